"""DiT's input embeddings: patches with a fixed 2D sin-cos position table, timesteps, class labels.

The formulas follow diffusers' ``PatchEmbed``, ``Timesteps(flip_sin_to_cos=True,
downscale_freq_shift=1)`` and ``LabelEmbedding`` (which the original DiT
weights were converted to), so the model can be checked against
``diffusers.DiTTransformer2DModel`` weight for weight.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(n,) positions -> (n, dim) features: ``dim/2`` sines then ``dim/2`` cosines, periods up to 1e4."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    angles = positions.double()[:, None] * omega[None, :]  # (n, dim/2)
    return torch.cat((angles.sin(), angles.cos()), dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid*grid, dim) fixed positions of raster-ordered patches: first half encodes the column, second the row."""
    row, col = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")  # (g, g) each
    return torch.cat((sincos_1d(dim // 2, col.flatten()), sincos_1d(dim // 2, row.flatten())), dim=1).float()


class PatchEmbed(nn.Module):
    """(b, c, H, W) image -> (b, (H/p)*(W/p), hidden) raster-ordered patch tokens plus their 2D positions."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        # fixed, not learned; recomputed rather than saved (it is a function of the shape)
        self.register_buffer("position", sincos_2d(hidden_size, image_size // patch_size)[None], persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(images).flatten(2).transpose(1, 2)  # (b, hidden, g, g) -> (b, g*g, hidden)
        return tokens + self.position.to(tokens.dtype)


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(b,) timesteps (0..1000 scale, may be fractional) -> (b, dim) cos then sin features (diffusers' shift 1)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    angles = t.float()[:, None] * freqs[None, :]  # (b, half)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


class TimestepEmbedder(nn.Module):
    """(b,) timesteps -> (b, hidden): sinusoidal features through a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.linear_1 = nn.Linear(frequency_size, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_features(t, self.frequency_size).to(self.linear_1.weight.dtype)
        return self.linear_2(nn.functional.silu(self.linear_1(features)))


class LabelEmbedder(nn.Module):
    """(b,) class ids -> (b, hidden). Row ``n_classes`` is the null class: training swaps a label for it with
    probability ``dropout``, and classifier-free guidance asks for it."""

    def __init__(self, n_classes: int, hidden_size: int, dropout: float):
        super().__init__()
        self.n_classes = n_classes
        self.dropout = dropout
        self.embedding_table = nn.Embedding(n_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.n_classes), labels)
        return self.embedding_table(labels)
