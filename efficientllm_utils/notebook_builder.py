"""How the notebook generator (``efficientllm_utils.notebooks``, one module per study) writes every run notebook the
same way: the setup cell and the notebook itself.

A generated run notebook is a list of ``(kind, source)`` cells, ``kind`` one of ``md``, ``code`` or
``parameters`` (the cell papermill replaces; ``params.notebook_parameters_source`` writes it), committed without
outputs and with stable cell ids, so regenerating an unchanged notebook leaves the file unchanged.
"""
from __future__ import annotations

import nbformat

from .params import notebook_parameters_source

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def setup_source(run_model: type, module: str, alias: str | None = None, extra: str = "") -> str:
    """The cell after the parameters: validate them into ``p`` (a wrong value fails here, naming the field and the
    allowed values) and open the run's context ``run``; ``extra`` lines run before ``p`` is shown."""
    return (f"from {run_model.__module__} import {run_model.__name__}\n"
            "from efficientllm_utils.records import RunContext, metrics_table\n"
            f"from efficientllm_utils.studies import {module}{f' as {alias}' if alias else ''}\n\n"
            f"p = {run_model.__name__}.from_namespace(globals())  # a wrong value fails here, naming the field and the allowed values\n"
            "run = RunContext.from_namespace(globals(), p)\n"
            f"{extra}p")


def opening_cells(intro: str, study: str, run_model: type, setup: str | None = None) -> list[tuple[str, str]]:
    """A run notebook's first cells: its introduction, the parameters cell (``params/<study>.yaml``'s defaults) and
    the ``setup`` cell (``setup_source``; None for a notebook that sets itself up)."""
    cells = [("md", intro), ("parameters", notebook_parameters_source(study, run_model))]
    return cells + ([("code", setup)] if setup is not None else [])


def build(cells: list[tuple[str, str]], prefix: str) -> nbformat.NotebookNode:
    """A notebook of ``cells`` (kind, source) without outputs; cell ids ``<prefix>-00``, ``<prefix>-01``..."""
    kinds = {"md": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell,
             "parameters": nbformat.v4.new_code_cell}
    unknown = sorted({kind for kind, _ in cells} - set(kinds))
    if unknown:
        raise ValueError(f"cell kinds {unknown} are not among {sorted(kinds)}")
    nb = nbformat.v4.new_notebook()
    for i, (kind, source) in enumerate(cells):
        cell = kinds[kind](source)
        if kind == "parameters":
            cell.metadata["tags"] = ["parameters"]
        cell.id = f"{prefix}-{i:02d}"  # stable ids: regenerating gives the same file
        nb.cells.append(cell)
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    return nb
