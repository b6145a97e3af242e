"""The real SmolLM2-135M-Instruct, loaded at each precision: are the bytes what they claim?"""
import pytest
import torch

from efficientllm_utils import models
from efficientllm_utils.precisions.counting import count_model_bytes, linear_layer_kinds


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(precision):
        if precision not in cache:
            cache[precision] = models.load_causal_lm("smollm2-135m-instruct", precision)[0]
        return cache[precision]
    return get


def test_fp32_bytes_count_tied_weights_once(loaded):
    model = loaded("fp32")
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    counted = count_model_bytes(model)
    assert counted["total_bytes"] == sum(unique.values())
    assert counted["total_bytes"] < 4 * sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_int4_layers_really_hold_four_bit_weights(loaded):
    import bitsandbytes as bnb

    model = loaded("int4-nf4")
    kinds = linear_layer_kinds(model)
    assert kinds.get("Linear4bit", 0) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.dtype == torch.uint8
    assert layer.weight.numel() * 2 == layer.in_features * layer.out_features  # two 4-bit codes per byte
    ratio = count_model_bytes(loaded("bf16"))["linear_weight_bytes"] / \
        count_model_bytes(model)["linear_weight_bytes"]
    assert 3.4 < ratio < 4.0  # 16 -> 4 bits, plus one fp32 scale per 64 weights


def test_int8_layers_hold_int8_weights(loaded):
    model = loaded("int8")
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear8bitLt" and layer.weight.dtype == torch.int8


def test_quantized_model_still_predicts_like_the_reference(loaded):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.resolve_source("smollm2-135m-instruct"))
    ids = tokenizer("The capital of France is the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = loaded("fp32")(ids).logits[0, -1]
        q = loaded("int4-nf4")(ids).logits[0, -1].float()
    assert torch.topk(ref, 5).indices[0] in torch.topk(q, 5).indices  # damaged a little, not destroyed
    assert tokenizer.decode(ref.argmax()).strip() == "Paris"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        models.load_causal_lm("smollm2-135m-instruct", "int3")


def test_a_paper_shape_is_built_once_with_its_exact_shape_and_no_quality(tmp_path, monkeypatch):
    """``shape:<name>``: random weights of a paper model's config, cached; studies measure no quality on them."""
    from efficientllm_utils import assets
    from efficientllm_utils.studies.quantization_run import QuantizationRun
    from efficientllm_utils.studies import quantization as q

    tokenizer_dir = models.converted_checkpoint("smollm2-135m-instruct")
    monkeypatch.setattr(assets, "cache_dir", lambda: tmp_path / "assets")
    monkeypatch.setattr(models, "converted_checkpoint", lambda name: tokenizer_dir)
    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=50000, tie_word_embeddings=False)
    monkeypatch.setitem(models.SHAPE_MODELS, "tiny-qwen2", tiny)
    model, _ = models.load_causal_lm("shape:tiny-qwen2", "bf16")
    expected = 2 * 50000 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 + 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64
    assert sum(p.numel() for p in model.parameters()) == expected  # q/k/v biases, untied head, norms
    built = tmp_path / "models" / "shape-tiny-qwen2-seed0" / "model.safetensors"
    stamp = built.stat().st_mtime_ns
    models.load_causal_lm("shape:tiny-qwen2", "fp32")
    assert built.stat().st_mtime_ns == stamp  # built once, then reused

    p = QuantizationRun(model="shape:qwen2.5-7b", precision="int4-nf4", reference_precision="bf16")
    assert not p.scores_quality and q.reference_outputs(p, None) is None
    quality, raw = q.measure_quality(None, None, p)
    assert raw == {} and "random weights" in quality["not_measured"]
    with pytest.raises(ValueError, match="shape:qwen2.5-1.5b"):
        QuantizationRun(model="shape:qwen3", precision="bf16")
