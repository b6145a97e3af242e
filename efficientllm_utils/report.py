"""What the book's pages call: load a study's results, derive MCR, rank, compare with the paper, plot."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .records import RESULTS_DIR, RunRecord, load_records

PAPER_DIR = Path(__file__).resolve().parent.parent / "book" / "paper"  # copied from the study brief
# Paper leaderboard names of our precisions; int4 is compared through bitsandbytes nf4.
PAPER_PRECISION_NAMES = {"bf16": "bfloat16", "fp16": "float16", "int4-nf4": "int4"}
HIGHER_IS_BETTER = {"Perf": True, "AMU": False, "AL": False, "IT": True, "TT": True, "ST": True, "AEC": False,
                    "MCR": True, "PCU": True}


@dataclass
class StudyResults:
    study: str
    profile: str
    records: list[RunRecord]
    frame: pd.DataFrame  # flat rows, one per run

    @property
    def ok(self) -> pd.DataFrame:
        return self.frame[self.frame["status"] == "ok"].copy()

    def describe(self) -> str:
        """One sentence that says where these numbers came from."""
        if not self.records:
            return f"No results for `{self.study}` yet: run `make reproduce AXIS={self.study}`."
        hw = {r.provenance.get("hardware", {}).get("summary") for r in self.records} - {None}
        commits = {(r.provenance.get("git_commit") or "uncommitted")[:10] for r in self.records}
        n_ok = sum(r.status == "ok" for r in self.records)
        return (f"Profile **{self.profile}**: {n_ok} of {len(self.records)} runs succeeded, on "
                f"{'; '.join(sorted(hw)) or 'unknown hardware'}, code {', '.join(sorted(commits))}.")


def available_profiles(study: str, root: Path | None = None) -> list[str]:
    base = (root or RESULTS_DIR) / study
    return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.exists() else []


def load_study(study: str, profile: str | None = None, root: Path | None = None) -> StudyResults:
    """Results of one study. Without ``profile``: ``EFFICIENTLLM_BOOK_PROFILE``, else the profile whose
    latest record is newest."""
    profile = profile or os.environ.get("EFFICIENTLLM_BOOK_PROFILE")
    if profile is None:
        candidates = {p: load_records(study, p, root) for p in available_profiles(study, root)}
        candidates = {p: r for p, r in candidates.items() if r}
        profile = max(candidates, key=lambda p: max(r.finished or "" for r in candidates[p])) if candidates else "cpu"
    recs = load_records(study, profile, root)
    return StudyResults(study, profile, recs, pd.DataFrame([r.flat() for r in recs]))


# --- quantization ------------------------------------------------------------------------------

def quantization_table(res: StudyResults) -> pd.DataFrame:
    """One row per (model, precision): quality, counted size, MCR against the reference precision, costs."""
    df = res.ok
    if df.empty:
        return df
    rows = []
    for model, group in df.groupby("param_model"):
        ref_name = group["param_reference_precision"].iloc[0]
        ref = group[group["param_precision"] == ref_name]
        for _, r in group.iterrows():
            row = {
                "model": model, "precision": r["param_precision"],
                "accuracy": r["quality_mean_accuracy"], "perplexity": r["quality_perplexity"],
                "model_MB": r["model_bytes"] / 1e6, "linear_weights_MB": r["linear_weight_bytes"] / 1e6,
                "AMU_GB": r["amu_gb"], "PCU": r["pcu"], "AL_s": r["al_s"], "p90_s": r["latency_p90_s"],
                "TTFT_s": r["ttft_p50_s"], "TPOT_s": r.get("tpot_p50_s"), "IT_tok_s": r["it_tokens_per_s"],
                "AEC_W": r["aec_w"], "J_per_token": r["energy_per_token_j"],
            }
            if len(ref):
                ref_row = ref.iloc[0]
                size_ratio = ref_row["model_bytes"] / r["model_bytes"]
                quality_ratio = r["quality_mean_accuracy"] / ref_row["quality_mean_accuracy"]
                row["compression"] = size_ratio
                row["MCR"] = size_ratio * quality_ratio
                row["accuracy_drop_pct"] = 100 * (1 - quality_ratio)
                row["reference"] = ref_name
            rows.append(row)
    return pd.DataFrame(rows)


def quantization_leaderboard(table: pd.DataFrame) -> pd.DataFrame:
    """Our per-metric ranks for the precisions the paper compared, beside the paper's ranks."""
    metric_columns = {"Perf": "accuracy", "AMU": "AMU_GB", "AL": "AL_s", "IT": "IT_tok_s", "AEC": "AEC_W", "MCR": "MCR"}
    ours = table[table["precision"].isin(PAPER_PRECISION_NAMES)].copy()
    ours["method"] = ours["precision"].map(PAPER_PRECISION_NAMES)
    long = []
    for metric, column in metric_columns.items():
        if column not in ours or ours[column].isna().all():
            continue
        ranks = ours[column].rank(ascending=not HIGHER_IS_BETTER[metric], method="min")
        long += [{"method": m, "metric": metric, "our_rank": int(r)} for m, r in zip(ours["method"], ranks)]
    return pd.DataFrame(long)


def paper_ranks(axis: str, group: str, size_group: str | None = None) -> pd.DataFrame:
    path = PAPER_DIR / "leaderboard_ranks.csv"
    if not path.exists():
        return pd.DataFrame(columns=["method", "metric", "paper_rank"])
    df = pd.read_csv(path)
    df = df[(df["axis"] == axis) & (df["group"] == group)]
    if size_group is not None:
        df = df[df["size_group"] == size_group]
    return df.rename(columns={"rank": "paper_rank"})[["method", "metric", "paper_rank"]]


def compare_ranks(ours: pd.DataFrame, paper: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Side-by-side ranks and Kendall's tau-b per metric (NaN where fewer than two methods are shared)."""
    from scipy.stats import kendalltau

    both = ours.merge(paper, on=["method", "metric"], how="inner")
    taus = []
    for metric, group in both.groupby("metric", sort=False):
        tau = kendalltau(group["our_rank"], group["paper_rank"]).statistic if len(group) > 1 else np.nan
        taus.append({"metric": metric, "methods": len(group), "kendall_tau": tau})
    side = both.pivot(index="method", columns="metric", values=["our_rank", "paper_rank"]) if len(both) else both
    return side, pd.DataFrame(taus)


# --- plots --------------------------------------------------------------------------------------

def pareto_front(costs: np.ndarray, qualities: np.ndarray) -> np.ndarray:
    """Mask of the points that no other point beats on both lower cost and higher quality."""
    mask = np.ones(len(costs), dtype=bool)
    for i in range(len(costs)):
        dominated = (costs <= costs[i]) & (qualities >= qualities[i]) & ((costs < costs[i]) | (qualities > qualities[i]))
        mask[i] = not dominated.any()
    return mask


def tradeoff_plots(table: pd.DataFrame, quality: str, costs: dict[str, str], hue: str):
    """Quality against each cost, one panel per cost, with the trade-off front drawn through the best points."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, len(costs), figsize=(4.2 * len(costs), 3.6), squeeze=False)
    for ax, (column, label) in zip(axes[0], costs.items()):
        data = table.dropna(subset=[column, quality])
        sns.scatterplot(data=data, x=column, y=quality, hue=hue, s=90, ax=ax, legend=ax is axes[0][-1])
        if len(data):
            front = data[pareto_front(data[column].to_numpy(float), data[quality].to_numpy(float))].sort_values(column)
            ax.plot(front[column], front[quality], "--", color="grey", lw=1, zorder=0)
        ax.set(xlabel=label, ylabel=quality)
    if axes[0][-1].get_legend():
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return fig


def methods_legend(res: StudyResults, columns: list[str]) -> pd.DataFrame:
    """How each shown metric was obtained (from the records' ``*_method`` columns)."""
    df = res.ok
    rows = [{"metric": c, "how obtained": "; ".join(sorted(set(df[f"{c}_method"].dropna())))}
            for c in columns if f"{c}_method" in df]
    return pd.DataFrame(rows).set_index("metric") if rows else pd.DataFrame()


def quantization_findings(table: pd.DataFrame) -> str:
    """Plain statements of what this run shows on the paper's two quantization claims."""
    if table.empty or "MCR" not in table:
        return "*No results yet.*"
    lines = []
    by = table.set_index("precision")
    ref = table["reference"].iloc[0]
    for p in ("int4-nf4", "int4-fp4"):
        if p in by.index:
            r = by.loc[p]
            lines.append(
                f"- **{p}** holds {r['compression']:.2f}x fewer bytes than {ref} (counted), at an accuracy change of "
                f"{-r['accuracy_drop_pct']:+.1f}% and perplexity {r['perplexity']:.1f} vs {by.loc[ref, 'perplexity']:.1f}; "
                f"MCR {r['MCR']:.2f}. Its average power is {r['AEC_W']:.1f} W vs {by.loc[ref, 'AEC_W']:.1f} W and its "
                f"energy per token {r['J_per_token'] / by.loc[ref, 'J_per_token']:.2f}x the reference's. "
                "The paper: 3.6-3.9 MCR, 3-5% score drop, up to 3.9x less memory and energy.")
    if {"bf16", "fp16"} <= set(by.index):
        b, f = by.loc["bf16"], by.loc["fp16"]
        faster = "bf16" if b["AL_s"] < f["AL_s"] else "fp16"
        lines.append(f"- **bf16 vs fp16**: latency {b['AL_s']:.3f} vs {f['AL_s']:.3f} s/request ({faster} faster), "
                     f"energy per token {b['J_per_token']:.3g} vs {f['J_per_token']:.3g} J. The paper found bf16 "
                     "ahead on Hopper GPUs; on a CPU the answer depends on which kernels the CPU has for each type.")
    if len(lines) == 0:
        return "*The precisions needed for the paper's claims are not in these results.*"
    n = table["accuracy"].count()
    lines.append(f"- Accuracy differences below about two standard errors of a task subset are noise: see each run's "
                 f"per-task standard errors ({n} precisions measured).")
    return "\n".join(lines)
