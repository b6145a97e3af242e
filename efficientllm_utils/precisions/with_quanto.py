"""optimum-quanto: int4 weight-only linear layers, through transformers' ``QuantoConfig``.

quanto swaps each linear layer for a ``QLinear`` whose weight is a ``WeightQBitsTensor``: 4-bit data packed two per
byte, with a scale and a shift per group of 128 weights in the activation dtype (fp32 here: the rest of the model is
loaded in fp32, as bitsandbytes' CPU paths compute). On the CPU its product dequantizes the weight to fp32 and
multiplies in fp32 (quanto's optimized 4-bit kernels are CUDA ones; in bf16 it ran 9.2x slower on a CPU without
AVX512-BF16: 4286 against 464 ms a 64-token forward of SmolLM2-135M, timed once with other work running beside it);
its CUDA path has not been run here.
"""
from __future__ import annotations

from .registry import Precision, register

GROUP_SIZE = 128  # quanto's default group of a 4-bit weight


def _transformers_int4(skip_modules):
    from transformers import QuantoConfig

    return QuantoConfig(weights="int4", modules_to_not_convert=skip_modules)


register(Precision(
    name="int4-quanto", stands_for="int4", library="optimum-quanto",
    description="optimum-quanto int4 weight-only linear layers (groups of 128, fp32 scale and shift), fp32 compute",
    studies=frozenset({"llm"}), devices=("cpu",), load_dtype="float32", compute_dtype="fp32",
    kernel_notes="on the CPU each product dequantizes the 4-bit weight to fp32, then an fp32 matmul",
    transformers_config=_transformers_int4,
    planned_linear_bytes=lambda numel, rows: numel / 2 + 2 * 4 * numel / GROUP_SIZE))
