"""How a page shows numbers: tables with units and no index, readable figures, how each metric was obtained,
and quality-cost trade-off plots with their front."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .load import StudyResults


def model_label(source: str) -> str:
    """A model's name for a page: the hub id or offline name, or a local directory's last part."""
    return Path(source).name if os.sep in str(source) else str(source)


def show(table: pd.DataFrame, columns: dict[str, str], formats: dict[str, str] | None = None, digits: int = 3,
         keep_empty: bool = False):
    """A table for a page: only ``columns`` (column -> header with its unit), in that order, without the index,
    numbers rounded to ``digits`` significant figures unless ``formats`` (header or column -> format) says. Columns
    without a value are left out (a metric the records lack) unless ``keep_empty``."""
    from IPython.display import Markdown

    present = {c: h for c, h in columns.items() if c in table and (keep_empty or table[c].notna().any())}
    if table.empty or not present:
        return Markdown("*No results yet.*")
    view = table[list(present)].rename(columns=present)
    formats = {present.get(k, k): v for k, v in (formats or {}).items()}
    numeric = [h for h in view.columns if pd.api.types.is_float_dtype(view[h]) and h not in formats]
    formats.update({h: (lambda x, d=digits: readable(x, d)) for h in numeric})
    return styled(view).format(formats, na_rep="n/a")


# cells padded so that neighbouring numbers never touch in the book's theme
CELL_STYLE = [{"selector": "th, td", "props": "padding: 0.25em 0.7em;"},
              {"selector": "th", "props": "vertical-align: bottom;"}]


def styled(frame: pd.DataFrame):
    """A frame as a page shows it: no index column, padded cells."""
    return frame.style.hide(axis="index").set_table_styles(CELL_STYLE)


def readable(x: float, digits: int = 3) -> str:
    """A number as a reader wants it: ``digits`` significant figures, never in scientific notation above 1."""
    if pd.isna(x):
        return "n/a"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def methods_legend(res: StudyResults, columns: dict[str, str]) -> pd.DataFrame:
    """How each shown metric was obtained (from the records' ``*_method`` columns); ``columns``: record column ->
    the metric's name on the page."""
    df = res.ok
    rows = [{"metric": name, "how obtained": "; ".join(sorted(set(df[f"{c}_method"].dropna())))}
            for c, name in columns.items() if f"{c}_method" in df]
    return pd.DataFrame(rows, columns=["metric", "how obtained"])


def format_params(n: float) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"



def pareto_front(costs: np.ndarray, qualities: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Mask of the points that no other point beats on both lower cost and better quality (higher, or lower
    with ``higher_is_better=False``: perplexity)."""
    if not higher_is_better:
        qualities = -np.asarray(qualities, dtype=float)
    mask = np.ones(len(costs), dtype=bool)
    for i in range(len(costs)):
        dominated = (costs <= costs[i]) & (qualities >= qualities[i]) & ((costs < costs[i]) | (qualities > qualities[i]))
        mask[i] = not dominated.any()
    return mask


def finish_panels(fig, axes):
    """A row of panels ready for a page: the last panel's legend moved out to its right, the layout tightened."""
    import seaborn as sns

    if axes[0][-1].get_legend():
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return fig


def tradeoff_plots(table: pd.DataFrame, quality: str, costs: dict[str, str], hue: str,
                   higher_is_better: bool = True, quality_label: str | None = None, style: str | None = None):
    """Quality against each cost, one panel per cost (``costs``: column -> axis label with its unit), with the
    trade-off front drawn through the best points of each model (``style``: the model column, if several)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, len(costs), figsize=(min(4.0 * len(costs), 12), 3.4), squeeze=False)
    style = style if style in table and table[style].nunique() > 1 else None
    for ax, (column, label) in zip(axes[0], costs.items()):
        data = table.dropna(subset=[column, quality])
        sns.scatterplot(data=data, x=column, y=quality, hue=hue, style=style, s=80, ax=ax, legend=ax is axes[0][-1])
        for _, points in (data.groupby(style) if style else [("", data)]):
            if len(points):
                front = points[pareto_front(points[column].to_numpy(float), points[quality].to_numpy(float),
                                            higher_is_better)].sort_values(column)
                ax.plot(front[column], front[quality], "--", color="grey", lw=1, zorder=0)
        ax.set(xlabel=label, ylabel=quality_label or quality)
    return finish_panels(fig, axes)
