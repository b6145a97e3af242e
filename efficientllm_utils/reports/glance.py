"""The study at a glance (the book's front page): every claim that any chapter decides, with its chapter, verdict and
the figure behind it, computed from the records at build time by the chapters' own functions, and the counts per
verdict. The paper's claims and the project's own checks are two groups: a claim of ``book/paper/claims.csv`` is one
of the project's checks when its ``source`` says it is this project's requirement (``PROJECT_SOURCES``: e.g. "each
method adapts the base"), not the paper's."""
from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from .. import study_registry
from ..paths import REPO_ROOT
from .display import styled
from .findings import Finding, verdict_counts
from .load import load_study
from .paper import PAPER_DIR
from .verdicts import AGREES, DISAGREES, INCONCLUSIVE

PAPER, PROJECT = "the paper's claims", "the project's own checks"
# a claim whose source starts so is a check this project requires of its runs (claims.csv has no other marker)
PROJECT_SOURCES = ("this chapter's requirement", "this repository's requirement")


@dataclass(frozen=True)
class Chapter:
    page: str  # the chapter's page (book/<page>.md)
    title: str
    findings: Callable[[], list[Finding]]  # its findings, from the records the chapter reads


def _architecture(study: str) -> list[Finding]:
    from . import architecture as ar

    res = load_study(study)
    return ar.findings(res, ar.noise_tolerances(res.profile)) if res.ok_records else []


def _dit(study: str) -> list[Finding]:
    from . import dit

    res = load_study(study)
    return dit.claim_findings(res, dit.cost_tolerances(res.profile)) if res.ok_records else []


def _lvm(study: str) -> list[Finding]:
    from . import lvm

    res = load_study(study)
    if not res.ok_records:
        return []
    return lvm.quant_findings(res) if study == "lvm_quantization" else lvm.finetune_findings(res)


def _finetune(study: str) -> list[Finding]:
    """The PEFT chapter's claims, on the PEFT records or the vision-language ones (its chapter's transfer)."""
    from . import finetune as fr
    from . import vlm

    res = load_study(study)
    table = fr.results_table(res) if study == "peft" else vlm.finetune_table(res)
    return fr.findings(res, table) if len(table) else []


def _quantization(study: str) -> list[Finding]:
    """The quantization chapter's claims, on the quantization records or the vision-language ones."""
    from . import quantization as qr

    res = load_study(study)
    return qr.findings(res) if res.ok_records else []


# each study whose chapter decides claims -> its findings from its records, as its chapter computes them (the study
# registry says which page that is)
FINDINGS: dict[str, Callable[[str], list[Finding]]] = {
    "attention": _architecture, "positional_encoding": _architecture, "moe": _architecture,
    "attention_free": _architecture, "dit_attention": _dit, "dit_moe": _dit, "lvm_quantization": _lvm,
    "lvm_finetune": _lvm, "peft": _finetune, "vlm_peft": _finetune, "quantization": _quantization,
    "vlm_quantization": _quantization,
}


def page_title(page: str) -> str:
    """A chapter's title: the first heading of ``book/<page>.md``."""
    path = REPO_ROOT / "book" / f"{page}.md"
    lines = path.read_text().splitlines() if path.exists() else []
    return next((line[2:].strip() for line in lines if line.startswith("# ")), page)


def chapters() -> list[Chapter]:
    """Every study with findings, in the book's order (``study_registry.BOOK_PARTS``), on its chapter's page."""
    out = []
    for _, pages in study_registry.BOOK_PARTS:
        for page in pages:
            studies = [s.name for s in study_registry.STUDIES if s.chapter == page and s.name in FINDINGS]
            for name in studies:
                title = page_title(page) + (f" ({name})" if len(studies) > 1 else "")
                out.append(Chapter(page, title, lambda name=name: FINDINGS[name](name)))
    return out


def claim_group(source: str) -> str:
    """``PROJECT`` for a claim whose source is this project's requirement, else ``PAPER``."""
    return PROJECT if source.strip().lower().startswith(PROJECT_SOURCES) else PAPER


def all_claims() -> pd.DataFrame:
    """Every row of ``claims.csv`` with its group."""
    frame = pd.read_csv(PAPER_DIR / "claims.csv", dtype=str, keep_default_na=False)
    return frame.assign(group=frame["source"].map(claim_group))


def rows(chosen: list[Chapter] | None = None) -> pd.DataFrame:
    """One row per finding of every chapter (or of ``chosen``): group, chapter (title, page), claim id and
    statement, model, verdict, the figure behind it and the anchor of the finding on its page."""
    claims = all_claims().set_index("claim_id")
    out = []
    for chapter in chosen if chosen is not None else chapters():
        for f in chapter.findings():
            claim = claims.loc[f.claim_id]
            out.append({"group": claim["group"], "chapter": chapter.title, "page": chapter.page,
                        "claim_id": f.claim_id, "statement": claim["statement"], "model": f.model,
                        "verdict": f.verdict, "figure": f.figure, "anchor": f.anchor})
    return pd.DataFrame(out, columns=["group", "chapter", "page", "claim_id", "statement", "model", "verdict",
                                      "figure", "anchor"])


def counts(table: pd.DataFrame) -> pd.DataFrame:
    """Findings per verdict, per group and in all."""
    verdicts = [AGREES, DISAGREES, INCONCLUSIVE]
    out = []
    for group in (PAPER, PROJECT):
        part = table[table["group"] == group]
        out.append({"group": group, **{v: int((part["verdict"] == v).sum()) for v in verdicts}, "all": len(part)})
    out.append({"group": "all", **{v: int((table["verdict"] == v).sum()) for v in verdicts}, "all": len(table)})
    return pd.DataFrame(out)


def linked(table: pd.DataFrame) -> pd.DataFrame:
    """The rows as a page shows them: the claim links to its finding on the chapter's page."""
    def claim_cell(r) -> str:
        return (f'<a href="{r.page}.html#{r.anchor}">{html.escape(r.statement)}</a>'
                + (f" ({html.escape(r.model)})" if r.model else ""))

    return pd.DataFrame({"chapter": [f'<a href="{r.page}.html">{html.escape(r.chapter)}</a>'
                                     for r in table.itertuples()],
                         "claim": [claim_cell(r) for r in table.itertuples()],
                         "verdict": [f"<b>{r.verdict}</b>" for r in table.itertuples()],
                         "the figure behind it": [html.escape(r.figure) for r in table.itertuples()]})


def show(table: pd.DataFrame | None = None) -> list:
    """What the front page displays: the counts, then each group's findings (what to ``display``)."""
    from IPython.display import Markdown

    table = rows() if table is None else table
    if table.empty:
        return [Markdown("*No chapter has results yet: run `make reproduce AXIS=...`.*")]
    shown = [Markdown("**Findings per verdict**"), styled(counts(table))]
    for group in (PAPER, PROJECT):
        part = table[table["group"] == group]
        if len(part):
            shown += [Markdown(f"**{group[0].upper() + group[1:]}** ({verdict_counts(list(part['verdict']))})"),
                      styled(linked(part))]
    return shown
