"""The real SmolLM2-135M-Instruct, loaded at each precision: are the bytes what they claim?"""
import pytest
import torch

from efficientllm_utils import models


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
    counted = models.count_model_bytes(model)
    assert counted["total_bytes"] == sum(unique.values())
    assert counted["total_bytes"] < 4 * sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_int4_layers_really_hold_four_bit_weights(loaded):
    import bitsandbytes as bnb

    model = loaded("int4-nf4")
    kinds = models.linear_layer_kinds(model)
    assert kinds.get("Linear4bit", 0) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.dtype == torch.uint8
    assert layer.weight.numel() * 2 == layer.in_features * layer.out_features  # two 4-bit codes per byte
    ratio = models.count_model_bytes(loaded("bf16"))["linear_weight_bytes"] / \
        models.count_model_bytes(model)["linear_weight_bytes"]
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
