"""torchao: int8 weight-only linear layers, through transformers' ``TorchAoConfig``.

torchao's ``Int8WeightOnlyConfig`` swaps each linear weight for an ``Int8Tensor`` (a tensor subclass: int8 data, a
float32 scale and an int8 zero point per output row) and leaves the layer an ``nn.Linear``. Its weight-only product
casts the int8 weight to the activation's dtype and multiplies in it, then scales each output column
(``aten.linear`` of ``Int8Tensor``): here the activations are fp32, the rest of the model is loaded in fp32, as
bitsandbytes' CPU paths compute (in bf16 it ran 3.0x slower on a CPU without AVX512-BF16: 980 against 328 ms a
64-token forward of SmolLM2-135M, timed once (5 forwards after one warm-up) with other work running beside it, with the
same KL to fp32 within 0.001). Runs on
the CPU with torch 2.13 (torchao 0.18's int4 weight-only does not); its CUDA path exists in torchao but has not been
run here.
"""
from __future__ import annotations

from .registry import Precision, register


def _transformers_int8_weight_only(skip_modules):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip_modules)


register(Precision(
    name="int8-torchao", stands_for="int8", library="torchao",
    description="torchao int8 weight-only linear layers (int8 weights, a float32 scale and an int8 zero point per "
                "row), fp32 compute",
    studies=frozenset({"llm"}), devices=("cpu",), load_dtype="float32", compute_dtype="fp32",
    kernel_notes="weights cast from int8 to fp32 in every product, then an fp32 matmul and a per-row rescale",
    transformers_config=_transformers_int8_weight_only,
    planned_linear_bytes=lambda numel, rows: numel + 5 * rows))
