"""Flow matching (rectified flow, Liu et al. 2022; Lipman et al. 2022), the one objective of every variant.

A straight path from noise ``x0 ~ N(0, I)`` at ``t = 0`` to an image ``x1`` at ``t = 1``::

    x_t = (1 - t) x0 + t x1,     the model predicts the velocity  v = x1 - x0

trained with the mean squared error at ``t ~ U(0, 1)``. Sampling integrates
``dx/dt = v(x_t, t)`` with Euler steps from noise. The model sees ``1000 t``
(DiT's timestep scale).
"""
from __future__ import annotations

import torch
from torch import nn

TIME_SCALE = 1000.0


def velocity(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
    """(b, C, H, W), (b,) in [0, 1], (b,) -> the model's output (``.sample`` velocity, ``.aux_loss``)."""
    return model(x_t, t * TIME_SCALE, labels)


def flow_matching_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean squared velocity error over a batch (b, C, H, W) -> (loss, MoE aux loss or None)."""
    b = images.shape[0]
    # drawn on the CPU from the seeded generator, so every device and variant sees the same times and noise
    t = torch.rand(b, generator=generator).to(images.device)  # (b,)
    noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
    tt = t[:, None, None, None]
    out = velocity(model, (1 - tt) * noise + tt * images, t, labels)
    return nn.functional.mse_loss(out.sample.float(), (images - noise).float()), out.aux_loss


@torch.no_grad()
def heldout_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int = 0,
                 batch_size: int = 250) -> float:
    """Flow-matching loss on held-out images, with the same seeded times and noise for every model."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    total = 0.0
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        t = torch.rand(len(x), generator=generator)
        noise = torch.randn(x.shape, generator=generator)
        tt = t[:, None, None, None]
        x_t = ((1 - tt) * noise + tt * x).to(device)
        pred = velocity(model, x_t, t.to(device), y.to(device)).sample.float().cpu()
        total += nn.functional.mse_loss(pred, x - noise, reduction="sum").item()
    model.train(was_training)
    return total / images.numel()


@torch.no_grad()
def sample(model: nn.Module, labels: torch.Tensor, steps: int, seed: int = 0, guidance_scale: float = 1.0,
           batch_size: int = 250) -> torch.Tensor:
    """Images (n, C, H, W) in [-1, 1] for (n,) class ids: ``steps`` Euler steps from seeded noise.

    ``guidance_scale > 1`` applies classifier-free guidance against the null class
    (``v = v_null + s * (v_class - v_null)``); 1 is the plain conditional model.
    """
    was_training = model.training
    model.eval()
    config = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    shape = (config.in_channels, config.image_size, config.image_size)
    out = []
    for y in labels.split(batch_size):
        x = torch.randn((len(y), *shape), generator=generator).to(device=device, dtype=dtype)  # t = 0: noise
        y = y.to(device)
        for i in range(steps):
            t = torch.full((len(y),), i / steps, device=device, dtype=dtype)
            v = velocity(model, x, t, y).sample
            if guidance_scale != 1.0:
                v_null = velocity(model, x, t, torch.full_like(y, config.n_classes)).sample
                v = v_null + guidance_scale * (v - v_null)
            x = x + v / steps
        out.append(x.float().clamp(-1, 1).cpu())
    model.train(was_training)
    return torch.cat(out)
