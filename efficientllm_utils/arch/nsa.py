"""Native sparse attention (NSA, Yuan et al. 2025, arXiv 2502.11089).

Each query attends through three branches over the same GQA keys/values and
mixes them with learned per-head sigmoid gates::

    out = g_cmp * attn(q, compressed K/V) + g_slc * attn(q, selected blocks) + g_win * attn(q, last w tokens)

* compressed: every block of ``l = compress_block`` keys (stride ``d =
  compress_stride``) is summarised into one key/value by a learned linear map
  of the whole block (keys get an intra-block position embedding first); a
  query sees a compressed block once the block has ended.
* selected: the compressed attention probabilities, summed over the heads of a
  KV group and spread over the selection blocks of size ``l' = select_block``
  in proportion to the tokens they share, rank the blocks; each query attends
  to the tokens of its top ``n = n_selected`` blocks. The first block and the
  two blocks ending at the query are always selected (NSA paper, sec. 3.3.2).
* window: the last ``w = window`` tokens, the query included.

Non-causal (``AttentionContext.causal`` False, the diffusion transformer over
image patches in raster order): every compressed block is visible, a query's
selection is its own block plus the top-scored others anywhere in the sequence,
and the window is centred, ``|key - query| <= w // 2``.

This is a dense reference implementation: all queries are processed at once
and the sparsity is expressed as masks over the full key range, so compute is
not reduced (a block-sparse kernel would skip the masked blocks). It is exact
and causal, and its cache is the plain GQA cache: the raw keys/values before
RoPE, from which compressed keys/values are recomputed at each step. Positions
are the token indices ``0..T-1`` (no padded batches).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .attention import AttentionContext, grouped_sdpa
from .config import DecoderConfig
from .position import apply_rotary


class NativeSparseAttention(nn.Module):
    INITIAL_BLOCKS = 1  # always-selected blocks at the start of the sequence
    LOCAL_BLOCKS = 2  # always-selected blocks ending at the query (its own block and the one before)

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.block, self.stride = config.compress_block, config.compress_stride
        self.select_block, self.n_selected, self.window = config.select_block, config.n_selected, config.window
        hd = self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, config.hidden_size, bias=False)
        # phi: one block of keys/values (block * hd numbers) -> one compressed key/value, shared by the KV heads
        self.compress_key = nn.Linear(self.block * hd, hd, bias=False)
        self.compress_value = nn.Linear(self.block * hd, hd, bias=False)
        self.block_position = nn.Parameter(torch.zeros(self.block, hd))  # intra-block position embedding
        self.branch_gate = nn.Linear(config.hidden_size, 3 * self.n_heads, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if ctx.padded:
            raise ValueError("attention='nsa' does not support padded batches: pass sequences of equal length")
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (b, heads, t, hd)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (b, kv_heads, t, hd)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if ctx.cache is not None:  # raw keys (before RoPE): compression must see position-free keys
            k, v = ctx.cache.update(k, v, self.layer_idx)  # (b, kv_heads, T, hd)
        total = k.shape[2]
        query_pos = torch.arange(total - t, total, device=x.device)  # (t,)
        key_pos = torch.arange(total, device=x.device)  # (T,)

        compressed_k, compressed_v, block_start = self.compress(k, v)  # (b, kv_heads, n_c, hd) x2, (n_c,)
        if ctx.rotary is not None:
            q = apply_rotary(q, *ctx.rotary(query_pos))
            k = apply_rotary(k, *ctx.rotary(key_pos))
            compressed_k = apply_rotary(compressed_k, *ctx.rotary(block_start))  # a block sits at its start

        compressed, probs = self.compressed_attention(q, compressed_k, compressed_v, block_start, query_pos,
                                                      ctx.causal)
        selected_mask = self.selection_mask(probs.detach(), block_start, query_pos, key_pos, ctx.causal)  # (b, kv, t, T)
        group = self.n_heads // self.n_kv_heads
        selected = grouped_sdpa(q, k, v, attn_mask=selected_mask.repeat_interleave(group, 1))  # (b, heads, t, hd)
        if ctx.causal:
            in_window = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] > query_pos[:, None] - self.window)
        else:  # centred on the query: the neighbours on both sides in raster order
            in_window = (key_pos[None, :] - query_pos[:, None]).abs() <= self.window // 2  # (t, T)
        windowed = grouped_sdpa(q, k, v, attn_mask=in_window)

        gates = torch.sigmoid(self.branch_gate(x)).view(b, t, self.n_heads, 3).transpose(1, 2)  # (b, heads, t, 3)
        out = gates[..., 0:1] * compressed + gates[..., 1:2] * selected + gates[..., 2:3] * windowed
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def compress(self, k: torch.Tensor, v: torch.Tensor):
        """(b, kv_heads, T, hd) keys/values -> compressed keys/values (b, kv_heads, n_c, hd) and block starts (n_c,)."""
        b, kv_heads, total, hd = k.shape
        n_blocks = 0 if total < self.block else (total - self.block) // self.stride + 1
        block_start = torch.arange(n_blocks, device=k.device) * self.stride
        if n_blocks == 0:  # unfold cannot cut a block out of a shorter sequence
            empty = k.new_zeros(b, kv_heads, 0, hd)
            return empty, empty, block_start
        k_blocks = k.unfold(2, self.block, self.stride).transpose(-1, -2)  # (b, kv_heads, n_c, block, hd)
        v_blocks = v.unfold(2, self.block, self.stride).transpose(-1, -2)
        compressed_k = self.compress_key((k_blocks + self.block_position).flatten(-2))  # (b, kv_heads, n_c, hd)
        compressed_v = self.compress_value(v_blocks.flatten(-2))
        return compressed_k, compressed_v, block_start

    def compressed_attention(self, q, compressed_k, compressed_v, block_start, query_pos, causal: bool = True):
        """Attention over the ended compressed blocks -> output (b, heads, t, hd), probabilities (b, heads, t, n_c)."""
        b, heads, t, hd = q.shape
        kv_heads, n_blocks = compressed_k.shape[1], compressed_k.shape[2]
        q_groups = q.view(b, kv_heads, heads // kv_heads, t, hd)  # heads of one KV group side by side
        scores = q_groups @ compressed_k.unsqueeze(2).transpose(-1, -2) / math.sqrt(hd)  # (b, kv, g, t, n_c)
        visible = (block_start + self.block - 1)[None, :] <= query_pos[:, None]  # (t, n_c): block has ended
        if not causal:
            visible = torch.ones_like(visible)
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        # a query before the first complete block sees nothing: its (uniform) row is zeroed, not NaN
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32) * visible
        out = probs.to(compressed_v.dtype) @ compressed_v.unsqueeze(2)  # (b, kv, g, t, hd)
        return out.view(b, heads, t, hd), probs.view(b, heads, t, n_blocks)

    def selection_mask(self, probs, block_start, query_pos, key_pos, causal: bool = True) -> torch.Tensor:
        """Keys of the top-n selection blocks of each query, as a bool mask (b, kv_heads, t, T)."""
        b, heads, t, n_compressed = probs.shape
        kv_heads = self.n_kv_heads
        # the heads of a KV group pick the same blocks, so each group loads one set of keys (GQA-friendly)
        group_probs = probs.view(b, kv_heads, heads // kv_heads, t, n_compressed).sum(2)  # (b, kv, t, n_c)
        n_blocks = math.ceil(key_pos.numel() / self.select_block)
        select_start = torch.arange(n_blocks, device=probs.device) * self.select_block
        # tokens shared by compressed block i and selection block j: the share of i's score that j inherits
        overlap = (torch.minimum(block_start[:, None] + self.block, select_start[None, :] + self.select_block)
                   - torch.maximum(block_start[:, None], select_start[None, :])).clamp(min=0)  # (n_c, n_blocks)
        scores = group_probs @ overlap.float()  # (b, kv, t, n_blocks)

        block_id = torch.arange(n_blocks, device=probs.device)[None, :]  # (1, n_blocks)
        query_block = (query_pos // self.select_block)[:, None]  # (t, 1)
        if not causal:  # no past or future: the query's own block is forced, the others compete on score
            scores = scores.masked_fill(block_id == query_block, math.inf)
            top = scores.topk(min(self.n_selected, n_blocks), dim=-1).indices  # (b, kv, t, n)
            chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
            return chosen[..., key_pos // self.select_block]  # (b, kv, t, T)
        allowed = block_id <= query_block  # (t, n_blocks)
        forced = (block_id < self.INITIAL_BLOCKS) | (block_id > query_block - self.LOCAL_BLOCKS)
        scores = scores.masked_fill(forced, math.inf).masked_fill(~allowed, -math.inf)
        top = scores.topk(min(self.n_selected, n_blocks), dim=-1).indices  # (b, kv, t, n)
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & allowed  # drop -inf picks
        key_block = key_pos // self.select_block  # (T,)
        return chosen[..., key_block] & (key_pos[None, :] <= query_pos[:, None])  # (b, kv, t, T)
