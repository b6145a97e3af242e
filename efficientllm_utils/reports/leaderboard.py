"""Our ranks of each model's methods beside the paper's leaderboard ranks of the matching size group, and
Kendall's tau between them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..metrics.schema import PAPER_METRICS
from .display import show, styled
from .paper import paper_ranks, size_group

# the paper's quality metric (accuracy, or a loss negated) is higher-better; the efficiency metrics say their own
HIGHER_IS_BETTER = {"Perf": True, **{m.name: not m.lower_is_better for m in PAPER_METRICS.values()}}


def rank_methods(table: pd.DataFrame, metric_columns: dict[str, str],
                 higher_is_better: dict[str, bool] | None = None, by: str = "model") -> pd.DataFrame:
    """Per-metric ranks (1 = best, ties share the best rank) of the rows of ``table``, named by its ``method``
    column, within each ``by`` group (each model), in the long form ``against_paper`` takes. A metric whose column
    is missing or empty is skipped."""
    better = {**HIGHER_IS_BETTER, **(higher_is_better or {})}
    long = []
    groups = table.groupby(by, sort=False) if by in table else [("", table)]
    for key, group in groups:
        for metric, column in metric_columns.items():
            if column not in group or group[column].isna().all():
                continue
            ranks = group[column].rank(ascending=not better[metric], method="min")
            long += [{by: key, "method": m, "metric": metric, "our_rank": int(r)}
                     for m, r in zip(group["method"], ranks) if pd.notna(r)]
    return pd.DataFrame(long, columns=[by, "method", "metric", "our_rank"])



def kendall_taus(ours: pd.DataFrame, paper: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Side-by-side ranks (one row per method, "ours / paper" per metric) and Kendall's tau-b per metric (NaN where
    fewer than two methods are shared), for one model."""
    from scipy.stats import kendalltau

    both = ours.merge(paper, on=["method", "metric"], how="inner")
    taus = []
    for metric, group in both.groupby("metric", sort=False):
        tau = kendalltau(group["our_rank"], group["paper_rank"]).statistic if len(group) > 1 else np.nan
        taus.append({"metric": metric, "methods": len(group), "kendall_tau": tau})
    if both.empty:
        return pd.DataFrame(), pd.DataFrame(taus, columns=["metric", "methods", "kendall_tau"])
    both["ranks"] = both["our_rank"].astype(str) + " / " + both["paper_rank"].astype(int).astype(str)
    side = both.pivot(index="method", columns="metric", values="ranks")
    side = side[[m for m in dict.fromkeys(both["metric"])]].reset_index()
    side.columns.name = None
    return side, pd.DataFrame(taus)


@dataclass
class Leaderboard:
    """Our ranks of one model beside the paper's ranks of the matching size group."""

    model: str
    size_group: str | None
    why: str  # which size group and why
    side: pd.DataFrame  # method, then "ours / paper" per metric
    taus: pd.DataFrame  # metric, methods, kendall_tau


def against_paper(ours: pd.DataFrame, axis: str, group: str,
                  params_by_model: dict[str, float | None]) -> list[Leaderboard]:
    """One leaderboard per model of ``ours`` (``rank_methods``' long form), each against the paper's ranks of the
    size group matching that model's parameter count."""
    boards = []
    for model, ranks in ours.groupby("model", sort=False):
        chosen, why = size_group(axis, group, params_by_model.get(model))
        side, taus = kendall_taus(ranks.drop(columns="model"), paper_ranks(axis, group, chosen))
        boards.append(Leaderboard(model, chosen, why, side, taus))
    return boards


def tau_table(boards: list[Leaderboard]) -> pd.DataFrame:
    """Kendall's tau-b of every model in one table: one row per model (its size group, the methods compared), one
    column per metric."""
    rows = []
    for b in boards:
        row = {"model": b.model, "paper size group": b.size_group,
               "methods compared": int(b.taus["methods"].max()) if len(b.taus) else 0}
        rows.append(row | dict(zip(b.taus["metric"], b.taus["kendall_tau"])))
    return pd.DataFrame(rows)


def show_leaderboards(boards: list[Leaderboard]) -> None:
    """Display each model's ranks, then Kendall's tau of every model (for a chapter page)."""
    from IPython.display import Markdown, display

    if not boards:
        display(Markdown("*No results yet.*"))
        return
    for board in boards:
        display(Markdown(f"**{board.model}** against the paper's **{board.size_group}** ranks ({board.why}). "
                         "Each cell: our rank / the paper's rank."))
        display(styled(board.side) if len(board.side) else Markdown("*No shared methods.*"))
    taus = tau_table(boards)
    metrics = [col for col in taus.columns if col not in ("model", "paper size group", "methods compared")]
    display(Markdown("Kendall's tau-b per metric (+1: the paper's order, -1: reversed; n/a: fewer than two methods "
                     "shared):"))
    display(show(taus, {"model": "model", "paper size group": "paper size group",
                        "methods compared": "methods compared", **{m: m for m in metrics}},
                 {m: "{:+.2f}" for m in metrics}, keep_empty=True))
