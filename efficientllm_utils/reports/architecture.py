"""The architecture-pretraining studies' report (attention, positional encoding, MoE): what their book pages show,
computed from the records, per model (backbone size)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..paths import REPO_ROOT
from ..records import load_records
from .display import finish_panels, methods_legend, show, tradeoff_plots
from .findings import (Finding, common_caveats, decide_claims, findings_markdown, opening_summary,
                       variants_by_model)
from .leaderboard import Leaderboard, against_paper, rank_methods
from .load import StudyResults
from .verdicts import (Difference, bootstrap_ratio, point_difference, tracked_difference, widened,
                       within_group_spread)

AXIS = "architecture_pretraining"
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
    "attention_free": {"transformer": "Transformer", "mamba": "Mamba", "rwkv": "RWKV", "pythia": "Pythia"},
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


# the pretraining table's columns after model, variant and size: ours <- the record's column, or computed from them
_PRETRAINING_COLUMNS = {
    "perplexity": "quality_perplexity", "initial_loss": "quality_initial_loss", "final_loss": "quality_final_loss",
    "params_M": lambda df: df["params_total"] / 1e6, "active_params_M": lambda df: df["params_active"] / 1e6,
    "MFLOP_per_token": lambda df: df["flops_per_token"] / 1e6, "KV_bytes_per_token": "kv_cache_bytes_per_token",
    "KV_measured": "kv_cache_bytes_per_token_measured", "AMU_GB": "amu_gb", "peak_GB": "peak_memory_gb", "PCU": "pcu",
    "AL_s": "al_s", "AL_p90_s": "al_p90_s", "AL_CV": "al_cv", "TT": "tt_tokens_per_param_s",
    "TT_active": lambda df: df["train_tokens_per_s"] / df["params_active"], "tokens_per_s": "train_tokens_per_s",
    "AEC_W": "aec_w", "energy_J": "energy_j"}


def pretraining_table(res: StudyResults) -> pd.DataFrame:
    """One row per run of an architecture study: quality, sizes, analytical costs, training metrics, decoding
    at the longest context. Rows keep the order the runs were made in (the params file's)."""
    df = res.ok.sort_values("started") if len(res.ok) else res.ok
    if df.empty:
        return pd.DataFrame()
    contexts = decode_contexts(df)
    longest = contexts[-1] if contexts else None
    table = pd.DataFrame({
        "model": [model_key(res.study, r) for r in _params(df)],
        "variant": _variant_column(res, df).to_numpy(),
        "size": df["param_size"].to_numpy() if "param_size" in df else None,
        **{ours: (df[theirs] if isinstance(theirs, str) else theirs(df)).to_numpy()
           for ours, theirs in _PRETRAINING_COLUMNS.items()},
    })
    if table["size"].isna().all():
        table = table.drop(columns="size")
    if longest is not None:
        table["decode_context"] = longest
        for ours, metric in (("decode_s", "latency_s"), ("TPOT_s", "tpot_s"), ("TTFT_s", "ttft_s")):
            table[ours] = df[f"decode_ctx{longest}_{metric}"].to_numpy()
    return table.reset_index(drop=True)


def decode_curves(res: StudyResults) -> pd.DataFrame:
    """Decode timings per run and context length, long form: variant, (size), context, latency_s, ttft_s, ..."""
    df = res.ok.sort_values("started") if len(res.ok) else res.ok
    if df.empty:
        return pd.DataFrame()
    rows = []
    for (_, r), variant, params in zip(df.iterrows(), _variant_column(res, df), _params(df)):
        for context in decode_contexts(df):
            row = {"model": model_key(res.study, params), "variant": variant, "context": context}
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
        steps["variant"] = variant
        steps["model"] = model_key(res.study, record.params)
        steps["smoothed_loss"] = steps["lm_loss"].rolling(smooth, center=True, min_periods=1).mean()
        frames.append(steps)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def loss_plot(curves: pd.DataFrame):
    """Training loss against step, one line per variant (rolling mean; the raw steps are in the records)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    style = "model" if curves["model"].nunique() > 1 else None
    sns.lineplot(data=curves, x="step", y="smoothed_loss", hue="variant", style=style, ax=ax, lw=1.3)
    ax.set(xlabel="training step", ylabel="training loss (nats/token, rolling mean)")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return fig


def context_plot(curves: pd.DataFrame, panels: dict[str, str] | None = None):
    """Decode cost against context length, one line per variant (and size), one panel per timing."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    panels = panels or {"latency_s": "decode latency (s/request)", "tpot_s": "TPOT, median (s/output token)"}
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    style = "model" if curves["model"].nunique() > 1 else None
    contexts = sorted(curves["context"].unique())
    for ax, (column, label) in zip(axes[0], panels.items()):
        sns.lineplot(data=curves, x="context", y=column, hue="variant", style=style, markers=bool(style),
                     marker=None if style else "o", ax=ax, legend=ax is axes[0][-1])
        ax.set(xscale="log", xticks=contexts, xticklabels=contexts, xlabel="context (prompt tokens)", ylabel=label)
        ax.minorticks_off()
    return finish_panels(fig, axes)


def _params(frame: pd.DataFrame) -> list[dict]:
    """Each row's run parameters (``param_*`` columns) as a dict."""
    columns = [col for col in frame.columns if col.startswith("param_")]
    return [{col[len("param_"):]: v for col, v in zip(columns, row)} for row in frame[columns].itertuples(index=False)]


def model_key(study: str, params: dict) -> str:
    """Which model (backbone) a run trained, beside the part under study: its paper shape, or its hidden size and
    depth. The MoE study's variants set the shape themselves, so its paper shapes are one group."""
    size = params.get("size")
    if study == "attention_free":  # its models differ in shape by design: one group per paper size
        return f"Table 6 shapes, {size}" if isinstance(size, str) and size else "matched to the transformer"
    if isinstance(size, str) and size:
        return "Qwen2.5 shapes" if study == "moe" else f"Qwen2.5-style {size}"
    layers = int(params["n_layers"])
    return f"hidden {int(params['hidden_size'])}, {layers} layer{'s' if layers != 1 else ''}"


def leaderboard(study: str, table: pd.DataFrame) -> pd.DataFrame:
    """Our per-metric ranks, per model, of the variants the paper also trained (paper names)."""
    names = PAPER_ARCH_NAMES.get(study, {})
    ours = table[table["variant"].isin(names)]
    columns = [col for col in PRETRAINING_METRICS.values() if col in ours]
    ours = ours.groupby(["model", "variant"], sort=False)[columns].mean().reset_index()
    ours["method"] = ours["variant"].map(names)
    return rank_methods(ours, PRETRAINING_METRICS, {"Perf": False})


def leaderboards(study: str, table: pd.DataFrame) -> list[Leaderboard]:
    if table.empty:
        return []
    params = (table.groupby("model", sort=False)["params_M"].median() * 1e6).to_dict()
    return against_paper(leaderboard(study, table), AXIS, study, params)


# Relative gaps this small are ties: one run on a shared 2-core CPU does not resolve them. These are floors; repeated
# runs of the same model on a profile raise them (``noise_tolerances``). Perplexity has no floor: its noise is the
# spread over seeds (initial weights and data order) of runs the profile itself makes (``seed_runs``); a profile
# without seed runs decides no perplexity claim.
TIE_TOLERANCE = {"AL_s": 0.05, "TT": 0.05, "decode_s": 0.05, "AEC_W": 0.05, "AMU_GB": 0.02}
NO_SEED_RUNS = "no seed runs on this profile: the perplexity noise is unknown"

# settings that only one kind of architecture reads: two runs that differ only in these trained the same model
_ONLY_FOR = {"mla": ("kv_lora_rank",), "nsa": ("compress_block", "compress_stride", "select_block", "n_selected",
                                               "window"),
             "moe": ("n_experts", "moe_top_k", "moe_intermediate_size")}


def _effective_settings(params: dict, without: tuple[str, ...] = ()) -> str:
    """A run's settings without its name, without the fields its architecture ignores and without ``without``."""
    ignored = {"variant", *without}
    for kind, fields in _ONLY_FOR.items():
        if kind not in (params.get("attention"), params.get("ffn")):
            ignored.update(fields)
    return json.dumps({k: v for k, v in params.items() if k not in ignored}, sort_keys=True)


def _pretraining_runs(profile: str, root: Path | None = None) -> pd.DataFrame:
    """Every successful run of the three architecture studies on ``profile``, one row each, with its settings
    (``settings``: all of them; ``model``: all but the seed), costs and perplexity."""
    rows = []
    for study in STUDY_FIELD:
        for record in load_records(study, profile, root):
            if record.status != "ok":
                continue
            contexts = decode_contexts(pd.DataFrame(columns=list(record.metrics)))
            m = record.metrics
            rows.append({"study": study, "run": record.label, "seed": record.params.get("seed", 0),
                         "settings": _effective_settings(record.params),
                         "model": _effective_settings(record.params, ("seed",)),
                         "perplexity": record.quality.get("perplexity"), "AL_s": m["al_s"].value,
                         "AMU_GB": m["amu_gb"].value, "AEC_W": m["aec_w"].value, "TT": m["tt_tokens_per_param_s"].value,
                         "decode_s": m[f"decode_ctx{contexts[-1]}_latency_s"].value if contexts else None})
    return pd.DataFrame(rows)


def _groups(frame: pd.DataFrame, by: str, keep) -> pd.DataFrame:
    """The rows of ``frame`` in groups of ``by`` that ``keep(group)`` accepts, numbered in ``group``."""
    if frame.empty:
        return pd.DataFrame()
    kept = frame[frame.groupby(by)["run"].transform(lambda g: keep(frame.loc[g.index]))].copy()
    if kept.empty:
        return pd.DataFrame()
    kept.insert(0, "group", kept.groupby(by, sort=False).ngroup() + 1)
    return kept.drop(columns=["settings", "model"]).reset_index(drop=True)


def repeated_runs(profile: str, root: Path | None = None) -> pd.DataFrame:
    """Runs of the architecture studies that trained the very same model with the same settings, seed included (the
    GQA, RoPE, dense-FFN reference appears in all three studies), one row per run, with their costs and perplexity;
    ``group`` numbers the sets of identical settings."""
    return _groups(_pretraining_runs(profile, root), "settings", lambda g: len(g) > 1)


def seed_runs(profile: str, root: Path | None = None) -> pd.DataFrame:
    """Runs of the architecture studies that trained the same model with different seeds (the MoE study's
    ``dense-small-seed*`` variants beside the reference), one row per run; ``group`` numbers the models."""
    return _groups(_pretraining_runs(profile, root), "model", lambda g: g["seed"].nunique() > 1)


def noise_tolerances(profile: str, root: Path | None = None) -> dict[str, float]:
    """Tie tolerances: ``TIE_TOLERANCE``, raised to the largest relative spread (max / min - 1) that repeated runs
    of the very same model showed *within* a group of identical settings on this profile (two different models
    differ by more than noise, so their spread is never counted); perplexity's: the largest spread within a group of
    runs that differ only in their seed (NaN without such runs: no perplexity claim is decided)."""
    tolerances = dict(TIE_TOLERANCE)
    repeats = repeated_runs(profile, root)
    for column in tolerances:
        if column in repeats:
            spread = within_group_spread(repeats, "group", column)
            if spread is not None:
                tolerances[column] = max(tolerances[column], spread)
    seeds = seed_runs(profile, root)
    spread = within_group_spread(seeds, "group", "perplexity") if "perplexity" in seeds else None
    tolerances["perplexity"] = float("nan") if spread is None else spread
    return tolerances


# --- findings -----------------------------------------------------------------------------------

METRIC_WORDS = {"AL_s": "the training step time (AL)", "TT": "the training throughput (TT)",
                "AMU_GB": "the memory in use (AMU)", "AEC_W": "the average power (AEC)",
                "perplexity": "the held-out perplexity"}


def _timed_steps(record) -> list[dict]:
    return record.raw.get("steps", [])[record.params.get("timing_warmup_steps", 0):]


def compare(record_a, record_b, metric: str, tolerance: float) -> Difference | None:
    """The difference of two runs on one metric: step times (AL) and per-step throughput (TT) by a bootstrap
    interval over their timed steps, widened by ``tolerance`` (the spread of identical runs: the steps of one run
    vary less than two runs do on a shared machine, as in the DiT chapter); perplexity and memory by the noise
    ``tolerance``; estimated energy never."""
    if metric in ("AL_s", "TT"):
        a, b = (_timed_steps(r) for r in (record_a, record_b))
        if not (a and b):
            return None
        if metric == "AL_s":
            diff = bootstrap_ratio([s["seconds"] for s in a], [s["seconds"] for s in b])
        else:
            diff = bootstrap_ratio(*[[s["tokens"] / s["seconds"] / r.metrics["params_total"].value for s in steps]
                                       for r, steps in ((record_a, a), (record_b, b))])
        return widened(diff, tolerance, "the run-to-run spread")
    if metric == "perplexity":
        if not np.isfinite(tolerance):
            a, b = record_a.quality["perplexity"], record_b.quality["perplexity"]
            return Difference(a / b - 1, -np.inf, np.inf, NO_SEED_RUNS)
        return point_difference(record_a.quality["perplexity"], record_b.quality["perplexity"], tolerance,
                                  "the spread over seeds")
    if metric == "MFLOP_per_token":  # analytical: exact, no noise
        key = "flops_per_token"
        return point_difference(record_a.metrics[key].value, record_b.metrics[key].value, 0.0,
                                  "analytical, exact")
    key = {"AMU_GB": "amu_gb", "AEC_W": "aec_w"}[metric]
    return tracked_difference(record_a.metrics[key], record_b.metrics[key], tolerance)


def _records_by(res: StudyResults) -> dict[tuple[str, str], object]:
    """(model, variant) -> record; repeated runs of one (model, variant): the latest."""
    field = STUDY_FIELD.get(res.study, "variant")
    runs = sorted(res.ok_records, key=lambda r: r.started or "")
    return {(model_key(res.study, r.params), r.params.get(field) or r.label): r for r in runs}


def findings(res: StudyResults, tolerances: dict[str, float] | None = None) -> list[Finding]:
    """The chapter's claims (``book/paper/claims.csv``) on every model; ``tolerances`` (relative, per column;
    default ``noise_tolerances`` of the profile) are the noise of single values."""
    tol = {**TIE_TOLERANCE, **(tolerances if tolerances is not None else noise_tolerances(res.profile))}
    runs = _records_by(res)
    variants = variants_by_model(runs)

    def run_compare(claim, model, subject, baseline):
        given, noise = claim["tolerance"], tol.get(claim["metric"], 0.0)
        tolerance = noise if given == "noise" or not np.isfinite(noise) else max(float(given or 0), noise)
        return compare(runs[model, subject], runs[model, baseline], claim["metric"], tolerance)

    return decide_claims(res.study, AXIS, variants, run_compare, METRIC_WORDS)


def observations(study: str, table: pd.DataFrame) -> list[str]:
    """Numbers beside the claims that the paper does not state (no verdict)."""
    out = []
    for model, group in table.groupby("model", sort=False):
        by = group.groupby("variant", sort=False).mean(numeric_only=True)
        prefix = f"{model}: " if table["model"].nunique() > 1 else ""
        if study == "positional_encoding" and {"none", "rope"} <= set(by.index):
            gap = 100 * (by.loc["none", "perplexity"] / by.loc["rope", "perplexity"] - 1)
            out.append(f"{prefix}no positions (NoPE, not in the paper): perplexity {by.loc['none', 'perplexity']:.1f}, "
                       f"{gap:+.1f}% against RoPE's {by.loc['rope', 'perplexity']:.1f}.")
        if study == "attention" and "KV_bytes_per_token" in by:
            kv = by["KV_bytes_per_token"].sort_values()
            out.append(f"{prefix}KV cache per token (analytical, all layers): "
                       + ", ".join(f"{v} {b:,.0f} B" for v, b in kv.items()) + ".")
        if study == "moe":
            moe = [v for v in by.index if v.startswith("moe")]
            dense = [v for v in by.index if v.startswith("dense")]
            for m in moe[:1]:
                for d in dense[:1]:
                    out.append(f"{prefix}{m} holds {by.loc[m, 'params_M'] / by.loc[d, 'params_M']:.2f}x {d}'s "
                               f"parameters at {by.loc[m, 'active_params_M'] / by.loc[d, 'active_params_M']:.2f}x its "
                               f"active ones; its step takes {by.loc[m, 'AL_s'] / by.loc[d, 'AL_s']:.2f}x as long.")
    return out


def caveats(res: StudyResults, table: pd.DataFrame, tolerances: dict[str, float]) -> list[str]:
    params = (table.groupby("model", sort=False)["params_M"].median() * 1e6).to_dict() if len(table) else {}
    out = common_caveats(res, params, 0.5e9)
    if res.study == "attention" and len(table) and (table["variant"] == "nsa").any():
        out.append("NSA ran as a dense-masked reference (its branches over the full score matrix, no block-sparse "
                   "kernel), so its step time cannot fall below full attention's by construction: the claim that NSA "
                   "is the slowest is decided on that implementation, and the paper's speed point (block-sparse "
                   "selection cheaper at long context) is not tested here.")
    perplexity = tolerances.get("perplexity", float("nan"))
    out.append("Perplexity counts as different only beyond its noise, the largest spread over seeds of runs that "
               "differ only in their seed (the table above): "
               + (f"{100 * perplexity:.1f}% here." if np.isfinite(perplexity) else
                  "this profile has no such runs, so no perplexity claim is decided.")
               + f" Memory (AMU) counts as different beyond {100 * tolerances['AMU_GB']:.0f}% (the larger of a 2% "
               "floor and the spread of identical runs). Step times (AL) and throughput (TT) are compared by a "
               "bootstrap interval over each run's timed steps, widened on either side by the spread of identical "
               f"runs ({100 * tolerances['AL_s']:.1f}% for AL, {100 * tolerances['TT']:.1f}% for TT, at least 5%), "
               "then held to a margin of 3%: two identical runs differ by more than one run's steps do.")
    return out


def findings_text(res: StudyResults, table: pd.DataFrame, tolerances: dict[str, float] | None = None) -> str:
    if table.empty:
        return "*No results yet.*"
    tol = {**TIE_TOLERANCE, **(tolerances if tolerances is not None else noise_tolerances(res.profile))}
    return findings_markdown(findings(res, tol), observations(res.study, table), caveats(res, table, tol))


def summary(res: StudyResults, table: pd.DataFrame) -> str:
    """The chapter's opening lines: what this run found, per model, from the records."""
    if table.empty:
        return f"*No results yet: run `make reproduce AXIS={res.study}`.*"

    def per_model(model: str, group: pd.DataFrame) -> str:
        by = group.groupby("variant", sort=False).mean(numeric_only=True)
        return (f" ({by['params_M'].median():.2f}M parameters): the lowest perplexity is "
                f"{by['perplexity'].idxmin()}'s ({by['perplexity'].min():.1f}), the fastest step "
                f"{by['AL_s'].idxmin()}'s ({by['AL_s'].min():.3g} s/step), the slowest "
                f"{by['AL_s'].idxmax()}'s ({by['AL_s'].max():.3g} s/step).")
    return opening_summary(f"pretrained {table['variant'].nunique()} variant(s) on {table['model'].nunique()} model "
                           "shape(s)", findings(res), table, per_model)


# --- what the pages show: table column -> header with its unit, split into tables a 1280 px page holds ---------

QUALITY_COLUMNS = {"model": "model", "variant": "variant", "size": "shape", "perplexity": "perplexity",
                   "final_loss": "final loss (nats/token)", "params_M": "parameters (M)",
                   "active_params_M": "active parameters (M)", "MFLOP_per_token": "forward (MFLOP/token)",
                   "KV_bytes_per_token": "KV cache (bytes/token)", "KV_measured": "KV cache measured (bytes/token)"}
TRAINING_COLUMNS = {"model": "model", "variant": "variant", "AL_s": "AL (s/step)", "AL_p90_s": "p90 step (s)",
                    "AL_CV": "step time CV", "TT": "TT (tokens/param/s)", "TT_active": "TT active (tokens/param/s)",
                    "AMU_GB": "AMU (GB)", "PCU": "PCU (%)", "AEC_W": "AEC (W)", "energy_J": "energy (J)"}
DECODE_COLUMNS = {"model": "model", "variant": "variant", "decode_context": "prompt (tokens)",
                  "decode_s": "decode (s/request)", "TTFT_s": "TTFT (s)", "TPOT_s": "TPOT (s/token)"}
LEGEND = {"params_total": "parameters", "params_active": "active parameters", "flops_per_token": "forward FLOPs",
          "kv_cache_bytes_per_token": "KV cache", "kv_cache_bytes_per_token_measured": "KV cache measured",
          "amu_gb": "AMU", "pcu": "PCU", "al_s": "AL", "tt_tokens_per_param_s": "TT", "aec_w": "AEC"}
REPEAT_COLUMNS = {"group": "group of identical runs", "study": "study", "run": "run", "perplexity": "perplexity",
                  "AL_s": "AL (s/step)", "AMU_GB": "AMU (GB)", "AEC_W": "AEC (W)", "TT": "TT (tokens/param/s)",
                  "decode_s": "decode (s/request)"}


def show_tables(table: pd.DataFrame) -> None:
    """The chapter's result tables: quality and size, training costs, decoding (one model column only when the
    runs trained several)."""
    from IPython.display import display

    drop = {"model"} if len(table) and table["model"].nunique() == 1 else set()
    for columns in (QUALITY_COLUMNS, TRAINING_COLUMNS, DECODE_COLUMNS):
        display(show(table, {k: v for k, v in columns.items() if k not in drop},
                       {"decode_context": "{:.0f}", "KV_bytes_per_token": "{:,.0f}", "KV_measured": "{:,.0f}"}))


def legend(res: StudyResults):
    return show(methods_legend(res, {**LEGEND, **{f"decode_ctx{ctx}_latency_s": "decode"
                                                      for ctx in decode_contexts(res.ok)[-1:]}}),
                  {"metric": "metric", "how obtained": "how obtained"})


def show_repeats(profile: str):
    repeats = repeated_runs(profile)
    if repeats.empty:
        from IPython.display import Markdown
        return Markdown("*No repeated runs on this profile.*")
    return show(repeats, REPEAT_COLUMNS)


SEED_COLUMNS = {"group": "model", "study": "study", "run": "run", "seed": "seed", "perplexity": "perplexity"}


def show_seed_runs(profile: str) -> list:
    """The runs that differ only in their seed, whose perplexity spread is the perplexity noise, and that spread
    (what to ``display``)."""
    from IPython.display import Markdown

    seeds = seed_runs(profile)
    if seeds.empty:
        return [Markdown(f"*No seed runs on this profile ({NO_SEED_RUNS}).*")]
    spread = within_group_spread(seeds, "group", "perplexity")
    return [show(seeds, SEED_COLUMNS, {"seed": "{:.0f}", "group": "{:.0f}"}), Markdown(
        f"Perplexity spread over seeds (max / min - 1 within a model): **{100 * spread:.1f}%**, the perplexity "
        "noise of the findings below.")]


def perplexity_plots(table: pd.DataFrame, costs: dict[str, str]):
    """Perplexity against each cost (``costs``: column -> axis label with its unit)."""
    return tradeoff_plots(table, "perplexity", costs, hue="variant", higher_is_better=False,
                            quality_label="held-out perplexity", style="model")


# --- against the machine's limits (reports/roofline.py) -----------------------------------------

def run_label(res: StudyResults):
    """A run's name in the roofline section: the value of the study's swapped field."""
    field = {**STUDY_FIELD, "attention_free": "architecture"}.get(res.study, "variant")
    return lambda r: str(r.params.get(field) or r.label)


def show_roofline(res: StudyResults) -> None:
    """Training MFU, and the longest context's prefill MFU and decode MBU, per run (``reports.roofline``)."""
    from . import roofline as rl

    contexts = sorted({c_ for r in res.ok_records for c_ in r.params.get("decode_contexts", [])})
    longest = contexts[-1] if contexts else None
    metrics = {"train_mfu": "training-step MFU"}
    if longest:
        metrics |= {f"decode_ctx{longest}_prefill_mfu": f"prefill MFU ({longest} tokens)",
                    f"decode_ctx{longest}_mbu": f"decode MBU (context {longest})"}
    metrics["pcu"] = "PCU (NVML utilization.gpu)"
    rl.show_section(res, run_label(res), metrics, lambda name: name == f"decode-ctx{longest}",
                    f"decode_ctx{longest}_mbu")


# --- our modules against transformers' (benchmarks/arch_vs_hf.py) -------------------------------------------------

MODULE_TIMINGS = REPO_ROOT / "benchmarks" / "arch_vs_hf.json"  # written by ``arch_vs_hf --json``


def module_timings(path: Path = MODULE_TIMINGS) -> list:
    """The committed run of ``benchmarks.arch_vs_hf``: a sentence naming the machine, date, threads and load from
    its own provenance, and the table of median and p90 milliseconds per module and pass with the ratio ours/HF
    (what to ``display``)."""
    from IPython.display import Markdown

    if not Path(path).exists():
        return [Markdown(f"*No committed run of the module benchmark (`{Path(path).name}`).*")]
    run = json.loads(Path(path).read_text())
    hardware = run["provenance"].get("hardware", {}).get("summary") or "an unrecorded machine"
    load = (run["provenance"].get("load_average") or {}).get("5m")
    rows = []
    for r in run["rows"]:
        ours, ref = pd.Series(r["ours_s"]) * 1e3, pd.Series(r["reference_s"]) * 1e3
        rows.append({"module": r["module"], "HF reference": r["reference"], "pass": r["pass"],
                     "ours median (ms)": ours.median(), "ours p90 (ms)": ours.quantile(0.9, interpolation="nearest"),
                     "HF median (ms)": ref.median(), "HF p90 (ms)": ref.quantile(0.9, interpolation="nearest"),
                     "ours/HF": ours.median() / ref.median()})
    table = pd.DataFrame(rows)
    shape = "x".join(str(n) for n in run["input_shape"])
    cores = run["provenance"].get("hardware", {}).get("logical_cores")
    busy = load is not None and cores and load > cores + 1
    text = (f"Measured {run['finished'][:10]} on {hardware} ({run['device']}, {run['threads']} threads, "
            f"{run['dtype']}, torch {run['torch']}), input {shape}, {run['reps']} repetitions after {run['warmup']} "
            "warm-up" + (f"; 5-minute load average {load:.1f} when it ended" if load is not None else "") + "."
            + (f" The machine was far busier than its {cores} cores: absolute times are inflated several-fold, and "
               "even the ratios move from run to run (a p90 far above its median marks a stall); read them as "
               "rough." if busy else ""))
    return [Markdown(text), show(table, {k: k for k in table.columns}, {"ours/HF": "{:.2f}"})]
