"""Pretraining through the one training loop (``training.train``), and held-out perplexity; the paper's recipe
scaled down.

AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only), the loop's linear warm-up then cosine decay to
``min_lr``, gradient clipping at 1.0; a bf16 model trains with fp32 master weights (``training.MasterWeights``).
For MoE models the loss being minimised includes ``router_aux_loss_coef * aux_loss``. The loop returns raw
per-step samples and takes no measurements of its own, so a caller can wrap it with whatever tracker it likes
(``on_step``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .. import training


@dataclass(frozen=True)
class StepSample:
    step: int  # 0-based
    loss: float  # the minimised loss: next-token cross-entropy (+ MoE aux term)
    lm_loss: float  # next-token cross-entropy alone
    aux_loss: float | None  # MoE load-balancing loss before its coefficient; None for dense FFNs
    lr: float
    grad_norm: float  # before clipping
    seconds: float  # wall time of forward + backward + optimizer step (perf_counter)
    tokens: int  # tokens in the batch


def pretrain(model: nn.Module, train_blocks: Iterable[torch.Tensor], steps: int, lr: float, warmup: int,
             min_lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
             grad_clip: float = 1.0, seed: int = 0,
             on_step: Callable[[StepSample], None] | None = None) -> list[StepSample]:
    """Train ``model`` for ``steps`` batches of ``train_blocks`` ((b, t) token ids, labels = inputs).

    ``model`` may be one rank's part of a group (``distributed.wrap``: under DDP, or sharded by FSDP, whose fp32
    shards are their own masters); ``train_blocks`` are then this rank's rows of each batch.
    Raises ``ValueError`` if ``train_blocks`` runs out before ``steps``.
    """
    torch.manual_seed(seed)
    inner = getattr(model, "module", model)  # the model under a DDP wrapper
    device = next(inner.parameters()).device
    masters = training.MasterWeights(inner)
    aux_coef = getattr(inner.config, "router_aux_loss_coef", 0.0)
    model.train()

    def step(batch: torch.Tensor) -> dict:
        batch = batch.to(device)
        out = model(input_ids=batch, labels=batch, use_cache=False)
        out.loss.backward()
        aux_loss = getattr(out, "aux_loss", None)  # only our decoder has one (None for dense FFNs)
        return {"loss": out.loss.detach(), "aux_loss": None if aux_loss is None else aux_loss.detach(),
                "tokens": batch.numel()}

    def record(**values) -> StepSample:
        return StepSample(lm_loss=values["loss"] - aux_coef * (values["aux_loss"] or 0.0), **values)

    return training.train(train_blocks, step, training.decay_groups(masters.module, lr, weight_decay), steps=steps,
                          record=record, warmup_steps=warmup, min_lr_ratio=min_lr / lr,
                          max_grad_norm=grad_clip, betas=betas, masters=masters, on_step=on_step)


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, heldout_blocks: Iterable[torch.Tensor]) -> dict[str, float]:
    """Token-weighted next-token cross-entropy over ``heldout_blocks`` -> ``{"loss", "perplexity", "tokens"}``.

    ``loss`` excludes the MoE aux term. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in heldout_blocks:
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits  # (b, t, vocab)
        nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                          reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError("heldout_blocks is empty")
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens}
