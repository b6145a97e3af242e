"""The run model of the DiT attention and MoE studies (``studies/dit.py``)."""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..arch.config import ATTENTION_KINDS, FFN_KINDS
from ..params import RunParams, check_timed_steps
from ..vision.images import IMAGE_SETS as IMAGE_SET_SPECS
from ..vision.images import NAMES as IMAGE_SETS

DIT_MODEL = re.compile(r"^DiT-(B|L|XL)/\d+$")


class DiTRun(RunParams):
    """One class-conditional diffusion transformer trained from scratch with flow matching, then sampled.

    Shared by the DiT attention and MoE studies: only the part under study changes between the runs of
    a study (same data, order, noise, steps, schedule and seed). The shape is one of the DiT paper's
    models (``model``: ``DiT-B/4``, ``DiT-L/8``, ``DiT-XL/2``...) or given field by field.
    """

    variant: str | None = None  # a name for runs that differ in several fields at once (the MoE study)
    model: str | None = None  # a DiT paper shape and patch size, e.g. "DiT-B/4"; None: the fields below
    attention: Literal[ATTENTION_KINDS] = "mha"  # type: ignore[valid-type]
    ffn: Literal[FFN_KINDS] = "dense"  # type: ignore[valid-type]
    # --- shape (None: the model's, or the DiTConfig default) ---
    patch_size: int | None = Field(None, ge=1)
    hidden_size: int | None = Field(None, ge=8)
    n_layers: int | None = Field(None, ge=1)
    n_heads: int | None = Field(None, ge=1)
    n_kv_heads: int | None = Field(None, ge=1)  # None: mha/mla n_heads, mqa 1, gqa/nsa n_heads // 2
    intermediate_size: int | None = Field(None, ge=1)
    kv_lora_rank: int | None = Field(None, ge=1)
    compress_block: int | None = Field(None, ge=1)  # NSA; None: one block per row of patches
    compress_stride: int | None = Field(None, ge=1)
    select_block: int | None = Field(None, ge=1)
    n_selected: int = Field(2, ge=1)
    window: int | None = Field(None, ge=1)
    n_experts: int = Field(8, ge=2)
    moe_top_k: int = Field(2, ge=1)
    moe_intermediate_size: int | None = Field(None, ge=1)
    router_aux_loss_coef: float = Field(0.01, ge=0)
    class_dropout: float = Field(0.1, ge=0, lt=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    # --- data and training ---
    # an offline image set (vision/images.py), pixel space: fashion_mnist (Debian's package, every machine) or
    # cifar10 (the bigbench==1.0.0 sdist, where its source answers)
    data: Literal[IMAGE_SETS] = "fashion_mnist"  # type: ignore[valid-type]

    def required_assets(self) -> tuple[str, ...]:
        return (IMAGE_SET_SPECS[self.data].asset,)

    heldout_size: int = Field(512, ge=4)  # fixed held-out split; its halves give the FD noise floor
    batch_size: int = Field(32, ge=1)
    steps: int = Field(100, ge=2)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.0, ge=0, lt=1)  # EMA of the weights, the sampled model; 0: sample the raw weights
    timing_warmup_steps: int = Field(3, ge=0)
    sample_interval_s: float = Field(1.0, gt=0)
    num_threads: int | None = Field(None, ge=1)  # torch intra-op threads (None: torch's default)
    # --- sampling and quality ---
    n_samples: int = Field(256, ge=256)  # generated images for FD (the issue asks for >= 256)
    sampling_steps: int = Field(10, ge=1)  # Euler steps of the flow
    guidance_scale: float = Field(1.0, ge=1.0)  # 1: no classifier-free guidance
    fd_image_size: int = Field(224, ge=32)  # EfficientNet-Lite0's input size for FD (224: ImageNet's)
    sample_batch_size: int = Field(256, ge=1)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str | None) -> str | None:
        if value is not None and not DIT_MODEL.match(value):
            raise ValueError(f"model {value!r} is not a DiT paper model; allowed: DiT-B/<p>, DiT-L/<p>, DiT-XL/<p> "
                             "(e.g. DiT-B/4, DiT-L/8, DiT-XL/2) or None")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "DiTRun":
        check_timed_steps(self.timing_warmup_steps, self.steps)
        if self.heldout_size < 2 * self.n_samples:
            raise ValueError(f"heldout_size={self.heldout_size} must be >= 2 * n_samples ({2 * self.n_samples}): "
                             "FD compares n_samples generated images with one half of the held-out set, and the "
                             "two halves with each other (the noise floor)")
        self.dit_config()  # the model's own checks (patch divides the image, heads, NSA blocks, experts)
        return self

    def dit_config(self):
        """The run's ``DiTConfig`` (CIFAR-10: 32x32 RGB pixels, 10 classes)."""
        from ..dit.config import DiTConfig, paper_dit_config

        fields = ("patch_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "intermediate_size",
                  "kv_lora_rank", "compress_block", "compress_stride", "select_block", "window",
                  "moe_intermediate_size")
        settings: dict[str, Any] = {f: getattr(self, f) for f in fields if getattr(self, f) is not None}
        settings |= dict(image_size=32, in_channels=3, n_classes=10, attention=self.attention, ffn=self.ffn,
                         n_selected=self.n_selected, n_experts=self.n_experts, moe_top_k=self.moe_top_k,
                         router_aux_loss_coef=self.router_aux_loss_coef, class_dropout=self.class_dropout)
        if self.model is not None:
            return paper_dit_config(self.model, **settings)
        return DiTConfig(**settings)
