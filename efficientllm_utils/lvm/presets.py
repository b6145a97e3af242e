"""The models a run can name: small presets pretrained here (:mod:`.base`) or the paper's hub checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType

from . import sd3, wan

PAPER_MODELS = {"stabilityai/stable-diffusion-3.5-medium": "sd3", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "wan"}


@dataclass(frozen=True)
class Preset:
    family: str
    shape: object  # the family's shape dataclass
    vae_steps: int  # VAE reconstruction pretraining
    vae_lr: float
    kl_weight: float
    base_steps: int  # denoiser flow-matching pretraining
    lr: float
    batch_size: int
    heldout_size: int  # images: the DiT axis's fixed held-out split
    max_examples: int | None = None  # cap on the base's training and held-out examples (the smoke bases)
    seed: int = 0
    images: str = "fashion_mnist"  # the SD family's image set (vision/images.py); the Wan family reads videos


PRESETS = {
    "sd3-small": Preset("sd3", sd3.SD3Shape(), vae_steps=150, vae_lr=2e-3, kl_weight=1e-3, base_steps=300, lr=1e-3,
                        batch_size=32, heldout_size=2000),
    "sd3-tiny": Preset("sd3", sd3.SD3Shape(hidden_heads=2, n_layers=1, vae_channels=(8, 16), text_dim=16, t5_dim=32),
                       vae_steps=4, vae_lr=2e-3, kl_weight=1e-3, base_steps=4, lr=1e-3, batch_size=8,
                       heldout_size=2000, max_examples=64),
    "wan-small": Preset("wan", wan.WanShape(), vae_steps=150, vae_lr=2e-3, kl_weight=1e-3, base_steps=300, lr=1e-3,
                        batch_size=8, heldout_size=2000),
    "wan-tiny": Preset("wan", wan.WanShape(heads=2, n_layers=1, ffn_dim=32, vae_base_dim=8, text_dim=16),
                       vae_steps=4, vae_lr=2e-3, kl_weight=1e-3, base_steps=4, lr=1e-3, batch_size=4,
                       heldout_size=2000, max_examples=8),
}
# the small SD on CIFAR-10's colour photos, where its source answers (``--set model=sd3-small-cifar10``)
PRESETS["sd3-small-cifar10"] = replace(PRESETS["sd3-small"], images="cifar10")


def family_name(model: str) -> str:
    if model in PRESETS:
        return PRESETS[model].family
    if model in PAPER_MODELS:
        return PAPER_MODELS[model]
    raise ValueError(f"model {model!r} is not a preset {sorted(PRESETS)} or a paper checkpoint {sorted(PAPER_MODELS)}")


def family(model: str) -> ModuleType:
    return {"sd3": sd3, "wan": wan}[family_name(model)]


def assemble_pipeline(fam: ModuleType, components: dict):
    """A family's diffusers pipeline (its ``PIPELINE_CLASS``) from the components its ``build_components`` gave,
    with the flow-matching Euler scheduler (shift 1) both families use; its progress bar off."""
    import diffusers

    pipe = getattr(diffusers, fam.PIPELINE_CLASS)(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def preset(model: str) -> Preset:
    if model not in PRESETS:
        raise ValueError(f"model {model!r} is not a preset; allowed: {sorted(PRESETS)}")
    return PRESETS[model]


PAPER_HELDOUT_SIZE = 2000  # the paper's checkpoints are scored on the same held-out split
PAPER_IMAGES = "cifar10"  # ... of CIFAR-10 (colour photos; its source must answer: see assets.py)


@dataclass(frozen=True)
class PaperSampling:
    """How a paper checkpoint is fine-tuned and sampled here: at one stated resolution for the training data and
    the samples (an FD change compares like with like), in pipeline calls of ``batch`` samples (each batch's
    output goes to the CPU, so a thousand samples never sit on the GPU at once)."""

    size: int  # pixels, square
    frames: int | None  # clips' frames (Wan: 4k + 1)
    batch: int


PAPER_SAMPLING = {
    "stabilityai/stable-diffusion-3.5-medium": PaperSampling(size=256, frames=None, batch=8),
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": PaperSampling(size=256, frames=17, batch=2),
}


def sampling(model: str) -> dict:
    """``fam.generate``'s size and batch arguments for ``model``: none for a preset (its own size, one call)."""
    s = PAPER_SAMPLING.get(model)
    if s is None:
        return {}
    return {"size": s.size, "batch_size": s.batch} | ({"frames": s.frames} if s.frames else {})


def examples(model: str, part: str, heldout: bool):
    """The model's ``part`` ('base': what the base learned, 'new': what fine-tuning adapts it to), training or
    held-out side, as its family cuts it; a paper checkpoint's at its ``PAPER_SAMPLING`` size."""
    p = PRESETS.get(model)
    if p is not None:
        return family(model).examples(part, heldout, p.heldout_size, p.shape, p.images)
    s = PAPER_SAMPLING[model]
    if family_name(model) == "wan":
        return wan.examples(part, heldout, PAPER_HELDOUT_SIZE, wan.WanShape(image_size=s.size, frames=s.frames))
    return upsampled(sd3.examples(part, heldout, PAPER_HELDOUT_SIZE, None, PAPER_IMAGES), s.size)


def upsampled(examples, size: int):
    """Images (n, 3, h, w) resized to ``size`` px (bicubic), as a paper checkpoint trains and samples."""
    import torch.nn.functional as F

    pixels = F.interpolate(examples.pixels, size=(size, size), mode="bicubic").clamp(-1, 1)
    return replace(examples, pixels=pixels, source=f"{examples.source}, resized to {size} px (bicubic)")
