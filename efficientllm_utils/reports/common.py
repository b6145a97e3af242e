"""What every study's report uses: loading results, formatting tables, ranks against the paper's leaderboard
per model and size group, Kendall's tau, the paper's figures and claims, and the verdict rules."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..records import RESULTS_DIR, RunRecord, is_explored, load_records

PAPER_DIR = Path(__file__).resolve().parent.parent.parent / "book" / "paper"  # copied from the study brief
HIGHER_IS_BETTER = {"Perf": True, "AMU": False, "AL": False, "IT": True, "TT": True, "ST": True, "AEC": False,
                    "MCR": True, "PCU": True}


# --- loading ------------------------------------------------------------------------------------

@dataclass
class StudyResults:
    study: str
    profile: str
    records: list[RunRecord]
    frame: pd.DataFrame  # flat rows, one per run
    root: Path = RESULTS_DIR  # the results folder (the book's: a view of local and published results)

    @property
    def ok(self) -> pd.DataFrame:
        if "status" not in self.frame:  # no records at all: an empty frame without columns
            return self.frame.copy()
        return self.frame[self.frame["status"] == "ok"].copy()

    @property
    def ok_records(self) -> list[RunRecord]:
        return [r for r in self.records if r.status == "ok"]

    def describe(self) -> str:
        """Where these numbers came from: the profile, how many runs succeeded, local results or the published
        copy, the commit, machine and dates of the runs, and runs whose parameters no longer match the params
        file (``published.results_note``)."""
        from ..published import results_note

        if not self.records:
            return f"No results for `{self.study}` yet: run `make reproduce AXIS={self.study}`."
        n_ok = sum(r.status == "ok" for r in self.records)
        return (f"Profile **{self.profile}**: {n_ok} of {len(self.records)} runs succeeded. "
                + results_note(self.study, self.profile, self.records, self.root))


def available_profiles(study: str, root: Path | None = None) -> list[str]:
    """The study's profiles with a results folder (not the folders of explored runs, which are no profile's)."""
    base = (root or RESULTS_DIR) / study
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not is_explored(p.name)) if base.exists() else []


def load_study(study: str, profile: str | None = None, root: Path | None = None) -> StudyResults:
    """Results of one study. Without ``profile``: ``EFFICIENTLLM_BOOK_PROFILE``, else the profile whose
    latest record is newest."""
    profile = profile or os.environ.get("EFFICIENTLLM_BOOK_PROFILE")
    if profile is None:
        candidates = {p: load_records(study, p, root) for p in available_profiles(study, root)}
        candidates = {p: r for p, r in candidates.items() if r}
        profile = max(candidates, key=lambda p: max(r.finished or "" for r in candidates[p])) if candidates else "cpu"
    recs = load_records(study, profile, root)
    return StudyResults(study, profile, recs, pd.DataFrame([r.flat() for r in recs]), root or RESULTS_DIR)


def model_label(source: str) -> str:
    """A model's name for a page: the hub id or offline name, or a local directory's last part."""
    return Path(source).name if os.sep in str(source) else str(source)


# --- tables -------------------------------------------------------------------------------------

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


# --- ranks against the paper's leaderboard, per model ---------------------------------------------

def rank_methods(table: pd.DataFrame, metric_columns: dict[str, str],
                 higher_is_better: dict[str, bool] | None = None, by: str = "model") -> pd.DataFrame:
    """Per-metric ranks (1 = best, ties share the best rank) of the rows of ``table``, named by its ``method``
    column, within each ``by`` group (each model), in the long form ``leaderboards`` takes. A metric whose column
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


def format_params(n: float) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


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


def leaderboards(ours: pd.DataFrame, axis: str, group: str, params_by_model: dict[str, float | None]) -> list[Leaderboard]:
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


# --- plots --------------------------------------------------------------------------------------

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
    if axes[0][-1].get_legend():
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return fig


# --- the paper's figures and claims ---------------------------------------------------------------

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
    """The published figures, as a phrase: ``Qwen2.5-32B bfloat16 AMU 71.33 GB, int4 48.30 GB``."""
    parts, last_model = [], None
    for f in paper_figures(selectors, axis):
        unit = f" {f['unit']}" if isinstance(f.get("unit"), str) and f["unit"] else ""
        who = f"{f['method']}" if f["model"] == last_model else f"{f['model']} {f['method']}"
        parts.append(f"{who} {f['metric']} {f['value']:g}{unit}")
        last_model = f["model"]
    return ", ".join(parts)


def paper_rank_phrase(axis: str, group: str, size_group_name: str | None, method: str, metric: str) -> str:
    ranks = paper_ranks(axis, group, size_group_name)
    hit = ranks[(ranks["method"] == method) & (ranks["metric"] == metric)]
    if hit.empty:
        return ""
    return f"{method} {metric} rank {int(hit['paper_rank'].iloc[0])} of {len(ranks[ranks['metric'] == metric])} " \
           f"at {size_group_name}"


# --- verdict rules --------------------------------------------------------------------------------
# A claim about a difference of a subject against a baseline (or against each of several others) is decided on an
# interval of that difference, never on the two point values alone:
# * accuracy: both scored on the same items; a paired bootstrap interval over items of the difference;
# * latency and throughput: a bootstrap interval of the ratio of means from the raw samples of each run;
# * values per item of two runs on the same items (per-item loss under the same noise, per-image fidelity): a
#   paired bootstrap interval over items of the ratio of means;
# * a single value per run (perplexity, memory, loss): the value, with a relative noise tolerance (the spread of
#   repeated runs where the profile has them) as its interval;
# * a difference between two estimated values (energy without a counter) is no evidence at all.
# The claim agrees when the whole interval lies beyond the tolerance on the claimed side, disagrees when it lies
# beyond it on the other side, and is inconclusive otherwise.

AGREES, DISAGREES, INCONCLUSIVE = "agrees", "disagrees", "inconclusive"
CONFIDENCE = 0.95
BOOTSTRAP_DRAWS = 4000
LATENCY_TOLERANCE = 0.03  # relative: interval bounds within +-3% of "no difference" are not a difference
MIN_SAMPLES = 5  # fewer timed samples per run than this: no interval (a bootstrap of 2 values means nothing)
MIN_ITEMS = 30  # fewer scored items than this: no interval for an accuracy difference


@dataclass
class Difference:
    """The relative difference of a subject against a baseline (subject / baseline - 1), with its interval."""

    estimate: float
    low: float
    high: float
    how: str  # how the interval was obtained, a phrase
    estimated: bool = False  # both values are estimates (no evidence)

    def __str__(self) -> str:
        if not np.isfinite(self.estimate):
            return f"no relative difference ({self.how})"
        if not np.isfinite([self.low, self.high]).all():
            return f"{100 * self.estimate:+.1f}% ({self.how})"
        if self.low == self.high == self.estimate:
            return f"{100 * self.estimate:+.1f}% ({self.how})"
        return (f"{100 * self.estimate:+.1f}% ({100 * CONFIDENCE:.0f}% interval {100 * self.low:+.1f}% to "
                f"{100 * self.high:+.1f}%, {self.how})")


def undefined_difference(subject, baseline) -> Difference | None:
    """No relative difference, hence no verdict, where a value (or sample) is NaN or infinite or the baseline's
    mean is zero."""
    a, b = np.atleast_1d(np.asarray(subject, float)), np.atleast_1d(np.asarray(baseline, float))
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return Difference(float("nan"), -np.inf, np.inf, "a value is NaN or infinite")
    if b.mean() == 0:
        return Difference(float("nan"), -np.inf, np.inf, "the baseline is zero")
    return None


def bootstrap_ratio(subject: list[float], baseline: list[float], seed: int = 0) -> Difference:
    """Relative difference of the means of two independent samples (e.g. request latencies of two runs), with a
    percentile bootstrap interval (each sample resampled on its own)."""
    a, b = np.asarray(subject, float), np.asarray(baseline, float)
    if (undefined := undefined_difference(a, b)) is not None:
        return undefined
    if min(len(a), len(b)) < MIN_SAMPLES:
        return Difference(a.mean() / b.mean() - 1, -np.inf, np.inf,
                          f"only {len(a)} and {len(b)} timed samples: too few for an interval, fewer than "
                          f"{MIN_SAMPLES}")
    rng = np.random.default_rng(seed)
    ratios = (rng.choice(a, (BOOTSTRAP_DRAWS, len(a))).mean(1) / rng.choice(b, (BOOTSTRAP_DRAWS, len(b))).mean(1))
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return Difference(a.mean() / b.mean() - 1, low - 1, high - 1,
                      f"bootstrap over {len(a)} and {len(b)} timed samples")


def paired_accuracy(subject: list[int], baseline: list[int], seed: int = 0) -> Difference:
    """Relative accuracy difference of two runs scored on the same items (1 = correct), with a paired bootstrap
    interval over items (relative to the baseline's accuracy); no interval under ``MIN_ITEMS`` items, and with no
    item answered differently the rule of three (a share of at most 3/n) instead of a degenerate bootstrap."""
    a, b = np.asarray(subject, float), np.asarray(baseline, float)
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired accuracy needs the same items: {len(a)} vs {len(b)}")
    if not np.isin(np.concatenate([a, b]), (0, 1)).all():
        raise ValueError("paired accuracy needs answers scored 0 (wrong) or 1 (right), got "
                         f"{sorted(set(np.concatenate([a, b]).tolist()) - {0.0, 1.0})[:5]}")
    base = b.mean() or 1.0
    flips, n = int((a != b).sum()), len(a)
    estimate = (a.mean() - b.mean()) / base
    if n < MIN_ITEMS:
        return Difference(estimate, -np.inf, np.inf, f"{n} items, {flips} answered differently: too few items for "
                                                     f"an interval, fewer than {MIN_ITEMS}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, (BOOTSTRAP_DRAWS, n))
    diffs = (a[idx] - b[idx]).mean(1) / base
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail])
    if flips == 0:  # the bootstrap cannot see a share it never drew: the rule of three bounds it (95%)
        low, high = -3 / n / base, 3 / n / base
    return Difference(estimate, float(low), float(high), f"paired bootstrap over {n} items, {flips} answered "
                                                         "differently")


def paired_ratio(subject: list[float], baseline: list[float], seed: int = 0) -> Difference:
    """Relative difference of the means of two runs' values on the same items (e.g. per-item held-out losses under
    the same noise, per-image SSIM against one reference), with a paired bootstrap interval over items; no interval
    under ``MIN_SAMPLES`` items."""
    a, b = np.asarray(subject, float), np.asarray(baseline, float)
    if len(a) != len(b) or not len(a):
        raise ValueError(f"a paired difference needs the same items: {len(a)} vs {len(b)}")
    if (undefined := undefined_difference(a, b)) is not None:
        return undefined
    estimate, n = a.mean() / b.mean() - 1, len(a)
    if n < MIN_SAMPLES:
        return Difference(estimate, -np.inf, np.inf, f"only {n} items: too few for an interval, fewer than "
                                                     f"{MIN_SAMPLES}")
    idx = np.random.default_rng(seed).integers(0, n, (BOOTSTRAP_DRAWS, n))
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(a[idx].mean(1) / b[idx].mean(1), [tail, 100 - tail])
    return Difference(estimate, float(low - 1), float(high - 1), f"paired bootstrap over {n} items")


def point_difference(subject: float, baseline: float, tolerance: float, what: str) -> Difference:
    """One value per run: the relative difference, its interval the noise ``tolerance`` on either side."""
    if (undefined := undefined_difference(subject, baseline)) is not None:
        return undefined
    est = subject / baseline - 1
    return Difference(est, est - tolerance, est + tolerance, f"+-{100 * tolerance:.0f}% {what}" if tolerance else what)


def estimated_difference(subject: float, baseline: float) -> Difference:
    est = subject / baseline - 1 if baseline else float("nan")
    return Difference(est, est, est, "estimated", estimated=True)


def is_estimate(method: object) -> bool:
    return isinstance(method, str) and method.startswith("estimated:")


def tracked_difference(subject, baseline, tolerance: float) -> Difference | None:
    """Two runs' values of one tracker metric (``MetricValue``s): None when either is missing, an estimate's
    difference (never evidence) when either is estimated, else the difference within ``tolerance``."""
    if subject.value is None or baseline.value is None:
        return None
    if is_estimate(subject.method) or is_estimate(baseline.method):
        return estimated_difference(subject.value, baseline.value)
    return point_difference(subject.value, baseline.value, tolerance, "tolerance: one tracked phase per run")


def decide(diff: Difference, expect: str, tolerance: float = 0.0) -> str:
    """The verdict on a claim that the subject is ``lower`` / ``higher`` than the baseline, or ``not_lower``
    (at most ``tolerance`` lower: a non-inferiority margin), from the interval of the difference."""
    if diff.estimated or not np.isfinite([diff.low, diff.high]).all():
        return INCONCLUSIVE
    if expect == "lower":
        return AGREES if diff.high < -tolerance else DISAGREES if diff.low > tolerance else INCONCLUSIVE
    if expect == "higher":
        return AGREES if diff.low > tolerance else DISAGREES if diff.high < -tolerance else INCONCLUSIVE
    if expect == "not_lower":
        return AGREES if diff.low >= -tolerance else DISAGREES if diff.high < -tolerance else INCONCLUSIVE
    raise ValueError(f"expect must be lower, higher or not_lower, got {expect!r}")


def combine(verdicts: list[str]) -> str:
    """A claim made of parts (e.g. "lowest": lower than each other variant): any part that disagrees decides it;
    it agrees only when every part agrees."""
    if not verdicts:
        return INCONCLUSIVE
    if DISAGREES in verdicts:
        return DISAGREES
    return AGREES if all(v == AGREES for v in verdicts) else INCONCLUSIVE


@dataclass
class Finding:
    """One claim of the paper tested on one model: the sentence shown, generated from the numbers, and its
    verdict."""

    claim_id: str
    model: str
    verdict: str
    sentence: str

    def markdown(self) -> str:
        return f"- **{self.verdict}**: {self.sentence}"


def findings_markdown(findings: list[Finding], observations: list[str] | None = None,
                      caveats: list[str] | None = None) -> str:
    """Findings grouped by model, then observations (numbers without a claim) and caveats the records show."""
    if not findings and not observations:
        return "*The runs needed for the paper's claims are not in these results.*"
    lines = []
    models = list(dict.fromkeys(f.model for f in findings))
    for model in models:
        if len(models) > 1 or model:
            lines.append(f"\n**{model}**\n")
        lines += [f.markdown() for f in findings if f.model == model]
    if observations:
        lines.append("\n**Other observations**\n")
        lines += [f"- {o}" for o in observations]
    if caveats:
        lines.append("\n**Caveats these records show**\n")
        lines += [f"- {c}" for c in caveats]
    return "\n".join(lines)


def verdict_counts(findings: list[Finding]) -> str:
    """``2 agree, 1 disagrees, 3 inconclusive`` over the findings."""
    counts = {v: sum(f.verdict == v for f in findings) for v in (AGREES, DISAGREES, INCONCLUSIVE)}
    words = {AGREES: ("agrees", "agree"), DISAGREES: ("disagrees", "disagree"), INCONCLUSIVE: ("inconclusive",) * 2}
    return ", ".join(f"{n} {words[v][0] if n == 1 else words[v][1]}" for v, n in counts.items())


# --- caveats from the records ---------------------------------------------------------------------

def common_caveats(res: StudyResults, n_params: dict[str, float | None], smallest_paper_params: float,
                   min_items: int | None = None, items: int | None = None) -> list[str]:
    """Caveats that every study's records can show: CPU only, a model far smaller than the paper's, estimated
    energy, too few scored items."""
    df = res.ok
    out = []
    if len(df) and "param_device" in df and (df["param_device"] == "cpu").all():
        out.append("Every run ran on a CPU: latency, memory and energy are CPU figures, PCU needs a GPU, and the "
                   "paper's GPU kernels (and their bf16/int4 speed-ups) are not what ran here.")
    small = {m: n for m, n in n_params.items() if n and n < smallest_paper_params}
    if small:
        out.append("Model sizes below the paper's smallest (" + format_params(smallest_paper_params) + "): "
                   + ", ".join(f"{m} {format_params(n)}" for m, n in small.items())
                   + "; effects that grow with scale may not show.")
    energy_methods = [col for col in df.columns if col.endswith("_method") and col.startswith(("aec_w", "energy"))]
    estimated = sorted({m.split("/")[0] for col in energy_methods for m in df[col].dropna() if is_estimate(m)})
    if estimated:
        out.append(f"Energy is estimated ({', '.join(estimated)}), not measured by a counter: it follows how much "
                   "CPU a run got, so no energy claim is decided on it.")
    if min_items is not None and items is not None and items < min_items:
        out.append(f"Accuracy rests on {items} scored items per run: only differences of several items can be "
                   "told from chance.")
    return out


# --- noise from repeated runs ----------------------------------------------------------------------

def within_group_spread(frame: pd.DataFrame, group_column: str, value_column: str) -> float | None:
    """The largest relative spread (max / min - 1) of ``value_column`` within any group of rows that share
    ``group_column`` (runs with identical settings); None without a group of two or more values."""
    spreads = [g.max() / g.min() - 1 for _, g in frame.groupby(group_column)[value_column]
               if g.notna().sum() > 1 and g.min() > 0]
    return float(max(spreads)) if spreads else None


# --- testing a chapter's claims -------------------------------------------------------------------

def _first_present(names: str, present: set[str]) -> str | None:
    """``"moe-8x2|moe-1.5Bx8"`` -> the first name a model's runs have."""
    return next((n for n in names.split("|") if n in present), None) if names else None


def test_claims(chapter: str, axis: str, variants: dict[str, list[str]], compare, words: dict[str, str],
                expected=None, resolve=None, margin=None) -> list[Finding]:
    """Every claim of ``chapter`` in ``claims.csv``, on every model of ``variants`` (model -> its variants) that
    has the runs the claim names.

    ``compare(claim, model, subject, baseline)`` returns the ``Difference`` of two runs on the claim's metric (by
    the rule that suits the metric) or None when the records lack what the rule needs; ``words`` names each metric
    in a sentence; ``expected(claim, model)`` gives the direction of a claim whose direction is ``ranks`` (read from
    the paper's leaderboard of the model's size group) and a phrase saying so; ``resolve(model, name)`` maps a
    name such as ``reference`` to a run's name; ``margin(claim)`` is a ``not_lower`` claim's allowed drop. A claim
    whose direction is ``front`` (a best quality-cost trade-off) is decided by ``_front_finding``.
    """
    out = []
    for model, names in variants.items():
        present = set(names)
        for _, claim in claims(chapter).iterrows():
            if resolve is not None:
                claim = claim.copy()
                for key in ("subject", "baseline"):
                    claim[key] = "|".join(resolve(model, n) for n in claim[key].split("|")) if claim[key] else ""
            if claim["direction"] == "front":
                finding = _front_finding(claim, model, present, compare, words, axis)
                out += [finding] if finding is not None else []
                continue
            subject = _first_present(claim["subject"], present)
            if subject is None:
                continue
            direction, source = claim["direction"], ""
            if direction in ("lowest", "highest"):
                others = [n for n in claim["among"].split("|") if n in present and n != subject]
                parts = [(o, "lower" if direction == "lowest" else "higher") for o in others]
            else:
                baseline = _first_present(claim["baseline"], present)
                if baseline is None or baseline == subject:
                    continue
                if direction == "ranks":
                    direction, source = expected(claim, model)
                    if direction is None:
                        continue
                parts = [(baseline, direction)]
            if not parts:
                continue
            paper = paper_quote(claim["paper_figures"], axis)
            head = f"*{claim['statement']}* (paper: {paper}{'; ' + source if source else ''})." if paper or source \
                else f"*{claim['statement']}* ({claim['source']})."
            pieces, verdicts, estimated, missing = [], [], False, []
            for other, expect in parts:
                diff = compare(claim, model, subject, other)
                if diff is None:
                    missing.append(other)
                    verdicts.append(INCONCLUSIVE)
                    continue
                estimated |= diff.estimated
                allowed = margin(claim) if expect == "not_lower" else diff_margin(diff)
                verdicts.append(decide(diff, expect, allowed))
                pieces.append(f"against {other} {diff}")
                if expect == "not_lower":
                    pieces[-1] += f" (the claim allows a drop of at most {100 * allowed:.1f}%)"
            sentence = f"{head} Here {words.get(claim['metric'], claim['metric'])} of {subject}: " \
                       + ("; ".join(pieces) or "no comparison possible") + "."
            if missing:
                sentence += f" The records lack the values the rule needs for {', '.join(missing)}."
            if estimated:
                sentence += (" At least one of these values is estimated (no energy counter), not measured: a "
                             "difference involving an estimate is no evidence either way.")
            out.append(Finding(claim["claim_id"], model, combine(verdicts), sentence))
    return out


def either(verdicts: list[str]) -> str:
    """A claim that holds when any one of its parts does (e.g. "better on at least one metric"): it agrees when any
    part agrees, disagrees only when every part disagrees."""
    if AGREES in verdicts:
        return AGREES
    return DISAGREES if verdicts and all(v == DISAGREES for v in verdicts) else INCONCLUSIVE


def _front_finding(claim, model: str, present: set[str], compare, words: dict[str, str], axis: str
                   ) -> Finding | None:
    """A ``front`` claim: each subject (``a+b``: every one) offers a best quality-cost trade-off. Its ``metric`` is
    ``quality+cost+cost...``, all lower-is-better. For each subject (1) every cost is lower than the baseline's
    (``lower``), and (2) no other method of ``among`` beats it on the quality and every cost at once: against each
    other method the subject must be lower on at least one metric (``either``; disagrees when the other is lower on
    all of them). Agrees when every part agrees (``combine``). None when a subject or the baseline lacks its run."""
    subjects, metrics = claim["subject"].split("+"), claim["metric"].split("+")
    baseline = _first_present(claim["baseline"], present)
    if baseline is None or not all(s in present for s in subjects):
        return None

    def difference(metric, subject, other):
        diff = compare({**claim, "metric": metric}, model, subject, other)
        verdict = INCONCLUSIVE if diff is None else decide(diff, "lower", diff_margin(diff))
        return diff, verdict

    verdicts, texts = [], []
    for subject in subjects:
        cost_parts = []
        for metric in metrics[1:]:
            diff, verdict = difference(metric, subject, baseline)
            verdicts.append(verdict)
            cost_parts.append(f"{words.get(metric, metric)} {diff if diff is not None else 'not in the records'}")
        beaten, undecided = [], []
        for other in [n for n in claim["among"].split("|") if n in present and n not in (subject,)]:
            parts = [difference(metric, subject, other) for metric in metrics]
            verdict = either([v for _, v in parts])
            verdicts.append(verdict)
            if verdict == DISAGREES:
                beaten.append(other + " (" + ", ".join(f"{m} {d}" for m, (d, _) in zip(metrics, parts)) + ")")
            elif verdict == INCONCLUSIVE:
                undecided.append(other)
        front = ("lower on at least one of " + ", ".join(metrics) + " than every other method"
                 if not beaten and not undecided else
                 (f"beaten on all of {', '.join(metrics)} by {'; '.join(beaten)}" if beaten else "")
                 + ("; " if beaten and undecided else "")
                 + (f"not told apart on any of them from {', '.join(undecided)}" if undecided else ""))
        texts.append(f"{subject} against {baseline}: " + "; ".join(cost_parts) + f"; on the front: {front}")
    paper = paper_quote(claim["paper_figures"], axis)
    head = f"*{claim['statement']}* ({f'paper: {paper}' if paper else claim['source']})."
    return Finding(claim["claim_id"], model, combine(verdicts), f"{head} Here " + ". ".join(texts) + ".")


def diff_margin(diff: Difference) -> float:
    """Intervals from raw samples are held to ``LATENCY_TOLERANCE``; point values carry their tolerance already."""
    return LATENCY_TOLERANCE if diff.how.startswith("bootstrap over") else 0.0
