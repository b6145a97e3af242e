"""Flow matching in diffusers' convention, the objective of SD3 and Wan (and of their scheduler).

``FlowMatchEulerDiscreteScheduler`` integrates from noise at ``sigma = 1`` to data at ``sigma = 0``::

    x_sigma = (1 - sigma) x0 + sigma * noise,    the model predicts  v = noise - x0,   timestep = 1000 sigma

(the reverse time of ``dit.flow``, whose DiT samples with its own Euler loop). The loss is the mean
squared velocity error at ``sigma ~ U(0, 1)``: the paper's quality metric for fine-tuning.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Denoise = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def velocity_loss(transformer: nn.Module, denoise: Denoise, latents: torch.Tensor, cond: dict,
                  generator: torch.Generator, reduction: str = "mean") -> torch.Tensor:
    """Flow-matching loss of a batch of latents (b, ...) under its conditioning rows (b, ...)."""
    b = latents.shape[0]
    weight = next(transformer.parameters())
    dtype, device = weight.dtype, weight.device
    # times and noise drawn on the CPU from the seeded generator: every model, method and device sees the same ones
    sigma = torch.rand(b, generator=generator).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    latents, cond = latents.to(device), {k: v.to(device) for k, v in cond.items()}
    s = sigma.view(b, *[1] * (latents.dim() - 1))
    noisy = (1 - s) * latents + s * noise
    pred = denoise(transformer, noisy.to(dtype), (sigma * 1000).to(dtype), {k: v.to(dtype) for k, v in cond.items()})
    return nn.functional.mse_loss(pred.float(), noise - latents, reduction=reduction)


def sample_in_batches(sample: Callable[[slice, torch.Tensor | None], torch.Tensor], n: int, batch_size: int | None,
                      draw_noise: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``sample(rows, initial_noise)`` over rows of ``batch_size`` samples, each batch's output moved to the CPU (so
    a thousand 1024-px images never sit on the GPU at once). The initial noise of all ``n`` is drawn first by
    ``draw_noise()`` (the pipeline's own ``prepare_latents`` with the seeded generator), exactly as one call would
    draw it: the batches sample from the same noise. ``batch_size`` None or >= n: one call drawing its own noise."""
    if batch_size is None or batch_size >= n:
        return sample(slice(None), None)
    noise = draw_noise()
    return torch.cat([sample(slice(i, i + batch_size), noise[i: i + batch_size]).cpu()
                      for i in range(0, n, batch_size)])


@torch.no_grad()
def heldout_item_losses(transformer: nn.Module, denoise: Denoise, latents: torch.Tensor, cond: dict, seed: int = 0,
                        batch_size: int = 64) -> torch.Tensor:
    """Flow-matching loss of each held-out latent (n,), with seeded times and noise (the same for every model, so
    two models' losses pair item by item)."""
    was_training = transformer.training
    transformer.eval()
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for start in range(0, len(latents), batch_size):
        rows = slice(start, start + batch_size)
        error = velocity_loss(transformer, denoise, latents[rows], {k: v[rows] for k, v in cond.items()},
                              generator, reduction="none")  # (b, ...)
        losses.append(error.flatten(1).mean(1).cpu())
    transformer.train(was_training)
    return torch.cat(losses)


def heldout_loss(transformer: nn.Module, denoise: Denoise, latents: torch.Tensor, cond: dict, seed: int = 0,
                 batch_size: int = 64) -> float:
    """Mean flow-matching loss over held-out latents (every item has the same size: the mean of the items')."""
    return float(heldout_item_losses(transformer, denoise, latents, cond, seed, batch_size).mean())
