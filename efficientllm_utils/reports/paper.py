"""The paper's numbers as shipped in ``book/paper/``: its figures (``published_figures.csv``), the claims the
chapters test (``claims.csv``) and its leaderboard ranks per size group (``leaderboard_ranks.csv``)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..paths import REPO_ROOT
from .display import format_params

PAPER_DIR = REPO_ROOT / "book" / "paper"  # copied from the study brief


def published_figures() -> pd.DataFrame:
    path = PAPER_DIR / "published_figures.csv"
    return pd.read_csv(path) if path.exists() else pd.DataFrame(
        columns=["axis", "table", "model", "method", "metric", "value", "unit"])


def claims(chapter: str) -> pd.DataFrame:
    """The paper's claims a chapter tests (``book/paper/claims.csv``), in file order."""
    path = PAPER_DIR / "claims.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return df[df["chapter"] == chapter].reset_index(drop=True)


def paper_figures(selectors: str, axis: str) -> list[dict]:
    """The published figures named by ``model/method/metric`` selectors (``;``-separated) of one axis."""
    figures = published_figures()
    figures = figures[figures["axis"] == axis]
    rows = []
    for selector in filter(None, (s.strip() for s in selectors.split(";"))):
        model, method, metric = selector.rsplit("/", 2)  # model names may hold a slash (DiT-XL/2)
        hit = figures[(figures["model"] == model) & (figures["method"] == method) & (figures["metric"] == metric)]
        rows += hit.to_dict("records")[:1]
    return rows


def paper_quote(selectors: str, axis: str) -> str:
    """The published figures, as a phrase labelled with where they were taken from: ``paper Table 9 as quoted by an
    AI-written summary of the paper, second-hand: Qwen2.5-32B bfloat16 AMU 71.33 GB, int4 48.3 GB``."""
    figures = paper_figures(selectors, axis)
    parts, last_model = [], None
    for f in figures:
        unit = f" {f['unit']}" if isinstance(f.get("unit"), str) and f["unit"] else ""
        who = f"{f['method']}" if f["model"] == last_model else f"{f['model']} {f['method']}"
        parts.append(f"{who} {f['metric']} {f['value']:g}{unit}")
        last_model = f["model"]
    if not parts:
        return ""
    tables = ", ".join(dict.fromkeys(f"{int(f['table'])}" for f in figures))
    sources = "; ".join(dict.fromkeys(f"{'an' if f['source'][:1].lower() in 'aeiou' else 'a'} {f['source']}, "
                                      f"{f['confidence']}" for f in figures))
    return f"paper Table {tables} as quoted by {sources}: " + ", ".join(parts)


def paper_ranks(axis: str, group: str, size_group: str | None = None) -> pd.DataFrame:
    path = PAPER_DIR / "leaderboard_ranks.csv"
    if not path.exists():
        return pd.DataFrame(columns=["method", "metric", "paper_rank"])
    df = pd.read_csv(path)
    df = df[(df["axis"] == axis) & (df["group"] == group)]
    if size_group is not None:
        df = df[df["size_group"] == size_group]
    # the shipped leaderboard repeats a few rows verbatim; one copy of each is kept
    return df.rename(columns={"rank": "paper_rank"})[["method", "metric", "paper_rank"]].drop_duplicates()


def _group_range(name: str) -> tuple[float, float]:
    """``"1.5B-3.8B"`` -> (1.5e9, 3.8e9)."""
    low, high = (float(x.rstrip("B")) * 1e9 for x in name.split("-"))
    return low, high


def size_group(axis: str, group: str, n_params: float | None) -> tuple[str | None, str]:
    """The paper's size group for a model of ``n_params`` parameters, and why it was chosen: the group whose range
    holds the count, else the nearest one (on a log scale), saying so."""
    path = PAPER_DIR / "leaderboard_ranks.csv"
    df = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["axis", "group", "size_group"])
    groups = list(dict.fromkeys(df[(df["axis"] == axis) & (df["group"] == group)]["size_group"]))
    if not groups:
        return None, "the paper has no leaderboard for this study"
    if n_params is None or not np.isfinite(n_params):
        return groups[0], f"the parameter count is not in the records; the paper's first group ({groups[0]}) is used"
    ranges = {g: _group_range(g) for g in groups}
    count = format_params(n_params)
    for g, (low, high) in ranges.items():
        if low <= n_params <= high:
            return g, f"{count} parameters lie in the paper's {g} group"
    distance = {g: min(abs(np.log(n_params / low)), abs(np.log(n_params / high))) for g, (low, high) in ranges.items()}
    nearest = min(distance, key=distance.get)
    if n_params < min(low for low, _ in ranges.values()):
        why = f"{count} parameters are fewer than every group of the paper's; the smallest, {nearest}, is used"
    elif n_params > max(high for _, high in ranges.values()):
        why = f"{count} parameters are more than every group of the paper's; the largest, {nearest}, is used"
    else:
        why = f"{count} parameters fall between the paper's groups; the nearest, {nearest}, is used"
    return nearest, why
