"""The DiT axis's images (an offline image set of :mod:`..vision.images`), split and batched.

The set is shuffled with ``images.SPLIT_SEED`` and the first ``heldout_size`` images are held out: the held-out
images are the same whatever a run's seed.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..vision import images as image_sets


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(n, 32, 32, 3) uint8 -> (n, 3, 32, 32) float32 in [-1, 1], the space the model generates in."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass
class ImageSplits:
    train_images: torch.Tensor  # (n_train, 3, 32, 32) in [-1, 1]
    train_labels: torch.Tensor  # (n_train,)
    heldout_images: torch.Tensor  # (n_heldout, 3, 32, 32) in [-1, 1], never trained on
    heldout_labels: torch.Tensor
    source: str
    classes: tuple[str, ...]  # label i is classes[i]


def splits(heldout_size: int, data: str) -> ImageSplits:
    """Shuffle image set ``data``'s images with ``SPLIT_SEED`` and hold the first ``heldout_size`` out."""
    chosen = image_sets.image_set(data)
    images, labels = chosen.load()
    if not 2 <= heldout_size < len(images):
        raise ValueError(f"heldout_size must be in [2, {len(images) - 1}], got {heldout_size}")
    order = image_sets.shuffled_order(len(images))
    held, train = order[:heldout_size], order[heldout_size:]
    return ImageSplits(to_tensor(images[train]), torch.from_numpy(labels[train]),
                       to_tensor(images[held]), torch.from_numpy(labels[held]),
                       f"{chosen.source}, {len(train)} train / {heldout_size} held out", chosen.classes)


def train_batches(data: ImageSplits, batch_size: int, seed: int, flip: bool = True
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (images (b, 3, 32, 32), labels (b,)) batches: seeded epochs of shuffled images, random horizontal
    flips (DiT's only augmentation). The same ``seed`` gives the same batches, whatever the model."""
    generator = torch.Generator().manual_seed(seed)
    n = len(data.train_images)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            images = data.train_images[index]
            if flip:
                flipped = torch.rand(batch_size, generator=generator) < 0.5
                images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
            yield images, data.train_labels[index]
