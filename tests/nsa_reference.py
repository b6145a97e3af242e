"""Shared pieces of the looping NSA references (causal in test_arch_nsa.py, bidirectional in test_dit_model.py)."""
from __future__ import annotations

import math

import torch


def attend(query: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """Softmax attention of one query over explicit lists of keys and values."""
    weights = torch.softmax(torch.stack([query @ k for k in keys]) / math.sqrt(query.numel()), dim=0)
    return sum(w * v for w, v in zip(weights, values, strict=True))


def nsa_projections(module, x: torch.Tensor):
    """q (b, T, H, hd), k and v (b, T, KV, hd), branch gates (b, T, H, 3), compression block starts, and the
    number of selection blocks of ``module`` (a NativeSparseAttention) on ``x`` (b, T, hidden)."""
    b, total, _ = x.shape
    heads, kv_heads, hd = module.n_heads, module.n_kv_heads, module.head_dim
    q = module.q_proj(x).view(b, total, heads, hd)
    k = module.k_proj(x).view(b, total, kv_heads, hd)
    v = module.v_proj(x).view(b, total, kv_heads, hd)
    gates = torch.sigmoid(module.branch_gate(x)).view(b, total, heads, 3)
    starts = list(range(0, total - module.block + 1, module.stride))
    return q, k, v, gates, starts, math.ceil(total / module.select_block)
