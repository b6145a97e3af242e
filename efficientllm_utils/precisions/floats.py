"""Float dtypes: the weights and compute in that dtype (fp32 is every study's reference)."""
from __future__ import annotations

from .registry import STUDIES, Precision, register

for name, dtype, paper in (("fp32", "float32", "float32"), ("bf16", "bfloat16", "bfloat16"),
                           ("fp16", "float16", "float16")):
    register(Precision(
        name=name, stands_for=paper, library="torch", description=f"{dtype} weights and compute",
        studies=frozenset(STUDIES), devices=("cpu", "cuda"), load_dtype=dtype, compute_dtype=name,
        planned_linear_bytes=lambda numel, rows, width={"fp32": 4, "bf16": 2, "fp16": 2}[name]: width * numel))
