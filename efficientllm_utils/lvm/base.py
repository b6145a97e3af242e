"""The small pretrained bases of the CPU profiles, pretrained here once and cached.

No pretrained diffusion weights ship in any registry package, so a small model (``lvm.presets``) is
pretrained on real data for a fixed budget before anything is fine-tuned or quantized, as the paper's
methods start from a base that has learned something:

1. the VAE: reconstruction (MSE + a small KL) on the base pixels, then its latent statistics are set
   (the shift and scale the pipeline undoes before decoding);
2. the denoiser: flow matching on the base latents, through the same loop as fine-tuning.

The whole pipeline is saved with ``save_pretrained`` under ``<cache>/models/lvm/<model>-<hash>/`` (the
hash covers the preset, the captions and this module's version), with ``base.json``: the budget, the data, the wall time,
and the held-out flow-matching loss of the untrained and the pretrained denoiser (per item too, the same times and
noise for both: the chapter's paired test that pretraining taught the base something).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from .. import training
from ..assets import cache_dir
from ..finetune.config import TrainSettings
from . import data as lvm_data
from .flow import heldout_item_losses
from .presets import Preset, assemble_pipeline, family, preset
from .train import LatentSet, train

VERSION = 2  # bump when pretraining changes what it produces
BASE_JSON = "base.json"


def base_dir(model: str) -> Path:
    p = preset(model)
    key = hashlib.sha256(f"{VERSION}|{p!r}|{lvm_data.all_captions()}".encode()).hexdigest()[:12]
    return cache_dir().parent / "models" / "lvm" / f"{model}-{key}"


def train_vae(vae, pixels: torch.Tensor, p: Preset) -> list[float]:
    """Reconstruction pretraining of the VAE: MSE + kl_weight * KL, AdamW, fixed seed and order."""
    generator = torch.Generator().manual_seed(p.seed)
    batches = (pixels[torch.randint(len(pixels), (p.batch_size,), generator=generator)] for _ in range(p.vae_steps))

    def step(x: torch.Tensor) -> dict:
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        loss = torch.nn.functional.mse_loss(vae.decode(z).sample, x) + p.kl_weight * posterior.kl().mean() / x[0].numel()
        loss.backward()
        return {"loss": loss.detach()}

    vae.train()
    # AdamW at its default weight decay (0.01), a constant lr, no clipping
    losses = training.train(batches, step, [{"params": list(vae.parameters()), "lr": p.vae_lr}], steps=p.vae_steps,
                            record=lambda **values: values["loss"], schedule="constant", max_grad_norm=None)
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def reconstruction_mse(vae, pixels: torch.Tensor, batch_size: int = 64) -> float:
    errors = [torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x, reduction="sum")
              for x in pixels.split(batch_size)]
    return float(sum(errors) / pixels.numel())


def capped(examples, n: int | None):
    """The first ``n`` examples (all when None)."""
    if n is None or n >= len(examples.pixels):
        return examples
    return replace(examples, pixels=examples.pixels[:n], caption_ids=examples.caption_ids[:n],
                   source=f"{examples.source} (first {n})")


def latent_set(pipe, fam, examples) -> LatentSet:
    return LatentSet(fam.to_latents(pipe.vae, examples.pixels), examples.caption_ids,
                     fam.encode_captions(pipe, examples.captions))


def pretrain(model: str) -> Path:
    """Pretrain ``model``'s VAE and denoiser and save the pipeline (see the module's doc); returns its dir."""
    p, fam = preset(model), family(model)
    start = time.perf_counter()
    comps = fam.build_components(p.shape, lvm_data.all_captions(), p.seed)
    train_pixels = capped(fam.examples("base", False, p.heldout_size, p.shape, p.images), p.max_examples)
    held_pixels = capped(fam.examples("base", True, p.heldout_size, p.shape, p.images), p.max_examples)
    vae = comps["vae"]
    recon_init = reconstruction_mse(vae, held_pixels.pixels)
    vae_losses = train_vae(vae, train_pixels.pixels, p)
    with torch.no_grad():
        fam.set_latent_stats(vae, torch.cat([vae.encode(x).latent_dist.mean for x in train_pixels.pixels.split(64)]))
    pipe = assemble_pipeline(fam, comps)
    train_set, held_set = latent_set(pipe, fam, train_pixels), latent_set(pipe, fam, held_pixels)
    transformer = comps["transformer"]
    items_init = heldout_item_losses(transformer, fam.denoise, held_set.latents, held_set.cond(slice(None)), p.seed)
    settings = TrainSettings(steps=p.base_steps, batch_size=p.batch_size, warmup_steps=max(1, p.base_steps // 20),
                             min_lr_ratio=0.1, seed=p.seed)
    steps = train(transformer, [{"params": list(transformer.parameters()), "lr": p.lr, "weight_decay": 0.0}],
                  train_set, settings, fam.denoise)
    items = heldout_item_losses(transformer, fam.denoise, held_set.latents, held_set.cond(slice(None)), p.seed)
    summary = {
        "model": model, "preset": repr(p), "pipeline_class": fam.PIPELINE_CLASS,
        "train_data": train_pixels.source, "heldout_data": held_pixels.source,
        "vae_steps": p.vae_steps, "vae_first_loss": vae_losses[0], "vae_last_loss": vae_losses[-1],
        "vae_heldout_mse_init": recon_init, "vae_heldout_mse": reconstruction_mse(vae, held_pixels.pixels),
        "base_steps": p.base_steps, "base_first_loss": steps[0].loss, "base_last_loss": steps[-1].loss,
        "heldout_loss_init": float(items_init.mean()), "heldout_loss": float(items.mean()),
        "heldout_item_losses_init": items_init.tolist(), "heldout_item_losses": items.tolist(),
        "params": sum(q.numel() for q in transformer.parameters()),
        "wall_s": time.perf_counter() - start,
    }
    target = base_dir(model)
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging)
    (staging / BASE_JSON).write_text(json.dumps(summary, indent=1))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, target)  # atomic: a half-written base is never loaded
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(staging, ignore_errors=True)
    return target


def pretrained_base(model: str) -> Path:
    """The cached pretrained base of ``model`` (pretrained now when missing)."""
    target = base_dir(model)
    return target if (target / BASE_JSON).exists() else pretrain(model)


def base_summary(model: str) -> dict:
    return json.loads((pretrained_base(model) / BASE_JSON).read_text())
