"""Positional signals of the ``position`` axis.

Each kind enters the model at a different place:

* ``rope``: rotates queries and keys inside attention (``RotaryEmbedding`` + ``apply_rotary``);
* ``absolute`` / ``learnable``: a vector added to the token embeddings;
* ``relative``: a learned per-head bias added to the attention scores (T5);
* ``none``: nothing -- the causal mask alone tells tokens apart (NoPE).

``PositionEncoding`` builds the part a config asks for; the others stay ``None``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import DecoderConfig


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al., 2021) in the rotate-half layout of Qwen2/Llama.

    ``inv_freq`` is recomputed on each call instead of kept as a buffer: it is
    tiny, and a non-persistent buffer would be left uninitialised when
    transformers builds the model on the meta device in ``from_pretrained``.
    """

    def __init__(self, dim: int, theta: float):
        super().__init__()
        self.dim = dim
        self.theta = theta

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (..., t) integer -> cos, sin: (..., t, dim) float32
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32,
                                                      device=positions.device) / self.dim))
        freqs = positions[..., None].float() * inv_freq  # (..., t, dim/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (..., t, dim): the two halves rotate together
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta:g}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (b, heads, t, dim) by angles ``cos``/``sin`` of shape (b, t, dim) or (t, dim)."""
    cos = cos.unsqueeze(-3).to(x.dtype)  # broadcast over heads
    sin = sin.unsqueeze(-3).to(x.dtype)
    return x * cos + rotate_half(x) * sin


class SinusoidalPositionEmbedding(nn.Module):
    """Fixed sin/cos table of Vaswani et al. (2017), computed on the fly, no parameters."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.base = base

    def forward(self, positions: torch.Tensor) -> torch.Tensor:  # (b, t) -> (b, t, dim) float32
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32,
                                                     device=positions.device) / self.dim))
        angles = positions[..., None].float() * inv_freq  # (b, t, ceil(dim/2))
        # interleaved: even dims sin, odd dims cos
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[..., : self.dim]


class RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias (Raffel et al., 2020), causal variant.

    The distance ``query_pos - key_pos`` (>= 0 under the causal mask) falls in
    one of ``num_buckets`` buckets: exact buckets for the first half, then
    log-spaced buckets up to ``max_distance``; each bucket holds one learned
    scalar per head. One instance is shared by all layers, as in T5.
    """

    def __init__(self, n_heads: int, num_buckets: int, max_distance: int):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bias = nn.Embedding(num_buckets, n_heads)

    def bucket(self, distance: torch.Tensor) -> torch.Tensor:
        max_exact = self.num_buckets // 2
        log_ratio = torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(
            self.max_distance / max_exact)
        far = (max_exact + log_ratio * (self.num_buckets - max_exact)).long().clamp(max=self.num_buckets - 1)
        return torch.where(distance < max_exact, distance, far)

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        # query_positions: (q,), key_positions: (k,) -> additive bias (1, heads, q, k)
        distance = (query_positions[:, None] - key_positions[None, :]).clamp(min=0)
        return self.bias(self.bucket(distance)).permute(2, 0, 1).unsqueeze(0)


class PositionEncoding(nn.Module):
    """The positional part chosen by ``config.position``; the parts not chosen are ``None``."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        kind = config.position
        self.input_embedding: nn.Module | None = None  # (b, t) positions -> (b, t, hidden), added to tokens
        if kind == "absolute":
            self.input_embedding = SinusoidalPositionEmbedding(config.hidden_size)
        elif kind == "learnable":
            self.input_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.rotary = RotaryEmbedding(config.rope_dim, config.rope_theta) if kind == "rope" else None
        self.relative_bias = (
            RelativePositionBias(config.n_heads, config.relative_num_buckets, config.relative_max_distance)
            if kind == "relative" else None
        )
