"""The DiT training loop: one recipe for every variant, raw per-step samples for the metrics.

DiT's recipe scaled down: AdamW (betas 0.9/0.999 in DiT; here the LLM axis's
optimizer groups: weight decay on matrices only), linear warm-up then cosine
decay, gradient clipping at 1.0, flow-matching loss plus
``router_aux_loss_coef * aux_loss`` for MoE, and DiT's exponential moving
average of the weights (``torch.optim.swa_utils.AveragedModel``), the model that
is sampled. The loop takes no measurements of its own beyond the step's wall
time, so the caller wraps it in the tracker.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..arch.train import MasterWeights, _optimizer, _synchronize, cosine_lr
from .flow import flow_matching_loss
from .model import DiT


@dataclass(frozen=True)
class DiTStep:
    step: int  # 0-based
    loss: float  # the minimised loss: flow matching (+ MoE aux term)
    flow_loss: float  # flow-matching MSE alone
    aux_loss: float | None  # MoE load-balancing loss before its coefficient; None for dense FFNs
    lr: float
    grad_norm: float  # before clipping
    seconds: float  # forward + backward + optimizer step (perf_counter)
    images: int  # images in the batch
    tokens: int  # patch tokens in the batch


def train(model: DiT, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float, warmup: int,
          min_lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
          grad_clip: float = 1.0, seed: int = 0, ema: AveragedModel | None = None) -> list[DiTStep]:
    """Train ``model`` for ``steps`` batches of (images, labels); the noise and times come from ``seed``.
    ``ema`` (from ``weight_average``) is updated after every optimizer step, inside the timed step."""
    torch.manual_seed(seed)  # class dropout draws from the global generator
    generator = torch.Generator().manual_seed(seed)  # times and noise: the same for every variant
    device = next(model.parameters()).device
    masters = MasterWeights(model)  # a bf16 model steps fp32 masters; the EMA averages them
    optimizer = _optimizer(masters.module, lr, weight_decay, betas)
    aux_coef = model.config.router_aux_loss_coef
    model.train()
    samples: list[DiTStep] = []
    for step in range(steps):
        images, labels = next(batches)
        step_lr = cosine_lr(step, steps, lr, warmup, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        _synchronize(device)
        start = time.perf_counter()
        images, labels = images.to(device), labels.to(device)
        flow, aux = flow_matching_loss(model, images, labels, generator)
        loss = flow + aux_coef * aux if aux is not None else flow
        loss.backward()
        masters.gradients_to_masters()
        grad_norm = torch.nn.utils.clip_grad_norm_(masters.module.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        masters.masters_to_model()
        if ema is not None:
            ema.update_parameters(masters.module)
        _synchronize(device)
        seconds = time.perf_counter() - start
        samples.append(DiTStep(step=step, loss=loss.item(), flow_loss=flow.item(),
                               aux_loss=aux.item() if aux is not None else None, lr=step_lr,
                               grad_norm=grad_norm.item(), seconds=seconds, images=len(images),
                               tokens=len(images) * model.config.n_tokens))
    return samples


def weight_average(model: DiT, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights (DiT samples from it; its decay is 0.9999 over
    400K steps, a short run needs a shorter memory). Its first update copies the weights; ``.module`` is a DiT."""
    # kept in fp32 whatever the model's dtype: at 0.9999 a bf16 average would round every update away
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True).float()
