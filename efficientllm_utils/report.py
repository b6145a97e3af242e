"""What the book's pages call: load a study's results, derive MCR, rank, compare with the paper, plot."""
from __future__ import annotations

import json
import os
import re
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
        if "status" not in self.frame:  # no records at all: an empty frame without columns
            return self.frame.copy()
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


def rank_methods(table: pd.DataFrame, metric_columns: dict[str, str],
                 higher_is_better: dict[str, bool] | None = None) -> pd.DataFrame:
    """Per-metric ranks (1 = best, ties share the best rank) of the rows of ``table``, named by its ``method``
    column, in the long form ``compare_ranks`` takes. A metric whose column is missing or empty is skipped."""
    better = {**HIGHER_IS_BETTER, **(higher_is_better or {})}
    long = []
    for metric, column in metric_columns.items():
        if column not in table or table[column].isna().all():
            continue
        ranks = table[column].rank(ascending=not better[metric], method="min")
        long += [{"method": m, "metric": metric, "our_rank": int(r)} for m, r in zip(table["method"], ranks)]
    return pd.DataFrame(long, columns=["method", "metric", "our_rank"])


def quantization_leaderboard(table: pd.DataFrame) -> pd.DataFrame:
    """Our per-metric ranks for the precisions the paper compared, beside the paper's ranks."""
    metric_columns = {"Perf": "accuracy", "AMU": "AMU_GB", "AL": "AL_s", "IT": "IT_tok_s", "AEC": "AEC_W", "MCR": "MCR"}
    ours = table[table["precision"].isin(PAPER_PRECISION_NAMES)].copy()
    ours["method"] = ours["precision"].map(PAPER_PRECISION_NAMES)
    return rank_methods(ours, metric_columns)


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
                   higher_is_better: bool = True):
    """Quality against each cost, one panel per cost, with the trade-off front drawn through the best points
    (``higher_is_better=False`` for a quality such as perplexity)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, len(costs), figsize=(4.2 * len(costs), 3.6), squeeze=False)
    for ax, (column, label) in zip(axes[0], costs.items()):
        data = table.dropna(subset=[column, quality])
        sns.scatterplot(data=data, x=column, y=quality, hue=hue, s=90, ax=ax, legend=ax is axes[0][-1])
        if len(data):
            front = data[pareto_front(data[column].to_numpy(float), data[quality].to_numpy(float),
                                      higher_is_better)].sort_values(column)
            ax.plot(front[column], front[quality], "--", color="grey", lw=1, zorder=0)
        ax.set(xlabel=label, ylabel=quality)
    if axes[0][-1].get_legend():
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return fig


def methods_legend(res: StudyResults, columns: list[str]):
    """How each shown metric was obtained (from the records' ``*_method`` columns)."""
    df = res.ok
    rows = [{"metric": c, "how obtained": "; ".join(sorted(set(df[f"{c}_method"].dropna())))}
            for c in columns if f"{c}_method" in df]
    if not rows:  # no runs yet: a sentence, not an empty table
        from IPython.display import Markdown

        return Markdown("*No results yet.*")
    return pd.DataFrame(rows).set_index("metric")


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


# --- architecture pretraining -----------------------------------------------------------------

# the run parameter that names a run within its study (the MoE study's runs differ in several fields: `variant`)
STUDY_FIELD = {"attention": "attention", "positional_encoding": "position", "moe": "variant"}
# our variant names -> the paper's leaderboard names (book/paper/leaderboard_ranks.csv, axis architecture_pretraining);
# the MoE study's CPU variants stand in for the paper's four models (see params/moe.yaml)
PAPER_ARCH_NAMES = {
    "attention": {"mqa": "MQA", "gqa": "GQA", "mla": "MLA", "nsa": "NSA"},
    "positional_encoding": {"rope": "RoPE", "absolute": "Absolute", "learnable": "Learnable Absolute",
                            "relative": "Relative"},
    "moe": {"dense-small": "Dense 1.5B", "moe-8x2": "MoE 1.5Bx8", "dense-large": "Dense 3B",
            "moe-8x2-small": "MoE 0.5Bx8", "dense-1.5B": "Dense 1.5B", "moe-1.5Bx8": "MoE 1.5Bx8",
            "dense-3B": "Dense 3B", "moe-0.5Bx8": "MoE 0.5Bx8"},
}
# leaderboard metric -> pretraining_table column; quality is perplexity, lower is better
PRETRAINING_METRICS = {"Perf": "perplexity", "AMU": "AMU_GB", "AL": "AL_s", "TT": "TT", "AEC": "AEC_W"}
_DECODE_COLUMN = re.compile(r"^decode_ctx(\d+)_(latency_s|ttft_s|tpot_s|tokens_per_s)$")


def _variant_column(res: StudyResults, frame: pd.DataFrame) -> pd.Series:
    field = STUDY_FIELD.get(res.study, "variant")
    column = f"param_{field}"
    return frame[column] if column in frame else frame["label"]


def decode_contexts(frame: pd.DataFrame) -> list[int]:
    """Context lengths with decode timings in a study's flat frame, shortest first."""
    return sorted({int(m.group(1)) for c in frame.columns if (m := _DECODE_COLUMN.match(c))})


def pretraining_table(res: StudyResults) -> pd.DataFrame:
    """One row per run of an architecture study: quality, sizes, analytical costs, training metrics, decoding
    at the longest context. Rows keep the order the runs were made in (the params file's)."""
    df = res.ok.sort_values("started") if len(res.ok) else res.ok
    if df.empty:
        return pd.DataFrame()
    contexts = decode_contexts(df)
    longest = contexts[-1] if contexts else None
    table = pd.DataFrame({
        "variant": _variant_column(res, df).to_numpy(),
        "size": df["param_size"].to_numpy() if "param_size" in df else None,
        "perplexity": df["quality_perplexity"].to_numpy(),
        "initial_loss": df["quality_initial_loss"].to_numpy(),
        "final_loss": df["quality_final_loss"].to_numpy(),
        "params_M": df["params_total"].to_numpy() / 1e6,
        "active_params_M": df["params_active"].to_numpy() / 1e6,
        "MFLOP_per_token": df["flops_per_token"].to_numpy() / 1e6,
        "KV_bytes_per_token": df["kv_cache_bytes_per_token"].to_numpy(),
        "KV_measured": df["kv_cache_bytes_per_token_measured"].to_numpy(),
        "AMU_GB": df["amu_gb"].to_numpy(),
        "peak_GB": df["peak_memory_gb"].to_numpy(),
        "PCU": df["pcu"].to_numpy(),
        "AL_s": df["al_s"].to_numpy(),
        "AL_p90_s": df["al_p90_s"].to_numpy(),
        "AL_CV": df["al_cv"].to_numpy(),
        "TT": df["tt_tokens_per_param_s"].to_numpy(),
        "TT_active": (df["train_tokens_per_s"] / df["params_active"]).to_numpy(),
        "tokens_per_s": df["train_tokens_per_s"].to_numpy(),
        "AEC_W": df["aec_w"].to_numpy(),
        "energy_J": df["energy_j"].to_numpy(),
    })
    if table["size"].isna().all():
        table = table.drop(columns="size")
    if longest is not None:
        table["decode_context"] = longest
        table["decode_s"] = df[f"decode_ctx{longest}_latency_s"].to_numpy()
        table["TPOT_s"] = df[f"decode_ctx{longest}_tpot_s"].to_numpy()
        table["TTFT_s"] = df[f"decode_ctx{longest}_ttft_s"].to_numpy()
    return table.reset_index(drop=True)


def decode_curves(res: StudyResults) -> pd.DataFrame:
    """Decode timings per run and context length, long form: variant, (size), context, latency_s, ttft_s, ..."""
    df = res.ok.sort_values("started") if len(res.ok) else res.ok
    if df.empty:
        return pd.DataFrame()
    rows = []
    for (_, r), variant in zip(df.iterrows(), _variant_column(res, df)):
        for context in decode_contexts(df):
            row = {"variant": variant, "context": context}
            if "param_size" in df and pd.notna(r["param_size"]):
                row["size"] = r["param_size"]
            for name in ("latency_s", "ttft_s", "tpot_s", "tokens_per_s"):
                row[name] = r.get(f"decode_ctx{context}_{name}")
            rows.append(row)
    return pd.DataFrame(rows)


def loss_curves(res: StudyResults, smooth: int = 5) -> pd.DataFrame:
    """Training loss per step of every run (from the records' raw step samples), with a centred rolling mean."""
    frames = []
    for record in sorted((r for r in res.records if r.status == "ok"), key=lambda r: r.started or ""):
        steps = pd.DataFrame(record.raw.get("steps", []))
        if steps.empty:
            continue
        variant = record.params.get(STUDY_FIELD.get(res.study, "variant")) or record.label
        size = record.params.get("size")
        steps["variant"] = f"{variant} ({size})" if size else variant
        steps["smoothed_loss"] = steps["lm_loss"].rolling(smooth, center=True, min_periods=1).mean()
        frames.append(steps)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def loss_plot(curves: pd.DataFrame):
    """Training loss against step, one line per variant (rolling mean; the raw steps are in the records)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    sns.lineplot(data=curves, x="step", y="smoothed_loss", hue="variant", ax=ax, lw=1.3)
    ax.set(xlabel="training step", ylabel="training loss (cross-entropy, rolling mean)")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return fig


def context_plot(curves: pd.DataFrame, panels: dict[str, str] | None = None):
    """Decode cost against context length, one line per variant (and size), one panel per timing."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    panels = panels or {"latency_s": "seconds per request", "tpot_s": "seconds per output token (p50)"}
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    style = "size" if "size" in curves else None
    contexts = sorted(curves["context"].unique())
    for ax, (column, label) in zip(axes[0], panels.items()):
        sns.lineplot(data=curves, x="context", y=column, hue="variant", style=style, markers=bool(style),
                     marker=None if style else "o", ax=ax, legend=ax is axes[0][-1])
        ax.set(xscale="log", xticks=contexts, xticklabels=contexts, xlabel="context (prompt tokens)", ylabel=label)
        ax.minorticks_off()
    if axes[0][-1].get_legend():
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return fig


def architecture_leaderboard(study: str, table: pd.DataFrame) -> pd.DataFrame:
    """Our per-metric ranks of the variants the paper also trained (mean over sizes where there are several)."""
    names = PAPER_ARCH_NAMES.get(study, {})
    ours = table[table["variant"].isin(names)]
    columns = [c for c in PRETRAINING_METRICS.values() if c in ours]
    ours = ours.groupby("variant", sort=False)[columns].mean().reset_index()
    ours["method"] = ours["variant"].map(names)
    return rank_methods(ours, PRETRAINING_METRICS, {"Perf": False})


# Relative gaps this small are ties: one run on a shared 2-core CPU does not resolve them. These are floors; repeated
# runs of the same model on a profile raise them (``noise_tolerances``). Perplexity: the spread over seeds 0, 1, 2
# (initialisation and data order) of the attention study's cpu profile, measured 2026-11-26: GQA 347.5 / 378.5 /
# 361.7 (8.9%), MLA 293.2 / 308.9 / 291.2 (6.1%), MQA 382.3 / 409.4 / 382.2 (7.1%).
TIE_TOLERANCE = {"AL_s": 0.05, "TT": 0.05, "decode_s": 0.05, "AEC_W": 0.05, "AMU_GB": 0.02, "perplexity": 0.09}


@dataclass
class Standing:
    """Where one variant stands among others on one column: its rank, and whether it is best or worst
    within the column's tie tolerance."""

    rank: int
    n: int
    best: bool
    worst: bool
    gap_pct: float  # to the best, in percent of the best
    tied_top: bool = False  # another variant is within the tolerance of this best one
    tied_bottom: bool = False  # another variant is within the tolerance of this worst one
    tolerance_pct: float = 0.0

    def __str__(self) -> str:
        if self.rank == 1:
            tie = f" (another within {self.tolerance_pct:.0f}%: a tie at this noise)" if self.tied_top else ""
        else:
            tie = f" ({self.gap_pct:.1f}% from the best: a tie at this noise)" if self.best else ""
        return f"rank {self.rank} of {self.n}{tie}"

    @property
    def first(self) -> bool | None:
        """True: strictly best; None: tied for best within the tolerance; False: behind."""
        return True if self.rank == 1 and not self.tied_top else (None if self.best else False)

    @property
    def last(self) -> bool | None:
        """True: strictly worst (e.g. the slowest); None: tied for worst; False: ahead of the worst."""
        return True if self.rank == self.n and not self.tied_bottom else (None if self.worst else False)


def standing(table: pd.DataFrame, column: str, variant: str, among: list[str], lower_is_better: bool = True,
             tolerance: float | None = None) -> Standing:
    """``variant``'s standing on ``column`` among the variants ``among`` (means over sizes); gaps within
    ``tolerance`` (relative; default ``TIE_TOLERANCE[column]``) are ties."""
    values = table[table["variant"].isin(among)].groupby("variant", sort=False)[column].mean()
    signed = values if lower_is_better else -values
    tol = TIE_TOLERANCE.get(column, 0.0) if tolerance is None else tolerance
    best, worst, mine = signed.min(), signed.max(), signed[variant]
    gap = abs(mine - best) / abs(best) if best else 0.0
    near = bool((abs(signed.drop(variant) - mine) <= tol * abs(mine)).any())  # another variant within tolerance
    is_best, is_worst = gap <= tol, abs(worst - mine) <= tol * abs(worst)
    return Standing(rank=int((signed < mine).sum()) + 1, n=len(values), best=is_best, worst=is_worst,
                    gap_pct=100 * gap, tied_top=near and is_best, tied_bottom=near and is_worst,
                    tolerance_pct=100 * tol)


def _verdict(*claims: bool | None) -> str:
    """Combine the parts of a claim: True holds, None is a tie at this noise, False does not hold."""
    claims = tuple(None if c is None else bool(c) for c in claims)  # numpy booleans are not `True`
    if all(c is True for c in claims):
        return "**agrees**"
    if all(c is False for c in claims):
        return "**does not agree**"
    if all(c is None for c in claims):
        return "**inconclusive** (a tie at this noise)"
    return "**partly agrees**"


def _gap_claim(gap_pct: float, tolerance: float) -> bool | None:
    """A relative gap that should be negative (e.g. lower perplexity): True, None within the tolerance, False."""
    return None if abs(gap_pct) <= 100 * tolerance else gap_pct < 0


# settings that only one kind of architecture reads: two runs that differ only in these trained the same model
_ONLY_FOR = {"mla": ("kv_lora_rank",), "nsa": ("compress_block", "compress_stride", "select_block", "n_selected",
                                               "window"),
             "moe": ("n_experts", "moe_top_k", "moe_intermediate_size")}


def _effective_settings(params: dict) -> str:
    """A run's settings without its name and without the fields its architecture ignores."""
    ignored = {"variant"}
    for kind, fields in _ONLY_FOR.items():
        if kind not in (params.get("attention"), params.get("ffn")):
            ignored.update(fields)
    return json.dumps({k: v for k, v in params.items() if k not in ignored}, sort_keys=True)


def repeated_runs(profile: str, root: Path | None = None) -> pd.DataFrame:
    """Runs of the architecture studies that trained the very same model with the same settings (the GQA, RoPE,
    dense-FFN reference appears in all three studies), one row per run, with their costs and perplexity."""
    rows = []
    for study in STUDY_FIELD:
        for record in load_records(study, profile, root):
            if record.status != "ok":
                continue
            contexts = decode_contexts(pd.DataFrame(columns=list(record.metrics)))
            m = record.metrics
            rows.append({"study": study, "run": record.label, "settings": _effective_settings(record.params),
                         "perplexity": record.quality.get("perplexity"), "AL_s": m["al_s"].value,
                         "AMU_GB": m["amu_gb"].value, "AEC_W": m["aec_w"].value, "TT": m["tt_tokens_per_param_s"].value,
                         "decode_s": m[f"decode_ctx{contexts[-1]}_latency_s"].value if contexts else None})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    repeated = frame[frame.groupby("settings")["run"].transform("size") > 1]
    return repeated.drop(columns="settings").reset_index(drop=True) if len(repeated) else pd.DataFrame()


def noise_tolerances(profile: str, root: Path | None = None) -> dict[str, float]:
    """Tie tolerances: ``TIE_TOLERANCE``, raised to the relative spread (max / min - 1) that repeated runs of
    the same model showed on this profile, where there are such runs."""
    tolerances = dict(TIE_TOLERANCE)
    repeats = repeated_runs(profile, root)
    for column in tolerances:
        if column in repeats and repeats[column].notna().sum() > 1:
            spread = repeats[column].max() / repeats[column].min() - 1
            tolerances[column] = max(tolerances[column], float(spread))
    return tolerances


def architecture_findings(study: str, table: pd.DataFrame, tolerances: dict[str, float] | None = None) -> str:
    """Plain statements, computed from this run's table, of whether it agrees with the paper's claims.
    Gaps within ``tolerances`` (relative, per column; default ``TIE_TOLERANCE``) count as ties."""
    if table.empty:
        return "*No results yet.*"
    tol = {**TIE_TOLERANCE, **(tolerances or {})}
    if "size" in table and table["size"].nunique() > 1:  # one line per variant: the mean over sizes
        numeric = table.select_dtypes("number").columns
        table = table.groupby("variant", sort=False)[list(numeric)].mean().reset_index()
    by = table.set_index("variant")
    lines = {"attention": _attention_findings, "positional_encoding": _position_findings,
             "moe": _moe_findings}[study](table, by, tol)
    if not lines:
        return "*The variants needed for the paper's claims are not in these results.*"
    shown = ", ".join(f"{c} {100 * t:.0f}%" for c, t in tol.items() if c in table)
    lines.append(f"- **Noise.** Gaps smaller than these are counted as ties: {shown} (the larger of a floor and the "
                 "spread of repeated runs of the same model, above; the median coefficient of variation of a "
                 f"training step is {table['AL_CV'].median():.2f}). AEC on a CPU without an "
                 "energy counter is estimated from CPU time (see the methods page): it follows how much CPU the run "
                 "got, not the variant's power draw.")
    return "\n".join(lines)


def _among(by: pd.DataFrame, names: list[str]) -> list[str]:
    return [n for n in names if n in by.index]


def _attention_findings(table: pd.DataFrame, by: pd.DataFrame, tol: dict[str, float]) -> list[str]:
    lines = []
    paper = _among(by, ["mqa", "gqa", "mla", "nsa"])
    if len(paper) < 2:
        return lines
    if "mqa" in paper:
        r = by.loc["mqa"]
        al = standing(table, "AL_s", "mqa", paper, tolerance=tol["AL_s"])
        amu = standing(table, "AMU_GB", "mqa", paper, tolerance=tol["AMU_GB"])
        kv = standing(table, "KV_bytes_per_token", "mqa", paper, tolerance=0.0)  # analytical: exact
        decode = standing(table, "decode_s", "mqa", paper, tolerance=tol["decode_s"]) if "decode_s" in table else None
        smaller = [v for v in paper if by.loc[v, "KV_bytes_per_token"] < r["KV_bytes_per_token"]]
        lines.append(
            f"- **MQA, the best memory-latency trade-off** (paper: rank 1 on AMU and AL). Here MQA is {al} on AL "
            f"({r['AL_s']:.3f} s/iter) and {amu} on AMU ({r['AMU_GB']:.3f} GB of process memory, mostly the Python "
            f"and PyTorch baseline at this size); its KV cache, {r['KV_bytes_per_token']:.0f} bytes/token, is "
            f"{kv}" + (f" ({', '.join(v.upper() for v in smaller)} smaller)" if smaller else "")
            + (f", and its decode latency at {int(r['decode_context'])} tokens is {decode}" if decode else "")
            + f". {_verdict(al.first, amu.first)}")
    if "mla" in paper:
        r = by.loc["mla"]
        ppl = standing(table, "perplexity", "mla", paper, tolerance=tol["perplexity"])
        values = ", ".join(f"{v.upper()} {by.loc[v, 'perplexity']:.1f}" for v in paper)
        lines.append(
            f"- **MLA, the best perplexity** (paper: 7.79 vs GQA 8.09 at 1.5B). Here MLA is {ppl} on held-out "
            f"perplexity ({values}). {_verdict(ppl.first)}")
    if "nsa" in paper:
        r = by.loc["nsa"]
        al = standing(table, "AL_s", "nsa", paper, tolerance=tol["AL_s"])
        aec = standing(table, "AEC_W", "nsa", paper, tolerance=tol["AEC_W"])
        lines.append(
            f"- **NSA, the lowest power but the slowest** (paper: rank 1 on AEC, rank 4 on AL). Here NSA is {al} on "
            f"AL ({r['AL_s']:.3f} s/iter{', the slowest' if al.last else ''}; ours is a dense reference "
            f"implementation, masks and no block-sparse kernel) and {aec} on AEC ({r['AEC_W']:.1f} W, estimated). "
            f"{_verdict(al.last, aec.first)}")
    return lines


def _position_findings(table: pd.DataFrame, by: pd.DataFrame, tol: dict[str, float]) -> list[str]:
    lines = []
    paper = _among(by, ["rope", "absolute", "learnable", "relative"])
    if len(paper) < 2:
        return lines
    if "rope" in paper:
        ppl = standing(table, "perplexity", "rope", paper, tolerance=tol["perplexity"])
        order = ", ".join(f"{v} {by.loc[v, 'perplexity']:.1f}" for v in by.loc[paper, "perplexity"].sort_values().index)
        lines.append(f"- **RoPE, the best perplexity** (paper: RoPE 8.09, Relative 8.29 at 1.5B; ranks RoPE, "
                     f"Learnable, Relative, Absolute). Here RoPE is {ppl}; best first: {order}. {_verdict(ppl.first)}")
    if "relative" in paper:
        r = by.loc["relative"]
        al = standing(table, "AL_s", "relative", paper, tolerance=tol["AL_s"])
        tt = standing(table, "TT", "relative", paper, lower_is_better=False, tolerance=tol["TT"])
        lines.append(
            f"- **Relative positions, the most efficient** (paper: rank 1 on AMU, AL, TT and AEC). Here the T5 "
            f"relative bias is {al} on AL ({r['AL_s']:.3f} s/iter) and {tt} on TT; it adds a (heads, q, k) bias to "
            f"every attention call, which rules out the fused causal path of scaled_dot_product_attention. "
            f"{_verdict(al.first, tt.first)}")
    if "none" in by.index and "rope" in by.index:
        gap = 100 * (by.loc["none", "perplexity"] / by.loc["rope", "perplexity"] - 1)
        lines.append(f"- **No positions (NoPE)**, not in the paper: perplexity {by.loc['none', 'perplexity']:.1f}, "
                     f"{gap:+.1f}% against RoPE; the causal mask alone carries order.")
    return lines


def _moe_findings(table: pd.DataFrame, by: pd.DataFrame, tol: dict[str, float]) -> list[str]:
    lines = []
    moe = next((v for v in ("moe-8x2", "moe-1.5Bx8") if v in by.index), None)
    small = next((v for v in ("dense-small", "dense-1.5B") if v in by.index), None)
    large = next((v for v in ("dense-large", "dense-3B") if v in by.index), None)
    if moe is None or small is None:
        return lines
    m, s = by.loc[moe], by.loc[small]
    gap = 100 * (m["perplexity"] / s["perplexity"] - 1)
    lines.append(
        f"- **MoE, better quality at the same active parameters** (paper: MoE 1.5Bx8 7.10 vs Dense 1.5B 8.09, "
        f"-12%). Here {moe} {m['perplexity']:.1f} vs {small} {s['perplexity']:.1f} ({gap:+.1f}%), at "
        f"{m['active_params_M']:.2f}M vs {s['active_params_M']:.2f}M active parameters. "
        f"{_verdict(_gap_claim(gap, tol['perplexity']))}")
    if large is not None:
        g = by.loc[large]
        gap_large = 100 * (m["perplexity"] / g["perplexity"] - 1)
        lines.append(
            f"- **MoE against a larger dense model** (paper: MoE 1.5Bx8 7.10 ahead of Dense 3B 7.58). Here {moe} "
            f"{m['perplexity']:.1f} vs {large} {g['perplexity']:.1f} ({gap_large:+.1f}%); {large} has the mixture's "
            f"total parameters ({g['params_M']:.2f}M vs {m['params_M']:.2f}M) but uses all of them for every token, "
            f"at {g['AL_s'] / m['AL_s']:.2f}x the mixture's step time. "
            f"{_verdict(_gap_claim(gap_large, tol['perplexity']))}")
    lines.append(
        f"- **...at more memory** (paper: AMU 76.5 vs 44.8 GB). Here {moe} holds {m['params_M'] / s['params_M']:.2f}x "
        f"{small}'s parameters (and its optimizer state); the process's AMU is {m['AMU_GB']:.3f} vs "
        f"{s['AMU_GB']:.3f} GB, mostly the Python and PyTorch baseline at this size. "
        + _verdict(m["params_M"] > s["params_M"],
                   _gap_claim(100 * (s["AMU_GB"] / m["AMU_GB"] - 1), tol["AMU_GB"])))
    lines.append(
        f"- **Throughput**: TT (tokens/parameter/s over all parameters) is {m['TT']:.4f} for {moe} vs {s['TT']:.4f} "
        f"for {small}; per active parameter {m['TT_active']:.4f} vs {s['TT_active']:.4f}. The paper ranks MoE "
        f"first on TT, which suggests it counted active parameters; here the expert dispatch (sort, split, one "
        f"matmul per expert) costs {m['AL_s'] / s['AL_s']:.2f}x the dense step time.")
    return lines
