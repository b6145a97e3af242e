"""Our attention/FFN modules against the transformers reference implementations, with copied weights."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Qwen2ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

from efficientllm_utils.arch import DecoderConfig, EfficientDecoderForCausalLM
from efficientllm_utils.arch.attention import AttentionContext
from efficientllm_utils.arch.ffn import SparseMoE, load_balancing_loss
from efficientllm_utils.arch.hf_reference import (deepseek_v3_attention, mla_state_dict, moe_block, moe_state_dict,
                                                  qwen2_config)
from efficientllm_utils.arch.mla import MultiHeadLatentAttention
from efficientllm_utils.arch.position import RotaryEmbedding

ATOL = 1e-5
VOCAB, HIDDEN, HEADS = 97, 64, 4


def qwen2_pair(n_kv_heads: int, attention: str):
    """A random Qwen2ForCausalLM and our model with the same weights."""
    config = DecoderConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, n_layers=2, n_heads=HEADS,
                           n_kv_heads=n_kv_heads, attention=attention, max_position_embeddings=256)
    torch.manual_seed(0)
    reference = Qwen2ForCausalLM(qwen2_config(config, attn_implementation="eager")).eval()
    ours = EfficientDecoderForCausalLM(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)  # same parameter names as Qwen2
    return reference, ours


KV_VARIANTS = [(HEADS, "mha"), (2, "gqa"), (1, "mqa")]


@pytest.mark.parametrize(("n_kv_heads", "attention"), KV_VARIANTS)
def test_logits_match_qwen2(n_kv_heads, attention):
    reference, ours = qwen2_pair(n_kv_heads, attention)
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(ours(ids, use_cache=False).logits, expected, atol=ATOL, rtol=0)

        # prefill 10 tokens, then feed the rest one token at a time through the cache
        out = ours(ids[:, :10], use_cache=True)
        steps = [out.logits]
        for i in range(10, ids.shape[1]):
            out = ours(ids[:, i:i + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("n_kv_heads", "attention"), KV_VARIANTS)
def test_greedy_generate_matches_qwen2_with_and_without_cache(n_kv_heads, attention):
    reference, ours = qwen2_pair(n_kv_heads, attention)
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = ours.generate(prompt, use_cache=True, **kwargs)
    assert torch.equal(cached, ours.generate(prompt, use_cache=False, **kwargs))
    assert torch.equal(cached, reference.generate(prompt, **kwargs))


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_mla_matches_deepseek_v3_attention(q_lora_rank):
    config = DecoderConfig(hidden_size=HIDDEN, n_heads=HEADS, n_kv_heads=HEADS, attention="mla", kv_lora_rank=16,
                           q_lora_rank=q_lora_rank, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
    torch.manual_seed(0)
    reference = deepseek_v3_attention(config, attn_implementation="eager").eval()
    for param in reference.parameters():
        torch.nn.init.normal_(param, std=0.1)
    ours = MultiHeadLatentAttention(config, layer_idx=0).eval()
    ours.load_state_dict(mla_state_dict(reference), strict=True)

    b, t = 2, 9
    x = torch.randn(b, t, HIDDEN)
    positions = torch.arange(t).expand(b, -1)
    causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
    reference_cache, our_cache = DynamicCache(), DynamicCache()
    ctx = AttentionContext(rotary=None, query_rope=RotaryEmbedding(8, config.rope_theta)(positions),
                           mask=None, is_causal=True, padded=False, cache=our_cache)
    with torch.no_grad():
        expected, _ = reference(x, DeepseekV3RotaryEmbedding(reference.config)(x, positions), causal,
                                cache=reference_cache)
        torch.testing.assert_close(ours(x, ctx), expected, atol=ATOL, rtol=0)
    # both cache only the normalised latent (b, 1, t, kv_lora_rank) and the rotated shared key (b, 1, t, rope)
    torch.testing.assert_close(our_cache.layers[0].keys, reference_cache.layers[0].keys, atol=ATOL, rtol=0)
    torch.testing.assert_close(our_cache.layers[0].values, reference_cache.layers[0].values, atol=ATOL, rtol=0)
    assert our_cache.layers[0].keys.shape == (b, 1, t, 16)


@pytest.mark.parametrize(("n_shared_experts", "reference_name"),
                         [(1, "Qwen2MoeSparseMoeBlock"), (0, "MixtralSparseMoeBlock")])
def test_moe_matches_hf_block(n_shared_experts, reference_name):
    config = DecoderConfig(hidden_size=32, ffn="moe", n_experts=6, moe_top_k=2, moe_intermediate_size=24,
                           n_shared_experts=n_shared_experts)
    torch.manual_seed(0)
    reference = moe_block(config).eval()
    assert type(reference).__name__ == reference_name
    for param in reference.parameters():
        torch.nn.init.normal_(param, std=0.2)
    ours = SparseMoE(config).eval()
    ours.load_state_dict(moe_state_dict(reference), strict=True)

    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        out, router_logits = ours(x)
        torch.testing.assert_close(out, reference(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(load_balancing_loss(router_logits, 2),
                               load_balancing_loss_func((router_logits,), 6, 2), atol=1e-6, rtol=0)
