"""The bytes a loaded model's tensors really hold, whatever precision it was loaded at.

Every parameter and buffer of every module is counted once (tied weights too). A tensor subclass (torchao's
``Int8Tensor``, quanto's ``WeightQBitsTensor``...) counts as the plain tensors it flattens to (``__tensor_flatten__``,
recursively), not at the dtype it presents; each registered precision adds what its library keeps beside a weight
(``extra_tensors``: bitsandbytes' scales) or outside parameters and buffers (``module_tensors``). Nothing here is
derived from a bits-per-weight formula.
"""
from __future__ import annotations

from collections import Counter

import torch

from .registry import all_precisions


def plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``tensor``'s storage: itself, or those its subclass flattens to."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [plain for name in names if isinstance(inner := getattr(tensor, name), torch.Tensor)
            for plain in plain_tensors(inner)]


def weight_tensors(weight: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a weight holds: its own storage and what any registered precision keeps beside it."""
    extras = [t for p in all_precisions() if p.extra_tensors is not None for t in p.extra_tensors(weight)]
    return [plain for t in [weight.data if isinstance(weight, torch.nn.Parameter) else weight, *extras]
            for plain in plain_tensors(t)]


def is_linear_weight(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> bool:
    return name == "weight" and tensor.dim() == 2 and not isinstance(module, torch.nn.Embedding)


def count_model_bytes(model: torch.nn.Module) -> dict:
    """Count the bytes the model's tensors really hold, by storage dtype; ``linear_weight_bytes``: those of
    two-dimensional weights but embeddings (with their scales), and of registered quantized layers' state."""
    seen: set[tuple] = set()
    by_dtype: Counter = Counter()
    linear_weight_bytes = 0
    module_state = [p.module_tensors for p in all_precisions() if p.module_tensors is not None]

    def add(tensor: torch.Tensor, is_linear_weight: bool = False) -> None:
        nonlocal linear_weight_bytes
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)  # tied weights share storage
        if key in seen:
            return
        seen.add(key)
        n = tensor.numel() * tensor.element_size()
        by_dtype[str(tensor.dtype).replace("torch.", "")] += n
        if is_linear_weight:
            linear_weight_bytes += n

    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            for tensor in weight_tensors(param):
                add(tensor, is_linear_weight(module, pname, param))
        for bname, buf in module.named_buffers(recurse=False):
            for tensor in weight_tensors(buf):
                add(tensor, is_linear_weight(module, bname, buf) and _is_quantized_layer(module))
        for state in module_state:
            for tensor in state(module):
                for plain in plain_tensors(tensor):
                    add(plain, True)
    return {
        "total_bytes": int(sum(by_dtype.values())),
        "linear_weight_bytes": int(linear_weight_bytes),
        "bytes_by_dtype": dict(by_dtype),
    }


def _quantized_layer_types() -> tuple[type, ...]:
    return tuple(t for p in all_precisions() if p.layer_types is not None for t in p.layer_types())


def _is_quantized_layer(module: torch.nn.Module) -> bool:
    return isinstance(module, _quantized_layer_types())


def linear_layer_kinds(model: torch.nn.Module) -> dict[str, int]:
    """How many linear layers of each class the model holds (proves int4 really is 4-bit): ``nn.Linear`` and its
    subclasses, and registered quantized layer classes that are not ``nn.Linear``; a plain ``nn.Linear`` whose weight
    is a tensor subclass (torchao) is named with it, e.g. ``Linear[Int8Tensor]``."""
    counts: Counter = Counter()
    quantized = _quantized_layer_types()
    for module in model.modules():
        if not isinstance(module, (torch.nn.Linear, *quantized)):
            continue
        name = type(module).__name__
        weight = getattr(module, "weight", None)
        if type(module) is torch.nn.Linear and len(plain_tensors(weight)) > 1:
            name += f"[{type(weight).__name__}]"
        counts[name] += 1
    return dict(counts)
