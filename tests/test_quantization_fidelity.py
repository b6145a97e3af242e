"""Fidelity to the reference precision: KL divergence, top-1 agreement and flip rate, against hand computations."""
import copy

import pytest
import torch

from efficientllm_utils import models, quality
from efficientllm_utils.studies.quantization_run import QuantizationRun
from efficientllm_utils.studies import quantization as q

TEXT_TOKENS, SEQ_LEN = 96, 32  # three windows


def _distributions(model, tokenizer, keep=TEXT_TOKENS):
    return quality.perplexity(model, tokenizer, quality.heldout_text(5000), seq_len=SEQ_LEN, max_tokens=TEXT_TOKENS,
                              batch_size=2, keep_distributions=keep)["logprobs"]


def _perturbed(model, scale=0.05):
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(scale * torch.randn_like(param))
    return other


def test_identical_models_give_zero_kl_full_agreement_and_no_flips(tiny_llama):
    model, tokenizer = tiny_llama
    reference = _distributions(model, tokenizer)
    assert reference.shape == (3 * (SEQ_LEN - 1), len(tokenizer))
    same = quality.fidelity(reference, _distributions(model, tokenizer))
    assert same["kl_to_reference"] == pytest.approx(0.0, abs=1e-9) and same["top1_agreement"] == 1.0
    assert same["fidelity_tokens"] == 3 * (SEQ_LEN - 1)
    predictions = {"boolq": [0, 1, 1], "piqa": [1, 0]}
    assert quality.flips(predictions, predictions)["flip_rate"] == 0.0


def test_kl_and_top1_of_a_perturbed_model_equal_a_direct_torch_computation(tiny_llama):
    model, tokenizer = tiny_llama
    other = _perturbed(model)
    result = quality.fidelity(_distributions(model, tokenizer), _distributions(other, tokenizer))
    # the obvious computation: every window through both models, KL over the vocabulary, mean over positions
    ids = tokenizer(quality.heldout_text(5000), add_special_tokens=False).input_ids[:TEXT_TOKENS]
    windows = torch.tensor(ids).view(-1, SEQ_LEN)  # (3, SEQ_LEN)
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=windows).logits[:, :-1].double(), -1).reshape(-1, len(tokenizer))
        r = torch.log_softmax(other(input_ids=windows).logits[:, :-1].double(), -1).reshape(-1, len(tokenizer))
    direct_kl = torch.nn.functional.kl_div(r, p, log_target=True, reduction="batchmean")  # KL(p || r)
    assert result["kl_to_reference"] > 1e-4
    assert result["kl_to_reference"] == pytest.approx(float(direct_kl), rel=1e-4)
    assert result["top1_agreement"] == pytest.approx(float((p.argmax(-1) == r.argmax(-1)).double().mean()))
    assert len(result["kl_per_token"]) == len(result["top1_agree"]) == p.shape[0]
    assert min(result["kl_per_token"]) >= -1e-9  # a KL divergence is never negative
    # only the first positions when asked for fewer
    assert quality.fidelity(_distributions(model, tokenizer, 10), _distributions(other, tokenizer, 10))[
        "kl_per_token"] == pytest.approx(result["kl_per_token"][:10])


def test_flip_rate_counts_changed_answers_right_or_wrong():
    reference = {"boolq": [0, 1, 1], "piqa": [1, 0]}
    result = quality.flips(reference, {"boolq": [0, 0, 1], "piqa": [0, 0]})
    assert result["flip_rate"] == pytest.approx(2 / 5) and result["flip_items"] == 5
    assert result["flipped"] == {"boolq": [0, 1, 0], "piqa": [1, 0]}
    with pytest.raises(ValueError, match="same tasks"):
        quality.flips(reference, {"boolq": [0, 1, 1]})
    with pytest.raises(ValueError, match="do not match"):
        quality.fidelity(torch.zeros(3, 5), torch.zeros(4, 5))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, saved, so the study can load it at any precision."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(models.resolve_source("smollm2-135m-instruct"))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
                     ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _run(tiny_dir, precision):
    return QuantizationRun(model=tiny_dir, precision=precision, reference_precision="fp32", tasks=["boolq", "piqa"],
                           n_per_task=3, ppl_tokens=64, ppl_seq_len=32)


def test_reference_outputs_are_the_same_in_any_run_order(tiny_dir, tmp_path):
    bf16, fp32 = _run(tiny_dir, "bf16"), _run(tiny_dir, "fp32")
    # a non-reference run first: it loads the reference model and computes its outputs
    first = q.reference_outputs(bf16, tmp_path, "precision=bf16")
    assert not first["reused"] and first["computed_by"] == "precision=bf16"
    assert q.reference_outputs(fp32, tmp_path, "precision=fp32") is None  # the reference run needs no other model
    # then the reference run: compared with itself, and its own outputs are the ones already stored
    model, tokenizer, _ = q.load(fp32)
    own, raw = q.measure_quality(model, tokenizer, fp32, None, tmp_path, "precision=fp32")
    assert (own["kl_to_reference"], own["top1_agreement"], own["flip_rate"]) == (0.0, 1.0, 0.0)
    assert own["fidelity_tokens"] == 62 and own["flip_items"] == 6
    assert own["reference_source"] == "this run is the reference"
    assert own["reference_fingerprint"] == first["fingerprint"]
    assert raw["reference_predictions"] == first["predictions"] == own["predictions"]
    # a later run reuses what the first computed: the very same numbers
    again = q.reference_outputs(bf16, tmp_path, "precision=int8")
    assert again["reused"] and again["computed_by"] == "precision=bf16"
    assert torch.equal(again["logprobs"], first["logprobs"])
    # the bf16 run against it: KL as computed directly from the two models' distributions
    model16, tokenizer16, _ = q.load(bf16)
    result, raw16 = q.measure_quality(model16, tokenizer16, bf16, again, tmp_path, "precision=bf16")
    ref, other = first["logprobs"].double(), _distributions_of(model16, tokenizer16, bf16).double()  # (62, vocab)
    # KL(fp32 || bf16) per position, averaged: torch's own kl_div, not quality.fidelity. Its sign is not asserted:
    # bf16's log-probabilities need not sum to exactly 1, so on a CPU with AVX512-BF16 kernels it comes out -3e-7
    direct_kl = torch.nn.functional.kl_div(other, ref, reduction="none", log_target=True).sum(-1).mean().item()
    assert result["kl_to_reference"] == pytest.approx(direct_kl, rel=1e-6, abs=1e-12)
    assert abs(result["kl_to_reference"]) < 1e-2  # bf16 of a small model stays close to fp32
    assert result["top1_agreement"] == (ref.argmax(-1) == other.argmax(-1)).double().mean().item()
    assert result["reference_source"].startswith("reused from run precision=bf16")
    assert len(raw16["kl_per_token"]) == 62 and sum(map(len, raw16["flipped"].values())) == 6
    # a different reference (here: other items) is another fingerprint, computed again
    other = q.reference_outputs(bf16.model_copy(update={"n_per_task": 2}), tmp_path, "x")
    assert not other["reused"] and other["fingerprint"] != first["fingerprint"]


def _distributions_of(model, tokenizer, p):
    return quality.perplexity(model, tokenizer, quality.heldout_text(), seq_len=p.ppl_seq_len,
                              max_tokens=p.ppl_tokens, keep_distributions=p.ppl_tokens)["logprobs"]
