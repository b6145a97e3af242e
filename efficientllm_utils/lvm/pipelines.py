"""Loading a run's pipeline (the cached small base, or the paper's checkpoint) and generating from it."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..metrics.inference import synchronize
from .presets import PAPER_MODELS, family


def source(model: str) -> str:
    """What ``from_pretrained`` takes: the paper's hub id, or the cached pretrained base (pretrained if missing)."""
    if model in PAPER_MODELS:
        return model
    from .base import pretrained_base

    return str(pretrained_base(model))


def load_pipeline(model: str, device: str = "cpu", transformer=None):
    """The family's diffusers pipeline class ``from_pretrained(source(model))``; ``transformer`` replaces the
    saved one (e.g. a quantized copy). The small bases run in fp32, the paper's checkpoints in bf16."""
    import diffusers

    fam = family(model)
    dtype = torch.bfloat16 if model in PAPER_MODELS else torch.float32
    kwargs = {"torch_dtype": dtype} | ({"transformer": transformer} if transformer is not None else {})
    pipe = getattr(diffusers, fam.PIPELINE_CLASS).from_pretrained(source(model), **kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_transformer(model: str, precision: str, device: str = "cpu"):
    import diffusers

    from .quantize import load_transformer as load

    cls = getattr(diffusers, family(model).TRANSFORMER_CLASS)
    return load(cls, source(model), precision, device, subfolder="transformer")


@dataclass
class Timed:
    samples: torch.Tensor  # (n, 3, H, W) images or (n, 3, F, H, W) clips in [-1, 1]
    seconds: float  # wall time of the whole generation
    step_seconds: list[float]  # each denoiser forward (one per sampling step, whole batch)


def timed_generate(pipe, fam, cond: dict, steps: int, seed: int, guidance_scale: float = 1.0, **sizes) -> Timed:
    """``fam.generate`` (``sizes``: its size and batch arguments) with every denoiser forward timed by hooks
    (perf_counter after a sync)."""
    marks: list[float] = []
    step_seconds: list[float] = []
    device = next(pipe.transformer.parameters()).device

    def clock() -> float:  # after the queued kernels: a step's time, not its launches'
        synchronize(device)
        return time.perf_counter()

    pre = pipe.transformer.register_forward_pre_hook(lambda *a: marks.append(clock()))
    post = pipe.transformer.register_forward_hook(lambda *a: step_seconds.append(clock() - marks[-1]))
    try:
        start = time.perf_counter()
        samples = fam.generate(pipe, cond, steps, seed, guidance_scale, **sizes)
        synchronize(samples.device)
        return Timed(samples.cpu(), time.perf_counter() - start, step_seconds)
    finally:
        pre.remove()
        post.remove()


def frames(samples: torch.Tensor) -> torch.Tensor:
    """Images as they are; clips (n, 3, F, H, W) as their frames (n*F, 3, H, W)."""
    return samples if samples.dim() == 4 else samples.permute(0, 2, 1, 3, 4).flatten(0, 1)


def save_grid(samples: torch.Tensor, path: Path, columns: int = 8, scale: int = 2) -> Path:
    """Images in rows of ``columns`` (clips: one row of frames per clip) as a PNG."""
    from PIL import Image

    if samples.dim() == 5:
        rows = [torch.cat(list(clip.permute(1, 0, 2, 3)), dim=2) for clip in samples]  # (3, H, F*W)
    else:
        rows = [torch.cat(list(samples[i:i + columns]), dim=2) for i in range(0, len(samples), columns)]
        rows = [torch.nn.functional.pad(r, (0, rows[0].shape[2] - r.shape[2])) for r in rows]
    grid = torch.cat(rows, dim=1)
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST).save(path)
    return path


def save_clip(clip: torch.Tensor, path: Path, fps: int = 8, scale: int = 4) -> Path:
    """One clip (3, F, H, W) in [-1, 1] as an H.264 MP4 (imageio with imageio-ffmpeg's bundled ffmpeg)."""
    import imageio.v2 as imageio

    frames_u8 = ((clip.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0)  # (F, H, W, 3)
    frames_u8 = frames_u8.repeat_interleave(scale, 1).repeat_interleave(scale, 2).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(path, list(frames_u8), fps=fps, codec="libx264", macro_block_size=1,
                     output_params=["-pix_fmt", "yuv420p"])
    return path
