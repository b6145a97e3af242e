"""``DiT``: class-conditional diffusion transformer with swappable attention and FFN.

``forward(x_t, t, labels)`` predicts the flow-matching velocity (or noise: the
model does not care) for a batch of noisy images; ``aux_loss`` is the mean MoE
load-balancing loss over the layers (``None`` for dense FFNs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch.attention import AttentionContext
from ..arch.nsa import NativeSparseAttention
from .block import DiTBlock, FinalLayer
from .config import DiTConfig
from .embed import LabelEmbedder, PatchEmbed, TimestepEmbedder


@dataclass
class DiTOutput:
    sample: torch.Tensor  # (b, C, H, W)
    aux_loss: torch.Tensor | None


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.image_size, config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size, config.frequency_embedding_size)
        self.y_embedder = LabelEmbedder(config.n_classes, config.hidden_size, config.class_dropout)
        self.blocks = nn.ModuleList(DiTBlock(config, i) for i in range(config.n_layers))
        self.final = FinalLayer(config)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier linears, N(0, 0.02) embeddings, zero modulations and output (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.t_embedder.linear_2.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, NativeSparseAttention):
                nn.init.normal_(module.block_position, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        for layer in (self.final.modulation, self.final.proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def conditioning(self, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(b,) timesteps on DiT's 0..1000 scale and (b,) class ids -> (b, hidden)."""
        return self.t_embedder(t) + self.y_embedder(labels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> DiTOutput:
        """x: (b, C, H, W) noisy images, t: (b,) timesteps (0..1000), labels: (b,) -> (b, C, H, W)."""
        tokens = self.patch_embed(x)  # (b, g*g, hidden)
        c = self.conditioning(t, labels)  # (b, hidden)
        ctx = AttentionContext.bidirectional()
        aux = []
        for block in self.blocks:
            tokens, aux_loss = block(tokens, c, ctx)
            if aux_loss is not None:
                aux.append(aux_loss)
        return DiTOutput(sample=self.final(tokens, c), aux_loss=torch.stack(aux).mean() if aux else None)
