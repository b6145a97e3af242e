"""What a precision declares, and the registry every study, report and check reads its precisions from.

No torch import here: the report layer reads names and what they stand for. Loaders import their library when
called.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

STUDIES = ("llm", "vlm", "lvm")  # the quantization studies: language, vision-language, generative vision (denoiser)


@dataclass(frozen=True)
class Precision:
    """One precision a model can be loaded at: a float dtype, or a quantization method of a field library.

    ``transformers_config(skip_modules)`` is the ``quantization_config`` transformers loads it with (None for a float
    dtype); ``diffusers_config()`` is diffusers' counterpart for a denoiser, and ``quantize_denoiser_on_cpu(model)``
    quantizes a loaded fp32 denoiser where diffusers' quantizer refuses the CPU. ``load_dtype`` is the torch dtype of
    a float precision's weights, or of what a method leaves in floating point (``load_dtype_on(device)`` where that
    depends on the device). ``compute_dtype`` is the dtype its
    matmuls run in (which probed peak its MFU is held against); ``compute_dtype_on(device)`` where that depends on
    the device. Counted bytes: every parameter and buffer, each tensor subclass by the plain tensors it flattens to
    (``counting.py``), plus ``extra_tensors(weight)`` (state a library keeps on a weight, e.g. bitsandbytes' scales)
    and ``module_tensors(module)`` (state kept outside parameters and buffers); ``layer_types()`` names quantized
    layer classes that are not ``nn.Linear``. ``planned_linear_bytes(numel, rows)`` is the plan's formula for a
    linear layer's weight (``plan.py``)."""

    name: str  # the ``precision`` parameter's value
    stands_for: str  # the paper's name for it (its Table 9: bfloat16, float16, int4), or the plain kind otherwise
    library: str  # the field library doing the work
    description: str
    studies: frozenset[str]  # the quantization studies that offer it (``STUDIES``)
    devices: tuple[str, ...]  # devices it has been run on here
    load_dtype: str  # torch dtype name (``float32``, ``bfloat16``, ``float16``)
    compute_dtype: str  # fp32 / bf16 / fp16 / int8: the machine probe's dtypes
    kernel_notes: str = ""
    transformers_config: Callable[[list[str] | None], Any] | None = None
    diffusers_config: Callable[[], Any] | None = None
    quantize_denoiser_on_cpu: Callable[[Any], Any] | None = None
    compute_dtype_on: Callable[[str], str] | None = None
    load_dtype_on: Callable[[str], str] | None = None
    after_load: Callable[[Any, str, str], None] | None = None  # (model, device, cpu_4bit_kernel)
    extra_tensors: Callable[[Any], list] | None = None
    module_tensors: Callable[[Any], list] | None = None
    layer_types: Callable[[], tuple[type, ...]] | None = None
    planned_linear_bytes: Callable[[float, float], float] | None = None
    silenced_warnings: tuple[str, ...] = field(default=())  # messages it floods the output with, every call

    @property
    def is_float(self) -> bool:
        return self.transformers_config is None and self.diffusers_config is None

    def compute_dtype_for(self, device: str) -> str:
        return self.compute_dtype_on(device) if self.compute_dtype_on is not None else self.compute_dtype

    def load_dtype_for(self, device: str) -> str:
        return self.load_dtype_on(device) if self.load_dtype_on is not None else self.load_dtype

    def torch_dtype(self, device: str | None = None):
        """The torch dtype it loads at (on ``device``, where that depends on the device)."""
        import torch

        return getattr(torch, self.load_dtype if device is None else self.load_dtype_for(device))


_REGISTRY: dict[str, Precision] = {}


def register(precision: Precision) -> Precision:
    """Add a precision (its module calls this on import); a name is registered once."""
    if precision.name in _REGISTRY:
        raise ValueError(f"precision {precision.name!r} is already registered")
    unknown = set(precision.studies) - set(STUDIES)
    if unknown:
        raise ValueError(f"precision {precision.name!r}: studies {sorted(unknown)} are not among {STUDIES}")
    if "lvm" in precision.studies and not precision.is_float and precision.diffusers_config is None:
        raise ValueError(f"precision {precision.name!r} is offered to the lvm study without a diffusers config")
    _REGISTRY[precision.name] = precision
    return precision


def unregister(name: str) -> None:
    """Remove a precision (tests that register their own)."""
    del _REGISTRY[name]


def all_precisions() -> list[Precision]:
    """Every registered precision, in registration order (floats first, then each library's)."""
    return list(_REGISTRY.values())


def names(study: str | None = None) -> tuple[str, ...]:
    """The precisions a study offers (every one for None), in registration order."""
    return tuple(p.name for p in _REGISTRY.values() if study is None or study in p.studies)


def get(name: str, study: str | None = None) -> Precision:
    """The precision called ``name``; a ValueError naming the allowed values where ``study`` (or none) lacks it."""
    allowed = names(study)
    if name not in allowed:
        where = f" of the {study} quantization study" if study else ""
        raise ValueError(f"precision {name!r} is not one of the precisions{where}: "
                         f"{', '.join(repr(n) for n in allowed)}")
    return _REGISTRY[name]


def check(name: str, study: str) -> str:
    """``name`` if ``study`` offers it (a pydantic validator: the error names the allowed values)."""
    get(name, study)
    return name


def standing_for(paper_name: str) -> tuple[str, ...]:
    """The precisions that stand for a paper's name (e.g. ``int4``), the first registered first."""
    return tuple(p.name for p in _REGISTRY.values() if p.stands_for == paper_name)


def representative(paper_name: str) -> str | None:
    """The precision a paper's name is compared through: the first registered that stands for it."""
    found = standing_for(paper_name)
    return found[0] if found else None


def one_of_each_kind(device: str) -> tuple[str, ...]:
    """The first registered precision of each paper name that has run on ``device`` (e.g. bf16, int8, int4-nf4)."""
    kinds: dict[str, str] = {}
    for p in _REGISTRY.values():
        if device in p.devices:
            kinds.setdefault(p.stands_for, p.name)
    return tuple(kinds.values())


def resolve_claim_name(name: str) -> str:
    """A claim's subject or baseline (``book/paper/claims.csv`` keys on what a method stands for, e.g. ``int4``) as
    the precisions standing for it, ``|``-joined in registration order (the first one a model has decides); a name
    no precision stands for is kept (e.g. ``reference``, or one precision's own name)."""
    found = standing_for(name)
    return "|".join(found) if found else name
