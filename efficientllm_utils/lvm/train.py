"""Flow-matching training of the denoisers through the one training loop (``training.train``): base pretraining
and every fine-tuning method go through it.

The data order comes from the fine-tuning library's :func:`~..finetune.train.batch_schedule` (seed and
data size only), the optimizer and schedule from the loop, both over the fine-tuning library's
``TrainSettings``; times and noise come from one seeded generator. So every method sees the same latents,
captions, times and noise in the same order; only the trainable parameters differ.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .. import training
from ..finetune.config import TrainSettings
from ..finetune.train import autocast_dtype, batch_schedule, threads
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
    step: int  # 1-based optimizer step
    loss: float
    seconds: float  # forward + backward + clip + optimizer step, perf_counter
    lr: float
    grad_norm: float | None  # total gradient norm before clipping (None without clipping)
    samples: int


def train(transformer: torch.nn.Module, param_groups: list[dict], data: LatentSet, settings: TrainSettings,
          denoise: Denoise) -> list[FlowStep]:
    """AdamW over ``param_groups`` for ``settings.steps`` steps of ``settings.batch_size`` latents."""
    with threads(settings.num_threads):
        torch.manual_seed(settings.seed)  # adapter dropout draws the same masks for every method
        schedule = batch_schedule(len(data), settings.steps, settings.batch_size, 1, settings.seed, settings.shuffle)
        generator = torch.Generator().manual_seed(settings.seed)
        device, autocast = next(transformer.parameters()).device, autocast_dtype(transformer)  # GPU: bf16 autocast

        def step(micro_batches: list[list[int]]) -> dict:
            (batch,) = micro_batches
            index = torch.tensor(batch)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = velocity_loss(transformer, denoise, data.latents[index], data.cond(index), generator)
            loss.backward()
            return {"loss": loss.detach(), "samples": len(batch)}

        transformer.train()
        steps = training.train(schedule, step, param_groups, steps=settings.steps, record=FlowStep,
                               warmup_steps=settings.warmup_steps, schedule=settings.schedule,
                               min_lr_ratio=settings.min_lr_ratio, max_grad_norm=settings.max_grad_norm,
                               betas=settings.adam_betas, eps=settings.adam_eps, first_step=1)
        transformer.eval()
        return steps


def curve(steps: list[FlowStep]) -> list[dict]:
    return [asdict(s) for s in steps]
