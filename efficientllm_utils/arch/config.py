"""``DecoderConfig``: one config for every variant of the architecture axis.

The model is a Qwen2.5-style decoder (pre-norm RMSNorm blocks, SwiGLU FFN,
biases on the q/k/v projections, RoPE with base 1e6, tied embeddings). Three
fields pick the part that the EfficientLLM study swaps:

* ``attention`` -- how queries meet keys and what the KV cache holds:

  - ``"mha"`` multi-head attention: every query head has its own key/value
    head, ``n_kv_heads == n_heads``.
  - ``"gqa"`` grouped-query attention: ``n_heads / n_kv_heads`` query heads
    share one key/value head (Qwen2.5: 14 query heads, 2 KV heads).
  - ``"mqa"`` multi-query attention: all query heads share a single key/value
    head, ``n_kv_heads == 1``.
  - ``"mla"`` DeepSeek-V2/V3 multi-head latent attention: keys and values are
    expanded from a ``kv_lora_rank``-dim latent, plus a small decoupled RoPE key
    shared by all heads; the cache keeps only the latent and that RoPE key.
  - ``"nsa"`` native sparse attention: three branches over GQA keys/values
    (compressed blocks, top-n selected blocks, sliding window) mixed by gates.

* ``position`` -- ``"rope"`` (rotary), ``"absolute"`` (fixed sinusoidal, added
  to the embeddings), ``"learnable"`` (learned table added to the embeddings),
  ``"relative"`` (T5 bucketed bias added to the attention scores) or
  ``"none"`` (no positional signal besides the causal mask).

* ``ffn`` -- ``"dense"`` SwiGLU or ``"moe"`` (top-k routed SwiGLU experts,
  optionally one always-on shared expert).

Fields that belong to one variant only are ignored by the others. ``None``
for ``head_dim``, ``kv_lora_rank``, the MLA head dims and
``moe_intermediate_size`` means "derive from the shape" (see ``__post_init__``).
"""
from __future__ import annotations

from transformers import PreTrainedConfig

ATTENTION_KINDS = ("mha", "gqa", "mqa", "mla", "nsa")
POSITION_KINDS = ("rope", "absolute", "learnable", "relative", "none")
FFN_KINDS = ("dense", "moe")


class DecoderConfig(PreTrainedConfig):
    model_type = "efficient_decoder"
    # HF code (caches, generation, peft, accelerate) reads the standard names
    attribute_map = {
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
    }

    # --- shape (defaults: Qwen2.5-0.5B) ---
    vocab_size: int = 151936
    hidden_size: int = 896
    n_layers: int = 24
    n_heads: int = 14  # query heads
    n_kv_heads: int = 2  # key/value heads: n_heads for mha, 1 for mqa, a divisor of n_heads for gqa/nsa
    head_dim: int | None = None  # None -> hidden_size // n_heads
    intermediate_size: int = 4864  # SwiGLU width of the dense FFN
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # RoPE base, 1e6 as in Qwen2.5 and the paper
    max_position_embeddings: int = 32768  # also the size of the learnable position table
    tie_word_embeddings: bool = True  # lm_head shares the embedding matrix (Qwen2.5 <= 3B)
    qkv_bias: bool = True  # bias on q/k/v projections like Qwen2.5 (MLA follows DeepSeek: no biases)
    initializer_range: float = 0.02
    use_cache: bool = True

    # --- the swapped parts ---
    attention: str = "gqa"
    position: str = "rope"
    ffn: str = "dense"

    # --- MLA (DeepSeek-V2/V3) ---
    kv_lora_rank: int | None = None  # latent width; None -> hidden_size // 8 (the paper's choice)
    q_lora_rank: int | None = None  # None: full-rank query projection; an int: low-rank query like DeepSeek
    qk_nope_head_dim: int | None = None  # per-head key/query part without RoPE; None -> head_dim
    qk_rope_head_dim: int | None = None  # decoupled RoPE part, one key shared by all heads; None -> head_dim // 2
    v_head_dim: int | None = None  # None -> head_dim

    # --- NSA (native sparse attention); paper values, scale them down with the sequence length ---
    compress_block: int = 64  # l: tokens summarised by one compressed key/value
    compress_stride: int = 32  # d: distance between compressed blocks (NSA uses d = l/2; the paper does not say)
    select_block: int = 64  # l': size of the blocks the selection branch picks
    n_selected: int = 4  # n: selected blocks per query (always including the first and the two local ones)
    window: int = 128  # w: sliding-window length

    # --- MoE ---
    n_experts: int = 8
    # routed experts per token, their softmax weights renormalised to sum to one (not "top_k":
    # generation would read a model config's top_k as its sampling top-k)
    moe_top_k: int = 2
    n_shared_experts: int = 0  # 0 or 1 always-on expert with a sigmoid gate, as in Qwen2-MoE
    moe_intermediate_size: int | None = None  # None -> intermediate_size // moe_top_k: active FFN width matches dense
    router_aux_loss_coef: float = 0.01  # weight of the Switch-Transformer load-balancing loss

    # --- relative position bias (T5, causal buckets) ---
    relative_num_buckets: int = 32
    relative_max_distance: int = 128

    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        # the sizes the derived fields are computed from are checked first
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "intermediate_size",
                     "max_position_embeddings", "moe_top_k"):
            _positive(name, getattr(self, name))
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.n_heads
        if self.kv_lora_rank is None:
            self.kv_lora_rank = self.hidden_size // 8
        if self.qk_nope_head_dim is None:
            self.qk_nope_head_dim = self.head_dim
        if self.qk_rope_head_dim is None:
            self.qk_rope_head_dim = self.head_dim // 2
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = max(1, self.intermediate_size // self.moe_top_k)
        self._validate()
        super().__post_init__(**kwargs)

    def _validate(self) -> None:
        _choice("attention", self.attention, ATTENTION_KINDS)
        _choice("position", self.position, POSITION_KINDS)
        _choice("ffn", self.ffn, FFN_KINDS)
        _positive("head_dim", self.head_dim)
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")

        kv_rule = {
            "mha": (self.n_kv_heads == self.n_heads, f"n_kv_heads == n_heads ({self.n_heads})"),
            "mqa": (self.n_kv_heads == 1, "n_kv_heads == 1"),
            # MLA expands its latent to one key/value head per query head
            "mla": (self.n_kv_heads == self.n_heads, f"n_kv_heads == n_heads ({self.n_heads})"),
            "gqa": (self.n_heads % self.n_kv_heads == 0, f"n_kv_heads dividing n_heads ({self.n_heads})"),
            "nsa": (self.n_heads % self.n_kv_heads == 0, f"n_kv_heads dividing n_heads ({self.n_heads})"),
        }
        holds, rule = kv_rule[self.attention]
        if not holds:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} is not allowed for attention={self.attention!r}: "
                             f"it needs {rule}")

        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                _positive(name, getattr(self, name))
            if self.q_lora_rank is not None:
                _positive("q_lora_rank", self.q_lora_rank)
            _even("qk_rope_head_dim", self.qk_rope_head_dim)
        elif self.position == "rope":
            _even("head_dim", self.head_dim)

        if self.attention == "nsa":
            for name in ("compress_block", "compress_stride", "select_block", "n_selected", "window"):
                _positive(name, getattr(self, name))
            if self.compress_stride > self.compress_block:
                raise ValueError(f"compress_stride={self.compress_stride} must be <= compress_block="
                                 f"{self.compress_block}, or some tokens would never be compressed")
            if self.position == "relative":
                raise ValueError("position='relative' is not allowed for attention='nsa': the compressed "
                                 f"branch has no per-token distances; choose one of "
                                 f"{[p for p in POSITION_KINDS if p != 'relative']}")

        if self.ffn == "moe":
            if self.n_experts < 2:
                raise ValueError(f"n_experts must be >= 2 for ffn='moe', got {self.n_experts}")
            if not 1 <= self.moe_top_k <= self.n_experts:
                raise ValueError(f"moe_top_k must be in [1, n_experts={self.n_experts}], got {self.moe_top_k}")
            _choice("n_shared_experts", self.n_shared_experts, (0, 1))
            _positive("moe_intermediate_size", self.moe_intermediate_size)
            if self.router_aux_loss_coef < 0:
                raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")

        if self.position == "relative":
            if self.relative_num_buckets < 2:
                raise ValueError(f"relative_num_buckets must be >= 2, got {self.relative_num_buckets}")
            if self.relative_max_distance <= self.relative_num_buckets // 2:
                raise ValueError(f"relative_max_distance must be > relative_num_buckets // 2 "
                                 f"({self.relative_num_buckets // 2}), got {self.relative_max_distance}")

    @property
    def rope_dim(self) -> int:
        """Width of the rotated part of each query/key head."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: {list(allowed)}")


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _even(name: str, value: int) -> None:
    if value % 2:
        raise ValueError(f"{name} must be even for rotary embeddings (pairs of dims rotate), got {value}")


# The paper's three Qwen2.5 shapes (vocab 151936, RoPE base 1e6, tied embeddings)
PAPER_SHAPES: dict[str, dict[str, int]] = {
    "0.5B": dict(n_layers=24, hidden_size=896, n_heads=14, n_kv_heads=2, intermediate_size=4864),
    "1.5B": dict(n_layers=28, hidden_size=1536, n_heads=12, n_kv_heads=2, intermediate_size=8960),
    "3B": dict(n_layers=36, hidden_size=2048, n_heads=16, n_kv_heads=2, intermediate_size=11008),
}


def paper_config(size: str = "0.5B", attention: str = "gqa", position: str = "rope", ffn: str = "dense",
                 **overrides) -> DecoderConfig:
    """The paper's ``size`` shape with one attention/position/FFN choice.

    ``n_kv_heads`` follows the attention kind (mha/mla: ``n_heads``, mqa: 1,
    gqa/nsa: the shape's 2 KV heads) unless given in ``overrides``; any other
    field (e.g. a smaller ``n_layers`` or ``vocab_size`` for a CPU run) can be
    overridden too.
    """
    if size not in PAPER_SHAPES:
        raise ValueError(f"size={size!r} is not allowed; allowed values: {list(PAPER_SHAPES)}")
    shape = {**PAPER_SHAPES[size], "vocab_size": 151936, "rope_theta": 1_000_000.0, **overrides}
    if "n_kv_heads" not in overrides:
        shape["n_kv_heads"] = {"mha": shape["n_heads"], "mla": shape["n_heads"], "mqa": 1}.get(
            attention, shape["n_kv_heads"])
    return DecoderConfig(attention=attention, position=position, ffn=ffn, **shape)
