"""Held-out answers scored by log-likelihood over each task's closed answer set.

As ``quality.choice_loglikelihoods`` does for one-token choices: one forward pass of the prompt (with its image),
the log-softmax over the whole vocabulary at the last prompt position, each answer's token read off it. The
prediction is the best-scoring answer; the *answer distribution* is the softmax over the answer set only, what the
KL divergence and the flip rate between two models (``quality.fidelity``, ``quality.flips``) compare.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..finetune.train import collate, evaluating, model_extras
from ..quality import choice_accuracy
from . import data as vdata


def _requests(choice_ids: list[list[int]]) -> list[tuple[int, ...]]:
    """The continuations to feed after the prompt so that every choice's tokens are predicted: the prompt alone when
    every choice is one token, else each longer choice's tokens but its last (whose first position is the prompt's
    last, so the one-token choices are read off the first request too)."""
    longer = [tuple(c[:-1]) for c in choice_ids if len(c) > 1]
    return list(dict.fromkeys(longer)) or [()]


@torch.no_grad()
def answer_logprobs(model, processor, items: list[vdata.VQAItem], batch_size: int = 16,
                    num_threads: int | None = None) -> list[list[float]]:
    """Summed log-probability (over the vocabulary) of each answer's tokens of each item, after its prompt and
    image: one forward pass per item (per answer of several tokens, if there is one)."""
    device = next(model.parameters()).device
    pad = processor.tokenizer.pad_token_id or 0
    choice_ids = {c: vdata.answer_token_ids(processor, c) for c in {i.choices for i in items}}
    plan = []  # (item index, request prefix, Example)
    for n, item in enumerate(items):
        prompt = vdata.encode(processor, item.image, item.question, None, item.row)
        plan += [(n, prefix, vdata.extend(prompt, list(prefix))) for prefix in _requests(choice_ids[item.choices])]
    dists: dict[tuple[int, tuple], torch.Tensor] = {}
    with evaluating(model, num_threads):
        for start in range(0, len(plan), batch_size):
            chunk = plan[start:start + batch_size]
            batch = collate([e for _, _, e in chunk], pad)  # right-padded
            lengths = batch["attention_mask"].sum(-1)
            keep = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
            for row, (_, prefix, _) in enumerate(chunk):  # the prompt's last position and the prefix's
                keep[row, lengths[row] - 1 - len(prefix): lengths[row]] = True
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device), logits_to_keep=keep.to(device),
                           use_cache=False, **model_extras(batch, device)).logits
            logprobs = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1).cpu()
            for (n, prefix, _), part in zip(chunk, logprobs.split([len(p) + 1 for _, p, _ in chunk])):
                dists[(n, prefix)] = part  # (len(prefix) + 1, vocab)
    scores = []
    for n, item in enumerate(items):
        first = dists[(n, _requests(choice_ids[item.choices])[0])][0]
        row = []
        for ids in choice_ids[item.choices]:
            if len(ids) == 1:
                row.append(float(first[ids[0]]))
            else:
                lp = dists[(n, tuple(ids[:-1]))]
                row.append(float(sum(lp[j, t] for j, t in enumerate(ids))))
        scores.append(row)
    return scores


def accuracy(items: list[vdata.VQAItem], scores: list[list[float]]) -> dict:
    """Accuracy per task and over all items (with stderr), predictions, per-item correctness, the gold answer's
    mean log-probability and the probability mass on the answer set (does the model answer in the format?)."""
    result = choice_accuracy(scores, [item.gold for item in items])
    by_task: dict[str, list[int]] = defaultdict(list)
    for item, c in zip(items, result["correct"]):
        by_task[item.task].append(c)
    n = result["n"]
    return {
        **result,
        "per_task": {t: sum(c) / len(c) for t, c in by_task.items()},
        "n_per_task": {t: len(c) for t, c in by_task.items()},
        "gold_logprob": sum(s[i.gold] for s, i in zip(scores, items)) / n,
        "answer_mass": sum(sum(math.exp(x) for x in s) for s in scores) / n,
        "scores": scores,
    }


def answer_distributions(scores: list[list[float]]) -> list[torch.Tensor]:
    """Per item, log-probabilities renormalised over its answer set."""
    return [torch.log_softmax(torch.tensor(s, dtype=torch.float64), dim=-1) for s in scores]


def evaluate(model, processor, items: list[vdata.VQAItem], **kwargs) -> dict:
    return accuracy(items, answer_logprobs(model, processor, items, **kwargs))
