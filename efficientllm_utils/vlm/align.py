"""The alignment stage: the vision tower and merger learn to speak to a frozen language model (LLaVA's stage 1).

First (``embed_align``) the vision tower alone learns to emit the language model's input embeddings of each
caption's content words: no language-model pass, so thousands of images in a minute. Then captioned real images
(``data.captions``: an image set's train images and easy-VQA train images, never the held-out splits) go through the
fine-tuning library's one training loop with only the patch merger (the projector) trainable, as LLaVA's first
stage trains only its projector; the loss is on the caption tokens. (Training the whole vision tower here at a
high lr undid the first stage: the share of held-out CIFAR-10 photos whose image tokens lie nearest to their own
class word's embedding fell from 0.31 to 0.17 of 200, measured with the previous settings.) The result is saved once under ``.cache/models/vlm-aligned-<key>`` (as the SmolLM2
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

from .. import assets, training
from .. import finetune as ft
from . import data as vdata
from .config import AlignSettings, VisionSettings
from .model import build_small_vlm

ALIGN_VERSION = 3  # bump when the procedure changes: a new key, a new checkpoint
SETTINGS_FILE = "efficientllm_vlm.json"


def cache_key(lm_source: str, vision: VisionSettings, align: AlignSettings) -> str:
    spec = {"lm": lm_source, "vision": vision.model_dump(), "align": align.model_dump(exclude={"num_threads"}),
            "version": ALIGN_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_dir(lm_source: str, vision: VisionSettings, align: AlignSettings) -> Path:
    return assets.cache_dir().parent / "models" / f"vlm-aligned-{cache_key(lm_source, vision, align)}"


def embed_align(model, processor, settings: AlignSettings) -> list[float]:
    """Stage 1: the vision tower and merger learn to emit, for each image, language-model input embeddings of its
    caption's content words (image token j -> word j mod n: "cat cat cat cat", "blue circle blue circle"), by
    cosine distance plus squared error (relative to the embeddings' mean square) to the frozen embedding rows. No
    language-model pass, so it sees many images cheaply; returns the loss per step."""
    from PIL import Image

    if settings.embed_steps == 0:
        return []
    pairs = vdata.captions(settings.embed_captions_per_task, settings.seed + 1, settings.images)
    encoded = processor.image_processor(images=[Image.fromarray(image) for image, _, _ in pairs], return_tensors="pt")
    pixels, grids = encoded["pixel_values"], encoded["image_grid_thw"]  # (n * patches, C*T*P*P), (n, 3)
    per_image = int(grids[0].prod())
    merged = per_image // model.model.visual.spatial_merge_size ** 2
    embeddings = model.get_input_embeddings().weight.detach()  # (vocab, hidden)
    scale = embeddings.pow(2).mean()
    word_ids = [[processor.tokenizer(f" {w}", add_special_tokens=False).input_ids[0] for w in words]
                for _, _, words in pairs]
    targets = torch.stack([embeddings[[ids[j % len(ids)] for j in range(merged)]] for ids in word_ids])  # (n, m, h)
    visual = model.model.visual
    generator = torch.Generator().manual_seed(settings.seed)
    batches = (torch.randint(len(pairs), (settings.embed_batch_size,), generator=generator)
               for _ in range(settings.embed_steps))

    def step(batch: torch.Tensor) -> dict:
        rows = (batch[:, None] * per_image + torch.arange(per_image)).reshape(-1)
        features = visual(pixels[rows], grid_thw=grids[batch]).pooler_output  # (batch * m, hidden), image order
        target = targets[batch].reshape(-1, targets.shape[-1])
        loss = (1 - torch.nn.functional.cosine_similarity(features, target, dim=-1)).mean() + \
            (features - target).pow(2).mean() / scale
        loss.backward()
        return {"loss": loss.detach()}

    visual.train()
    losses = training.train(batches, step, [{"params": list(visual.parameters()), "lr": settings.embed_lr,
                                             "weight_decay": 0.0}],
                            steps=settings.embed_steps, record=lambda **values: values["loss"],
                            warmup_steps=min(10, settings.embed_steps - 1), min_lr_ratio=0.1)
    visual.eval()
    return losses


def align(model, processor, settings: AlignSettings) -> ft.TrainResult:
    """Stage 2: train the patch merger on captions, the vision transformer and the language model frozen; returns
    the loop's record."""
    pairs = vdata.captions(settings.captions_per_task, settings.seed, settings.images)
    examples = [vdata.encode(processor, image, vdata.CAPTION_QUESTION, caption, row)
                for row, (image, caption, _) in enumerate(pairs)]
    model.requires_grad_(False)
    model.model.visual.merger.requires_grad_(True)  # the projector only: the ViT keeps what stage 1 taught it
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
    t0, cpu0 = time.perf_counter(), time.process_time()
    model, processor = build_small_vlm(lm_source, vision)
    with ft.threads(align_settings.num_threads):
        t1 = time.perf_counter()
        embed_losses = embed_align(model, processor, align_settings)
        embed_seconds = time.perf_counter() - t1
        result = align(model, processor, align_settings)
    staging = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.tokenizer.save_pretrained(staging)
    (staging / SETTINGS_FILE).write_text(json.dumps({
        "language_model": lm_source, "vision": vision.model_dump(), "align": align_settings.model_dump(),
        "transplant": model.config.efficientllm_transplant, "version": ALIGN_VERSION,
        "losses": result.losses, "seconds": time.perf_counter() - t0,
        # CPU seconds of this process for the whole stage: its wall time at 1 thread on an idle machine, whatever the
        # load was when it was built
        "cpu_seconds": time.process_time() - cpu0,
        "embed_losses": embed_losses, "embed_seconds": embed_seconds,
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
