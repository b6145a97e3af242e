"""The model as an HF causal LM: cache size, save/load, peft, bitsandbytes, config errors, training."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from efficientllm_utils.arch import DecoderConfig, EfficientDecoderForCausalLM, lora_target_modules, paper_config
from efficientllm_utils.arch.analysis import (flops_per_token, kv_cache_bytes_per_token,
                                              measure_kv_cache_bytes_per_token, param_counts)
from efficientllm_utils.arch.train import evaluate_perplexity, pretrain

TINY = dict(vocab_size=61, hidden_size=32, n_layers=2, n_heads=4, intermediate_size=48, max_position_embeddings=64,
            compress_block=4, compress_stride=2, select_block=4, n_selected=3, window=6,
            kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
ATTENTIONS = ["mha", "gqa", "mqa", "mla", "nsa"]


def tiny_model(seed: int = 0, **overrides) -> EfficientDecoderForCausalLM:
    torch.manual_seed(seed)
    return EfficientDecoderForCausalLM(paper_config(**{**TINY, **overrides}))


def token_ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_measured_kv_cache_bytes_equal_the_formula(attention):
    model = tiny_model(attention=attention).eval()
    measured = measure_kv_cache_bytes_per_token(model, token_ids(2, 13))
    assert measured == kv_cache_bytes_per_token(model.config, dtype_bytes=4)


def test_kv_cache_formula_orders_the_attention_kinds():
    bytes_per_token = {a: kv_cache_bytes_per_token(paper_config("0.5B", attention=a)) for a in ATTENTIONS}
    assert bytes_per_token["mha"] == 7 * bytes_per_token["gqa"] == 14 * bytes_per_token["mqa"]
    assert bytes_per_token["nsa"] == bytes_per_token["gqa"]
    assert bytes_per_token["mla"] == 24 * (896 // 8 + 32) * 2


@pytest.mark.parametrize(("attention", "position", "ffn"),
                         [("gqa", "rope", "dense"), ("mla", "relative", "moe"), ("nsa", "learnable", "moe")])
def test_incremental_decoding_and_generate_match_full_forward(attention, position, ffn):
    model = tiny_model(attention=attention, position=position, ffn=ffn, n_shared_experts=1).eval()
    ids = token_ids(2, 20)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        prefill = model(ids[:, :12], use_cache=True)
        rest = model(ids[:, 12:], cache=prefill.cache, use_cache=True)  # several new tokens after a cache
    torch.testing.assert_close(torch.cat([prefill.logits, rest.logits], 1), full, atol=1e-5, rtol=0)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:, :5], use_cache=True, **kwargs),
                       model.generate(ids[:, :5], use_cache=False, **kwargs))


def test_left_padded_generate_is_the_same_with_and_without_cache():
    model = tiny_model(attention="gqa").eval()
    ids = token_ids(2, 7)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :3] = 0  # row 0 is left-padded
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs))


@pytest.mark.parametrize(("attention", "position", "ffn"),
                         [("gqa", "rope", "dense"), ("mla", "absolute", "moe"), ("nsa", "rope", "dense")])
def test_save_and_auto_load_give_identical_logits(tmp_path, attention, position, ffn):
    model = tiny_model(attention=attention, position=position, ffn=ffn).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is EfficientDecoderForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    ids = token_ids(2, 11)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(("attention", "ffn", "expected"), [
    ("gqa", "dense", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("mla", "moe", ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
])
def test_lora_wraps_the_model_and_trains_one_step(attention, ffn, expected):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(attention=attention, ffn=ffn)
    assert lora_target_modules(model) == expected
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=expected))
    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = peft_model.base_model.model.model.embed_tokens.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_ids(2, 16)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = [n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert changed
    assert torch.equal(peft_model.base_model.model.model.embed_tokens.weight, frozen_before)


def test_bitsandbytes_4bit_load_quantises_the_linears(tmp_path):
    from bitsandbytes.nn import Linear4bit

    model = tiny_model(attention="gqa", hidden_size=64, intermediate_size=128).eval()
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantised = AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
            device_map="cpu")
    assert isinstance(quantised.model.layers[0].self_attn.q_proj, Linear4bit)
    assert isinstance(quantised.model.layers[0].mlp.down_proj, Linear4bit)
    ids = token_ids(1, 12)
    with torch.no_grad():
        expected, got = model(ids).logits, quantised(ids).logits
    assert (got - expected).abs().max() < 0.2 * expected.abs().max()
    assert quantised.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 16)


@pytest.mark.parametrize(("kwargs", "field", "allowed"), [
    (dict(attention="sparse"), "attention", "['mha', 'gqa', 'mqa', 'mla', 'nsa']"),
    (dict(position="alibi"), "position", "['rope', 'absolute', 'learnable', 'relative', 'none']"),
    (dict(ffn="glu"), "ffn", "['dense', 'moe']"),
    (dict(attention="mha", n_heads=14, n_kv_heads=2), "n_kv_heads", "n_kv_heads == n_heads (14)"),
    (dict(attention="mqa", n_kv_heads=2), "n_kv_heads", "n_kv_heads == 1"),
    (dict(attention="gqa", n_heads=14, n_kv_heads=4), "n_kv_heads", "dividing n_heads (14)"),
    (dict(ffn="moe", n_shared_experts=2), "n_shared_experts", "[0, 1]"),
    (dict(ffn="moe", moe_top_k=9), "moe_top_k", "[1, n_experts=8]"),
    (dict(attention="nsa", compress_stride=65), "compress_stride", "compress_block=64"),
    (dict(attention="nsa", position="relative"), "position", "['rope', 'absolute', 'learnable', 'none']"),
    (dict(n_layers=0), "n_layers", "positive integer"),
])
def test_config_errors_name_the_field_and_the_allowed_values(kwargs, field, allowed):
    with pytest.raises(ValueError) as error:
        DecoderConfig(**kwargs)
    assert field in str(error.value) and allowed in str(error.value)


def test_paper_shapes_have_the_qwen25_parameter_counts():
    counts = {size: param_counts(paper_config(size))["total"] for size in ("0.5B", "1.5B", "3B")}
    assert counts == {"0.5B": 494_032_768, "1.5B": 1_543_714_304, "3B": 3_085_938_688}
    moe = paper_config("0.5B", ffn="moe")
    dense_ffn = 3 * 896 * 4864
    assert param_counts(moe)["total"] - param_counts(moe)["active"] == 24 * 6 * 3 * 896 * 2432
    assert param_counts(moe)["active"] - param_counts(paper_config("0.5B"))["total"] == 24 * (896 * 8 + 2 * 3 * 896
                                                                                               * 2432 - dense_ffn)


def test_flops_grow_with_context_and_nsa_caps_attention():
    gqa, nsa = paper_config("0.5B"), paper_config("0.5B", attention="nsa")
    assert flops_per_token(gqa, 8192) - flops_per_token(gqa, 4096) == 24 * 2 * 14 * 2 * 64 * 4096
    assert flops_per_token(nsa, 8192) - flops_per_token(nsa, 4096) < 0.1 * (flops_per_token(gqa, 8192)
                                                                          - flops_per_token(gqa, 4096))
    matmuls = flops_per_token(gqa, 0)
    norms, qkv_biases = 24 * 2 * 896 + 896, 24 * (896 + 2 * 128)
    assert matmuls == 2 * (param_counts(gqa)["total"] - norms - qkv_biases)  # tied lm_head counted once


@pytest.mark.parametrize(("position", "ffn"), [("rope", "dense"), ("absolute", "dense"), ("learnable", "dense"),
                                               ("relative", "dense"), ("none", "dense"), ("rope", "moe")])
def test_training_lowers_the_loss(position, ffn):
    model = tiny_model(position=position, ffn=ffn)
    batch = token_ids(4, 32, seed=3)
    before = evaluate_perplexity(model, [batch])
    samples = pretrain(model, itertools.repeat(batch, 12), steps=12, lr=2e-2, warmup=2, min_lr=2e-3, seed=0)
    after = evaluate_perplexity(model, [batch])
    assert len(samples) == 12 and all(s.tokens == 128 and s.seconds > 0 for s in samples)
    assert after["loss"] < 0.8 * before["loss"]
    assert samples[-1].lm_loss < samples[0].lm_loss
    assert (samples[0].aux_loss is not None) == (ffn == "moe")
    assert before["tokens"] == 4 * 31
