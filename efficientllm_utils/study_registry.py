"""The one registry of studies: each study's axis, run model, notebook, report, book chapter and run-page title.

Everything per study is derived from here: the CLI's axes (``axis_studies``), the params file
(``params/<study>.yaml``), the notebook the runner executes, the report module the chapter calls, the title of a
run's page in the book and the book's table of contents (``book_toc``; ``book/_toc.yml`` is its committed copy,
checked by the tests). This module imports nothing of the package: a study's run model and report are named by
their module, and imported only when asked for (``run_model``), so the params core reads the registry without
loading any domain code.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Study:
    name: str  # its params file is params/<name>.yaml, its results results/<name>/<profile>/
    axis: str | None  # the group `make reproduce AXIS=...` runs it with (None: run by its own name only)
    run_model: str  # "<module under efficientllm_utils.studies>:<class>": the pydantic model of one run
    notebook: str  # the notebook one run executes, from the repository root
    chapter: str | None  # its book page, book/<chapter>.md (None: not in the book)
    report: str | None  # the module under efficientllm_utils.reports that the chapter calls
    run_title: str  # the title of a run's page: a format string over the run's params


STUDIES: tuple[Study, ...] = (
    Study("quantization", "quantization", "quantization_run:QuantizationRun", "notebooks/llm/quantization.ipynb",
          "quantization", "quantization", "Quantization: {model} at {precision}"),
    Study("attention", "architecture", "architecture_run:PretrainRun", "notebooks/llm/attention.ipynb",
          "attention", "architecture", "Attention: {attention}"),
    Study("positional_encoding", "architecture", "architecture_run:PretrainRun",
          "notebooks/llm/positional_encoding.ipynb", "positional_encoding", "architecture",
          "Positional encoding: {position}"),
    Study("moe", "architecture", "architecture_run:PretrainRun", "notebooks/llm/moe.ipynb", "moe", "architecture",
          "MoE: {variant}"),
    Study("attention_free", "architecture", "attention_free_run:AttentionFreeRun",
          "notebooks/llm/attention_free.ipynb", "attention_free", "attention_free", "Attention-free: {variant}"),
    Study("peft", "peft", "finetune_run:FinetuneRun", "notebooks/llm/peft.ipynb", "peft", "finetune",
          "PEFT: {method}"),
    Study("dit_attention", "dit", "dit_run:DiTRun", "notebooks/dit/dit.ipynb", "dit", "dit",
          "DiT attention: {attention}"),
    Study("dit_moe", "dit", "dit_run:DiTRun", "notebooks/dit/dit.ipynb", "dit", "dit", "DiT MoE: {variant}"),
    Study("vlm_peft", "vlm", "vlm_run:VLMFinetuneRun", "notebooks/vlm/vlm_peft.ipynb", "vlm", "vlm",
          "VLM fine-tuning: {method}"),
    Study("vlm_quantization", "vlm", "vlm_run:VLMQuantizationRun", "notebooks/vlm/vlm_quantization.ipynb", "vlm",
          "vlm", "VLM quantization: {precision}"),
    Study("lvm_quantization", "lvm", "lvm_run:LVMQuantizationRun", "notebooks/lvm/lvm_quantization.ipynb", "lvm",
          "lvm", "Vision generation, quantization: {model} at {precision}"),
    Study("lvm_finetune", "lvm", "lvm_run:LVMFinetuneRun", "notebooks/lvm/lvm_finetune.ipynb", "lvm", "lvm",
          "Vision generation, fine-tuning: {model} with {method}"),
    Study("selftest", None, "selftest_run:SelfTestRun", "notebooks/selftest.ipynb", None, None,
          "Self-test: {mode} {value}"),
)
BY_NAME: dict[str, Study] = {s.name: s for s in STUDIES}

# the book's parts in order: a caption and its pages (a study's chapter, or a page of no study)
BOOK_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("The study", ("methods", "cluster")),
    ("Architecture pretraining", ("attention", "positional_encoding", "moe", "attention_free")),
    ("Vision generation", ("dit", "lvm")),
    ("Fine-tuning", ("peft",)),
    ("Vision-language", ("vlm",)),
    ("Inference", ("quantization",)),
)
BOOK_ROOT = "intro"


def study(name: str | None) -> Study:
    """The registered study ``name``; a ``ValueError`` names the registered ones."""
    if name not in BY_NAME:
        raise ValueError(f"study {name!r} is not one of {sorted(BY_NAME)}")
    return BY_NAME[name]


def axes() -> dict[str, list[str]]:
    """Each axis and its studies, in registry order."""
    groups: dict[str, list[str]] = {}
    for s in STUDIES:
        if s.axis is not None:
            groups.setdefault(s.axis, []).append(s.name)
    return groups


def axis_studies(axis: str) -> list[str]:
    """The studies of an axis, or ``[axis]`` for a study's own name; a ``ValueError`` names both kinds."""
    groups = axes()
    if axis in groups:
        return groups[axis]
    if axis in BY_NAME:
        return [axis]
    raise ValueError(f"AXIS {axis!r} is not one of {sorted(groups)} (or a study: {sorted(BY_NAME)})")


def run_model(name: str):
    """The pydantic run model of study ``name`` (imported on first use)."""
    module, cls = study(name).run_model.split(":")
    return getattr(importlib.import_module(f"efficientllm_utils.studies.{module}"), cls)


def book_toc() -> dict[str, Any]:
    """The book's table of contents (``book/_toc.yml``): each study's chapter with its run pages as sections."""
    def chapter(page: str) -> dict[str, Any]:
        runs = [{"glob": f"runs/{s.name}/*"} for s in STUDIES if s.chapter == page]
        return {"file": page, **({"sections": runs} if runs else {})}

    return {"format": "jb-book", "root": BOOK_ROOT,
            "parts": [{"caption": caption, "chapters": [chapter(p) for p in pages]} for caption, pages in BOOK_PARTS]}
