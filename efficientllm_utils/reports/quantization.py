"""The quantization study's report: what ``book/quantization.md`` shows, computed from the records, per model."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import precisions
from .display import methods_legend, model_label, show
from .findings import (Finding, common_caveats, decide_claims, findings_markdown, variants_by_model,
                       verdict_counts)
from .leaderboard import Leaderboard, against_paper, rank_methods
from .load import StudyResults
from .paper import paper_figures
from .verdicts import (MIN_SAMPLES, Difference, bootstrap_ratio, mean_interval, paired_accuracy, point_difference,
                       tracked_difference)

AXIS, GROUP = "inference", "quantization"
# The paper's leaderboard methods (its Table 9) and the precision each is compared through: the first registered that
# stands for it (int4: bitsandbytes' NF4)
PAPER_METHODS = ("bfloat16", "float16", "int4")
PAPER_PRECISION_NAMES = {precisions.representative(m): m for m in PAPER_METHODS}
LEADERBOARD_METRICS = {"Perf": "accuracy", "AMU": "AMU_GB", "AL": "AL_s", "IT": "IT_tok_s", "AEC": "AEC_W", "MCR": "MCR"}
# float precisions: counted bytes -> parameters
BYTES_PER_PARAM = {p.name: p.planned_linear_bytes(1, 0) for p in precisions.all_precisions() if p.is_float}
MIN_ITEMS = 200  # fewer scored items per run than this: the chapter says accuracy resolves only large differences

# table column -> header (with unit), in the order shown; split into tables a 1280 px page holds
QUALITY_COLUMNS = {"model": "model", "precision": "precision", "accuracy": "accuracy (mean over tasks)",
                   "accuracy_change_pct": "accuracy change (%)", "perplexity": "perplexity",
                   "kl": "KL to reference (nats/token)", "top1": "top-1 agreement (fraction)",
                   "flip_rate": "answer flip rate (fraction)"}
SIZE_COLUMNS = {"model": "model", "precision": "precision", "model_MB": "model size (MB)",
                "linear_weights_MB": "linear weights (MB)", "compression": "compression (x)", "MCR": "MCR",
                "AMU_GB": "AMU (GB)", "PCU": "PCU (%)"}
SPEED_COLUMNS = {"model": "model", "precision": "precision", "AL_s": "AL (s/request)", "p90_s": "p90 latency (s)",
                 "TTFT_s": "TTFT (s)", "TPOT_s": "TPOT (s/token)", "IT_tok_s": "IT (tokens/s)",
                 "AEC_W": "AEC (W)", "J_per_token": "energy (J/token)"}


def quantization_table(res: StudyResults) -> pd.DataFrame:
    """One row per (model, precision): quality, counted size, MCR against the model's reference precision, costs."""
    df = res.ok
    if df.empty:
        return pd.DataFrame()
    rows = []
    for source, group in df.groupby("param_model", sort=False):
        ref_name = group["param_reference_precision"].iloc[0]
        ref = group[group["param_precision"] == ref_name]
        for _, r in group.iterrows():
            row = {
                "model": model_label(source), "source": source, "precision": r["param_precision"],
                # NaN for a model whose random weights (a paper shape) give efficiency figures only
                "accuracy": r.get("quality_mean_accuracy", np.nan), "perplexity": r.get("quality_perplexity", np.nan),
                "kl": r.get("quality_kl_to_reference"), "top1": r.get("quality_top1_agreement"),
                "flip_rate": r.get("quality_flip_rate"),
                "model_MB": r["model_bytes"] / 1e6, "linear_weights_MB": r["linear_weight_bytes"] / 1e6,
                "AMU_GB": r["amu_gb"], "PCU": r["pcu"], "AL_s": r["al_s"], "p90_s": r["latency_p90_s"],
                "TTFT_s": r["ttft_p50_s"], "TPOT_s": r.get("tpot_p50_s"), "IT_tok_s": r["it_tokens_per_s"],
                "AEC_W": r["aec_w"], "J_per_token": r["energy_per_token_j"], "reference": ref_name,
            }
            if len(ref):
                ref_row = ref.iloc[0]
                size_ratio = ref_row["model_bytes"] / r["model_bytes"]
                quality_ratio = row["accuracy"] / ref_row.get("quality_mean_accuracy", np.nan)
                row["compression"] = size_ratio
                row["MCR"] = size_ratio * quality_ratio
                row["accuracy_change_pct"] = 100 * (quality_ratio - 1)
            rows.append(row)
    table = pd.DataFrame(rows)
    for column in ("compression", "MCR", "accuracy_change_pct"):  # NaN where a model has no reference run
        if column not in table:
            table[column] = np.nan
    return table.astype({col: float for col in ("kl", "top1", "flip_rate", "PCU") if col in table})


def fidelity_intervals(record) -> dict | None:
    """A run's fidelity to its reference with 95% bootstrap intervals: the mean next-token KL and top-1 agreement
    over the text's positions (each window of ``ppl_seq_len`` tokens resampled as one block: its positions are not
    independent), the answer flip rate over the scored items of every task. None for the reference itself and for a
    record without per-token values (a paper shape's random weights)."""
    raw, params = record.raw.get("fidelity") or {}, record.params  # the notebook's raw["fidelity"]
    if params["precision"] == params["reference_precision"] or not raw.get("kl_per_token"):
        return None
    block = int(params.get("ppl_seq_len") or 256) - 1  # predicted positions per window
    flipped = [f for task in params["tasks"] for f in raw.get("flipped", {}).get(task, [])]
    out = {"model": model_label(params["model"]), "precision": params["precision"],
           "reference": params["reference_precision"], "tokens": len(raw["kl_per_token"]),
           "windows": -(-len(raw["kl_per_token"]) // block), "items": len(flipped)}
    for name, values, cluster in (("kl", raw["kl_per_token"], block), ("top1", raw["top1_agree"], block),
                                  ("flip_rate", flipped, 1)):
        out[name], out[f"{name}_low"], out[f"{name}_high"] = mean_interval(values, cluster)
    return out


def fidelity_table(res: StudyResults) -> pd.DataFrame:
    """The primary fidelity signals, one row per non-reference run (``fidelity_intervals``)."""
    return pd.DataFrame([row for r in res.ok_records if (row := fidelity_intervals(r)) is not None])


FIDELITY_COLUMNS = {"model": "model", "precision": "precision", "reference": "reference",
                    "kl_interval": "KL to reference (nats/token)", "top1_interval": "top-1 agreement",
                    "flip_interval": "answer flip rate", "tokens": "positions", "items": "items"}


def show_fidelity(res: StudyResults):
    """The fidelity table: each value with its interval in one column."""
    table = fidelity_table(res)
    if table.empty:
        return show(table, {})

    def cell(name: str, fmt: str) -> list[str]:
        return [f"{fmt.format(v)} ({_interval(lo, hi, fmt)})"
                for v, lo, hi in zip(table[name], table[f"{name}_low"], table[f"{name}_high"])]

    table = table.assign(kl_interval=cell("kl", "{:.4f}"), top1_interval=cell("top1", "{:.3f}"),
                         flip_interval=cell("flip_rate", "{:.3f}"))
    return show(table, _without_single_model(table, FIDELITY_COLUMNS))


def _interval(low: float, high: float, fmt: str) -> str:
    if np.isnan(low) or np.isnan(high):
        return f"no interval: fewer than {MIN_SAMPLES} windows"
    return f"95% interval {fmt.format(low)} to {fmt.format(high)}"


def fidelity_lines(res: StudyResults) -> list[str]:
    """One sentence per non-reference run: its KL, top-1 agreement and flip rate with their intervals."""
    table = fidelity_table(res)
    several = table["model"].nunique() > 1 if len(table) else False
    return [f"{r.model + ' ' if several else ''}{r.precision} against {r.reference}: next-token KL "
            f"{r.kl:.4f} nats/token ({_interval(r.kl_low, r.kl_high, '{:.4f}')}), top-1 agreement "
            f"{r.top1:.3f} ({_interval(r.top1_low, r.top1_high, '{:.3f}')}) over {r.tokens} positions in {r.windows} "
            f"windows; answers flipped on {r.flip_rate:.3f} of {r.items} items "
            f"({_interval(r.flip_rate_low, r.flip_rate_high, '{:.3f}')})."
            for r in table.itertuples()]


def parameter_counts(table: pd.DataFrame) -> dict[str, float | None]:
    """Parameters of each model, from the counted bytes of a float-precision run (bytes / bytes per parameter)."""
    counts: dict[str, float | None] = {}
    for model, group in table.groupby("model", sort=False):
        floats = group[group["precision"].isin(BYTES_PER_PARAM)]
        counts[model] = (float(floats["model_MB"].iloc[0] * 1e6 / BYTES_PER_PARAM[floats["precision"].iloc[0]])
                         if len(floats) else None)
    return counts


def leaderboard(table: pd.DataFrame) -> pd.DataFrame:
    """Our per-metric ranks, per model, of the precisions the paper compared (paper names)."""
    ours = table[table["precision"].isin(PAPER_PRECISION_NAMES)].copy()
    ours["method"] = ours["precision"].map(PAPER_PRECISION_NAMES)
    return rank_methods(ours, LEADERBOARD_METRICS)


def leaderboards(table: pd.DataFrame) -> list[Leaderboard]:
    return against_paper(leaderboard(table), AXIS, GROUP, parameter_counts(table)) if len(table) else []


# --- findings -----------------------------------------------------------------------------------

def _records_by(res: StudyResults) -> dict[tuple[str, str], object]:
    return {(model_label(r.params["model"]), r.params["precision"]): r for r in res.ok_records}


def _correct(record) -> list[int] | None:
    """Per-item correctness over every task, in task order (None: the record predates per-item correctness)."""
    per_task = record.quality.get("correct")
    if not per_task:
        return None
    return [x for task in record.params["tasks"] for x in per_task.get(task, [])]


def _latencies(record) -> list[float]:
    return [s["latency_s"] for s in record.raw.get("requests", [])]


def _tokens_per_s(record) -> list[float]:
    """Throughput of each timed request (tokens/s): IT's raw samples."""
    tokens = record.params["batch_size"] * record.params["new_tokens"]
    return [tokens / s for s in _latencies(record)]


def compare(metric: str, subject, baseline, tolerance: float) -> Difference | None:
    """The difference of two runs on a claim's metric, by the rule that suits it (see ``verdicts``)."""
    if metric == "accuracy":
        a, b = _correct(subject), _correct(baseline)
        return paired_accuracy(a, b) if a is not None and b is not None and len(a) == len(b) else None
    if metric == "model_bytes":  # counted: exact, no noise
        return point_difference(subject.metrics["model_bytes"].value, baseline.metrics["model_bytes"].value, 0.0,
                                  "counted bytes, exact")
    if metric == "it_tokens_per_s":
        return bootstrap_ratio(_tokens_per_s(subject), _tokens_per_s(baseline))
    if metric == "al_s":
        return bootstrap_ratio(_latencies(subject), _latencies(baseline))
    return tracked_difference(subject.metrics[metric], baseline.metrics[metric], tolerance)


METRIC_WORDS = {"accuracy": "accuracy", "model_bytes": "counted model size", "it_tokens_per_s": "throughput (IT)",
                "al_s": "latency (AL)", "aec_w": "average power (AEC)", "energy_per_token_j": "energy per token"}


def _paper_margin(claim) -> float:
    """The non-inferiority margin of an accuracy claim (``tolerance: paper``): the largest relative drop of int4
    against bfloat16 in the paper's own figures that the claim quotes."""
    if claim["tolerance"] != "paper":
        return float(claim["tolerance"] or 0)
    by_model: dict[str, dict[str, float]] = {}
    for f in paper_figures(claim["paper_figures"], AXIS):
        by_model.setdefault(f["model"], {})[f["method"]] = f["value"]
    drops = [1 - v["int4"] / v["bfloat16"] for v in by_model.values() if {"int4", "bfloat16"} <= set(v)]
    return max(drops) if drops else 0.0


def findings(res: StudyResults) -> list[Finding]:
    """Every claim of ``book/paper/claims.csv`` for this chapter, tested on every model that has the runs."""
    runs = _records_by(res)
    variants = variants_by_model(runs)
    references = {m: r.params["reference_precision"] for (m, _), r in runs.items()}

    def run_compare(claim, model, subject, baseline):
        return compare(claim["metric"], runs[model, subject], runs[model, baseline], _paper_margin(claim))

    return decide_claims("quantization", AXIS, variants, run_compare, METRIC_WORDS,
                          resolve=lambda model, name: (references[model] if name == "reference"
                                                       else precisions.resolve_claim_name(name)),
                          margin=_paper_margin)


def caveats(res: StudyResults, table: pd.DataFrame) -> list[str]:
    counts = parameter_counts(table) if len(table) else {}
    # scored items per run: the per-item record, else n_per_task x tasks (None: every item of every task)
    sizes = [len(_correct(r) or []) or (r.params["n_per_task"] or 10 ** 9) * len(r.params["tasks"])
             for r in res.ok_records]
    items = min(sizes) if sizes else None
    out = common_caveats(res, counts, 1.5e9, MIN_ITEMS, items)
    gguf = sorted({m for m in res.ok.get("param_model", pd.Series(dtype=str)) if _ships_as_gguf(m)})
    if gguf:
        out.append(reference_note(gguf))
    return out


def reference_note(models: list[str]) -> str:
    """What the reference of an offline model is, and what that does to every claim measured against it."""
    return (f"{', '.join(models)}: the reference is its Q4_1 GGUF (the only SmolLM2 weights that ship offline; no "
            "full-precision small LLM is reachable here) dequantised to fp32. Every fidelity figure and accuracy "
            "change is against those weights, which already carry 4-bit rounding: int4 re-quantises weights that "
            "were 4-bit already, which flatters its drop against what it would lose from bf16 weights.")


def _ships_as_gguf(model: str) -> bool:
    from ..models import OFFLINE_MODELS  # every offline model ships as GGUF (models.py)

    return model in OFFLINE_MODELS


def findings_text(res: StudyResults, table: pd.DataFrame) -> str:
    if table.empty:
        return "*No results yet.*"
    return findings_markdown(findings(res), fidelity_lines(res), caveats=caveats(res, table))


def summary(res: StudyResults, table: pd.DataFrame) -> str:
    """The chapter's opening lines: what this run found, per model, from the records."""
    if table.empty:
        return "*No results yet: run `make reproduce AXIS=quantization`.*"
    found = findings(res)
    lines = [f"This run measured {table['model'].nunique()} model(s) at {table['precision'].nunique()} precision(s) "
             f"({', '.join(dict.fromkeys(table['precision']))}). The paper's claims: {verdict_counts(found)}."]
    gguf = sorted({model_label(m) for m in res.ok.get("param_model", pd.Series(dtype=str)) if _ships_as_gguf(m)})
    if gguf:
        lines.append(f"- **The reference.** {reference_note(gguf)}")
    records = _records_by(res)
    for model, group in table.groupby("model", sort=False):
        g = group.dropna(subset=["compression"])
        if g.empty:
            continue
        small, fast = g.loc[g["model_MB"].idxmin()], g.loc[g["AL_s"].idxmin()]
        items = _correct(records[(model, small["precision"])]) if (model, small["precision"]) in records else None
        on_items = f" on {len(items)} scored items" if items else ""
        kl = (f", next-token KL to {small['reference']} {small['kl']:.3g} nats/token and top-1 agreement "
              f"{small['top1']:.3f}" if pd.notna(small.get("kl")) else "")
        change = (f"its accuracy changed by {small['accuracy_change_pct']:+.1f}%{on_items}{kl}"
                  if pd.notna(small["accuracy_change_pct"]) else
                  "no quality was measured (random weights of the paper model's shape: efficiency figures only)")
        lines.append(f"- **{model}**: the smallest is {small['precision']} at {small['model_MB']:.0f} MB (counted; "
                     f"{small['compression']:.1f}x smaller than {small['reference']}); {change}; the lowest mean latency was "
                     f"{fast['precision']}'s ({fast['AL_s']:.3g} s/request). Whether such gaps exceed the noise is "
                     f"decided under *Findings* below.")
    return "\n".join(lines)


LEGEND = {"model_bytes": "model size", "amu_gb": "AMU", "pcu": "PCU", "al_s": "AL", "it_tokens_per_s": "IT",
          "aec_w": "AEC", "energy_per_token_j": "energy per token"}
FORMATS = {"accuracy_change_pct": "{:+.1f}", "model_MB": "{:.1f}", "linear_weights_MB": "{:.1f}",
           "compression": "{:.2f}", "MCR": "{:.2f}", "kl": "{:.4f}", "top1": "{:.3f}", "flip_rate": "{:.3f}"}


def _without_single_model(table: pd.DataFrame, columns: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in columns.items() if not (k == "model" and table["model"].nunique() == 1)}


def show_tables(table: pd.DataFrame):
    """Quality per (model, precision); the fidelity columns only where the records have them."""
    if table.empty:
        return show(table, {})
    return show(table, _without_single_model(table, QUALITY_COLUMNS), FORMATS)


def show_cost_tables(table: pd.DataFrame) -> None:
    """Two tables: size and memory, then latency, throughput and energy."""
    from IPython.display import display

    if table.empty:
        display(show(table, {}))
        return
    for columns in (SIZE_COLUMNS, SPEED_COLUMNS):
        display(show(table, _without_single_model(table, columns), FORMATS))


def legend(res: StudyResults):
    return show(methods_legend(res, LEGEND), {"metric": "metric", "how obtained": "how obtained"})


PRECISION_COLUMNS = {"precision": "precision", "library": "library", "stands_for": "the paper's name",
                     "description": "what it is", "compute_dtype": "computes in", "kernel_notes": "kernel"}


def precisions_table(table: pd.DataFrame) -> pd.DataFrame:
    """What each precision of these runs is, from the registry (``efficientllm_utils.precisions``), in its order;
    ``computes in`` is the registry's (bitsandbytes' int8 finds its kernel's on the device: see the roofline)."""
    present = set(table["precision"]) if len(table) else set()
    return pd.DataFrame([{key: getattr(p, key) if key != "precision" else p.name for key in PRECISION_COLUMNS}
                         for p in precisions.all_precisions() if p.name in present], columns=list(PRECISION_COLUMNS))


def show_precisions(table: pd.DataFrame):
    return show(precisions_table(table), PRECISION_COLUMNS)


KERNEL_WORDS = {
    "dequantize": "dequantising kernel (weights dequantised to the compute dtype, then an ordinary matmul)",
    "fused-bf16": "fused bf16 kernel of CPUs with AVX512-BF16 (weights repacked, scales and arithmetic in bf16)",
}


def kernel_note(res: StudyResults) -> str:
    """Which bitsandbytes CPU kernel each 4-bit run used, from its record's provenance (``cpu_4bit.py``); empty
    when no 4-bit run ran on a CPU."""
    lines = []
    for r in res.records:
        kernel = r.provenance.get("cpu_4bit")
        if r.status != "ok" or not kernel:
            continue
        cpu = "with" if kernel["cpu_has_avx512bf16"] else "without"
        narrow = kernel.get("layers_too_narrow_for_repack", 0)
        lines.append(f"- {model_label(r.params['model'])} at {r.params['precision']}: bitsandbytes' "
                     f"{KERNEL_WORDS.get(kernel['kernel'], kernel['kernel'])}; {kernel['layers_packed']} of "
                     f"{kernel['layers_4bit']} 4-bit layers repacked for the fused kernel"
                     + (f", {narrow} too narrow for it" if narrow else "")
                     + f"; CPU {cpu} AVX512-BF16 (`cpu_4bit_kernel: {r.params.get('cpu_4bit_kernel', 'auto')}`).")
    if not lines:
        return ""
    return ("**4-bit kernels.** On a CPU, bitsandbytes runs 4-bit layers by one of two kernels; the study pins one "
            "per run and records it. The two agree within bf16 rounding of the scales (tested), so int4 figures from "
            "CPUs with and without AVX512-BF16 compare, but not to the last digit:\n\n" + "\n".join(lines))


# --- against the machine's limits (reports/roofline.py) -----------------------------------------

ROOFLINE_METRICS = {"prefill_mfu": "prefill MFU", "decode_mbu": "decode MBU", "decode_mfu": "decode MFU",
                    "pcu": "PCU (NVML utilization.gpu)"}


def run_label(res: StudyResults):
    """A run's name in the roofline section: its precision (and model, where the study has several)."""
    several = len({r.params["model"] for r in res.ok_records}) > 1
    return lambda r: (f"{model_label(r.params['model'])} {r.params['precision']}" if several
                      else r.params["precision"])


def show_roofline(res: StudyResults) -> None:
    from . import roofline as rl

    rl.show_section(res, run_label(res), ROOFLINE_METRICS, lambda name: name == "decode", "decode_mbu")
