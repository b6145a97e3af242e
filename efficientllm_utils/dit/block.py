"""The adaLN-Zero DiT block and the final layer that turns tokens back into patches.

A block modulates two non-affine LayerNorms with a shift and a scale computed from
the conditioning vector ``c`` (timestep + class), and gates each residual branch;
the modulation is zero-initialised, so every block starts as the identity::

    shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c))
    x = x + gate1 * attention(LN(x) * (1 + scale1) + shift1)      # non-causal, arch's attention
    x = x + gate2 * ffn(LN(x) * (1 + scale2) + shift2)            # arch's dense SwiGLU or MoE
"""
from __future__ import annotations

import torch
from torch import nn

from ..arch.attention import AttentionContext
from ..arch.block import build_attention
from ..arch.ffn import SparseMoE, build_ffn, load_balancing_loss
from .config import DiTConfig


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(b, t, hidden) tokens, (b, hidden) shift and scale -> (b, t, hidden)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig, layer_idx: int):
        super().__init__()
        decoder = config.decoder_config()
        self.norm1 = nn.LayerNorm(config.hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = build_attention(decoder, layer_idx)
        self.norm2 = nn.LayerNorm(config.hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = build_ffn(decoder)
        self.modulation = nn.Linear(config.hidden_size, 6 * config.hidden_size)
        self.top_k = decoder.moe_top_k

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(b, t, hidden) tokens, (b, hidden) conditioning -> tokens and the MoE balancing loss (None if dense)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(nn.functional.silu(c)).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), ctx)
        h = modulate(self.norm2(x), shift2, scale2)
        if isinstance(self.mlp, SparseMoE):
            out, router_logits = self.mlp(h)
            return x + gate2[:, None] * out, load_balancing_loss(router_logits, self.top_k)
        return x + gate2[:, None] * self.mlp(h), None


class FinalLayer(nn.Module):
    """(b, t, hidden) tokens -> (b, C, H, W): adaLN (shift, scale), a linear map to p*p*C, unpatchify."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.patch_size, self.channels, self.grid = config.patch_size, config.in_channels, config.grid_size
        self.norm = nn.LayerNorm(config.hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(config.hidden_size, 2 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.patch_size ** 2 * config.in_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(nn.functional.silu(c)).chunk(2, dim=1)
        patches = self.proj(modulate(self.norm(x), shift, scale))  # (b, g*g, p*p*C)
        b, g, p, ch = x.shape[0], self.grid, self.patch_size, self.channels
        patches = patches.view(b, g, g, p, p, ch)  # (b, row, col, p_row, p_col, C)
        return torch.einsum("nhwpqc->nchpwq", patches).reshape(b, ch, g * p, g * p)
