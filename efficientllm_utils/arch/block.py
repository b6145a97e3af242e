"""One pre-norm decoder block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""
from __future__ import annotations

import torch
from torch import nn

from .attention import AttentionContext, GroupedQueryAttention
from .config import DecoderConfig
from .ffn import SparseMoE, build_ffn, load_balancing_loss
from .mla import MultiHeadLatentAttention
from .norm import RMSNorm
from .nsa import NativeSparseAttention


# the attention kinds with a module of their own; mha / gqa / mqa are GroupedQueryAttention, differing only in n_kv_heads
ATTENTION_MODULES = {"mla": MultiHeadLatentAttention, "nsa": NativeSparseAttention}


def build_attention(config: DecoderConfig, layer_idx: int) -> nn.Module:
    return ATTENTION_MODULES.get(config.attention, GroupedQueryAttention)(config, layer_idx)


class DecoderBlock(nn.Module):
    # module names follow Qwen2 so that state dicts, LoRA targets and quantisation skip-lists carry over
    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = build_attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = build_ffn(config)
        self.top_k = config.moe_top_k

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(b, t, hidden) -> (b, t, hidden) and this layer's MoE load-balancing loss (None for a dense FFN)."""
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        if isinstance(self.mlp, SparseMoE):
            out, router_logits = self.mlp(self.post_attention_layernorm(x))
            return x + out, load_balancing_loss(router_logits, self.top_k)
        return x + self.mlp(self.post_attention_layernorm(x)), None
