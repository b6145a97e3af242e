"""The vision-generation fine-tuning study: one method adapts a pretrained SD3.5 or Wan 2.1 denoiser to new data.

Every run of a profile starts from the same pretrained base (:mod:`..lvm.base`) and trains on the same new
examples (SD: image-set classes the base never saw; Wan: a video it never saw) with the same loop, data order,
times, noise, steps, schedule and seed (:mod:`..lvm.train`); only the method changes (LoRA, RSLoRA, DoRA, LoHa,
LoKr, GLoRA through ``peft``, or full fine-tuning). Phases:

1. data: the base pipeline; the new training and held-out examples as latents with their captions; FD's noise
   floor (``fd.noise_floor``: real training images or frames of the new data, as many as the samples', against
   the held-out ones);
2. the base on the new data: held-out flow-matching loss (per item), samples for the new captions and their FD
   (EfficientNet-Lite0) against the held-out real images -- what every method must improve on; the same for
   every method, so computed by the first run of a profile and reused by the others (``score_cache``, keyed by
   the base's weights, the held-out latents, the prompts, the settings, the code and the packages);
3. the method (trainable parameters), trained under the resource tracker (1 s samples): AL, ST, AMU, AEC;
4. after: held-out loss (per item, the same times and noise as the base's: the chapter pairs them), the same
   samples (same prompts and seed) and their FD, the adapter's bytes on disk; a sample grid (and for video a
   clip) beside the record.
"""
from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import score_cache
from ..finetune.methods import BuiltMethod, build_module_method, trainable_parameters
from ..lvm import pipelines
from ..lvm.base import capped, latent_set
from ..lvm.flow import heldout_item_losses
from ..lvm.presets import examples, family, sampling
from ..lvm.quantize import cast_inputs_hook, output_dtype_hook
from ..lvm.train import FlowStep, LatentSet, train
from ..metrics.tracker import ResourceTracker
from ..metrics.training import step_latency_metrics, tracker_metrics
from ..metrics.values import MetricValue
from .lvm_run import LVMFinetuneRun
from ..vision import fd
from .lvm_quantization import _SAMPLING_CODE, _SAMPLING_PACKAGES, CLIP_FILE, GRID_FILE, cycled_cond, pipeline_modules

BEFORE_GRID_FILE = "samples_base.png"
BASE_DIR = ".base"  # beside the runs of a profile: the base's held-out losses and samples by fingerprint


@dataclass
class Data:
    fam: object
    pipe: object
    train: LatentSet
    heldout: LatentSet
    cond: dict  # the sampling prompts' conditioning rows (the new captions, cycled)
    prompts: list[str]
    real_features: np.ndarray  # held-out real images (frames) of the new data
    train_source: str
    heldout_source: str
    noise_floor: float  # FD of real training images (frames) of the new data, as many as the samples' frames
    noise_floor_images: int


def load_data(p: LVMFinetuneRun) -> Data:
    if p.torch_threads:
        torch.set_num_threads(p.torch_threads)
    fam = family(p.model)
    pipe = pipelines.load_pipeline(p.model, p.device)
    pipe.transformer.requires_grad_(False)
    new_train = capped(examples(p.model, "new", heldout=False), p.n_train)
    new_held = examples(p.model, "new", heldout=True)
    with torch.no_grad():
        train_set, held_set = latent_set(pipe, fam, new_train), latent_set(pipe, fam, new_held)
    cond, prompts = cycled_cond(fam, pipe, new_held.captions, p.n_samples)
    real = fd.cached_features(pipelines.frames(new_held.pixels), p.fd_image_size)
    frames_per_sample = new_held.pixels.shape[2] if new_held.pixels.dim() == 5 else 1
    floor, floor_images = fd.noise_floor(pipelines.frames(new_train.pixels), real, p.n_samples * frames_per_sample,
                                         p.fd_image_size, p.seed)
    return Data(fam, pipe, train_set, held_set, cond, prompts, real, new_train.source, new_held.source, floor,
                floor_images)


def heldout(model, data: Data, p: LVMFinetuneRun) -> torch.Tensor:
    """Each held-out item's flow-matching loss (n,), seeded: every model sees the same times and noise."""
    return heldout_item_losses(model, data.fam.denoise, data.heldout.latents, data.heldout.cond(slice(None)), p.seed)


def sample_fd(data: Data, p: LVMFinetuneRun, grid: Path | None = None) -> tuple[float, torch.Tensor]:
    samples = data.fam.generate(data.pipe, data.cond, p.sampling_steps, p.seed, p.guidance_scale,
                                **sampling(p.model)).cpu()
    if grid is not None:
        pipelines.save_grid(samples[:p.grid_samples], grid)
    features = fd.cached_features(pipelines.frames(samples), p.fd_image_size)
    return fd.cached_frechet_distance(features, data.real_features), samples


def base_fingerprint(data: Data, p: LVMFinetuneRun) -> str:
    """What the base's numbers on the new data depend on: its weights, the held-out latents and captions, the
    prompts and settings, the code and the packages (``score_cache.fingerprint``)."""
    held = hashlib.sha256(data.heldout.latents.float().cpu().numpy().tobytes()
                          + data.heldout.caption_ids.cpu().numpy().tobytes())
    inputs = {"prompts": data.prompts, "heldout": held.hexdigest(), "heldout_source": data.heldout_source,
              "settings": {k: getattr(p, k) for k in ("n_samples", "sampling_steps", "seed", "guidance_scale",
                                                      "fd_image_size", "device", "torch_threads")}}
    return score_cache.fingerprint(pipeline_modules(data.pipe), inputs,
                                   (*_SAMPLING_CODE, "lvm/flow.py", "studies/lvm_finetune.py"), _SAMPLING_PACKAGES)


def measure_base(data: Data, p: LVMFinetuneRun, result_dir: Path | None = None, cache_dir: Path | None = None,
                 run_label: str = "manual") -> tuple[dict, dict]:
    """The base on the new data: the numbers every method must improve on (quality), and its per-item held-out
    losses (raw). Every method's run starts from the same base, so an earlier run's numbers are reused from
    ``cache_dir`` when ``base_fingerprint`` matches (the very same computation; None: always computed)."""
    def compute() -> dict:
        base_fd, samples = sample_fd(data, p)
        return {"item_losses": heldout(data.pipe.transformer, data, p), "fd_base": base_fd, "samples": samples}

    stored = score_cache.cached(base_fingerprint(data, p), compute, cache_dir, run_label)
    if result_dir is not None:
        pipelines.save_grid(stored["samples"][:p.grid_samples], Path(result_dir) / BEFORE_GRID_FILE)
    quality = {"heldout_loss_base": float(stored["item_losses"].mean()), "fd_base": stored["fd_base"],
               "base_reused": stored["reused"], "base_computed_by": stored["computed_by"]}
    return quality, {"heldout_item_losses_base": stored["item_losses"].tolist()}


def build(data: Data, p: LVMFinetuneRun) -> BuiltMethod:
    settings = p.method_settings()
    if settings.target_modules == "all-linear":  # the family's attention and FFN projections
        settings = settings.model_copy(update={"target_modules": list(data.fam.ADAPTER_TARGETS)})
    pipe_dtype = data.pipe.transformer.dtype
    built = build_module_method(p.method, data.pipe.transformer, settings, p.glora_settings())
    if next(built.model.parameters()).dtype != pipe_dtype:  # full: upcast to fp32 masters in a bf16 pipeline
        built.model.register_forward_pre_hook(cast_inputs_hook(next(built.model.parameters()).dtype),
                                              with_kwargs=True)
        to_pipe = output_dtype_hook(pipe_dtype)  # sampling: the pipeline's latents stay in its dtype
        built.model.register_forward_hook(lambda m, a, k, out: out if m.training else to_pipe(m, a, k, out),
                                          with_kwargs=True)
    data.pipe.transformer = built.model
    return built


def finetune(built: BuiltMethod, data: Data, p: LVMFinetuneRun) -> tuple[list[FlowStep], ResourceTracker]:
    with ResourceTracker(interval_s=p.sample_interval_s, use_gpu=p.device == "cuda") as tracker:
        steps = train(built.model, built.param_groups, data.train, p.train_settings(), data.fam.denoise)
    return steps, tracker


def training_metrics(built: BuiltMethod, steps: list[FlowStep], tracker: ResourceTracker,
                     p: LVMFinetuneRun) -> dict[str, MetricValue]:
    out, counter = step_latency_metrics([s.seconds for s in steps], p.timing_warmup_steps)
    timed = steps[p.timing_warmup_steps:]
    out["st_samples_per_s"] = MetricValue.measured(sum(s.samples for s in timed) / sum(s.seconds for s in timed),
                                                   "samples/s", counter)
    counts = trainable_parameters(built.model)
    out["trainable_params"] = MetricValue.measured(counts["trainable"], "params", "counted-requires-grad")
    out["trainable_share"] = MetricValue.measured(counts["share"], "fraction", "counted-requires-grad/total")
    out["adapter_bytes"] = MetricValue.measured(saved_bytes(built), "bytes", saved_how(built))
    return {**out, **tracker_metrics(tracker)}


def saved_how(built: BuiltMethod) -> str:
    return ("file-size(peft-save_pretrained,safetensors)" if built.method != "full"
            else "file-size(safetensors,every-trainable-tensor)")


def saved_bytes(built: BuiltMethod) -> int:
    """What the method adds to the base on disk: peft's adapter files, or every trained tensor for ``full``."""
    with tempfile.TemporaryDirectory() as tmp:
        if built.method == "full":
            from safetensors.torch import save_file

            save_file({n: q.detach().contiguous() for n, q in built.model.named_parameters() if q.requires_grad},
                      f"{tmp}/model.safetensors")
        else:
            built.model.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).iterdir() if f.suffix == ".safetensors")


def measure_after(built: BuiltMethod, data: Data, p: LVMFinetuneRun, steps: list[FlowStep], base: dict,
                  result_dir: Path | None = None) -> tuple[dict, dict]:
    """After training: held-out loss, samples and FD (quality), and the per-item held-out losses (raw)."""
    grid = Path(result_dir) / GRID_FILE if result_dir is not None else None
    after_fd, samples = sample_fd(data, p, grid)
    if result_dir is not None and samples.dim() == 5:
        pipelines.save_clip(samples[0], Path(result_dir) / CLIP_FILE)
    tail = steps[-max(1, len(steps) // 10):]
    items = heldout(built.model, data, p)
    loss = float(items.mean())
    return {
        "heldout_loss": loss, **base, "heldout_loss_change": loss - base["heldout_loss_base"],
        "fd": after_fd, "fd_change": after_fd - base["fd_base"],
        "fd_noise_floor": data.noise_floor, "fd_noise_floor_images": data.noise_floor_images,
        "initial_loss": steps[0].loss, "final_loss": sum(s.loss for s in tail) / len(tail),
        "fd_metric": (f"frechet-distance(efficientnet-lite0-pooled-1280,{p.fd_image_size}px,"
                      f"{len(pipelines.frames(samples))}-generated-vs-{len(data.real_features)}-real;not-inception-FID)"),
        "method_description": built.description,
        "train_data": data.train_source, "heldout_data": data.heldout_source,
    }, {"heldout_item_losses": items.tolist()}
