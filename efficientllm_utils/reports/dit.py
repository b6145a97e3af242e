"""What the DiT chapter shows: the runs' table, sample grids, the paper's Table 10/11 beside ours, quality
against cost, and findings whose verdicts are computed from the records (no torch import)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..records import GRID_FILE, RESULTS_DIR, run_dir
from . import display
from .findings import Finding, decide_claims, findings_markdown
from .load import StudyResults, load_study
from .paper import published_figures
from .verdicts import Difference, bootstrap_ratio, point_difference, tracked_difference, widened

AXIS = "vision"  # the axis of the paper's DiT tables in published_figures.csv
METRIC_WORDS = {"FD": "FD (EfficientNet-Lite0)", "AL_s": "the training step time (AL)", "AMU_GB": "AMU"}
PAPER_TABLES = {"dit_attention": 10, "dit_moe": 11}
PAPER_METHOD = {"MHA": "mha", "MQA": "mqa", "GQA": "gqa", "MLA": "mla", "NSA": "nsa", "Dense": "dense",
                "MoE": "moe-8x2"}
COLUMNS = {  # our column <- record column
    "FD": "quality_fd", "FD_untrained": "quality_fd_init", "FD_noise_floor": "quality_fd_noise_floor",
    "heldout_loss": "quality_heldout_loss", "heldout_loss_init": "quality_heldout_loss_init",
    "final_loss": "quality_final_loss",
    "AL_s": "al_s", "AL_p90_s": "al_p90_s", "TT": "tt_tokens_per_param_s", "AMU_GB": "amu_gb",
    "peak_GB": "peak_memory_gb", "AEC_W": "aec_w", "energy_J": "energy_j",
    "sample_s_per_image": "sample_latency_s_per_image",
}
# what the pages show: table column -> header with its unit (``display.show``: no index, readable numbers)
HEADERS = {
    "variant": "variant", "params_M": "parameters (M)", "active_params_M": "active parameters (M)",
    "GFLOP_per_step": "training (GFLOP/step)", "FD": "FD", "FD_untrained": "FD untrained",
    "FD_noise_floor": "FD noise floor", "heldout_loss": "held-out loss", "AL_s": "AL (s/step)",
    "AL_p90_s": "p90 step (s)", "TT": "TT (tokens/param/s)", "AMU_GB": "AMU (GB)", "peak_GB": "peak memory (GB)",
    "AEC_W": "AEC (W, estimated)", "sample_s_per_image": "sampling (s/image)",
    "our_FD_rank": "our FD rank", "paper_model": "paper's model", "paper_FID": "paper's FID",
    "paper_FID_rank": "paper's FID rank", "paper_AMU": "paper's AMU (GB)",
    "model": "model", "method": "method", "metric": "metric", "value": "value", "unit": "unit",
    "source": "source", "confidence": "confidence",
}


def show(table: pd.DataFrame, columns: list[str]):
    """``table``'s ``columns`` as a page shows them, with ``HEADERS``."""
    return display.show(table, {k: HEADERS.get(k, k) for k in columns})


MIN_COST_TOLERANCE = 0.02  # cost gaps under 2% are ties even when the repeated run agrees more closely


def variant_of(frame: pd.DataFrame) -> pd.Series:
    """The attention kind (attention study) or the variant name (MoE study) of each run."""
    if "param_variant" in frame and frame["param_variant"].notna().any():
        return frame["param_variant"]
    return frame["param_attention"]


def dit_table(res: StudyResults) -> pd.DataFrame:
    """One row per successful run: the variant, its shape, quality and costs in the chapter's units."""
    ok = res.ok
    if not len(ok):
        return pd.DataFrame()
    table = pd.DataFrame({"variant": variant_of(ok).values, "run_id": ok["run_id"].values})
    table["model"] = ok["param_model"].fillna("custom").values if "param_model" in ok else "custom"
    table["params_M"] = ok["params_total"].values / 1e6
    table["active_params_M"] = ok["params_active"].values / 1e6
    table["GFLOP_per_step"] = ok["flops_per_step"].values / 1e9
    for ours, theirs in COLUMNS.items():
        table[ours] = ok[theirs].values if theirs in ok else np.nan
    table["FD_gain"] = table["FD_untrained"] - table["FD"]
    return table


def sample_grids(res: StudyResults, root: Path | None = None) -> list[tuple[str, Path]]:
    """(variant, path of its samples.png) for every successful run that saved a grid."""
    table = dit_table(res)
    out = []
    for variant, run_id in zip(table.get("variant", []), table.get("run_id", []), strict=False):
        path = run_dir(res.study, res.profile, run_id, root or RESULTS_DIR) / GRID_FILE
        if path.exists():
            out.append((variant, path))
    return out


def paper_figures(study: str) -> pd.DataFrame:
    """The paper's Table 10 (attention) or 11 (MoE) figures that our sources hold (second-hand summaries)."""
    figures = published_figures()
    rows = figures[(figures["axis"] == "vision") & (figures["table"] == PAPER_TABLES[study])]
    return rows[["model", "method", "metric", "value", "unit", "source", "confidence"]].reset_index(drop=True)


def _paper_value(study: str, method: str, metric: str) -> float:
    rows = paper_figures(study)
    return float(rows[(rows["method"] == method) & (rows["metric"] == metric)]["value"].iloc[0])


def paper_claims() -> str:
    """The paper's DiT claims this chapter tests, its figures read from ``book/paper/published_figures.csv``."""
    a, m = "dit_attention", "dit_moe"
    return (f"In its Table 10 (as summarised in our sources) **MQA and GQA reached far better FID than MHA at "
            f"DiT-XL/2** ({_paper_value(a, 'MQA', 'FID'):g} and {_paper_value(a, 'GQA', 'FID'):g} against "
            f"{_paper_value(a, 'MHA', 'FID'):g}); in Table 11 **an 8-expert DiT-B/4 beat the dense one** (FID "
            f"{_paper_value(m, 'MoE', 'FID'):g} against {_paper_value(m, 'Dense', 'FID'):g}) **at more memory** (AMU "
            f"{_paper_value(m, 'MoE', 'AMU'):g} against {_paper_value(m, 'Dense', 'AMU'):g} GB).")


def scale_note(res: StudyResults) -> str:
    """What the runs' scale is, from their records: parameters, steps, images seen, held-out split."""
    ok = res.ok_records
    if not ok:
        return ""
    r = ok[0]
    p, params = r.params, r.metrics.get("params_total")
    seen = p.get("steps", 0) * p.get("batch_size", 0)
    size = f"about {params.value / 1e6:.2g}M parameters" if params is not None and params.value else "a small DiT"
    return (f"This profile (**{res.profile}**) trains a DiT of {size} for {p.get('steps')} steps of "
            f"{p.get('batch_size')} images ({seen:,} images seen), from the run's record.")


def leaderboard(study: str, table: pd.DataFrame) -> pd.DataFrame:
    """Our FD and AMU with ranks (1 = best) beside the paper's FID and AMU for the same methods."""
    if not len(table):
        return pd.DataFrame()
    ours = table[["variant", "FD", "AMU_GB", "AL_s"]].copy()
    ours["our_FD_rank"] = ours["FD"].rank(method="min").astype(int)
    paper = paper_figures(study)
    paper = paper.assign(variant=paper["method"].map(PAPER_METHOD))
    wide = paper.pivot_table(index="variant", columns="metric", values="value", aggfunc="first")
    wide.columns = [f"paper_{c}" for c in wide.columns]
    models = paper.groupby("variant")["model"].first().rename("paper_model")
    side = ours.merge(wide, left_on="variant", right_index=True, how="left").merge(
        models, left_on="variant", right_index=True, how="left")
    if "paper_FID" in side:
        side["paper_FID_rank"] = side["paper_FID"].rank(method="min")
    return side


def tradeoff_plot(table: pd.DataFrame, costs: dict[str, str]):
    """FD against each cost, one panel per cost; lower-left is better. The dashed line is the noise floor."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, len(costs), figsize=(4.2 * len(costs), 3.6), squeeze=False)
    for ax, (column, label) in zip(axes[0], costs.items(), strict=True):
        sns.scatterplot(data=table, x=column, y="FD", hue="variant", s=70, ax=ax, legend=ax is axes[0][0])
        for _, row in table.iterrows():
            ax.annotate(row["variant"], (row[column], row["FD"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
        floor = table["FD_noise_floor"].iloc[0]
        ax.axhline(floor, ls="--", color="grey", lw=1)
        ax.set(xlabel=label, ylabel="FD (EfficientNet-Lite0), lower is better")
    axes[0][0].text(0.02, 0.02, "dashed: noise floor (two real halves)", transform=axes[0][0].transAxes, fontsize=8)
    fig.tight_layout()
    return fig


def loss_plot(res: StudyResults):
    """Training flow-matching loss per step (moving average of 5), one line per variant."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = []
    for record in res.records:
        if record.status != "ok":
            continue
        name = record.params.get("variant") or record.params.get("attention")
        losses = pd.Series([s["flow_loss"] for s in record.raw.get("steps", [])]).rolling(5, min_periods=1).mean()
        rows += [{"variant": name, "step": i, "loss": v} for i, v in enumerate(losses)]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.4))
    sns.lineplot(data=pd.DataFrame(rows), x="step", y="loss", hue="variant", ax=ax, lw=1)
    ax.set(ylabel="flow-matching loss (train, smoothed)")
    fig.tight_layout()
    return fig


# --- findings -----------------------------------------------------------------------------------

def cost_tolerances(profile: str, root: Path | None = None) -> dict[str, float]:
    """Relative run-to-run spread of each cost, from the MHA-dense DiT that both studies train with identical
    settings (at least ``MIN_COST_TOLERANCE``)."""
    attention, moe = load_study("dit_attention", profile, root), load_study("dit_moe", profile, root)
    a, m = dit_table(attention), dit_table(moe)
    tolerances = {c: MIN_COST_TOLERANCE for c in ("AL_s", "AMU_GB", "AEC_W", "TT", "sample_s_per_image")}
    if len(a) and len(m) and (a["variant"] == "mha").any() and (m["variant"] == "dense").any():
        first, second = a[a["variant"] == "mha"].iloc[0], m[m["variant"] == "dense"].iloc[0]
        for column in tolerances:
            mean = (first[column] + second[column]) / 2
            if mean:
                tolerances[column] = max(MIN_COST_TOLERANCE, abs(first[column] - second[column]) / abs(mean))
    return tolerances


def _timed_seconds(record) -> list[float]:
    """The step times after the run's timing warm-up, from the record's raw steps."""
    return [s["seconds"] for s in record.raw.get("steps", [])[record.params.get("timing_warmup_steps", 0):]]


def fd_difference(fd_a: float | None, fd_b: float | None, floor: float | None) -> Difference | None:
    """Two FDs (one sample set each) as a single value whose noise is the noise floor: the FD of real images
    against the same reference, made relative to the baseline's FD (the vision chapters' rule); None without all
    three."""
    if None in (fd_a, fd_b, floor) or not fd_b:
        return None
    return point_difference(fd_a, fd_b, floor / fd_b, f"the noise floor, FD {floor:.1f}")


def compare(record_a, record_b, metric: str, tolerance: float) -> Difference | None:
    """The difference of two runs on one metric by ``reports.verdicts``' rules: FD as a single value whose noise is
    the noise floor (an absolute FD, made relative to the baseline's); AL by a bootstrap interval over the timed
    steps, widened by ``tolerance``; AMU by the tracker's values within ``tolerance``. ``tolerance`` is the metric's
    run-to-run spread, from the MHA DiT that both studies train with identical settings (``cost_tolerances``)."""
    if metric == "FD":
        return fd_difference(record_a.quality.get("fd"), record_b.quality.get("fd"),
                             record_b.quality.get("fd_noise_floor"))
    if metric == "AL_s":
        a, b = _timed_seconds(record_a), _timed_seconds(record_b)
        if not (a and b):
            return None
        # the steps of one run vary less than two runs do on a shared machine: widen by the measured spread
        return widened(bootstrap_ratio(a, b), tolerance, "the run-to-run spread")
    key = {"AMU_GB": "amu_gb"}[metric]
    if key not in record_a.metrics or key not in record_b.metrics:
        return None
    return tracked_difference(record_a.metrics[key], record_b.metrics[key], tolerance)


def claim_findings(res: StudyResults, tolerances: dict[str, float] | None = None) -> list[Finding]:
    """The paper's DiT claims (``book/paper/claims.csv``, chapter = the study) tested on the runs' records."""
    tol = tolerances or {}
    runs = {(r.params.get("variant") or r.params.get("attention")): r
            for r in sorted(res.ok_records, key=lambda r: r.started or "")}

    def run_compare(claim, model, subject, baseline):
        return compare(runs[subject], runs[baseline], claim["metric"], tol.get(claim["metric"], MIN_COST_TOLERANCE))

    return decide_claims(res.study, AXIS, {"": list(runs)}, run_compare, METRIC_WORDS)


def learned_lines(table: pd.DataFrame) -> list[str]:
    """The issue's criterion per variant: FD below the untrained model's by more than the noise floor; and
    whether the held-out loss fell."""
    floor = float(table["FD_noise_floor"].iloc[0])
    beaten = table["FD_gain"] > floor
    loss_fell = table["heldout_loss"] < table["heldout_loss_init"]
    return [
        f"- **Every variant learned** (FD below its untrained initialisation's by more than the noise floor, "
        f"{floor:.1f}): **{'holds' if beaten.all() else 'does not hold'}** -- "
        + "; ".join(f"{r.variant} {r.FD:.1f} vs {r.FD_untrained:.1f} untrained, gain {r.FD_gain:.1f}: "
                    f"{'learned' if gain else 'not beyond the floor'}"
                    for r, gain in zip(table.itertuples(), beaten, strict=True)) + ".",
        f"- **Every variant lowered its held-out flow-matching loss** below its untrained initialisation's: "
        f"**{'holds' if loss_fell.all() else 'does not hold'}** -- "
        + ", ".join(f"{r.variant} {r.heldout_loss:.3f} vs {r.heldout_loss_init:.3f}" for r in table.itertuples())
        + ". Where this holds and the FD line above does not, the model learned the denoising objective but not "
          "yet samples that look more like the held-out images than noise does, in EfficientNet-Lite0's features.",
    ]


def findings(res: StudyResults, table: pd.DataFrame, tolerances: dict[str, float] | None = None) -> str:
    """Markdown: whether every variant learned, then each of the paper's claims with the numbers behind it and its
    verdict (``agrees``, ``disagrees``, ``inconclusive``, by ``reports.verdicts``' rules)."""
    if not len(table):
        return "*No results yet.*"
    found = claim_findings(res, tolerances)
    claims_text = findings_markdown(found) if found else "*The runs the paper's claims need are not here.*"
    return "\n".join(learned_lines(table)) + "\n\n**The paper's claims**\n\n" + claims_text
