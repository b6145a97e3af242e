"""``make plan``: every run of a profile held against a target GPU before any GPU is used.

Per grid point: the model is built from its real config on the meta device (shapes, no memory, no download: the
paper's hub configs ship in ``hub_configs/``), the study's own method is applied to it where it only reshapes the
model (``finetune.methods.build_method`` for the LoRA family, Freeze and full fine-tuning), and the cost model gives

* the predicted peak memory, in parts (weights, gradients, AdamW moments, activations, the logits' gradient, KV
  cache, the CUDA context): counted parameters times their bytes at the run's precision, and the activations traced:
  the study's forward (its model, the method applied) runs on the meta device with one and with two blocks for a
  short sequence, a ``saved_tensors_hooks`` counting the bytes autograd keeps for backward; the difference is a
  block's bytes per token, scaled to the run's blocks and tokens (gradient checkpointing: each block's input and
  one block recomputed);
* the FLOPs of the run (``cost.training_flops`` for the pretraining studies, ``model_costs`` for the fine-tuning and
  quantization ones, ``dit.analysis.dit_costs`` for DiT) and the time on the target: FLOPs at ``cost.ASSUMED_MFU`` of
  its vendor peak for the compute dtype, decode steps' bytes at ``ASSUMED_MBU`` of its bandwidth
  (``machine_probe.PUBLISHED_GPU_PEAKS``), loading and scoring overheads not counted;
* the assumptions behind both, printed with the run.

A run fits when its predicted memory is at most ``USABLE_SHARE`` of the target's memory (the rest: allocator
fragmentation, cuBLAS workspaces); a profile with a run that does not fit is refused, naming the run.

``plan --check`` runs the fine-tuning study's code path for one micro-batch on a small stand-in on the CPU
(:func:`standin_check`) and sets the plan's bytes for the stand-in beside the real ones.
"""
from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import precisions
from .cost import ASSUMED_MFU, training_flops
from .metrics import machine_probe, model_costs
from .params import RunSpec, expand, params_path
from .runner import gpus_of

HUB_CONFIGS = Path(__file__).parent / "hub_configs"
# target name -> (machine_probe's GPU name, memory in GB as sold)
TARGETS: dict[str, tuple[str, float]] = {"h100": ("H100", 80.0), "h200": ("H200", 141.0)}
USABLE_SHARE = 0.90  # of the target's memory a run may plan to use
CUDA_CONTEXT_BYTES = 0.6e9  # the CUDA context and cuBLAS workspace, before any tensor
ASSUMED_MBU = 0.60  # decode: share of the bandwidth a batched decode step reaches (weights + KV cache read once)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "float32": 4, "bfloat16": 2, "float16": 2}
VLM_ASSUMED_TOKENS = 128  # a question, its image's merged patches and the answer (Qwen2.5-VL's minimum image size)


class PlanError(ValueError):
    """A profile that will not fit its target, or a run the plan cannot model."""


@dataclass
class RunPlan:
    study: str
    label: str
    gpus: int
    model: str
    params: int
    memory_parts: dict[str, float]  # bytes
    flops: float | None
    seconds: float | None
    assumptions: list[str] = field(default_factory=list)
    trainable: int | None = None

    @property
    def memory_gb(self) -> float:
        return sum(self.memory_parts.values()) / 1e9


# --- models from their configs, without the hub -------------------------------------------------

def hub_config(model_id: str):
    """The ``transformers`` config of a hub id from ``hub_configs/<org>--<name>.json`` (architecture fields of its
    published config.json), or of an offline (``smollm2-135m-instruct``) or ``shape:`` model."""
    from transformers import AutoConfig, Qwen2Config

    from .models import OFFLINE_MODELS, SHAPE_MODELS, SHAPE_PREFIX

    if model_id.startswith(SHAPE_PREFIX):
        return Qwen2Config(**SHAPE_MODELS[model_id[len(SHAPE_PREFIX):]])
    if model_id in OFFLINE_MODELS:
        model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    path = HUB_CONFIGS / f"{model_id.replace('/', '--')}.json"
    if not path.exists():
        raise PlanError(f"no shipped config for {model_id!r}: add its config.json as {path} "
                        f"(shipped: {sorted(p.stem.replace('--', '/') for p in HUB_CONFIGS.glob('*.json'))})")
    fields = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("_name_or_path", "architectures")}
    return AutoConfig.for_model(**fields)


def meta_model(config, dtype: torch.dtype = torch.bfloat16):
    """The causal (or image-text-to-text) LM of ``config`` on the meta device: shapes only."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config, dtype=dtype)


def _text_config(config):
    """The language model's config of a vision-language config, else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _dims(config) -> tuple[int, int, int, int, int]:
    """(layers, hidden h, KV width kv, FFN width i, vocab) of a decoder config (ours or a transformers one)."""
    c = _text_config(config)
    layers = getattr(c, "num_hidden_layers", None) or c.n_layers
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_heads", None)
    if heads is None:  # an attention-free block (Mamba, RWKV): no keys or values
        kv = 0
    else:
        kv_heads = getattr(c, "num_key_value_heads", None) or getattr(c, "n_kv_heads", None) or heads
        kv = kv_heads * (getattr(c, "head_dim", None) or c.hidden_size // heads)
    inter = getattr(c, "intermediate_size", None) or 4 * c.hidden_size
    return layers, c.hidden_size, kv, inter, c.vocab_size


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of the distinct storages autograd saves for backward during a forward (the activations'
    size; the module's own parameters and buffers, which a matmul saves too, are not counted): on the meta device
    from shapes alone, on the CPU from real tensors."""

    def __init__(self, module: torch.nn.Module):
        self.bytes = 0
        self._seen = {t.untyped_storage()._cdata for t in [*module.parameters(), *module.buffers()]}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage._cdata not in self._seen:  # views and tensors saved twice share a storage
                self._seen.add(storage._cdata)
                self.bytes += storage.nbytes()
            return tensor

        super().__init__(pack, lambda tensor: tensor)


def saved_bytes(module: torch.nn.Module, forward: Callable[[], object]) -> int:
    """Bytes saved for backward by ``forward()``, a call of ``module``."""
    saved = SavedBytes(module)
    with saved:
        forward()
    return saved.bytes


@dataclass
class ActivationProfile:
    """Bytes saved for backward, fitted as ``const + layers x layer_const + tokens x (fixed + layers x per_layer)``:
    per token in each block (``per_layer``) and outside them (``fixed``: embeddings, head, logits, loss), and
    per forward whatever does not grow with the tokens (``layer_const``: e.g. DoRA's weight norms)."""

    per_layer: float
    fixed: float
    layer_const: float
    const: float

    def bytes(self, tokens: int, layers: int, checkpoint_bytes_per_layer: float | None = None) -> float:
        """At ``tokens`` tokens through ``layers`` blocks; with gradient checkpointing (``checkpoint_bytes_per_layer``
        per token: each block's input) the blocks keep their inputs and one block is recomputed at a time."""
        if checkpoint_bytes_per_layer is not None:
            return (self.const + self.layer_const
                    + tokens * (self.fixed + layers * checkpoint_bytes_per_layer + self.per_layer))
        return self.const + layers * self.layer_const + tokens * (self.fixed + layers * self.per_layer)


def trace_activations(forward_with: Callable[[int, int], tuple[torch.nn.Module, Callable[[], object]]],
                      tokens: int) -> ActivationProfile:
    """The study's forward traced on the meta device with two and three blocks (RWKV's init divides by the layers
    less one) at ``tokens`` and twice as many tokens (``forward_with(layers, tokens)``); the four counts fit
    :class:`ActivationProfile` exactly. Short sequences, so attention's score matrix (where kept; flash attention
    on a GPU keeps none) stays small."""
    (two, three), (two2, three2) = ([saved_bytes(*forward_with(n, t)) for n in (2, 3)] for t in (tokens, 2 * tokens))
    layer, layer2 = three - two, three2 - two2
    per_layer = (layer2 - layer) / tokens
    layer_const = layer - tokens * per_layer
    fixed = (two2 - two) / tokens - 2 * per_layer
    return ActivationProfile(per_layer=per_layer, fixed=fixed, layer_const=layer_const,
                             const=two - 2 * layer_const - tokens * (fixed + 2 * per_layer))


def on_cpu_uninitialised(model: torch.nn.Module) -> torch.nn.Module:
    """A meta model's storage allocated on the CPU with small random values (no per-module init: a trace counts
    bytes, and an MoE router needs distinct scores to route as it will, not ties)."""
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.02, generator=generator)
    return model


def logits_gradient_bytes(vocab: int, tokens: int) -> float:
    """The loss's float32 gradient of the logits, alive while backward starts (not a saved tensor)."""
    return tokens * vocab * 4


def weight_bytes(model, precision: str) -> tuple[float, str]:
    """Bytes of the model's weights at ``precision``: float ones at their width; a quantization method's linear
    weights (every linear layer but the head) by its registered formula (``Precision.planned_linear_bytes``, e.g.
    bitsandbytes int8: a byte per weight + a float32 scale per row), the rest in its load dtype."""
    method = precisions.get(precision)
    total = sum(p.numel() for p in model.parameters())
    if method.is_float:
        width = DTYPE_BYTES[precision]
        return total * width, f"{total / 1e9:.2f}B params x {width} bytes"
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    numel = sum(m.weight.numel() for m in linears)
    quantised = method.planned_linear_bytes(numel, sum(m.out_features for m in linears))
    rest = DTYPE_BYTES[method.load_dtype] * (total - numel)
    return quantised + rest, f"{numel / 1e9:.2f}B linear weights at {precision}, the rest {method.load_dtype}"


# --- target device ---------------------------------------------------------------------------

def target_peaks(target: str) -> dict:
    if target not in TARGETS:
        raise PlanError(f"--device-target {target!r} is not one of {sorted(TARGETS)}")
    return machine_probe.published_peaks(TARGETS[target][0])


def compute_seconds(flops: float, dtype: str, peaks: dict) -> float:
    """FLOPs at ``ASSUMED_MFU`` of the vendor's matmul peak of the dtype (fp32: TF32 is not assumed)."""
    return flops / (ASSUMED_MFU * peaks[{"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)])


# --- one planner per kind of study -----------------------------------------------------------

def plan_quantization(spec: RunSpec, peaks: dict) -> RunPlan:
    p = spec.run_params()
    config = hub_config(p.model)
    model = meta_model(config)
    weights, how = weight_bytes(model, p.precision)
    layers, h, kv, i, vocab = _dims(config)
    batch = getattr(p, "batch_size", 1)
    prompt = getattr(p, "prompt_tokens", VLM_ASSUMED_TOKENS)
    context = prompt + p.new_tokens
    window = getattr(p, "ppl_seq_len", None) or getattr(p, "ppl_tokens", None) or prompt
    kv_bytes = batch * context * model_costs.kv_bytes_per_token(_text_config(config), 2)
    parts = {"weights": weights, "kv-cache": kv_bytes,
             "logits": window * vocab * (2 + 4 + 4),  # a perplexity window's logits, upcast and log-softmax
             "forward-transient": window * (h + 3 * i) * 2,  # one layer's largest intermediates, no grad
             "cuda-context": CUDA_CONTEXT_BYTES}
    requests = p.warmup + p.min_iterations + p.tracked_requests
    forward = model_costs.flops_per_token(model, context / 2)
    scored = (getattr(p, "ppl_tokens", 0) or 0) + (getattr(p, "fidelity_tokens", 0) or 0)
    flops = forward * (scored + requests * batch * context)
    decode_bytes = model_costs.weight_bytes_read_per_token(model, weights) + kv_bytes
    seconds = (compute_seconds(forward * (scored + requests * batch * prompt), "bf16", peaks)
               + requests * p.new_tokens * decode_bytes / (ASSUMED_MBU * peaks["bandwidth"]))
    return RunPlan(spec.study, spec.label, gpus_of(spec), p.model, sum(t.numel() for t in model.parameters()), parts,
                   flops, seconds, [how, f"KV cache of {batch} x {context} tokens in bf16",
                                    f"timed requests ({requests}) + {scored} scored tokens; multiple-choice scoring, "
                                    "loading and the reference's pass not timed"])


TRACE_TOKENS = 64  # tokens per traced forward: short, so attention's score matrix (if kept) stays small


def with_layers(config, layers: int):
    """A copy of a transformers config (a vision-language one: its decoder) with ``layers`` decoder layers."""
    config = type(config).from_dict(config.to_dict())
    text = _text_config(config)
    text.num_hidden_layers = layers
    if isinstance(text.to_dict().get("layer_types"), list):  # a stored per-layer list (a derived one follows)
        text.layer_types = text.layer_types[:layers]
    return config


def _causal_lm_forward(model, tokens: int, device: str = "meta") -> tuple[torch.nn.Module, Callable[[], object]]:
    ids = torch.randint(0, 64, (1, tokens), device=device) if device != "meta" else \
        torch.zeros((1, tokens), dtype=torch.long, device=device)
    # as called (no mask, the default cache): transformers' mask checks call .item() otherwise, which meta lacks
    return model, lambda: model(input_ids=ids, labels=ids)


LORA_SHAPED = {"loraplus": "lora", "rslora": "lora", "pissa": "lora", "qlora": "lora"}


def _built_method(config, method: str, settings, dtype: torch.dtype = torch.float32):
    """The fine-tuning study's method on its base (``finetune.methods.load_base_model``: float32) on the meta device.
    PiSSA and QLoRA as LoRA: the same shapes (their SVD and 4-bit weights need real data)."""
    from .finetune import methods as ft

    built = ft.build_method(LORA_SHAPED.get(method, method), meta_model(config, dtype), settings)
    built.model.train()
    return built


@functools.lru_cache(maxsize=128)
def _method_on_meta(model_id: str, method: str, settings_json: str, length: int):
    """Counts, forward FLOPs per token at the mean causal context of ``length``, the backward's share and the traced
    activations of the study's method on the model, on the meta device."""
    from .finetune import methods as ft
    from .finetune.config import MethodSettings

    settings = MethodSettings.model_validate_json(settings_json)
    config = hub_config(model_id)
    built = _built_method(config, method, settings)
    # traced without checkpointing (checkpointing hides the blocks' tensors from the hooks); ActivationProfile applies it
    plain = settings.model_copy(update={"gradient_checkpointing": False, "freeze_trainable_layers": 1})  # of 2 or 3
    profile = trace_activations(lambda n, t: _causal_lm_forward(
        _built_method(with_layers(config, n), method, plain).model, t), TRACE_TOKENS)
    return (ft.trainable_parameters(built.model), model_costs.flops_per_token(built.model, (length + 1) / 2),
            model_costs.backward_share(built.model), profile)


def plan_finetune(spec: RunSpec, peaks: dict) -> RunPlan:
    p = spec.run_params()
    config = hub_config(p.model)
    length = getattr(p, "max_length", None) or VLM_ASSUMED_TOKENS
    # the LoRA variants build LoRA's shapes (LoRA+ and rsLoRA change the lr and the scale, PiSSA the init, QLoRA the
    # base's storage, counted below): one trace for all of them; the settings that change no shape left out
    shape_settings = p.method_settings().model_dump_json(
        exclude={"lr", "weight_decay", "loraplus_lr_ratio", "pissa_niter", "qlora_quant_type", "qlora_double_quant",
                 "qlora_compute_dtype", "alpha"})
    counts, forward_flops, share, profile = _method_on_meta(p.model, LORA_SHAPED.get(p.method, p.method),
                                                            shape_settings, length)
    compute = p.qlora_compute_dtype if p.method == "qlora" else "fp32"
    if p.method == "qlora":
        frozen, how = weight_bytes(meta_model(config), "int4-nf4")
        weights = frozen + counts["trainable"] * 4
    else:
        weights, how = counts["total"] * 4, f"{counts['total'] / 1e9:.2f}B params x 4 bytes (float32 base)"
    nproc = getattr(p, "nproc", 1)
    tokens = p.batch_size * length // nproc  # one rank's micro-batch, every sequence at max_length: an upper bound
    layers, hidden, _, _, vocab = _dims(config)
    checkpoint = hidden * DTYPE_BYTES[compute] if p.gradient_checkpointing else None
    parts = {"weights": weights, "gradients": counts["trainable"] * 4, "adamw-moments": 2 * counts["trainable"] * 4,
             "activations": profile.bytes(tokens, layers, checkpoint),
             "logits-gradient": logits_gradient_bytes(vocab, tokens), "cuda-context": CUDA_CONTEXT_BYTES}
    parts, spread = per_gpu(parts, p, counts["total"] * 4 / layers)
    per_token = (1 + share) * forward_flops + 2 * counts["trainable"]
    flops = per_token * tokens * nproc * p.grad_accum * p.steps
    return RunPlan(spec.study, spec.label, gpus_of(spec), p.model, counts["total"], parts, flops,
                   compute_seconds(flops, compute, peaks) / nproc,
                   [*spread, how, f"{p.method}: {counts['trainable'] / 1e6:.1f}M trainable (float32 grads and moments)",
                    f"micro-batch {p.batch_size} x {length} tokens"
                    + (f" ({p.batch_size // nproc} per GPU)" if nproc > 1 else "")
                    + (" (assumed: text and image tokens alike)" if not getattr(p, "max_length", None) else "")
                    + (", gradient checkpointing" if p.gradient_checkpointing else ""),
                    f"activations traced on the meta device ({profile.per_layer / 1e3:.0f} kB/token/layer)",
                    f"{p.steps} steps x {p.grad_accum} micro-batches; evaluation not timed"], counts["trainable"])


def per_gpu(parts: dict[str, float], p, block_bytes: float) -> tuple[dict[str, float], list[str]]:
    """One GPU's parts of a run spanning ``p.nproc`` GPUs (``distributed``; activations are already one rank's rows):
    DDP keeps the whole model and optimizer per GPU plus its gradient buckets (a copy of the gradients); FSDP
    shards weights, gradients and AdamW's moments over the GPUs and gathers the whole weights of two blocks at a
    time (the one computing and the one prefetched). Returns the parts and the assumption to print."""
    nproc, parallel = getattr(p, "nproc", 1), getattr(p, "parallel", "ddp")
    if nproc == 1:
        return parts, []
    out = dict(parts)
    if parallel == "fsdp":
        for name in ("weights", "gradients", "adamw-moments"):
            out[name] = parts[name] / nproc
        out["fsdp-gathered-blocks"] = 2 * block_bytes
        how = f"FSDP over {nproc} GPUs: weights, gradients and moments / {nproc}, two blocks gathered whole"
    else:
        out["ddp-gradient-buckets"] = parts["gradients"]
        how = f"DDP over {nproc} GPUs: the whole model and optimizer per GPU, plus gradient buckets"
    return out, [how + f"; time: compute / {nproc} (perfect scaling, communication not counted)"]


def plan_pretrain(spec: RunSpec, peaks: dict) -> RunPlan:
    from .arch.analysis import kv_cache_bytes_per_token, param_counts
    from .arch.model import EfficientDecoderForCausalLM
    from .metrics.roofline import training_memory_parts
    p = spec.run_params()
    dtype, dtype_bytes = getattr(torch, p.dtype), DTYPE_BYTES[p.dtype]
    if spec.study == "attention_free" and p.architecture != "transformer":
        config = p.hf_config()
        params = sum(t.numel() for t in meta_model(config).parameters())
        name, kv, layers = p.architecture, 0.0, config.num_hidden_layers

        def build(n):  # the study's builder (arch.attention_free.build), on the meta device
            from .arch.attention_free import build as build_af

            from transformers.initialization import no_init_weights

            with no_init_weights():  # shapes only: RWKV's init loops in Python for a minute
                return build_af(with_layers(config, n), seed=0, device="meta", dtype=dtype).train()
    else:
        config = p.decoder_config()
        params, name = param_counts(config)["total"], f"{p.size} {p.attention}/{p.position}/{p.ffn}"
        kv, layers = max(p.decode_contexts) * kv_cache_bytes_per_token(config, dtype_bytes), config.n_layers

        def build(n):
            with torch.device("meta"):
                model = EfficientDecoderForCausalLM(replace(config, n_layers=n)).to(dtype).train()
            return model if device == "meta" else on_cpu_uninitialised(model)
    # MoE routes by data (bincount, .tolist()), which the meta device cannot: traced on the CPU
    device = "cpu" if getattr(config, "ffn", None) == "moe" else "meta"
    tokens = p.batch_size * p.seq_len // p.nproc  # one rank's rows of the batch
    # a recurrence runs token by token and MoE on the CPU computes: a shorter trace (the fit is linear in tokens)
    trace_tokens = TRACE_TOKENS if device == "meta" and kv else TRACE_TOKENS // 4
    traced_in = p.dtype
    try:
        profile = trace_activations(lambda n, t: _causal_lm_forward(build(n), t, device), trace_tokens)
    except RuntimeError:
        if getattr(p, "architecture", None) != "mamba" or dtype == torch.float32:
            raise
        # transformers' torch scan multiplies float32 states by bf16 C and fails in bf16 (the CUDA kernels of
        # mamba-ssm, which the paper profile expects, do not): traced in float32, an upper bound
        dtype = torch.float32
        profile = trace_activations(lambda n, t: _causal_lm_forward(build(n), t, device), trace_tokens)
        traced_in = "float32 (transformers' torch scan fails in bf16)"
    fsdp_fp32 = p.nproc > 1 and p.parallel == "fsdp"  # FSDP keeps fp32 shards and gathers blocks in the dtype
    parts = {**training_memory_parts(params, 4 if fsdp_fp32 else dtype_bytes),
             "activations": profile.bytes(tokens, layers),
             "logits-gradient": logits_gradient_bytes(p.vocab_size, tokens), "kv-cache": kv,
             "cuda-context": CUDA_CONTEXT_BYTES}
    parts, spread = per_gpu(parts, p, params * dtype_bytes / layers)
    flops = training_flops(spec)
    return RunPlan(spec.study, spec.label, gpus_of(spec), name, params, parts, flops,
                   None if flops is None else compute_seconds(flops, p.dtype, peaks) / p.nproc,
                   [*spread, f"{params / 1e9:.2f}B params, weights/grads/moments in "
                             f"{'float32 shards' if fsdp_fp32 else p.dtype}",
                    f"batch {p.batch_size} x {p.seq_len} tokens" + (f", {p.batch_size // p.nproc} rows per rank"
                                                                     if p.nproc > 1 else ""),
                    f"activations traced on the {device} device in {traced_in} "
                    f"({profile.per_layer / 1e3:.0f} kB/token/layer)", "decoding and held-out perplexity not timed"])


def plan_dit(spec: RunSpec, peaks: dict) -> RunPlan:
    from .dit.analysis import dit_costs
    from .dit.model import DiT
    from .metrics.roofline import training_memory_parts
    p = spec.run_params()
    config = p.dit_config()
    costs = dit_costs(config, p.batch_size)
    dtype, dtype_bytes = getattr(torch, p.dtype), DTYPE_BYTES[p.dtype]
    params = costs["params_total"]

    device = "cpu" if config.ffn == "moe" else "meta"  # MoE routes by data: traced on the CPU

    def forward(n, tokens):  # flow matching's forward (dit.flow) of tokens / n_tokens images through n blocks
        images = tokens // config.n_tokens
        with torch.device("meta"):
            model = DiT(replace(config, n_layers=n)).to(dtype).train()
        model = model if device == "meta" else on_cpu_uninitialised(model)
        with torch.device(device):
            x = torch.zeros(images, config.in_channels, config.image_size, config.image_size, dtype=dtype)
            t, labels = torch.zeros(images, dtype=dtype), torch.zeros(images, dtype=torch.long)
        return model, lambda: model(x, t, labels)

    profile = trace_activations(forward, config.n_tokens)
    parts = {**training_memory_parts(params, dtype_bytes), "ema": params * dtype_bytes,
             "activations": profile.bytes(p.batch_size * config.n_tokens, config.n_layers),
             "cuda-context": CUDA_CONTEXT_BYTES}
    flops = p.steps * costs["flops_per_step"] + p.n_samples * p.sampling_steps * costs["flops_per_image"]
    return RunPlan(spec.study, spec.label, gpus_of(spec), p.model, params, parts, flops,
                   compute_seconds(flops, p.dtype, peaks),
                   [f"{params / 1e6:.0f}M params in {p.dtype} + EMA", f"micro-batch {p.batch_size} x "
                    f"{config.n_tokens} patches",
                    f"activations traced on the {device} device ({profile.per_layer / 1e3:.0f} kB/token/layer)",
                    f"{p.steps} steps + {p.n_samples} samples x {p.sampling_steps} Euler steps; FD not timed"])


PLANNERS = {"quantization": plan_quantization, "vlm_quantization": plan_quantization,
            "peft": plan_finetune, "vlm_peft": plan_finetune,
            "attention": plan_pretrain, "positional_encoding": plan_pretrain, "moe": plan_pretrain,
            "attention_free": plan_pretrain, "dit_attention": plan_dit, "dit_moe": plan_dit}


def plan_run(spec: RunSpec, target: str = "h100") -> RunPlan:
    if spec.study not in PLANNERS:
        raise PlanError(f"{spec.study}: no cost model for this study (planned: {sorted(PLANNERS)})")
    return PLANNERS[spec.study](spec, target_peaks(target))


def plan_profile(study: str, profile: str | None = None, target: str = "h100",
                 overrides: dict | None = None) -> tuple[list[RunPlan], list[str]]:
    """The plans of a profile's runs, and one line per run the plan could not build (the study's code path failed
    on the meta device, or no config ships for its model): a run that fails here fails on the GPU too."""
    plans, failures = [], []
    for spec in expand(params_path(study), profile, overrides):
        try:
            plans.append(plan_run(spec, target))
        except (PlanError, RuntimeError, NotImplementedError, ValueError, TypeError) as err:
            failures.append(f"{study} {spec.label}: {type(err).__name__}: {err}".splitlines()[0])
    return plans, failures


def too_big(plans: list[RunPlan], target: str) -> list[RunPlan]:
    limit = USABLE_SHARE * TARGETS[target][1]
    return [plan for plan in plans if plan.memory_gb > limit]


def refusal(plans: list[RunPlan], target: str) -> str:
    """What to change, per run that does not fit."""
    name, memory = TARGETS[target][0], TARGETS[target][1]
    lines = [f"{len(plans)} run(s) will not fit one {name} ({memory:.0f} GB; {USABLE_SHARE:.0%} usable):"]
    for plan in plans:
        biggest = max(plan.memory_parts, key=plan.memory_parts.get)
        hint = {"activations": "lower batch_size or the sequence length, or set gradient_checkpointing: true",
                "logits": "lower batch_size or the sequence length",
                "adamw-moments": "a LoRA-family method, or a smaller model",
                "weights": "a smaller model or a 4-bit precision"}.get(biggest, "a smaller model or batch")
        other = " or --device-target h200" if target == "h100" and plan.memory_gb <= USABLE_SHARE * 141 else ""
        lines.append(f"  {plan.study} {plan.label}: predicted {plan.memory_gb:.1f} GB, largest part {biggest} "
                     f"{plan.memory_parts[biggest] / 1e9:.1f} GB; change: {hint}{other}")
    return "\n".join(lines)


def format_plan(plans: list[RunPlan], target: str) -> str:
    """One line per run (memory in GB, time on the target, FLOPs), then its parts and assumptions."""
    name, memory = TARGETS[target]
    out = []
    for plan in plans:
        time = "n/a" if plan.seconds is None else f"{plan.seconds / 60:.1f} min"
        flops = "n/a" if plan.flops is None else f"{plan.flops:.3g}"
        fits = "fits" if plan.memory_gb <= USABLE_SHARE * memory else "DOES NOT FIT"
        on = f"{plan.gpus} x {name}" if plan.gpus > 1 else name
        out.append(f"{plan.study}\t{plan.label}\t{plan.memory_gb:.2f} GB/GPU x {plan.gpus}\t{time} on {on}\t"
                   f"{flops} FLOPs\t{fits}")
        out.append("    memory: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in plan.memory_parts.items() if v))
        out.append("    assumes: " + "; ".join(plan.assumptions))
    total = [p.seconds for p in plans if p.seconds is not None]
    out.append(f"total: {len(plans)} runs, {sum(total) / 60:.1f} min of compute on {name} at {ASSUMED_MFU:.0%} MFU"
               f" (loading, scoring and evaluation not counted)")
    return "\n".join(out)


# --- the stand-in check: the study's code path on the CPU, predicted against measured ------------------

def standin_config(config, layers: int = 2, hidden: int = 64, vocab: int = 512):
    """A small config of the same architecture: ``layers`` layers, width ``hidden``, the GQA and the FFN's width
    ratios kept."""
    c = config.to_dict()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    new_heads = 4
    c.update(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=new_heads,
             num_key_value_heads=max(1, new_heads * kv_heads // heads), head_dim=hidden // new_heads,
             intermediate_size=int(hidden * config.intermediate_size / config.hidden_size), vocab_size=vocab)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "layer_types"):
        c.pop(key, None)
    return type(config).from_dict(c)


def standin_check(spec: RunSpec, tokens: int = TRACE_TOKENS, batch: int = 2) -> dict:
    """One micro-batch of the fine-tuning study's code path on a stand-in of the run's model on the CPU: the method
    built by ``finetune.methods.build_method``, a forward, a backward and the method's AdamW step. The plan's
    predictions for the stand-in (states from counts; activations traced on the meta device with one and two
    layers, scaled) against what the CPU holds (the states' bytes, the bytes saved for backward)."""
    from .finetune import methods as ft
    p = spec.run_params()
    config = standin_config(hub_config(p.model))
    settings = p.method_settings().model_copy(update={"gradient_checkpointing": False})
    profile = trace_activations(lambda n, t: _causal_lm_forward(
        _built_method(with_layers(config, n), p.method, settings).model, t), tokens)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    built = ft.build_method("lora" if p.method in ("qlora", "pissa") else p.method,  # real data: LoRA+ and rsLoRA
                            AutoModelForCausalLM.from_config(config, dtype=torch.float32), settings)
    built.model.train()
    ids = torch.randint(0, config.vocab_size, (batch, tokens))
    activations = saved_bytes(built.model, lambda: built.model(input_ids=ids, labels=ids).loss.backward())
    optimizer = built.make_optimizer()  # the study's AdamW over the method's parameter groups
    optimizer.step()
    trainable = [t for t in built.model.parameters() if t.requires_grad]
    states = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.dim())
    measured_states = (sum(t.numel() * t.element_size() for t in built.model.parameters())
                       + sum(t.grad.numel() * t.grad.element_size() for t in trainable) + states)
    counts = ft.trainable_parameters(built.model)
    return {"run": spec.label, "predicted_states_bytes": counts["total"] * 4 + 3 * counts["trainable"] * 4,
            "measured_states_bytes": measured_states,
            "predicted_activation_bytes": profile.bytes(batch * tokens, config.num_hidden_layers),
            "measured_activation_bytes": activations}


def main(axis_studies: list[str], profile: str | None, target: str, overrides: dict | None = None,
         check: bool = False) -> int:
    """Print the plan of every run; 2 when a run will not fit or its code path fails, 0 otherwise."""
    plans, failures = [], []
    for study in axis_studies:
        study_plans, study_failures = plan_profile(study, profile, target, overrides)
        plans += study_plans
        failures += study_failures
    print(format_plan(plans, target))
    if check:
        for study in axis_studies:
            if study != "peft":
                continue
            for spec in expand(params_path(study), profile, overrides):
                r = standin_check(spec)
                print(f"stand-in {study} {r['run']}: states {r['predicted_states_bytes'] / 1e6:.2f} MB predicted, "
                      f"{r['measured_states_bytes'] / 1e6:.2f} MB measured; activations "
                      f"{r['predicted_activation_bytes'] / 1e6:.2f} MB predicted (meta trace), "
                      f"{r['measured_activation_bytes'] / 1e6:.2f} MB saved for backward on the CPU")
    bad = too_big(plans, target)
    if bad:
        print(f"error: {refusal(bad, target)}", file=sys.stderr)
    if failures:
        print("error: the study's code path failed for:\n  " + "\n  ".join(failures), file=sys.stderr)
    return 2 if bad or failures else 0
