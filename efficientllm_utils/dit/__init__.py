"""Diffusion transformers (DiT) whose attention and FFN are the LLM architecture axis's (``arch``).

``config`` (shapes, the paper's DiT-B/L/XL), ``embed`` (patches + 2D positions,
timesteps, classes), ``block`` (adaLN-Zero block, final layer), ``model``
(``DiT``), ``flow`` (flow-matching loss and Euler sampler), ``train`` (the
seeded training loop), ``data`` (CIFAR-10 from BIG-bench), ``analysis``
(parameters and FLOPs), ``report`` (the book chapter).
"""
from .config import PAPER_SHAPES, DiTConfig, paper_dit_config
from .model import DiT

__all__ = ["DiT", "DiTConfig", "PAPER_SHAPES", "paper_dit_config"]
