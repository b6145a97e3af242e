"""The one generator of every run notebook under ``notebooks/``: one module per study (or family of studies) gives
its notebooks' cells, built by ``notebook_builder`` (parameters cell from the params file, setup cell, stable cell
ids, no outputs), so regenerating unchanged code leaves every committed notebook unchanged byte for byte.

    .venv/bin/python -m efficientllm_utils.notebooks           # write them all (make notebooks)
    .venv/bin/python -m efficientllm_utils.notebooks --check   # exit 1 naming each committed notebook that differs
"""
from __future__ import annotations

from pathlib import Path

import nbformat

from ..paths import REPO_ROOT
from . import architecture, dit, lvm, peft, quantization, selftest, vlm

STUDY_NOTEBOOKS = (architecture, quantization, peft, dit, lvm, vlm, selftest)


def notebooks() -> dict[str, nbformat.NotebookNode]:
    """Every run notebook, by its path relative to the repository."""
    out: dict[str, nbformat.NotebookNode] = {}
    for module in STUDY_NOTEBOOKS:
        out.update(module.notebooks())
    return out


def render(nb: nbformat.NotebookNode) -> str:
    """The file's text exactly as ``nbformat.write`` writes it."""
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def stale(root: Path = REPO_ROOT) -> list[str]:
    """The notebooks whose committed file differs from what the generator writes (or is missing)."""
    return [path for path, nb in notebooks().items()
            if not (root / path).exists() or (root / path).read_text(encoding="utf-8") != render(nb)]


def write(root: Path = REPO_ROOT) -> list[Path]:
    """Write every notebook; returns the paths written."""
    written = []
    for path, nb in notebooks().items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(nb), encoding="utf-8")
        written.append(target)
    return written
