"""The DiT studies (attention, MoE): one diffusion transformer variant per run, trained and sampled.

Every run of a study trains the same small class-conditional DiT from scratch on
the same images in the same order, with the same noise, times, steps,
schedule and seed; only the attention (or the FFN) changes. Phases:

1. data: the fixed held-out split (its two halves: the FD reference and the
   noise floor) and the training images;
2. model: the run's ``DiTConfig`` and a seeded model; parameters (counted, total
   and active), analytical FLOPs per image and per training step;
3. the untrained model: samples, their FD and the held-out loss (the baseline
   every trained variant must beat by more than the noise floor);
4. training under the resource tracker (1 s samples): AL, TT, AMU, AEC; an
   exponential moving average of the weights is kept (``ema_decay``);
5. quality, of the averaged weights: held-out flow-matching loss; ``n_samples`` class-balanced samples,
   timed (sampling latency per image), and their FD (EfficientNet-Lite0)
   against the held-out reference half; a sample grid saved beside the record.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..dit import DiT
from ..dit import data as dit_data
from ..dit.analysis import dit_costs
from ..dit.flow import heldout_loss, sample
from ..dit.train import DiTStep, weight_average
from ..dit.train import train as train_loop
from ..metrics.tracker import ResourceTracker
from ..metrics.training import step_latency_metrics, tracker_metrics
from ..metrics.values import MetricValue
from ..records import GRID_FILE
from .dit_run import DiTRun
from ..vision import fd

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GRID_PER_CLASS = 8  # columns of the sample grid (one row per class)


@dataclass
class Data:
    splits: dit_data.ImageSplits
    reference: torch.Tensor  # (n_heldout/2, 3, 32, 32): generated images are compared with these
    floor_half: torch.Tensor  # the other half: FD(floor_half, reference) is the noise floor
    reference_features: np.ndarray
    noise_floor_fd: float


def set_threads(p: DiTRun) -> None:
    """Pin torch's intra-op threads for the whole run (a notebook kernel is one run). On a shared 2-core machine
    one thread is several times faster for this small model: with two, every OpenMP barrier waits for the thread
    that shares its core with another job (the PEFT study measured the same)."""
    if p.num_threads is not None:
        torch.set_num_threads(p.num_threads)


def load_data(p: DiTRun) -> Data:
    splits = dit_data.splits(p.heldout_size, p.data)
    half = p.heldout_size // 2
    floor_half, reference = splits.heldout_images[:half], splits.heldout_images[half:2 * half]
    reference_features = fd.cached_features(reference, p.fd_image_size)
    floor = fd.cached_frechet_distance(fd.cached_features(floor_half, p.fd_image_size), reference_features)
    return Data(splits, reference, floor_half, reference_features, floor)


def fd_method(p: DiTRun, n: int, reference: int) -> str:
    return (f"frechet-distance(efficientnet-lite0-pooled-1280,{p.fd_image_size}px,{n}-vs-{reference}-heldout;"
            "not-inception-FID)")


# --- model ------------------------------------------------------------------------------------

def build_model(p: DiTRun) -> DiT:
    """The run's DiT, initialised from ``p.seed``, on ``p.device`` in ``p.dtype``."""
    torch.manual_seed(p.seed)
    return DiT(p.dit_config()).to(device=p.device, dtype=DTYPES[p.dtype])


def measure_model(model: DiT, p: DiTRun) -> tuple[dict[str, MetricValue], dict]:
    counts = dit_costs(model.config, p.batch_size)
    counted = sum(q.numel() for q in model.parameters())
    assert counted == counts["params_total"]
    metrics = {
        "params_total": MetricValue.measured(counted, "params", "counted-module-parameters"),
        "params_active": MetricValue.measured(counts["params_active"], "params",
                                              "counted-module-parameters(top-k-experts-only)"),
        "flops_per_image": MetricValue.estimated(counts["flops_per_image"], "FLOP/image",
                                                 f"analytical-forward-flops({model.config.n_tokens}-tokens)"),
        "flops_per_step": MetricValue.estimated(counts["flops_per_step"], "FLOP/step",
                                                f"analytical(3x-forward,batch={p.batch_size})"),
    }
    return metrics, {"config": model.config.to_dict()}


def sample_labels(n: int, n_classes: int = 10) -> torch.Tensor:
    """(n,) class ids, balanced: 0, 1, ..., 9, 0, 1, ..."""
    return torch.arange(n) % n_classes


def generate(model: DiT, p: DiTRun) -> tuple[torch.Tensor, float]:
    """``n_samples`` class-balanced images from seeded noise and the wall seconds it took."""
    start = time.perf_counter()
    images = sample(model, sample_labels(p.n_samples), p.sampling_steps, seed=p.seed,
                    guidance_scale=p.guidance_scale, batch_size=p.sample_batch_size)
    if p.device == "cuda":
        torch.cuda.synchronize()
    return images, time.perf_counter() - start


def measure_untrained(model: DiT, p: DiTRun, data: Data) -> dict:
    """FD and held-out loss of the freshly initialised model, the baseline training must beat.

    adaLN-Zero initialises the output projection to zero, so the untrained velocity is exactly zero for any input
    and every Euler step adds nothing: the samples are the sampler's seeded starting noise, which is what
    ``sample`` returns for 0 steps (checked on the weights, not assumed). They, their features and their FD are then
    the same for every variant and run of a profile, and cached."""
    final = model.final.proj
    if final.weight.count_nonzero() or final.bias.count_nonzero():
        images, _ = generate(model, p)  # not an adaLN-Zero start (e.g. loaded weights): sample it in full
    else:
        images = sample(model, sample_labels(p.n_samples), 0, seed=p.seed, batch_size=p.sample_batch_size)
    split = data.splits
    init_fd = fd.cached_frechet_distance(fd.cached_features(images, p.fd_image_size), data.reference_features)
    return {"fd_init": init_fd,
            "heldout_loss_init": heldout_loss(model, split.heldout_images, split.heldout_labels, seed=p.seed)}


# --- training ---------------------------------------------------------------------------------

def train(model: DiT, p: DiTRun, data: Data) -> tuple[list[DiTStep], ResourceTracker, DiT]:
    """Train ``model`` in place; return its steps, the tracker, and the model to sample and score: the moving
    average of the weights (``p.ema_decay > 0``) or the trained weights themselves."""
    batches = dit_data.train_batches(data.splits, p.batch_size, seed=p.seed)
    ema = weight_average(model, p.ema_decay) if p.ema_decay > 0 else None
    with ResourceTracker(interval_s=p.sample_interval_s, use_gpu=p.device == "cuda") as tracker:
        steps = train_loop(model, batches, p.steps, p.lr, p.warmup_steps, p.min_lr, weight_decay=p.weight_decay,
                           seed=p.seed, ema=ema)
    # the fp32 average sampled in the run's dtype
    return steps, tracker, (ema.module.to(next(model.parameters()).dtype) if ema is not None else model)


def training_metrics(steps: list[DiTStep], total_params: int, p: DiTRun,
                     tracker: ResourceTracker | None = None) -> dict[str, MetricValue]:
    """AL and its spread, TT (patch tokens / parameter / s) and images/s from the raw steps after the warm-up,
    with the tracker's AMU, PCU, AEC and energy over the whole training phase."""
    out, counter = step_latency_metrics([s.seconds for s in steps], p.timing_warmup_steps)
    timed = steps[p.timing_warmup_steps:]
    seconds = sum(s.seconds for s in timed)
    out["tt_tokens_per_param_s"] = MetricValue.measured(sum(s.tokens for s in timed) / total_params / seconds,
                                                        "tokens/param/s", f"{counter}(patch-tokens)")
    out["train_images_per_s"] = MetricValue.measured(sum(s.images for s in timed) / seconds, "images/s", counter)
    if tracker is not None:
        out.update(tracker_metrics(tracker))
    return out


# --- quality ----------------------------------------------------------------------------------

def measure_quality(model: DiT, p: DiTRun, data: Data, steps: list[DiTStep], untrained: dict,
                    result_dir: Path | None = None) -> tuple[dict, dict[str, MetricValue], torch.Tensor]:
    """Held-out loss, FD of ``n_samples`` samples, the noise floor and the untrained baseline; the sampling
    latency per image; the sample grid written to ``result_dir/samples.png``. ``model`` is the one to score:
    the moving average of the weights when the run keeps one."""
    split = data.splits
    images, seconds = generate(model, p)
    generated_fd = fd.frechet_distance(fd.cached_features(images, p.fd_image_size), data.reference_features)
    tail = steps[-max(1, len(steps) // 10):]
    aux = [s.aux_loss for s in tail if s.aux_loss is not None]
    half = len(data.reference)
    quality = {
        "fd": generated_fd,
        "fd_init": untrained["fd_init"],
        "fd_noise_floor": data.noise_floor_fd,
        "fd_gain": untrained["fd_init"] - generated_fd,
        "fd_metric": fd_method(p, p.n_samples, half),
        "noise_floor_metric": fd_method(p, half, half),
        "heldout_loss": heldout_loss(model, split.heldout_images, split.heldout_labels, seed=p.seed),
        "heldout_loss_init": untrained["heldout_loss_init"],
        "initial_loss": steps[0].flow_loss,
        "final_loss": sum(s.flow_loss for s in tail) / len(tail),
        "final_aux_loss": sum(aux) / len(aux) if aux else None,
        "trained_images": sum(s.images for s in steps),
        "n_samples": p.n_samples,
        "data": split.source,
        "sampled_weights": f"exponential-moving-average(decay={p.ema_decay})" if p.ema_decay > 0 else "trained",
    }
    metrics = {"sample_latency_s_per_image": MetricValue.measured(
        seconds / p.n_samples, "s/image",
        f"perf-counter(sampling,{p.n_samples}-images,{p.sampling_steps}-euler-steps,batch={p.sample_batch_size})")}
    if result_dir is not None:
        save_grid(images, Path(result_dir) / GRID_FILE)
    return quality, metrics, images


def save_grid(images: torch.Tensor, path: Path, per_class: int = GRID_PER_CLASS, n_classes: int = 10) -> Path:
    """The first ``per_class`` samples of each class, one row per class, as a PNG (images are class-cycled)."""
    from PIL import Image

    rows = []
    for c in range(n_classes):
        row = images[c::n_classes][:per_class]  # (k, 3, 32, 32)
        rows.append(torch.cat(list(row), dim=2))  # (3, 32, 32k)
    grid = torch.cat(rows, dim=1)  # (3, 32 * classes, 32k)
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).resize((pixels.shape[1] * 2, pixels.shape[0] * 2), Image.NEAREST).save(path)
    return path


def loss_curve(steps: list[DiTStep]) -> list[dict]:
    return [asdict(s) for s in steps]
