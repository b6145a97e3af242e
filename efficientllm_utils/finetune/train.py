"""The fine-tuning step every method goes through, in the one training loop (:func:`..training.train`), and adapter
save/load.

Same seed, same data order, same steps, same batch and the same AdamW + schedule for
every method; only the model and its parameter groups (each with its own peak lr)
differ. The data order comes from :func:`batch_schedule`, which depends on the seed and
the number of examples only, never on the model.

The step is the method's batch (its micro-batches, bf16 autocast on a GPU) and its answer-token loss; the loop
records raw per-step samples (loss, wall seconds by ``time.perf_counter``,
sequences and tokens, the exact example indices) and samples no system metric: the
caller wraps it with its own tracker and may pass ``on_step`` for progress.
"""
from __future__ import annotations

import json
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import training
from .config import TrainSettings
from .data import IGNORE_INDEX, Example

MANIFEST = "efficientllm_finetune.json"
TRAINABLE_WEIGHTS = "trainable_weights.safetensors"


@dataclass
class StepRecord:
    step: int  # 1-based optimizer step
    loss: float  # mean answer-token cross-entropy over the step's sequences (before the update)
    seconds: float  # forward + backward + clip + optimizer step, time.perf_counter
    lr: float  # the first group's lr used for this step
    grad_norm: float | None  # total gradient norm before clipping
    samples: int  # sequences in the step (all micro-batches)
    tokens: int  # real (non-pad) tokens in the step
    padded_tokens: int  # tokens including padding (what the model computed on)
    loss_tokens: int  # tokens the loss is on (answer + EOS)
    indices: list[int]  # positions in the example list, in the order used
    rows: list[int]  # source row ids of those examples


@dataclass
class TrainResult:
    steps: list[StepRecord]
    settings: dict
    seconds: float  # wall time of the whole loop
    meta: dict = field(default_factory=dict)

    @property
    def losses(self) -> list[float]:
        return [s.loss for s in self.steps]

    def loss_summary(self, k: int = 3) -> dict:
        """First step's loss (before any update) and the mean of the first/last ``k`` steps."""
        losses = self.losses
        k = max(1, min(k, len(losses) // 2 or 1))
        return {"first": losses[0], "last": losses[-1], f"first_{k}_mean": sum(losses[:k]) / k,
                f"last_{k}_mean": sum(losses[-k:]) / k}

    def to_records(self) -> list[dict]:
        return [asdict(s) for s in self.steps]


# --- data order --------------------------------------------------------------------------

def batch_schedule(n_examples: int, steps: int, batch_size: int, grad_accum: int, seed: int,
                   shuffle: bool = True) -> list[list[list[int]]]:
    """Example indices per step and micro-batch: seeded epochs of shuffled indices, or with ``shuffle=False``
    the examples in their own order, epoch after epoch (BoolQ's are already in a seeded order, yes and no
    alternating, so that every batch of an even size holds as many of each).

    Depends only on its arguments, so every method sees the same sequences in the same order.
    """
    if n_examples < 1:
        raise ValueError("no training examples")
    rng = random.Random(f"efficientllm-finetune-order-{seed}")
    pool: list[int] = []
    schedule = []
    for _ in range(steps):
        step = []
        for _ in range(grad_accum):
            batch = []
            while len(batch) < batch_size:
                if not pool:
                    pool = list(range(n_examples))
                    if shuffle:
                        rng.shuffle(pool)
                    else:
                        pool.reverse()  # popped from the end: example 0 first
                batch.append(pool.pop())
            step.append(batch)
        schedule.append(step)
    return schedule


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and pad)."""
    longest = max(e.n_tokens for e in examples)
    ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = e.n_tokens
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    extras = [e.model_inputs for e in examples if e.model_inputs]
    if extras:
        if len(extras) != len(examples):
            raise ValueError("a batch mixes examples with and without model_inputs")
        for key, first in extras[0].items():
            if isinstance(first, tuple):  # one value per token
                padded = torch.zeros((len(examples), longest), dtype=torch.long)
                for i, x in enumerate(extras):
                    padded[i, :len(x[key])] = torch.tensor(x[key])
                batch[key] = padded
            else:
                batch[key] = torch.cat([x[key] for x in extras])
    return batch


TEXT_KEYS = ("input_ids", "attention_mask", "labels")


def model_extras(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """The batch's inputs beyond the text (``Example.model_inputs``), on ``device``."""
    return {k: v.to(device) for k, v in batch.items() if k not in TEXT_KEYS}


def _device(model) -> torch.device:
    return next(p.device for p in model.parameters())


def answer_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the labelled tokens, and their count.

    Logits are computed only where a next-token label exists (``logits_to_keep`` as a
    boolean mask), which spares the vocabulary projection on every prompt position.
    """
    device = _device(model)
    ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t+1
    targets = labels[:, 1:][keep[:, :-1]]
    out = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), logits_to_keep=keep,
                use_cache=False, **model_extras(batch, device))
    logits = out.logits.reshape(-1, out.logits.shape[-1]).float()
    if logits.shape[0] != targets.shape[0]:  # a model that ignores logits_to_keep
        logits = out.logits[:, :-1][keep[:, :-1]].float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


@torch.no_grad()
def mean_answer_loss(model, examples: Sequence[Example], pad_token_id: int, batch_size: int = 8) -> float:
    """Mean answer-token cross-entropy on ``examples`` (e.g. the held-out rows), eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        s, n = answer_loss_sum(model, collate(examples[start:start + batch_size], pad_token_id))
        total += float(s)
        count += n
    model.train(was_training)
    return total / max(count, 1)


# --- the loop ------------------------------------------------------------------------------

@contextmanager
def threads(n: int | None):
    """Run a block with ``n`` torch intra-op threads (None: leave the setting alone)."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def evaluating(model, num_threads: int | None = None):
    """Run a block with ``model`` in eval mode on ``num_threads`` threads; its training mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        with threads(num_threads):
            yield
    finally:
        model.train(was_training)


def autocast_dtype(model) -> torch.dtype | None:
    """The dtype the training loop's forward autocasts to: bf16 on a GPU (fp32 masters of the trainable weights,
    bf16 matmuls, as the paper trains), none on the CPU (fp32 as loaded, the published CPU runs)."""
    return torch.bfloat16 if next(model.parameters()).device.type == "cuda" else None


def train_model(model, param_groups: list[dict], examples: Sequence[Example], settings: TrainSettings,
                pad_token_id: int, on_step: Callable[[StepRecord], None] | None = None, rank=None) -> TrainResult:
    """Fine-tune ``model`` on ``examples`` with AdamW over ``param_groups``; the model stays in place.

    ``param_groups`` are torch optimizer groups with their own ``lr`` (the peak lr; the
    schedule scales every group alike). The step's loss is the mean over its answer tokens
    across all micro-batches, each micro-batch's summed loss divided by that total.
    ``rank`` (a ``distributed.Rank``; ``model`` under DDP or FSDP): this process trains on its rows of each
    micro-batch, its loss divided by the whole step's answer tokens (the gradient average over the ranks is scaled
    back by their number), so each step's record holds this rank's part of the loss: the ranks' parts add up to it.
    """
    with threads(settings.num_threads):
        return _train(model, param_groups, examples, settings, pad_token_id, on_step, rank)


def _train(model, param_groups, examples, settings, pad_token_id, on_step, rank=None) -> TrainResult:
    torch.manual_seed(settings.seed)  # LoRA dropout draws the same masks for every run
    schedule = batch_schedule(len(examples), settings.steps, settings.batch_size, settings.grad_accum,
                              settings.seed, settings.shuffle)
    device = next(model.parameters()).device
    autocast = autocast_dtype(model)

    def step(micro_batches: list[list[int]]) -> dict:
        batches = [[examples[i] for i in mb] for mb in micro_batches]
        n_loss = sum(e.n_answer_tokens for mb in batches for e in mb)
        total = 0.0
        for mb in batches:
            mb = rank.shard(mb) if rank is not None else mb
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss_sum, _ = answer_loss_sum(model, collate(mb, pad_token_id))
            (loss_sum / n_loss * (rank.world_size if rank is not None else 1)).backward()
            total += float(loss_sum.detach())
        flat = [i for mb in micro_batches for i in mb]
        return {"loss": total / n_loss, "samples": len(flat), "tokens": sum(examples[i].n_tokens for i in flat),
                "padded_tokens": sum(len(mb) * max(examples[i].n_tokens for i in mb) for mb in micro_batches),
                "loss_tokens": n_loss, "indices": flat, "rows": [examples[i].row for i in flat]}

    model.train()
    start_all = time.perf_counter()
    records = training.train(schedule, step, param_groups, steps=settings.steps, record=StepRecord,
                             warmup_steps=settings.warmup_steps, schedule=settings.schedule,
                             min_lr_ratio=settings.min_lr_ratio, max_grad_norm=settings.max_grad_norm,
                             betas=settings.adam_betas, eps=settings.adam_eps, first_step=1, on_step=on_step)
    model.eval()
    return TrainResult(records, settings.model_dump(), time.perf_counter() - start_all,
                       {"n_examples": len(examples), "pad_token_id": pad_token_id})


# --- evaluation ------------------------------------------------------------------------------

def evaluate_heldout(model, tokenizer, items: list, num_threads: int | None = None, **kwargs) -> dict:
    """Held-out accuracy: multiple-choice items (``quality.MCItem``) scored as ``quality.mc_accuracy`` scores them,
    exact-answer items (``quality.AnswerItem``) by ``quality.exact_match``.

    Multiple choice: calls ``quality.choice_loglikelihoods`` (log-likelihood of each choice after the
    context) once and returns mc_accuracy's fields (``accuracy, n, stderr, predictions,
    correct``) plus ``gold_logprob`` (mean log-probability of the gold choice, a smoother
    signal than accuracy) and ``first_choice_share`` (how often the first choice, "yes" for BoolQ, wins).
    Exact answers: the same fields, ``predictions`` whether the answer's first token is the greedy one,
    ``scores`` the answer's log-probability (one "choice" per item), ``first_choice_share`` NaN.
    ``kwargs`` go to the scorer.
    """
    from ..quality import AnswerItem, choice_accuracy, choice_loglikelihoods, exact_match

    with evaluating(model, num_threads):
        if items and isinstance(items[0], AnswerItem):
            exact = exact_match(model, tokenizer, items, **kwargs)
        else:
            scores = choice_loglikelihoods(model, tokenizer, items, **kwargs)
    if items and isinstance(items[0], AnswerItem):
        n = exact["n"]
        return {"accuracy": exact["accuracy"], "n": n, "stderr": exact["stderr"],
                "predictions": exact["first_token_right"], "correct": exact["correct"],
                "gold_logprob": sum(exact["gold_logprobs"]) / n if n else float("nan"),
                "first_choice_share": float("nan"), "scores": [[s] for s in exact["gold_logprobs"]]}
    result = choice_accuracy(scores, [item.gold for item in items])
    n = result["n"]
    return {
        **result,
        "gold_logprob": sum(s[item.gold] for s, item in zip(scores, items)) / n if n else float("nan"),
        "first_choice_share": sum(p == 0 for p in result["predictions"]) / n if n else float("nan"),
        "scores": scores,
    }


# --- adapters on disk ------------------------------------------------------------------------

def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_adapter(model, directory: str | Path, method: str | None = None) -> int:
    """Write what the fine-tuning changed; returns the bytes on disk.

    A peft model (LoRA family, QLoRA) goes through ``save_pretrained`` (PiSSA converted to
    a plain LoRA adapter on the original weights, rank 2r); freeze/full save their
    trainable parameters as safetensors.
    """
    from safetensors.torch import save_file

    from .methods import PISSA_INIT_ATTR

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if _is_peft(model):
        init_dir = getattr(model, PISSA_INIT_ATTR, None)
        if init_dir is not None:
            model.save_pretrained(directory, path_initial_model_for_weight_conversion=init_dir)
        else:
            model.save_pretrained(directory)
        kind = "peft"
    else:
        tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        if not tensors:
            raise ValueError("the model has no trainable parameter to save")
        save_file(tensors, str(directory / TRAINABLE_WEIGHTS))
        kind = "trainable_weights"
    (directory / MANIFEST).write_text(json.dumps({"kind": kind, "method": method}))
    return _dir_bytes(directory)


def load_adapter(base_model, directory: str | Path):
    """Apply a saved adapter to a fresh, unmodified base model; returns the model (eval mode).

    For freeze/full the saved tensors replace the base's (every saved name must exist);
    for peft adapters ``PeftModel.from_pretrained``.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    kind = json.loads((directory / MANIFEST).read_text())["kind"] if (directory / MANIFEST).exists() else "peft"
    if kind == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(directory)).eval()
    tensors = load_file(str(directory / TRAINABLE_WEIGHTS))
    own = dict(base_model.named_parameters())
    missing = sorted(set(tensors) - set(own))
    if missing:
        raise KeyError(f"saved weights not in the base model: {missing[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value.to(own[name].dtype))
    return base_model.eval()
