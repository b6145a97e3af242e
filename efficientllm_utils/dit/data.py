"""CIFAR-10's 10,000 test images (32x32 RGB, 10 classes) from BIG-bench's offline copy, split and batched.

``assets.cifar10_test_json()`` is BIG-bench's ``cifar10_classification`` task: each
example is a base64 PNG with a one-hot ``target_scores``. The images are decoded
once and cached beside it as ``uint8`` arrays. The file is sorted by class (the
1000 airplanes first), so the split shuffles with a fixed seed first: the
held-out images are the same whatever a run's seed.
"""
from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import assets

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLIT_SEED = 20250519  # the held-out split is fixed: the same images for every run and profile


def _decode(task_json: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    examples = json.loads(task_json.read_text())["examples"]
    images = np.empty((len(examples), 32, 32, 3), dtype=np.uint8)
    labels = np.empty(len(examples), dtype=np.int64)
    for i, example in enumerate(examples):
        png = Image.open(io.BytesIO(base64.b64decode(example["input"]))).convert("RGB")
        images[i] = np.asarray(png)
        scores = example["target_scores"]
        labels[i] = CLASSES.index(max(scores, key=scores.get))
    return images, labels


def load_cifar10_test() -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 images (n, 32, 32, 3) uint8 and labels (n,) int64, in the file's (class-sorted) order."""
    task_json = assets.cifar10_test_json()
    cached = task_json.parent / "decoded.npz"
    if not cached.exists():
        images, labels = _decode(task_json)
        tmp = cached.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        tmp.rename(cached)  # atomic: a half-written cache is never read
    with np.load(cached) as arrays:
        return arrays["images"], arrays["labels"]


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


def splits(heldout_size: int) -> ImageSplits:
    """Shuffle the 10,000 images with ``SPLIT_SEED`` and hold the first ``heldout_size`` out."""
    images, labels = load_cifar10_test()
    if not 2 <= heldout_size < len(images):
        raise ValueError(f"heldout_size must be in [2, {len(images) - 1}], got {heldout_size}")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    held, train = order[:heldout_size], order[heldout_size:]
    return ImageSplits(to_tensor(images[train]), torch.from_numpy(labels[train]),
                       to_tensor(images[held]), torch.from_numpy(labels[held]),
                       f"CIFAR-10 test set (bigbench==1.0.0 sdist), {len(train)} train / {heldout_size} held out")


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
