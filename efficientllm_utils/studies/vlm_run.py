"""The run models of the vision-language studies (``studies/vlm_finetune.py``, ``studies/vlm_quantization.py``)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, create_model, model_validator

from ..cpu_4bit import KERNELS as CPU_4BIT_KERNELS
from ..models import OFFLINE_MODELS, ModelSource
from ..params import RunParams, expand, params_path
from ..vision.images import IMAGE_SETS as IMAGE_SET_SPECS
from ..vlm.config import IMAGE_TASKS as VLM_IMAGE_TASKS
from ..vlm.config import TASKS as VLM_TASKS
from ..vlm.config import AlignSettings, VisionSettings
from .finetune_run import FinetuneBase
from .quantization_run import VLMPrecision

# the small model's settings a run sets (run field -> settings field), with the settings' defaults and bounds
VISION_FIELDS = {"image_size": "image_size", "patch_size": "patch_size", "merge_size": "merge_size",
                 "vision_depth": "depth", "vision_hidden_size": "hidden_size",
                 "vision_intermediate_size": "intermediate_size", "vision_heads": "num_heads"}
ALIGN_FIELDS = {f"align_{name}": name for name in ("embed_captions_per_task", "embed_steps", "embed_batch_size",
                                                   "embed_lr", "captions_per_task", "steps", "batch_size", "lr",
                                                   "warmup_steps")}


def _fields_of(settings: type[BaseModel], names: dict[str, str]) -> dict:
    """Run fields standing for ``settings``' fields: the same type, bounds and default (not the description)."""
    fields = {run_name: settings.model_fields[name] for run_name, name in names.items()}
    return {name: (Annotated[info.annotation, *info.metadata], info.default) for name, info in fields.items()}


class _VLMSettings(BaseModel):
    """``VLMData`` but its fields standing for ``VisionSettings`` and ``AlignSettings``."""

    tasks: list[Literal[VLM_TASKS]] = Field(default_factory=lambda: ["fashion_mnist", "easy_vqa"], min_length=1)  # type: ignore[valid-type]
    n_heldout_per_task: int = Field(48, ge=2, description="held-out questions per task (fixed test splits)")
    eval_batch_size: int = Field(16, ge=1, description="sequences per held-out scoring batch")

    def required_assets(self) -> tuple[str, ...]:
        images = {IMAGE_SET_SPECS[t].asset for t in self.tasks if t in IMAGE_SET_SPECS}
        images.add(IMAGE_SET_SPECS[self.align_settings().images].asset if self.small else "easy-vqa")
        return tuple(sorted({"smollm2", *images} | ({"easy-vqa"} if "easy_vqa" in self.tasks else set())))

    @property
    def small(self) -> bool:
        """A small Qwen2.5-VL built around an offline language model (else a released Qwen2.5-VL)."""
        return self.model in OFFLINE_MODELS  # type: ignore[attr-defined]

    def vision_settings(self) -> VisionSettings:
        return VisionSettings(**{name: getattr(self, run_name) for run_name, name in VISION_FIELDS.items()},
                              seed=self.seed).check()  # type: ignore[attr-defined]

    def align_settings(self) -> AlignSettings:
        """``AlignSettings`` from the ``align_<setting>`` fields; the images are the first image task's."""
        stages = {name: getattr(self, run_name) for run_name, name in ALIGN_FIELDS.items()}
        return AlignSettings(**stages, images=next((t for t in self.tasks if t in VLM_IMAGE_TASKS), "fashion_mnist"),
                             seed=self.seed, num_threads=getattr(self, "num_threads", None))  # type: ignore[attr-defined]

    @model_validator(mode="after")
    def _vision_fits(self):
        if self.small:
            try:
                self.vision_settings()
            except ValueError as err:
                raise ValueError(f"vision settings: {err}") from None
        return self


VLMData = create_model(
    "VLMData", __base__=_VLMSettings, __module__=__name__,
    **_fields_of(VisionSettings, VISION_FIELDS), **_fields_of(AlignSettings, ALIGN_FIELDS),
    __doc__="The vision-language runs' shared settings: the questions, and the small model's vision tower and "
            "alignment (used when ``model`` is an offline language model to transplant; a released Qwen2.5-VL brings "
            "its own); ``align_<setting>`` fields set the alignment's stages.")


class VLMFinetuneRun(FinetuneBase, VLMData):
    """One fine-tuning method on a Qwen2.5-VL: held-out answer accuracy before and after, training costs."""

    n_train_per_task: int = Field(64, ge=1, description="training questions per task (train splits)")
    required_assets = VLMData.required_assets


class VLMQuantizationRun(RunParams, VLMData):
    """A Qwen2.5-VL whose language model is loaded at one precision: answers, fidelity, size, latency, energy."""

    required_assets = VLMData.required_assets
    model: ModelSource
    precision: VLMPrecision
    reference_precision: VLMPrecision = "fp32"
    cpu_4bit_kernel: Literal[CPU_4BIT_KERNELS] = "auto"  # type: ignore[valid-type]
    new_tokens: int = Field(8, ge=2, description="tokens decoded per timed request (after the image prompt)")
    batch_size: int = Field(1, ge=1, le=1, description="prompts per timed request: one question with its image")
    warmup: int = Field(1, ge=0)
    min_iterations: int = Field(3, ge=1)
    min_seconds: float = Field(0.0, ge=0)
    tracked_requests: int = Field(2, ge=1)
    sample_interval_s: float = Field(0.1, gt=0)
    num_threads: int | None = Field(None, ge=1)
    # the model quantized: the base fine-tuned as one run of params/vlm_peft.yaml (that profile's run of that
    # method: its settings, trained once and cached by them, ``studies.vlm_finetune.tuned_checkpoint``), or the
    # untuned base (both None)
    finetune_profile: str | None = Field(None, description="a profile of params/vlm_peft.yaml")
    finetune_method: str | None = Field(None, description="a method of that profile's grid, merged into the weights")

    @model_validator(mode="after")
    def _finetune_run_matches(self):
        self.finetune_run()
        return self

    def finetune_run(self) -> VLMFinetuneRun | None:
        """The vlm_peft run whose fine-tuned model this run quantizes (None: the untuned base). Its questions, vision
        tower and alignment must be this run's (the same aligned base, processor and tasks); QLoRA is refused (its
        adapter cannot be merged into float weights without re-quantising them)."""
        if (self.finetune_profile is None) != (self.finetune_method is None):
            raise ValueError("finetune_profile and finetune_method are given together (or neither: the untuned base)")
        if self.finetune_profile is None:
            return None
        if not self.small:
            raise ValueError(f"finetune_profile: only the small model built here ({', '.join(OFFLINE_MODELS)}) is "
                             f"fine-tuned for quantization; {self.model!r} is quantized as released")
        specs = expand(params_path("vlm_peft"), self.finetune_profile)
        methods = {s.params["method"]: s for s in specs if s.params["method"] != "qlora"}
        if self.finetune_method not in methods:
            raise ValueError(f"finetune_method {self.finetune_method!r} is not a method of params/vlm_peft.yaml's "
                             f"profile {self.finetune_profile!r} that merges into float weights; allowed: "
                             f"{', '.join(methods)}")
        # the fine-tuning runs at this run's seed, so a reseeded quantization run quantizes a reseeded fine-tune
        run = VLMFinetuneRun.model_validate({**methods[self.finetune_method].params, "seed": self.seed})
        shared = [f for f in (*VLMData.model_fields, "model", "device")
                  if f not in ("n_heldout_per_task", "eval_batch_size")]
        differ = [f for f in shared if getattr(run, f) != getattr(self, f)]
        if differ:
            raise ValueError(f"finetune_profile {self.finetune_profile!r}: its runs differ from this one in "
                             f"{', '.join(f'{f} ({getattr(run, f)!r} there, {getattr(self, f)!r} here)' for f in differ)}"
                             "; the fine-tuned model must start from this run's base and questions")
        return run
