"""DiT training through the one training loop (``training.train``): one recipe for every variant, raw per-step
samples for the metrics.

DiT's recipe scaled down: AdamW (betas 0.9/0.999 in DiT; here the LLM axis's optimizer groups: weight decay on
matrices only), the loop's linear warm-up then cosine decay, gradient clipping at 1.0, flow-matching loss plus
``router_aux_loss_coef * aux_loss`` for MoE, and DiT's exponential moving average of the weights
(``torch.optim.swa_utils.AveragedModel``), the model that is sampled. The loop takes no measurements of its own
beyond the step's wall time, so the caller wraps it in the tracker.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import training
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
    masters = training.MasterWeights(model)  # a bf16 model steps fp32 masters; the EMA averages them
    aux_coef = model.config.router_aux_loss_coef
    model.train()

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
        images, labels = batch[0].to(device), batch[1].to(device)
        flow, aux = flow_matching_loss(model, images, labels, generator)
        loss = flow + aux_coef * aux if aux is not None else flow
        loss.backward()
        return {"loss": loss.detach(), "flow_loss": flow.detach(), "aux_loss": None if aux is None else aux.detach(),
                "images": len(images), "tokens": len(images) * model.config.n_tokens}

    return training.train(batches, step, training.decay_groups(masters.module, lr, weight_decay), steps=steps,
                          record=DiTStep, warmup_steps=warmup, min_lr_ratio=min_lr / lr,
                          max_grad_norm=grad_clip, betas=betas, masters=masters, ema=ema)


def weight_average(model: DiT, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights (DiT samples from it; its decay is 0.9999 over
    400K steps, a short run needs a shorter memory). Its first update copies the weights; ``.module`` is a DiT."""
    # kept in fp32 whatever the model's dtype: at 0.9999 a bf16 average would round every update away
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True).float()
