import math

import pytest
import torch

from efficientllm_utils import quality


@pytest.mark.parametrize("task", quality.TASKS)
def test_tasks_load_real_labelled_items(task):
    items = quality.load_task(task, 30, seed=0)
    assert len(items) == 30
    for item in items:
        assert item.context.strip() and len(item.choices) >= 2 and 0 <= item.gold < len(item.choices)
    assert items == quality.load_task(task, 30, seed=0)  # a fixed subset
    assert items != quality.load_task(task, 30, seed=1)
    golds = {i.gold for i in quality.load_task(task, 200)}
    assert len(golds) >= 2  # gold answers are not all the same choice


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        quality.load_task("trivia")


def _reference_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """The obvious computation: score the continuation's tokens in one full forward pass."""
    ctx = tokenizer(context).input_ids
    cont = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return float(sum(logprobs[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_loglikelihoods_match_a_plain_forward_pass(tiny_llama):
    model, tokenizer = tiny_llama
    items = quality.load_task("boolq", 3) + quality.load_task("piqa", 3)  # one-token and multi-token choices
    scores = quality.choice_loglikelihoods(model, tokenizer, items, max_batch_tokens=300)
    for item, item_scores in zip(items, scores):
        for choice, score in zip(item.choices, item_scores):
            assert score == pytest.approx(_reference_loglik(model, tokenizer, item.context, choice), abs=1e-4)


def test_accuracy_counts_argmax_predictions(tiny_llama, monkeypatch):
    model, tokenizer = tiny_llama
    items = quality.load_task("openbookqa", 4)
    fake = [[0.0] * len(i.choices) for i in items]
    for scores, item in zip(fake[:3], items[:3]):
        scores[item.gold] = 1.0  # three right, one wrong
    fake[3][(items[3].gold + 1) % len(items[3].choices)] = 1.0
    monkeypatch.setattr(quality, "choice_loglikelihoods", lambda *a, **k: fake)
    result = quality.mc_accuracy(model, tokenizer, items)
    assert result["accuracy"] == 0.75 and result["correct"] == [1, 1, 1, 0]
    assert result["stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))


def test_perplexity_equals_exp_of_the_models_own_loss(tiny_llama):
    model, tokenizer = tiny_llama
    text = quality.heldout_text(5000)
    result = quality.perplexity(model, tokenizer, text, seq_len=64, max_tokens=64)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids[:64]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert result["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert result["tokens"] == 63


def test_shared_context_scoring_equals_one_sequence_per_choice_item_by_item(tiny_llama):
    """Each context run once, the choices continuing from its cached keys and values, gives every choice the
    log-likelihood of the harness's one sequence per choice: items of one-token and multi-token choices, of 2 and 4
    choices and contexts of different lengths, in batches small enough to split them and large enough to pad."""
    model, tokenizer = tiny_llama
    items = (quality.load_task("boolq", 3) + quality.load_task("piqa", 4) + quality.load_task("openbookqa", 4)
             + quality.load_task("mmlu", 2))
    for budget in (256, 4096):
        shared = quality.choice_loglikelihoods(model, tokenizer, items, max_batch_tokens=budget)
        separate = quality.choice_loglikelihoods(model, tokenizer, items, max_batch_tokens=budget, share_context=False)
        for item, a, b in zip(items, shared, separate):
            assert len(a) == len(item.choices)
            assert a == pytest.approx(b, abs=1e-4), item.context


def test_exact_match_is_right_exactly_when_greedy_decoding_writes_the_answer(tiny_llama):
    """An item whose answer is the model's own greedy continuation is right; the same item with one answer token
    changed is wrong; every verdict equals greedy generation's (``generate``, no sampling) of as many tokens."""
    model, tokenizer = tiny_llama
    contexts = [item.context for item in quality.load_task("openbookqa", 6)]
    items = []
    for context in contexts:
        ids = torch.tensor([tokenizer(context).input_ids])
        with torch.no_grad():
            greedy = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        text = tokenizer.decode(greedy)
        if tokenizer(text, add_special_tokens=False).input_ids == greedy:  # the text tokenises back to them
            items += [quality.AnswerItem(context, text), quality.AnswerItem(context, text + "7")]
    assert len(items) >= 4
    result = quality.exact_match(model, tokenizer, items, max_batch_tokens=256)
    assert result["correct"][0::2] == [1] * (len(items) // 2)
    for item, right in zip(items, result["correct"]):
        answer = tokenizer(item.answer, add_special_tokens=False).input_ids
        ids = torch.tensor([tokenizer(item.context).input_ids])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=len(answer), do_sample=False, pad_token_id=0)
        assert right == int(out[0, ids.shape[1]:].tolist() == answer)
    assert result["accuracy"] == sum(result["correct"]) / len(items)


def test_exact_match_through_a_shared_prefix_equals_every_item_run_whole(tiny_llama):
    """The tokens every context starts with, run once and continued from their cache, give every item the same
    verdict and answer log-probability as running each item whole: contexts of different lengths behind one long
    common start, answers of one and several tokens, batches small enough to split them and large enough to pad."""
    from efficientllm_utils.quality import _common_prefix_length

    model, tokenizer = tiny_llama
    system = "Answer with the number only. Read the question and give one number, nothing else."
    items = [quality.AnswerItem(f"{system}\n{item.context}", answer)
             for item, answer in zip(quality.load_task("openbookqa", 6), ["7", " 12", "3.5", " forty two", "8", "1"])]
    requests = [(tokenizer(i.context).input_ids, tokenizer(i.answer, add_special_tokens=False).input_ids)
                for i in items]
    assert _common_prefix_length(requests) >= 10  # the shared start is really shared, and long
    for budget in (128, 4096):
        shared = quality.exact_match(model, tokenizer, items, max_batch_tokens=budget)
        whole = quality.exact_match(model, tokenizer, items, max_batch_tokens=budget, share_prefix=False)
        assert shared["correct"] == whole["correct"]
        assert shared["first_token_right"] == whole["first_token_right"]
        assert shared["gold_logprobs"] == pytest.approx(whole["gold_logprobs"], abs=1e-4)


def test_the_shared_prefix_leaves_each_context_a_token_of_its_own():
    from efficientllm_utils.quality import _common_prefix_length

    assert _common_prefix_length([([1, 2, 3], [9]), ([1, 2, 3, 4], [9])]) == 2  # not 3: the first has nothing left
    assert _common_prefix_length([([1, 2, 3], [9]), ([5, 2, 3], [9])]) == 0
    assert _common_prefix_length([([1, 2, 3], [9])]) == 0  # one sequence: nothing to share
