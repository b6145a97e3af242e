"""Native sparse attention against a looping, obviously-correct reference; causality of every attention."""
from __future__ import annotations

import math

import pytest
import torch

from efficientllm_utils.arch import DecoderConfig, EfficientDecoderForCausalLM, paper_config
from efficientllm_utils.arch.attention import AttentionContext
from efficientllm_utils.arch.nsa import NativeSparseAttention
from efficientllm_utils.arch.position import RotaryEmbedding, apply_rotary

from .nsa_reference import attend, nsa_projections

NSA_SHAPE = dict(hidden_size=32, n_heads=4, n_kv_heads=2, head_dim=8, attention="nsa", compress_block=4,
                 compress_stride=2, select_block=4, n_selected=4, window=5)


def rope_at(vector: torch.Tensor, position: int, rotary: RotaryEmbedding) -> torch.Tensor:
    cos, sin = rotary(torch.tensor([position]))
    return apply_rotary(vector.view(1, 1, -1), cos, sin).view(-1)


def naive_nsa(module: NativeSparseAttention, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
    """NSA written from the paper's equations, one batch row, head and query at a time."""
    b, total, _ = x.shape
    heads, kv_heads, hd = module.n_heads, module.n_kv_heads, module.head_dim
    group = heads // kv_heads
    size, l_sel, n, w = module.block, module.select_block, module.n_selected, module.window
    q, k, v, gates, starts, n_blocks = nsa_projections(module, x)
    out = torch.zeros(b, total, heads, hd)
    for bi in range(b):
        keys = [[rope_at(k[bi, s, g], s, rotary) for s in range(total)] for g in range(kv_heads)]
        values = [[v[bi, s, g] for s in range(total)] for g in range(kv_heads)]
        compressed_k = [[rope_at(module.compress_key((k[bi, s:s + size, g] + module.block_position).flatten()),
                                 s, rotary) for s in starts] for g in range(kv_heads)]
        compressed_v = [[module.compress_value(v[bi, s:s + size, g].flatten()) for s in starts]
                        for g in range(kv_heads)]
        for p in range(total):
            queries = [rope_at(q[bi, p, h], p, rotary) for h in range(heads)]
            visible = [i for i, s in enumerate(starts) if s + size - 1 <= p]
            block_scores = [[0.0] * n_blocks for _ in range(kv_heads)]
            compressed = [torch.zeros(hd) for _ in range(heads)]
            for h in range(heads):
                if not visible:
                    continue
                g = h // group
                scores = torch.stack([queries[h] @ compressed_k[g][i] for i in visible]) / math.sqrt(hd)
                probs = torch.softmax(scores, dim=0)
                compressed[h] = sum(prob * compressed_v[g][i] for prob, i in zip(probs, visible, strict=True))
                for prob, i in zip(probs, visible, strict=True):  # share a block's probability by common tokens
                    tokens = set(range(starts[i], starts[i] + size))
                    for j in range(n_blocks):
                        block_scores[g][j] += prob.item() * len(tokens & set(range(j * l_sel, (j + 1) * l_sel)))
            own = p // l_sel
            forced = {0, own - 1, own}
            for h in range(heads):
                g = h // group
                ranked = sorted(range(own + 1), key=lambda j: (j not in forced, -block_scores[g][j]))
                selected_tokens = [s for s in range(p + 1) if s // l_sel in ranked[:n]]
                window_tokens = range(max(0, p - w + 1), p + 1)
                selected = attend(queries[h], [keys[g][s] for s in selected_tokens],
                                  [values[g][s] for s in selected_tokens])
                windowed = attend(queries[h], [keys[g][s] for s in window_tokens],
                                  [values[g][s] for s in window_tokens])
                out[bi, p, h] = gates[bi, p, h] @ torch.stack([compressed[h], selected, windowed])
    return module.o_proj(out.view(b, total, heads * hd))


def test_nsa_matches_naive_loops():
    torch.manual_seed(0)
    config = DecoderConfig(**NSA_SHAPE)
    module = NativeSparseAttention(config, layer_idx=0).eval()
    for param in module.parameters():
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(2, 22, config.hidden_size)
    rotary = RotaryEmbedding(config.head_dim, 10000.0)
    ctx = AttentionContext(rotary=rotary, query_rope=None, mask=None, is_causal=True,
                           padded=False, cache=None)
    with torch.no_grad():
        torch.testing.assert_close(module(x, ctx), naive_nsa(module, x, rotary), atol=1e-5, rtol=0)


def test_nsa_selection_includes_a_scored_block():
    """With more history than forced blocks, the selection branch must pick by score, not only forced blocks."""
    torch.manual_seed(0)
    module = NativeSparseAttention(DecoderConfig(**NSA_SHAPE), layer_idx=0)
    probs = torch.rand(1, 4, 1, 9)
    block_start = torch.arange(9) * 2
    mask = module.selection_mask(probs, block_start, torch.tensor([19]), torch.arange(20))  # (1, 2, 1, 20)
    # by hand: a selection block's score is the sum, over its 4 tokens, of the group's probabilities of the
    # compressed blocks (4 tokens from 2i) that hold the token; blocks 0 (initial), 3 and 4 (local) are forced, so
    # the fourth pick is the better scored of blocks 1 and 2, for each KV group (heads 0-1, heads 2-3) on its own
    for kv, heads in enumerate((slice(0, 2), slice(2, 4))):
        group = probs[0, heads, 0].sum(0)  # (9,)
        score = {j: sum(float(group[i]) for s in range(4 * j, 4 * j + 4) for i in range(9) if 2 * i <= s < 2 * i + 4)
                 for j in (1, 2)}
        assert score[1] != score[2]
        chosen_blocks = {int(s) // 4 for s in mask[0, kv, 0].nonzero().flatten()}
        assert chosen_blocks == {0, 3, 4, max(score, key=score.get)}, kv


TINY = dict(vocab_size=61, hidden_size=32, n_layers=2, n_heads=4, intermediate_size=48, compress_block=4,
            compress_stride=2, select_block=4, n_selected=3, window=6)


@pytest.mark.parametrize("attention", ["mha", "gqa", "mqa", "mla", "nsa"])
def test_future_tokens_do_not_change_past_outputs(attention):
    torch.manual_seed(0)
    model = EfficientDecoderForCausalLM(paper_config(attention=attention, **TINY)).eval()
    ids = torch.randint(0, 61, (2, 30))
    changed = ids.clone()
    changed[:, 18:] = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        before, after = model(ids, use_cache=False).logits, model(changed, use_cache=False).logits
    torch.testing.assert_close(after[:, :18], before[:, :18], atol=0, rtol=0)
    assert not torch.allclose(after[:, 18:], before[:, 18:])
