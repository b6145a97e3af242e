"""The one flow-matching training loop: base pretraining and every fine-tuning method go through it.

The data order comes from the fine-tuning library's :func:`~..finetune.train.batch_schedule` (seed and
data size only), the schedule from its :func:`~..finetune.train.lr_lambda`, both over its
``TrainSettings``; times and noise come from one seeded generator. So every method sees the same latents,
captions, times and noise in the same order; only the trainable parameters differ.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..finetune.config import TrainSettings
from ..finetune.train import autocast_dtype, batch_schedule, lr_lambda, threads
from .flow import Denoise, velocity_loss


@dataclass
class LatentSet:
    """Training or held-out examples: latents and the caption each belongs to."""

    latents: torch.Tensor  # (n, c, h, w) or (n, c, f, h, w)
    caption_ids: torch.Tensor  # (n,) index into the conditioning table
    table: dict[str, torch.Tensor]  # conditioning per caption: {name: (n_captions, ...)}

    def __len__(self) -> int:
        return len(self.latents)

    def cond(self, index) -> dict[str, torch.Tensor]:
        return {k: v[self.caption_ids[index]] for k, v in self.table.items()}


@dataclass
class FlowStep:
    step: int
    loss: float
    seconds: float  # forward + backward + clip + optimizer step, perf_counter
    lr: float
    samples: int


def train(transformer: torch.nn.Module, param_groups: list[dict], data: LatentSet, settings: TrainSettings,
          denoise: Denoise) -> list[FlowStep]:
    """AdamW over ``param_groups`` for ``settings.steps`` steps of ``settings.batch_size`` latents."""
    with threads(settings.num_threads):
        torch.manual_seed(settings.seed)  # adapter dropout draws the same masks for every method
        schedule = batch_schedule(len(data), settings.steps, settings.batch_size, 1, settings.seed, settings.shuffle)
        optimizer = torch.optim.AdamW(param_groups, betas=tuple(settings.adam_betas), eps=settings.adam_eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
        generator = torch.Generator().manual_seed(settings.seed)
        params = [p for g in param_groups for p in g["params"]]
        device, autocast = next(transformer.parameters()).device, autocast_dtype(transformer)  # GPU: bf16 autocast
        transformer.train()
        steps = []
        for i, (batch,) in enumerate(schedule):
            index = torch.tensor(batch)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = velocity_loss(transformer, denoise, data.latents[index], data.cond(index), generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            steps.append(FlowStep(i + 1, loss.item(), time.perf_counter() - start, lr, len(batch)))
        transformer.eval()
        return steps


def curve(steps: list[FlowStep]) -> list[dict]:
    return [asdict(s) for s in steps]
