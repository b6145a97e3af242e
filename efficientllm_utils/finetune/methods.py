"""Fine-tuning methods, each a thin builder over ``peft`` (nothing re-implemented).

Every builder takes a loaded causal LM and :class:`~.config.MethodSettings` and
returns a :class:`BuiltMethod` ``(model, param_groups, description)``: the model
ready to train (only the method's parameters require grad) and the optimizer
parameter groups, each with its own ``lr``, for the one training loop's AdamW
(:mod:`..training`, through :mod:`.train`).

========= ==================================================================================
lora      ``LoraConfig(r, lora_alpha, lora_dropout, target_modules="all-linear")``; W + (alpha/r) BA
loraplus  the LoRA adapter, optimiser groups from ``peft.optimizers.create_loraplus_optimizer``:
          B matrices get ``lr * loraplus_lr_ratio``
rslora    LoRA with ``use_rslora=True``: scaling alpha/sqrt(r) instead of alpha/r
dora      LoRA with ``use_dora=True``: weight-decomposed, a trainable magnitude per output row
pissa     LoRA with ``init_lora_weights="pissa_niter_n"`` (or ``"pissa"``): A, B from the top-r
          singular triplets of W, the base keeps the residual
freeze    no adapter: only the last ``freeze_trainable_layers`` decoder layers train, every
          parameter inside them (attention q/k/v/o, MLP gate/up/down, both RMSNorms), as
          LLaMA-Factory's ``finetuning_type: freeze`` with ``freeze_trainable_modules: all``
          and no ``freeze_extra_modules``; embeddings, final norm and the (tied) head stay frozen
full      every parameter trains
loha      ``LoHaConfig``: Hadamard product of two low-rank pairs (any module: ``build_module_method``)
lokr      ``LoKrConfig``: Kronecker product with a low-rank factor (any module: ``build_module_method``)
glora     ``GloraConfig`` (peft's GLoRA, Chavan et al. 2023): W0 + W0*A + B, b0 + b0*D + E + W0 C, the supports
          of A..E from :class:`~.config.GloraSettings` (any module: ``build_module_method``)
qlora     the base loaded in 4-bit (bitsandbytes NF4, double quantisation), then
          ``peft.prepare_model_for_kbit_training`` and the LoRA adapter; on the CPU every 4-bit layer
          is pinned to bitsandbytes' dequantising kernel (see ``efficientllm_utils.cpu_4bit``)
========= ==================================================================================

"all-linear" is peft's shorthand; like LLaMA-Factory's ``lora_target: all`` it skips the
output head. All builders upcast the trainable parameters to float32.
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..params import one_of
from ..training import adamw
from .config import METHOD_NAMES, GloraSettings, MethodSettings

PISSA_INIT_ATTR = "efficientllm_pissa_init_dir"  # where a PiSSA model keeps its initial adapter


@dataclass
class BuiltMethod:
    """A model ready to fine-tune. Unpacks as ``model, param_groups, description``."""

    model: torch.nn.Module
    param_groups: list[dict]
    description: str
    method: str
    settings: MethodSettings
    extra: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.model, self.param_groups, self.description))

    def make_optimizer(self, betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        """The training loop's AdamW over the method's groups (``training.adamw``)."""
        return adamw(self.param_groups, betas, eps)


# --- parameter counting --------------------------------------------------------------

def _unique_params(model: torch.nn.Module):
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        yield name, p


def _numel(p: torch.Tensor) -> int:
    """Elements a parameter stands for (a packed bitsandbytes 4-bit weight holds two per byte)."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()


def trainable_parameters(model: torch.nn.Module) -> dict:
    """Trainable and total parameter counts (tied weights once; 4-bit weights by logical size)."""
    trainable = total = 0
    for _, p in _unique_params(model):
        n = _numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return {"trainable": trainable, "total": total, "share": trainable / total if total else float("nan")}


def linear_targets(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (in_features, out_features)}`` of the linear layers a LoRA adapter wraps."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            out[name] = (base.in_features, base.out_features)
    return out


def expected_lora_parameters(model: torch.nn.Module, rank: int, dora: bool = False) -> int:
    """r*(in+out) summed over the adapted layers (+ out per layer for DoRA's magnitude)."""
    return sum(rank * (i + o) + (o if dora else 0) for i, o in linear_targets(model).values())


# --- helpers ---------------------------------------------------------------------------

def _upcast_trainable(model: torch.nn.Module) -> None:
    for _, p in _unique_params(model):
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def _groups(model: torch.nn.Module, settings: MethodSettings) -> list[dict]:
    params = [p for _, p in _unique_params(model) if p.requires_grad]
    if not params:
        raise ValueError("the method left no parameter trainable")
    return [{"params": params, "lr": settings.lr, "weight_decay": settings.weight_decay}]


def is_4bit(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False)) or any(
        type(m).__name__ == "Linear4bit" for m in model.modules())


def _check_float_base(model: torch.nn.Module, method: str) -> None:
    if is_4bit(model) or getattr(model, "is_loaded_in_8bit", False):
        raise ValueError(f"{method} needs a floating-point base model; only qlora takes a quantised one")


def lora_config(settings: MethodSettings, **overrides):
    from peft import LoraConfig, TaskType

    kwargs = dict(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def _peft(model, settings: MethodSettings, **overrides):
    from peft import get_peft_model

    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, lora_config(settings, **overrides))
    _upcast_trainable(peft_model)
    return peft_model


def _lora_words(settings: MethodSettings, scaling: str) -> str:
    return (f"r={settings.rank}, alpha={settings.alpha:g} ({scaling}), dropout={settings.dropout:g}, "
            f"targets={settings.target_modules}")


# --- builders --------------------------------------------------------------------------

def _peft_method(model, settings: MethodSettings, name: str, desc: str, **peft_overrides) -> BuiltMethod:
    """A LoRA-family method that peft builds from its config alone (``peft_overrides``), one group per kind."""
    _check_float_base(model, name)
    m = _peft(model, settings, **peft_overrides)
    return BuiltMethod(m, _groups(m, settings), desc, name, settings)


def build_lora(model, settings: MethodSettings) -> BuiltMethod:
    return _peft_method(model, settings, "lora", f"LoRA: {_lora_words(settings, 'scale alpha/r')}, lr={settings.lr:g}")


def build_loraplus(model, settings: MethodSettings) -> BuiltMethod:
    from peft.optimizers import create_loraplus_optimizer

    _check_float_base(model, "loraplus")
    m = _peft(model, settings)
    # peft decides the groups (A: lr, B and 1-d params: lr*ratio); we keep them and let the
    # shared loop build its own AdamW over them.
    optimizer = create_loraplus_optimizer(
        m, torch.optim.AdamW, lr=settings.lr, loraplus_lr_ratio=settings.loraplus_lr_ratio,
        loraplus_weight_decay=settings.weight_decay)
    groups = [{"params": list(g["params"]), "lr": g["lr"], "weight_decay": g["weight_decay"]}
              for g in optimizer.param_groups if g["params"]]
    desc = (f"LoRA+: {_lora_words(settings, 'scale alpha/r')}, lr(A)={settings.lr:g}, "
            f"lr(B)={settings.lr * settings.loraplus_lr_ratio:g} (ratio {settings.loraplus_lr_ratio:g})")
    return BuiltMethod(m, groups, desc, "loraplus", settings)


def build_rslora(model, settings: MethodSettings) -> BuiltMethod:
    desc = f"rsLoRA: {_lora_words(settings, 'scale alpha/sqrt(r)')}, lr={settings.lr:g}"
    return _peft_method(model, settings, "rslora", desc, use_rslora=True)


def build_dora(model, settings: MethodSettings) -> BuiltMethod:
    desc = (f"DoRA: {_lora_words(settings, 'scale alpha/r')}, + a magnitude vector per adapted layer, "
            f"lr={settings.lr:g}")
    return _peft_method(model, settings, "dora", desc, use_dora=True)


def build_pissa(model, settings: MethodSettings) -> BuiltMethod:
    _check_float_base(model, "pissa")
    init = "pissa" if settings.pissa_niter is None else f"pissa_niter_{settings.pissa_niter}"
    m = _peft(model, settings, init_lora_weights=init)
    # Keep the initial adapter: save_adapter converts the trained PiSSA adapter into a plain
    # LoRA adapter (rank 2r) that applies to the *original* base weights.
    init_dir = tempfile.mkdtemp(prefix="pissa_init_")
    m.peft_config["default"].init_lora_weights = True
    m.save_pretrained(init_dir)
    m.peft_config["default"].init_lora_weights = init
    setattr(m, PISSA_INIT_ATTR, init_dir)
    weakref.finalize(m, shutil.rmtree, init_dir, True)  # removed with the model at the latest
    desc = (f"PiSSA: {_lora_words(settings, 'scale alpha/r')}, init {init!r} (A,B = top-r singular "
            f"triplets of W; base keeps the residual), lr={settings.lr:g}")
    return BuiltMethod(m, _groups(m, settings), desc, "pissa", settings, {"pissa_init_dir": init_dir})


def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer's decoder layers (``model.model.layers`` for Llama-like models; a vision-language model's
    language model's, ``model.model.language_model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        layers = getattr(getattr(inner, "language_model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers at model.model[.language_model].layers")
    return layers


def freeze_layer_ids(num_layers: int, trainable_layers: int) -> list[int]:
    """LLaMA-Factory's choice: last n layers if n > 0, first |n| if n < 0."""
    if trainable_layers == 0:
        raise ValueError("freeze_trainable_layers must be non-zero")
    if trainable_layers > 0:
        return list(range(max(0, num_layers - trainable_layers), num_layers))
    return list(range(min(-trainable_layers, num_layers)))


def build_freeze(model, settings: MethodSettings) -> BuiltMethod:
    _check_float_base(model, "freeze")
    layers = decoder_layers(model)
    ids = freeze_layer_ids(len(layers), settings.freeze_trainable_layers)
    model.requires_grad_(False)
    for i in ids:
        layers[i].requires_grad_(True)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _upcast_trainable(model)
    names = sorted({n.split(f".{ids[0]}.", 1)[-1] for n, p in model.named_parameters()
                    if p.requires_grad and f".{ids[0]}." in n})
    desc = (f"Freeze: train decoder layers {ids[0]}..{ids[-1]} of {len(layers)} (all their parameters: "
            f"{', '.join(names)}); embeddings, final norm and head frozen, lr={settings.lr:g}")
    return BuiltMethod(model, _groups(model, settings), desc, "freeze", settings, {"layer_ids": ids})


def build_full(model, settings: MethodSettings) -> BuiltMethod:
    _check_float_base(model, "full")
    model.requires_grad_(True)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _upcast_trainable(model)
    desc = f"Full fine-tuning: every parameter (tied embedding/head once), lr={settings.lr:g}"
    return BuiltMethod(model, _groups(model, settings), desc, "full", settings)


def build_qlora(model, settings: MethodSettings) -> BuiltMethod:
    from peft import get_peft_model, prepare_model_for_kbit_training

    if not is_4bit(model):
        raise ValueError("qlora needs a base loaded in 4-bit: use load_base_model(source, 'qlora', settings)")
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    m = get_peft_model(model, lora_config(settings))
    _upcast_trainable(m)
    qtype = getattr(getattr(model.config, "quantization_config", None), "bnb_4bit_quant_type", "nf4")
    desc = (f"QLoRA: 4-bit {qtype} base (bitsandbytes), prepare_model_for_kbit_training, "
            f"{_lora_words(settings, 'scale alpha/r')}, lr={settings.lr:g}")
    return BuiltMethod(m, _groups(m, settings), desc, "qlora", settings)


METHODS: dict[str, Callable[..., BuiltMethod]] = {
    "lora": build_lora,
    "loraplus": build_loraplus,
    "rslora": build_rslora,
    "dora": build_dora,
    "pissa": build_pissa,
    "freeze": build_freeze,
    "full": build_full,
    "qlora": build_qlora,
}
assert tuple(METHODS) == METHOD_NAMES


def check_method(name: str) -> str:
    return one_of(name, METHODS, "fine-tuning method")


def build_method(name: str, model, settings: MethodSettings) -> BuiltMethod:
    """``METHODS[name](model, settings)`` with a clear error for an unknown name."""
    return METHODS[check_method(name)](model, settings)


# --- adapters on any torch module (the diffusion denoisers) -------------------------------

def _lycoris_settings(settings: MethodSettings) -> dict:
    """LoHa's and LoKr's settings: ``r``, ``alpha``, dropout on the rank dimension, the target modules."""
    return dict(r=settings.rank, alpha=settings.alpha, rank_dropout=settings.dropout,
                target_modules=settings.target_modules)


def loha_config(settings: MethodSettings, **overrides):
    """LoHa (Hadamard product of two low-rank pairs) over the LyCORIS settings."""
    from peft import LoHaConfig

    return LoHaConfig(**(_lycoris_settings(settings) | overrides))


def lokr_config(settings: MethodSettings, **overrides):
    """LoKr (Kronecker product with a low-rank factor) over the LyCORIS settings."""
    from peft import LoKrConfig

    return LoKrConfig(**(_lycoris_settings(settings) | overrides))


def glora_config(settings: MethodSettings, glora: GloraSettings | None = None, **overrides):
    """GLoRA (peft's ``GloraConfig``): every target gets the same supports (``glora``; low-rank ones of rank
    ``r``), initialised as a no-op (the low-rank paths' down factor, vectors and scalars at zero)."""
    from peft import GloraConfig

    glora = glora or GloraSettings()
    kwargs = dict(r=settings.rank, target_modules=settings.target_modules, config_A_B=glora.glora_ab,
                  config_C=glora.glora_c, config_D_E=glora.glora_de)
    return GloraConfig(**(kwargs | overrides))


# method -> (peft config builder, its overrides, scaling words); ``task_type=None``: a plain module
MODULE_ADAPTERS = {
    "lora": (lora_config, {}, "LoRA, scale alpha/r"),
    "rslora": (lora_config, {"use_rslora": True}, "rsLoRA, scale alpha/sqrt(r)"),
    "dora": (lora_config, {"use_dora": True}, "DoRA, scale alpha/r, + a magnitude per output row"),
    "loha": (loha_config, {}, "LoHa, (B1 A1) * (B2 A2), scale alpha/r"),
    "lokr": (lokr_config, {}, "LoKr, C kron (B A), scale alpha/r"),
    "glora": (glora_config, {}, "GLoRA, W0 + W0*A + B and b0 + b0*D + E + W0 C"),
}
MODULE_METHOD_NAMES = (*MODULE_ADAPTERS, "full")


def build_module_method(name: str, model: torch.nn.Module, settings: MethodSettings,
                        glora: GloraSettings | None = None) -> BuiltMethod:
    """A method of :data:`MODULE_METHOD_NAMES` on any torch module (not a causal LM: no task type), e.g. a
    diffusers denoiser; ``settings.target_modules`` names the wrapped layers, ``glora`` GLoRA's supports (its
    defaults when None)."""
    if name == "full":
        return build_full(model, settings)
    if name not in MODULE_ADAPTERS:
        raise ValueError(f"unknown method {name!r} for a module; allowed: {', '.join(MODULE_METHOD_NAMES)}")
    from peft import get_peft_model

    _check_float_base(model, name)
    make_config, overrides, words = MODULE_ADAPTERS[name]
    if make_config is lora_config:
        overrides = {**overrides, "task_type": None}
    if make_config is glora_config:
        glora = glora or GloraSettings()
        config = glora_config(settings, glora, **overrides)
        how = (f"A,B {glora.glora_ab}, C {glora.glora_c}, D,E {glora.glora_de} on every target (no search), "
               f"r={settings.rank}")
    else:
        config = make_config(settings, **overrides)
        how = f"r={settings.rank}, alpha={settings.alpha:g}, dropout={settings.dropout:g}"
    m = get_peft_model(model, config)
    _upcast_trainable(m)
    desc = f"{words}: {how}, targets={settings.target_modules}, lr={settings.lr:g}"
    return BuiltMethod(m, _groups(m, settings), desc, name, settings,
                       {"glora": glora} if make_config is glora_config else {})


# --- loading the base ------------------------------------------------------------------

def qlora_quantization_config(settings: MethodSettings, skip_modules: list[str] | None = None):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, llm_int8_skip_modules=skip_modules,
        bnb_4bit_quant_type=settings.qlora_quant_type,
        bnb_4bit_use_double_quant=settings.qlora_double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16 if settings.qlora_compute_dtype == "bf16" else torch.float32,
    )


def load_base_model(source: str, method: str, settings: MethodSettings, device: str = "cpu"):
    """The base causal LM a method starts from: fp32 weights on the CPU, bf16 on a GPU, or 4-bit for ``qlora``.

    ``source`` is what :func:`efficientllm_utils.models.resolve_source` takes (an offline
    model name, a local directory or a hub id). Returns the model only (in eval mode).
    """
    from ..models import auto_model_class, resolve_source, unquantized_modules

    check_method(method)
    path = resolve_source(source)
    auto_class = auto_model_class(path)  # a vision-language model: its language model is what QLoRA quantises
    if method == "qlora":
        from ..cpu_4bit import pin_kernel

        model = auto_class.from_pretrained(
            path, quantization_config=qlora_quantization_config(settings, unquantized_modules(path)),
            dtype=torch.bfloat16 if settings.qlora_compute_dtype == "bf16" else torch.float32,
            device_map={"": device})
        if device == "cpu":
            # One kernel in every phase (training, scoring, merging, a reloaded adapter) on every CPU: the
            # dequantising one, the only one with a backward and the compute dtype asked for (cpu_4bit.py).
            pin_kernel(model, "dequantize")
    else:
        # on the CPU fp32 (the published CPU runs); on a GPU bf16 weights, as the paper trains: the builders keep
        # fp32 masters of the trainable parameters and the loop autocasts to bf16 (finetune.train.autocast_dtype)
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
        model = auto_class.from_pretrained(path, dtype=dtype, device_map={"": device})  # no full copy in host RAM
    return model.eval()


def cleanup(built: BuiltMethod) -> None:
    """Remove the temporary files a builder made (PiSSA's initial adapter)."""
    d = built.extra.get("pissa_init_dir")
    if d:
        shutil.rmtree(d, ignore_errors=True)
