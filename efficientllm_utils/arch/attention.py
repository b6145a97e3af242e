"""Grouped-query attention: MHA, GQA and MQA are one module with ``n_kv_heads``.

``n_heads`` query heads are split into ``n_kv_heads`` groups; the heads of a
group share one key/value head. ``n_kv_heads == n_heads`` is MHA,
``n_kv_heads == 1`` is MQA, anything between is GQA. The KV cache holds
``2 * n_kv_heads * head_dim`` numbers per token and layer, so fewer KV heads
means a proportionally smaller cache.

``AttentionContext`` is what every attention variant (this one, ``mla``,
``nsa``) receives besides its input; the model builds it once per forward.
``AttentionContext.bidirectional()`` is the non-causal context of an encoder
(the diffusion transformer): every token sees every other one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from .config import DecoderConfig
from .position import RotaryEmbedding, apply_rotary


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                 is_causal: bool = False, repeat_kv: bool | None = None) -> torch.Tensor:
    """SDPA of (b, heads, t, hd) queries over (b, kv_heads, T, hd) keys and values shared by query groups.

    Without a mask, ``enable_gqa`` broadcasts each KV head over its group without copying it (the flash kernel).
    With a mask on a GPU the KV heads are repeated instead (``repeat_kv``; None: exactly then): the kernel that
    takes masks (memory-efficient) refuses ``enable_gqa``, and SDPA would fall to the math kernel, which stores
    heads x t x T scores per layer (out of memory at 8K). The CPU keeps ``enable_gqa`` (its published numbers)."""
    if repeat_kv is None:
        repeat_kv = attn_mask is not None and q.is_cuda
    if repeat_kv:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (b, heads, T, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          enable_gqa=not repeat_kv)


@dataclass
class AttentionContext:
    """What every attention layer receives besides its input; the model builds it once per forward."""

    rotary: RotaryEmbedding | None  # set when position == "rope"
    query_rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin (b, t, rope_dim) at the new tokens' positions
    # SDPA's view of causality: ``mask`` None + ``is_causal`` True is a plain causal prefill,
    # None + False one new token that sees the whole cache; otherwise ``mask`` is a bool
    # (True = attend) or additive float mask of shape (b or 1, 1 or heads, t, cached + t).
    mask: torch.Tensor | None
    is_causal: bool
    padded: bool  # the batch holds padding tokens (mask already excludes them)
    cache: Cache | None  # HF cache; each layer writes its own entry (layer_idx)
    # False: no token order at all (an encoder over image patches). SDPA-based variants need nothing more
    # (mask None, is_causal False); NSA reads it to make its branches bidirectional.
    causal: bool = True

    @classmethod
    def bidirectional(cls) -> "AttentionContext":
        """Every query sees every key: no mask, no cache, no rotary positions (they come with the input)."""
        return cls(rotary=None, query_rope=None, mask=None, is_causal=False, padded=False, cache=None, causal=False)


class GroupedQueryAttention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.n_heads * config.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (b, heads, t, hd)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (b, kv_heads, t, hd)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (b, kv_heads, t, hd)
        if ctx.query_rope is not None:
            q, k = apply_rotary(q, *ctx.query_rope), apply_rotary(k, *ctx.query_rope)
        if ctx.cache is not None:  # keys are cached after RoPE: each key keeps its own position
            k, v = ctx.cache.update(k, v, self.layer_idx)  # (b, kv_heads, past + t, hd)
        out = grouped_sdpa(q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal)  # (b, heads, t, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
