"""optimum-quanto: int4 weight-only linear layers, through transformers' ``QuantoConfig``.

quanto swaps each linear layer for a ``QLinear`` whose weight is a ``WeightQBitsTensor``: 4-bit data packed two per
byte, with a scale and a shift per group of 128 weights in the activation dtype (bf16 here: the rest of the model is
loaded in bf16). On the CPU its product dequantizes the weight to bf16 and multiplies in bf16 (quanto's optimized
4-bit kernels are CUDA ones); its CUDA path has not been run here.
"""
from __future__ import annotations

from .registry import Precision, register

GROUP_SIZE = 128  # quanto's default group of a 4-bit weight


def _transformers_int4(skip_modules):
    from transformers import QuantoConfig

    return QuantoConfig(weights="int4", modules_to_not_convert=skip_modules)


register(Precision(
    name="int4-quanto", stands_for="int4", library="optimum-quanto",
    description="optimum-quanto int4 weight-only linear layers (groups of 128, bf16 scale and shift), bf16 compute",
    studies=frozenset({"llm"}), devices=("cpu",), load_dtype="bfloat16", compute_dtype="bf16",
    kernel_notes="on the CPU each product dequantizes the 4-bit weight to bf16, then a bf16 matmul",
    transformers_config=_transformers_int4,
    planned_linear_bytes=lambda numel, rows: numel / 2 + 2 * 2 * numel / GROUP_SIZE))
