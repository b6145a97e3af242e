"""The one training loop: pretraining (``arch``), DiT, fine-tuning (``finetune``, and the VLM through it) and the LVM
denoisers all step through :func:`train`.

The loop does the same things for every study:

* AdamW (:func:`adamw`) over parameter groups, each group with its own peak lr. The groups come from the study:
  :func:`decay_groups` for pretraining and DiT (weight decay on matrices only), or a fine-tuning method's groups
  (LoRA+'s A and B at two lrs).
* the learning-rate schedule, :func:`lr_multiplier` (below), applied to every group by ``LambdaLR``;
* gradient clipping (optional) and fp32 master weights of a bf16 model (optional, :class:`MasterWeights`);
* an exponential moving average of the weights, updated inside the step (DiT's; optional);
* the step's wall time (``time.perf_counter``), read after a device synchronisation at both ends, so that on a GPU
  the clock counts the work and not just the launches;
* a check that the loss is finite, and per-step records that measure nothing else. The caller wraps the loop in
  the resource tracker and merges the tracker's metrics (:func:`metrics.training.tracker_metrics`).

What each study supplies is only what is its own: its batches and a *step function* that runs the forward and
backward passes of one batch (its micro-batches, its autocast, its loss terms) and returns the values it logs,
``loss`` among them.

**Warm-up.** Over the first ``w`` steps the multiplier of the peak lr rises linearly as ``(s + 1) / (w + 1)`` at
step ``s`` (0-based), so it is ``1 / (w + 1)`` at step 0, ``w / (w + 1)`` at step ``w - 1`` and 1 at step ``w``, where
the decay starts from the peak. This is nanoGPT's definition (``learning_rate * (it + 1) / (warmup_iters + 1)``). It
was chosen over ``(s + 1) / w`` (the pretraining and DiT loops' until this module) because no step runs at a zero lr
(as ``s / w`` would at step 0) and the peak is reached once, at step ``w``, where the decay begins, instead of at step
``w - 1`` and held for step ``w`` too; and because it was already the schedule of fine-tuning, the VLM alignment and
the LVM pretraining, whose cached artefacts (aligned VLM checkpoints, pretrained LVM bases) therefore stay valid.
Pretraining and DiT runs change through it: their first ``w`` steps run at ``w / (w + 1)`` of the lrs they ran at.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, TypeVar

import torch
from torch import nn

from .metrics.inference import synchronize

SCHEDULES = ("cosine", "linear", "constant")

Record = TypeVar("Record")


# --- the learning-rate schedule --------------------------------------------------------------------------------

def lr_multiplier(step: int, steps: int, warmup_steps: int, schedule: str = "cosine",
                  min_lr_ratio: float = 0.0) -> float:
    """The share of the peak lr at ``step`` (0-based) of ``steps``: the linear warm-up above, then ``schedule``
    (``cosine`` or ``linear`` decay from 1 at step ``warmup_steps`` to ``min_lr_ratio`` at step ``steps``, or
    ``constant``)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    if schedule == "linear":
        return min_lr_ratio + (1 - min_lr_ratio) * max(0.0, 1 - progress)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --- the optimizer ----------------------------------------------------------------------------------------------

def decay_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Optimizer groups of ``module``'s trainable parameters: weight decay on matrices only; biases, norm gains and
    1-D position parameters keep their scale."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "lr": lr, "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "lr": lr, "weight_decay": 0.0}]


def adamw(param_groups: list[dict], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (each with its own ``lr`` and, where set, ``weight_decay``)."""
    return torch.optim.AdamW(param_groups, betas=tuple(betas), eps=eps)


class MasterWeights:
    """fp32 master weights of a low-precision (bf16) model, as mixed-precision training keeps them.

    The optimizer steps ``module``, an fp32 copy of the model, and each step's values are copied back into the
    model, so updates below bf16's spacing (2^-8 of a weight: norm gains at lr 3e-4, an EMA at 0.9999) accumulate
    instead of rounding away. For an fp32 model ``module`` is the model itself and nothing is copied.
    Memory: 4 bytes per parameter beside the model's 2 (AdamW's moments are fp32 either way)."""

    def __init__(self, model: nn.Module):
        low = any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point())
        self.module = copy.deepcopy(model).float() if low else model
        self.pairs = [(p, m) for p, m in zip(model.parameters(), self.module.parameters()) if p is not m]

    def gradients_to_masters(self) -> None:
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        for p, m in self.pairs:
            p.copy_(m)


# --- the loop ---------------------------------------------------------------------------------------------------

def train(batches: Iterable[Any], step: Callable[[Any], Mapping[str, Any]], param_groups: list[dict], *,
          steps: int, record: Callable[..., Record], warmup_steps: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.0, max_grad_norm: float | None = 1.0,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, masters: MasterWeights | None = None,
          ema: torch.optim.swa_utils.AveragedModel | None = None, first_step: int = 0,
          on_step: Callable[[Record], None] | None = None) -> list[Record]:
    """Train for ``steps`` optimizer steps, one per item of ``batches``; returns one record per step.

    ``step(batch)`` runs the forward and backward passes of one batch and returns the values it logs (``loss``
    among them); 0-d tensors among them are read after the clock stops (on a GPU, ``.item()`` waits for the work). Each step is timed from before ``step`` to after the optimizer step (and the EMA update),
    between device synchronisations; the schedule then advances. ``record`` is called as
    ``record(step=first_step + i, lr=..., grad_norm=..., seconds=..., **values)``: ``lr`` is the first group's lr
    used by the step, ``grad_norm`` the total norm before clipping (None without clipping).

    ``param_groups`` are what the optimizer steps: the model's own parameters, or ``masters.module``'s when
    ``masters`` keeps fp32 masters of a bf16 model (gradients move to them before clipping, values back after the
    step). Clipping takes the parameters group by group, or ``masters.module``'s in the module's order.
    ``ema`` (an ``AveragedModel``) averages ``masters.module`` after every step, so it needs ``masters``.

    Raises ``ValueError`` if ``batches`` runs out before ``steps`` and ``FloatingPointError`` on a loss that is
    not finite.
    """
    if ema is not None and masters is None:
        raise ValueError("ema averages masters.module: pass masters (MasterWeights(model) is free for fp32)")
    optimizer = adamw(param_groups, betas, eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_multiplier, steps=steps, warmup_steps=warmup_steps, schedule=schedule, min_lr_ratio=min_lr_ratio))
    if masters is not None:
        clipped = [p for p in masters.module.parameters() if p.requires_grad]
    else:
        clipped = [p for group in optimizer.param_groups for p in group["params"]]
    device = clipped[0].device
    records: list[Record] = []
    batch_iter = iter(batches)
    for i in range(steps):
        batch = next(batch_iter, None)
        if batch is None:
            raise ValueError(f"the batches ran out after {i} steps; {steps} steps were asked for")
        lr = optimizer.param_groups[0]["lr"]
        synchronize(device)
        start = time.perf_counter()
        values = step(batch)
        if masters is not None:
            masters.gradients_to_masters()
        grad_norm = None
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(clipped, max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: sharded
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if masters is not None:
            masters.masters_to_model()
        if ema is not None:
            ema.update_parameters(masters.module)
        synchronize(device)  # the optimizer's (and the average's) kernels are in the step
        seconds = time.perf_counter() - start
        scheduler.step()
        values = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"loss is {values['loss']} at step {first_step + i}")
        rec = record(step=first_step + i, lr=lr, grad_norm=grad_norm, seconds=seconds, **values)
        records.append(rec)
        if on_step is not None:
            on_step(rec)
    return records
