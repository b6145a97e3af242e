"""``DiTConfig``: a class-conditional diffusion transformer whose attention and FFN come from ``arch``.

The layout is DiT's (Peebles & Xie, 2023): patchify, adaLN-Zero blocks
conditioned on the timestep and the class, a final adaLN layer that
unpatchifies. The two parts the EfficientLLM study swaps are the LLM axis's:

* ``attention``: ``mha``, ``gqa``, ``mqa``, ``mla`` or ``nsa`` from
  ``efficientllm_utils.arch``, run non-causally over the patch tokens (raster
  order); positions are DiT's fixed 2D sin-cos table added to the patch
  embeddings, so the attention modules get no rotary positions;
* ``ffn``: ``dense`` SwiGLU or ``moe`` (top-k routed SwiGLU experts).

``decoder_config()`` is the ``arch.DecoderConfig`` those modules are built
from. ``PAPER_SHAPES`` are the DiT paper's B, L and XL shapes; a model name
like ``DiT-B/4`` is a shape and a patch size.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..arch.config import ATTENTION_KINDS, FFN_KINDS, DecoderConfig

# DiT paper, Table 1: layers, hidden size, heads
PAPER_SHAPES: dict[str, dict[str, int]] = {
    "B": dict(n_layers=12, hidden_size=768, n_heads=12),
    "L": dict(n_layers=24, hidden_size=1024, n_heads=16),
    "XL": dict(n_layers=28, hidden_size=1152, n_heads=16),
}


@dataclass(frozen=True)
class DiTConfig:
    image_size: int = 32  # square images (pixels, or latent cells)
    in_channels: int = 3
    patch_size: int = 4
    hidden_size: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: mha/mla n_heads, mqa 1, gqa/nsa n_heads // 2
    intermediate_size: int | None = None  # dense SwiGLU width; None -> 4 * hidden_size (DiT's mlp_ratio 4)
    n_classes: int = 10
    class_dropout: float = 0.1  # labels replaced by the null class in training (classifier-free guidance)
    attention: str = "mha"
    ffn: str = "dense"
    # MLA
    kv_lora_rank: int | None = None  # None -> hidden_size // 8
    # NSA over the raster-ordered patches (defaults: one compressed block and one selection block per row)
    compress_block: int | None = None  # None -> patches per row
    compress_stride: int | None = None  # None -> compress_block // 2
    select_block: int | None = None  # None -> patches per row
    n_selected: int = 2
    window: int | None = None  # centred window in raster order; None -> patches per row
    # MoE
    n_experts: int = 8
    moe_top_k: int = 2
    moe_intermediate_size: int | None = None  # None -> intermediate_size // moe_top_k (active width = dense)
    router_aux_loss_coef: float = 0.01
    frequency_embedding_size: int = 256  # sinusoidal timestep features before the MLP (DiT, diffusers)

    def __post_init__(self):
        for name in ("image_size", "in_channels", "patch_size", "hidden_size", "n_layers", "n_heads", "n_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide hidden_size={self.hidden_size}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size must be a multiple of 4 (2D sin-cos positions), got {self.hidden_size}")
        if not 0 <= self.class_dropout < 1:
            raise ValueError(f"class_dropout must be in [0, 1), got {self.class_dropout}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r} is not allowed; allowed values: {list(ATTENTION_KINDS)}")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn={self.ffn!r} is not allowed; allowed values: {list(FFN_KINDS)}")
        self.decoder_config()  # the attention/FFN's own checks (head counts, NSA blocks, experts)

    @property
    def grid_size(self) -> int:
        """Patches per row (and per column)."""
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        return self.grid_size ** 2

    def decoder_config(self) -> DecoderConfig:
        """The ``arch`` config the attention and FFN modules are built from (no positions: they are 2D here)."""
        row = self.grid_size
        n_kv = self.n_kv_heads
        if n_kv is None:
            n_kv = {"mha": self.n_heads, "mla": self.n_heads, "mqa": 1}.get(self.attention, max(1, self.n_heads // 2))
        block = self.compress_block or row
        settings = dict(
            vocab_size=1, hidden_size=self.hidden_size, n_layers=self.n_layers, n_heads=self.n_heads,
            n_kv_heads=n_kv, intermediate_size=self.intermediate_size or 4 * self.hidden_size,
            max_position_embeddings=self.n_tokens, attention=self.attention, position="none", ffn=self.ffn,
            qkv_bias=True, tie_word_embeddings=False, use_cache=False,
            compress_block=block, compress_stride=self.compress_stride or max(1, block // 2),
            select_block=self.select_block or row, n_selected=self.n_selected, window=self.window or row,
            n_experts=self.n_experts, moe_top_k=self.moe_top_k, router_aux_loss_coef=self.router_aux_loss_coef,
        )
        if self.kv_lora_rank is not None:
            settings["kv_lora_rank"] = self.kv_lora_rank
        if self.moe_intermediate_size is not None:
            settings["moe_intermediate_size"] = self.moe_intermediate_size
        return DecoderConfig(**settings)

    def to_dict(self) -> dict:
        return asdict(self)


def paper_dit_config(name: str = "DiT-B/4", **overrides) -> DiTConfig:
    """A DiT paper model (``DiT-B/4``, ``DiT-L/8``, ``DiT-XL/2``...) with any field overridden.

    The paper trains in the 32x32x4 latent space of Stable Diffusion's VAE (256x256 images);
    ``image_size``/``in_channels`` default to that. The FFN is arch's SwiGLU, three matrices instead of
    DiT's two, so its width defaults to 8/3 of the hidden size (rounded to 64) to keep DiT's parameter count.
    """
    shape, _, patch = name.removeprefix("DiT-").partition("/")
    if shape not in PAPER_SHAPES or not patch.isdigit():
        raise ValueError(f"model {name!r} is not allowed; allowed values: DiT-<{'|'.join(PAPER_SHAPES)}>/<patch>, "
                         "e.g. DiT-B/4, DiT-L/8, DiT-XL/2")
    hidden = overrides.get("hidden_size", PAPER_SHAPES[shape]["hidden_size"])
    settings = {"image_size": 32, "in_channels": 4, "patch_size": int(patch), "n_classes": 1000,
                "intermediate_size": 64 * round(hidden * 8 / 3 / 64), **PAPER_SHAPES[shape], **overrides}
    return DiTConfig(**settings)
