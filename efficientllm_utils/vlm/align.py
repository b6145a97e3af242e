"""The alignment stage: the vision tower and merger learn to speak to a frozen language model (LLaVA's stage 1).

Captioned real images (``data.captions``: CIFAR-10 train photos and easy-VQA train images, never the held-out
splits) go through the fine-tuning library's one training loop with only the vision parameters trainable; the
loss is on the caption tokens. The result is saved once under ``.cache/models/vlm-aligned-<key>`` (as the SmolLM2
conversion is), ``key`` a hash of every setting it depends on, so later runs and reruns load it in a second.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from .. import assets
from .. import finetune as ft
from . import data as vdata
from .config import AlignSettings, VisionSettings
from .model import build_small_vlm

ALIGN_VERSION = 1  # bump when the procedure changes: a new key, a new checkpoint
SETTINGS_FILE = "efficientllm_vlm.json"


def cache_key(lm_source: str, vision: VisionSettings, align: AlignSettings) -> str:
    spec = {"lm": lm_source, "vision": vision.model_dump(), "align": align.model_dump(exclude={"num_threads"}),
            "version": ALIGN_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_dir(lm_source: str, vision: VisionSettings, align: AlignSettings) -> Path:
    return assets.cache_dir().parent / "models" / f"vlm-aligned-{cache_key(lm_source, vision, align)}"


def align(model, processor, settings: AlignSettings) -> ft.TrainResult:
    """Train the vision tower and merger on captions, the language model frozen; returns the loop's record."""
    pairs = vdata.captions(settings.captions_per_task, settings.seed)
    examples = [vdata.encode(processor, image, vdata.CAPTION_QUESTION, caption, row)
                for row, (image, caption) in enumerate(pairs)]
    model.requires_grad_(False)
    model.model.visual.requires_grad_(True)  # the ViT blocks and the patch merger
    params = [p for p in model.parameters() if p.requires_grad]
    train = ft.TrainSettings(steps=settings.steps, batch_size=settings.batch_size, warmup_steps=settings.warmup_steps,
                             seed=settings.seed, num_threads=settings.num_threads, min_lr_ratio=0.1)
    result = ft.train_model(model, [{"params": params, "lr": settings.lr, "weight_decay": 0.0}], examples, train,
                            processor.tokenizer.pad_token_id)
    model.requires_grad_(False)
    return result


def aligned_checkpoint(lm_source: str, vision: VisionSettings, align_settings: AlignSettings) -> Path:
    """The directory of the aligned small model: built, aligned and saved on the first call, then reused."""
    target = checkpoint_dir(lm_source, vision, align_settings)
    if (target / SETTINGS_FILE).exists():
        return target
    t0 = time.perf_counter()
    model, processor = build_small_vlm(lm_source, vision)
    with ft.threads(align_settings.num_threads):
        result = align(model, processor, align_settings)
    staging = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.tokenizer.save_pretrained(staging)
    (staging / SETTINGS_FILE).write_text(json.dumps({
        "language_model": lm_source, "vision": vision.model_dump(), "align": align_settings.model_dump(),
        "transplant": model.config.efficientllm_transplant, "version": ALIGN_VERSION,
        "losses": result.losses, "seconds": time.perf_counter() - t0,
        "loss_summary": result.loss_summary()}, indent=1))
    try:
        os.replace(staging, target)  # atomic; another process that finished first wins
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def checkpoint_info(path: str | Path) -> dict:
    """What the aligned checkpoint was built from and how its alignment went (losses, seconds)."""
    return json.loads((Path(path) / SETTINGS_FILE).read_text())


def load_processor(path: str | Path):
    """The aligned checkpoint's processor (its tokenizer with the vision tokens, the image settings it used)."""
    from transformers import AutoTokenizer

    from .processor import build_processor

    vision = VisionSettings.model_validate(checkpoint_info(path)["vision"])
    return build_processor(AutoTokenizer.from_pretrained(str(path)), vision)


def load_aligned(path: str | Path, dtype: torch.dtype = torch.float32):
    """``(model, processor)`` of an aligned checkpoint, fp32, eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=dtype).eval(), load_processor(path)
