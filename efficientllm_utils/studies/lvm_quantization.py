"""The vision-generation quantization study: the denoising transformer of SD3.5 or Wan 2.1 at one precision.

Phases of one run (one model, one precision):

1. set-up: the pipeline with the fp32 (``reference_precision``) denoiser, the prompts (the base's own
   captions, cycled over ``n_samples``), the reference's samples for those prompts and one seed (computed by
   the first run of a profile and reused by the others: ``score_cache``, keyed by the reference's weights, the
   prompts, the settings, the code and the packages), and the features of held-out real images (frames) for FD,
   with its noise floor (``fd.noise_floor``: as many real training images or frames as the samples', against them);
2. the denoiser at ``precision`` (diffusers' bitsandbytes integration, :mod:`..lvm.quantize`): counted bytes
   and its linear layer classes;
3. generation under the resource tracker: a warm-up, then one timed generation of every sample with each
   denoiser step timed by hooks (latency per step, per image or clip, images or frames per second, AMU, AEC);
4. quality: PSNR and SSIM of each image (frame) against the reference's, FD (EfficientNet-Lite0) against the
   held-out real images; a grid (and for video, a clip) saved beside the record.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import score_cache
from ..lvm import pipelines
from ..lvm.base import base_summary
from ..lvm.presets import PAPER_MODELS, examples, family, sampling
from ..lvm.quantize import psnr, ssim
from ..metrics.stats import summarize
from ..metrics.tracker import ResourceTracker
from ..metrics.values import MetricValue
from ..precisions.counting import count_model_bytes, linear_layer_kinds
from ..records import GRID_FILE
from .lvm_run import LVMQuantizationRun
from ..vision import fd

CLIP_FILE = "sample.mp4"
REFERENCE_DIR = ".reference"  # beside the runs of a profile: the reference precision's samples by fingerprint
# what the reference's samples depend on besides the pipeline's weights and the prompts: this code and these packages
_SAMPLING_CODE = ("lvm/sd3.py", "lvm/wan.py", "lvm/pipelines.py", "lvm/quantize.py")
_SAMPLING_PACKAGES = ("torch", "diffusers", "transformers", "bitsandbytes")


@dataclass
class Setup:
    fam: object  # the family module (lvm.sd3 or lvm.wan)
    pipe: object
    cond: dict  # conditioning rows, one per sample
    prompts: list[str]
    reference: torch.Tensor  # the reference precision's samples
    reference_bytes: int
    real_features: np.ndarray
    real_source: str
    base: dict  # the pretrained base's summary (CPU presets)
    noise_floor: float  # FD of real training images (frames) of the base's data, as many as the samples' frames
    noise_floor_images: int
    reference_reused: bool = False  # the reference's samples came from an earlier run's cache


def cycled_cond(fam, pipe, captions: list[str], n: int) -> tuple[dict, list[str]]:
    prompts = [captions[i % len(captions)] for i in range(n)]
    table = fam.encode_captions(pipe, captions)
    index = torch.arange(n) % len(captions)
    return {k: v[index] for k, v in table.items()}, prompts


def pipeline_modules(pipe) -> torch.nn.ModuleDict:
    """Every weight the pipeline samples with (denoiser, VAE, text encoders), for a fingerprint."""
    return torch.nn.ModuleDict({k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)})


def sampling_fingerprint(pipe, prompts: list[str], p, extra: dict | None = None) -> str:
    """``score_cache.fingerprint`` of samples from ``pipe``: its weights, the prompts, the sampling settings."""
    inputs = {"prompts": prompts, **(extra or {}),
              "settings": {k: getattr(p, k) for k in ("n_samples", "sampling_steps", "seed", "guidance_scale",
                                                      "device", "torch_threads")}}
    return score_cache.fingerprint(pipeline_modules(pipe), inputs, _SAMPLING_CODE, _SAMPLING_PACKAGES)


def prepare(p: LVMQuantizationRun, cache_dir: Path | None = None, run_label: str = "manual") -> Setup:
    """The reference pipeline and its samples (reused from ``cache_dir`` when an earlier run of the profile made
    the very same ones; None: always generated), the prompts and the real images' features."""
    if p.torch_threads:
        torch.set_num_threads(p.torch_threads)
    fam = family(p.model)
    base = {} if p.model in PAPER_MODELS else base_summary(p.model)
    reference_transformer = pipelines.load_transformer(p.model, p.reference_precision, p.device)
    pipe = pipelines.load_pipeline(p.model, p.device, transformer=reference_transformer)
    held = examples(p.model, "base", heldout=True)
    cond, prompts = cycled_cond(fam, pipe, held.captions, p.n_samples)
    stored = score_cache.cached(
        sampling_fingerprint(pipe, prompts, p, {"reference_precision": p.reference_precision}),
        lambda: {"samples": fam.generate(pipe, cond, p.sampling_steps, p.seed, p.guidance_scale,
                                         **sampling(p.model)).cpu()},
        cache_dir, run_label)
    real = fd.cached_features(pipelines.frames(held.pixels), p.fd_image_size)
    floor, floor_images = fd.noise_floor(pipelines.frames(examples(p.model, "base", heldout=False).pixels), real,
                                         len(pipelines.frames(stored["samples"])), p.fd_image_size, p.seed)
    return Setup(fam, pipe, cond, prompts, stored["samples"], count_model_bytes(reference_transformer)["total_bytes"],
                 real, held.source, base, floor, floor_images, stored["reused"])


def quantized(p: LVMQuantizationRun, setup: Setup) -> tuple[dict[str, MetricValue], dict]:
    """Swap the run's precision of the denoiser into the pipeline; its counted bytes and layer classes."""
    transformer = pipelines.load_transformer(p.model, p.precision, p.device)
    setup.pipe.transformer = transformer
    counted = count_model_bytes(transformer)
    metrics = {
        "model_bytes": MetricValue.measured(counted["total_bytes"], "bytes", "counted-tensor-bytes(denoiser)"),
        "linear_weight_bytes": MetricValue.measured(counted["linear_weight_bytes"], "bytes",
                                                    "counted-tensor-bytes(linear-weights+scales)"),
        "mcr": MetricValue.measured(setup.reference_bytes / counted["total_bytes"], "ratio",
                                    f"counted-bytes({p.reference_precision})/counted-bytes({p.precision})"),
    }
    return metrics, {"bytes_by_dtype": counted["bytes_by_dtype"], "linear_layers": linear_layer_kinds(transformer)}


def generate(p: LVMQuantizationRun, setup: Setup) -> tuple[pipelines.Timed, dict[str, MetricValue]]:
    for _ in range(p.warmup):
        setup.fam.generate(setup.pipe, {k: v[:1] for k, v in setup.cond.items()}, p.sampling_steps, p.seed,
                           **sampling(p.model))
    with ResourceTracker(interval_s=p.sample_interval_s, use_gpu=p.device == "cuda") as tracker:
        timed = pipelines.timed_generate(setup.pipe, setup.fam, setup.cond, p.sampling_steps, p.seed,
                                         p.guidance_scale, **sampling(p.model))
    n_frames = len(pipelines.frames(timed.samples))
    counter = f"perf-counter(pipeline-call,{p.n_samples}-samples,{p.sampling_steps}-steps)"
    step = summarize(timed.step_seconds)
    unit = "image" if timed.samples.dim() == 4 else "clip"
    metrics = {
        "step_latency_s": MetricValue.measured(step["mean"], "s/step",
                                               f"perf-counter(denoiser-forward-hooks,batch="
                                               f"{min(p.n_samples, sampling(p.model).get('batch_size', p.n_samples))})"),
        f"latency_s_per_{unit}": MetricValue.measured(timed.seconds / p.n_samples, f"s/{unit}", counter),
        "frames_per_s": MetricValue.measured(n_frames / timed.seconds, "frames/s", counter),
        **{k: v for k, v in tracker.metrics().items() if k != "phase_wall_s"},
        "generation_wall_s": MetricValue.measured(timed.seconds, "s", counter),
    }
    return timed, metrics


def quality(p: LVMQuantizationRun, setup: Setup, timed: pipelines.Timed, result_dir: Path | None = None
            ) -> tuple[dict, dict]:
    """Fidelity to the reference and FD (quality), and the per-image (frame) values behind them (raw)."""
    ours, ref = pipelines.frames(timed.samples), pipelines.frames(setup.reference)
    per_psnr, per_ssim = psnr(ours, ref).clamp_max(100), ssim(ours, ref)
    features = fd.cached_features(ours, p.fd_image_size)
    out = {
        "psnr_db": float(per_psnr.mean()), "psnr_db_min": float(per_psnr.min()),
        "ssim": float(per_ssim.mean()), "ssim_min": float(per_ssim.min()),
        "identical_to_reference": bool(torch.equal(ours, ref)),
        "fd": fd.cached_frechet_distance(features, setup.real_features),
        "fd_reference": fd.cached_frechet_distance(fd.cached_features(ref, p.fd_image_size), setup.real_features),
        "fd_noise_floor": setup.noise_floor, "fd_noise_floor_images": setup.noise_floor_images,
        "reference_reused": setup.reference_reused,
        "fd_metric": (f"frechet-distance(efficientnet-lite0-pooled-1280,{p.fd_image_size}px,{len(ours)}-generated-vs-"
                      f"{len(setup.real_features)}-real;not-inception-FID)"),
        "fidelity_metric": f"psnr(peak-to-peak 2, capped at 100 dB), ssim(skimage, gaussian 1.5), per "
                           f"{'image' if timed.samples.dim() == 4 else 'frame'}, same prompts and seed as "
                           f"{p.reference_precision}",
        "prompts": sorted(set(setup.prompts)),
        "real_data": setup.real_source,
        **{f"base_{k}": v for k, v in setup.base.items() if k in ("heldout_loss_init", "heldout_loss", "base_steps",
                                                                 "vae_heldout_mse", "train_data", "heldout_data")},
    }
    raw = {"psnr_db_per_frame": per_psnr.tolist(), "ssim_per_frame": per_ssim.tolist(),
           **{f"base_{k}": setup.base[k] for k in ("heldout_item_losses_init", "heldout_item_losses")
              if k in setup.base}}
    if result_dir is not None:
        pipelines.save_grid(timed.samples[:p.grid_samples], Path(result_dir) / GRID_FILE)
        if timed.samples.dim() == 5:
            pipelines.save_clip(timed.samples[0], Path(result_dir) / CLIP_FILE)
    return out, raw
