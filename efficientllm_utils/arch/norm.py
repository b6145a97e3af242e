"""RMSNorm (Zhang & Sennrich, 2019), the pre-norm of every Qwen2.5 block."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``; no mean subtraction, no bias.

    The statistics are taken in float32 so that bf16/fp16 activations do not
    lose the small-variance dimensions (same as Qwen2/Llama).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)
