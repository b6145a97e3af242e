"""The model both vision-language studies start from, and their held-out questions.

A run whose ``model`` is an offline language model (``smollm2-135m-instruct``) uses the small Qwen2.5-VL built around
it and aligned (``align.aligned_checkpoint``, cached); a hub id or directory is a released Qwen2.5-VL.
"""
from __future__ import annotations

from pathlib import Path

from . import align
from . import data as vdata


def base_source(p) -> str:
    """What the base loads from: the aligned small checkpoint's directory (built and cached on first use) or the
    released model's hub id / directory. ``p``: a ``params.VLMData`` run."""
    if p.small:
        return str(align.aligned_checkpoint(p.model, p.vision_settings(), p.align_settings()))
    return p.model


def load_processor(source: str, p):
    if p.small:
        return align.load_processor(source)
    from transformers import AutoTokenizer

    from .processor import load_processor as released

    return released(source, AutoTokenizer.from_pretrained(source))


def heldout_items(p) -> list[vdata.VQAItem]:
    """Each task's first ``n_heldout_per_task`` test questions (seed 0: the same items for every run and profile
    that asks as many)."""
    return [item for task in p.tasks for item in vdata.load_items(task, "test", p.n_heldout_per_task, seed=0)]


def base_provenance(source: str, p) -> dict:
    """How the base was made: the transplant and the alignment stage (losses, seconds) for the small model, and the
    fine-tuning run merged into it where there was one."""
    if not p.small:
        return {"vlm_base": source}
    info = align.checkpoint_info(source)
    out = {"vlm_base": Path(source).name, "vlm_transplant": info["transplant"],
           "vlm_alignment": {k: info.get(k) for k in ("align", "vision", "loss_summary", "seconds", "cpu_seconds")}}
    if "finetune" in info:  # a fine-tuned checkpoint (the quantization study's ``finetune_method``)
        out["vlm_finetune"] = info["finetune"]
    return out
