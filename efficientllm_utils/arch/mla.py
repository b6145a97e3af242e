"""Multi-head latent attention (MLA, DeepSeek-V2 / V3).

Keys and values are not projected per head from the hidden state; they are
expanded from a shared low-rank latent ``c_kv`` of width ``kv_lora_rank``::

    c_kv, k_rope = split(kv_a_proj(x))           # (t, r), (t, rope_dim)
    k_nope, v    = split(kv_b_proj(norm(c_kv)))  # per head: (t, nope_dim), (t, v_dim)
    k            = [k_nope, rope(k_rope)]        # the RoPE key is shared by all heads

RoPE cannot be folded into the latent (a rotation depends on the position),
so a small "decoupled" key part carries it. The KV cache stores only the
normalised latent and the rotated shared key, ``kv_lora_rank +
qk_rope_head_dim`` numbers per token and layer, against ``2 * n_kv_heads *
head_dim`` for GQA. Keys/values are re-expanded from the cached latent at each
step; DeepSeek's "weight absorption" (folding ``kv_b_proj`` into the query and
output projections) is an inference optimisation left out here.

Like DeepSeek, the projections have no biases; ``q_lora_rank`` optionally makes
the query low-rank too (``q_a_proj`` -> RMSNorm -> ``q_b_proj``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionContext
from .config import DecoderConfig
from .norm import RMSNorm
from .position import apply_rotary


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        self.low_rank_query = config.q_lora_rank is not None
        if not self.low_rank_query:
            self.q_proj = nn.Linear(config.hidden_size, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj = nn.Linear(config.hidden_size, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_norm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, config.hidden_size, bias=False)
        self.scale = qk_dim ** -0.5

    def query(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, hidden) -> (b, t, heads * qk_dim)
        if self.low_rank_query:
            return self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        return self.q_proj(x)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.query(x).view(b, t, self.n_heads, -1).transpose(1, 2)  # (b, heads, t, nope + rope)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_norm(latent).unsqueeze(1)  # (b, 1, t, r): one "head" so HF caches can hold it
        k_rope = k_rope.unsqueeze(1)  # (b, 1, t, rope)
        if ctx.query_rope is not None:
            q_rope, k_rope = apply_rotary(q_rope, *ctx.query_rope), apply_rotary(k_rope, *ctx.query_rope)
        if ctx.cache is not None:  # the cache holds the compressed latent and the shared RoPE key only
            latent, k_rope = ctx.cache.update(latent, k_rope, self.layer_idx)  # (b, 1, T, r), (b, 1, T, rope)
        total = latent.shape[2]
        kv = self.kv_b_proj(latent).view(b, total, self.n_heads, -1).transpose(1, 2)  # (b, heads, T, nope + v)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, self.n_heads, -1, -1)), dim=-1)  # (b, heads, T, nope + rope)
        q = torch.cat((q_nope, q_rope), dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal,
                                             scale=self.scale)  # (b, heads, t, v_dim)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
