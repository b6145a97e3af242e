"""The fine-tuning study's report: what ``book/peft.md`` shows, computed from the records, per base model.

Kept apart from ``studies/finetune.py`` (the measurement procedure) so that a book page reads records
without importing torch, transformers and peft.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .display import methods_legend, model_label, show
from .findings import (Finding, common_caveats, decide_claims, findings_markdown, opening_summary,
                       variants_by_model)
from .leaderboard import Leaderboard, against_paper, rank_methods
from .load import StudyResults
from .paper import paper_ranks, size_group
from .verdicts import AGREES, CONFIDENCE, DISAGREES, INCONCLUSIVE, Difference, bootstrap_ratio, decide, paired_accuracy

AXIS, GROUP = "fine_tuning", "peft"

# our method names -> the paper's leaderboard names (book/paper/leaderboard_ranks.csv, axis fine_tuning, group peft);
# QLoRA is not in the paper's leaderboard
PAPER_METHOD_NAMES = {"lora": "LoRA", "loraplus": "LoRA-Plus", "rslora": "RSLoRA", "dora": "DoRA", "pissa": "PiSSA",
                      "freeze": "Freeze", "full": "Full"}
# leaderboard metric -> results_table column. The paper's quality is the final training loss; ours is held-out
# accuracy after training (higher is better): a few training steps' loss is no measure of quality here (it swings with
# the batch, and at one learning rate RSLoRA's larger scale lowers it mechanically)
LEADERBOARD_METRICS = {"Perf": "acc_after", "AMU": "AMU_GB", "PCU": "PCU", "AL": "AL_s", "ST": "ST", "AEC": "AEC_W"}
METRIC_WORDS = {"AL_s": "the training step time (AL)", "accuracy": "the held-out accuracy after training"}
IMPROVES, WORSENS = "improves", "worsens"


def results_table(res):
    """One row per run (model, method) of a ``StudyResults`` of this study, in the params file's order."""
    df = res.ok
    if df.empty:
        return pd.DataFrame()
    order = {m: i for i, m in enumerate(PAPER_METHOD_NAMES | {"qlora": ""})}
    df = df.assign(_order=df["param_method"].map(order),
                   _model=df["param_model"].map({m: i for i, m in enumerate(dict.fromkeys(df["param_model"]))}))
    df = df.sort_values(["_model", "_order", "started"])

    def q(name: str):  # NaN where a study does not record it (the vision-language study has no yes/no share)
        return df[f"quality_{name}"].to_numpy() if f"quality_{name}" in df else np.full(len(df), np.nan)

    return pd.DataFrame({
        "model": df["param_model"].map(model_label).to_numpy(),
        "method": df["param_method"].to_numpy(),
        "label": df["label"].to_numpy(),
        "lr": df["param_lr"].to_numpy(), "rank": df["param_rank"].to_numpy(), "alpha": df["param_alpha"].to_numpy(),
        "steps": df["param_steps"].to_numpy(), "batch_size": df["param_batch_size"].to_numpy(),
        "n_heldout": q("n_heldout"),
        "final_loss": q("final_loss"),
        "initial_loss": q("initial_loss"),
        "acc_before": q("accuracy_before"), "acc_before_se": q("accuracy_before_stderr"),
        "acc_after": q("accuracy_after"), "acc_after_se": q("accuracy_after_stderr"),
        "gold_logprob_before": q("gold_logprob_before"), "gold_logprob_after": q("gold_logprob_after"),
        "answer_mass_before": q("answer_mass_before"), "answer_mass_after": q("answer_mass_after"),
        "AL_s": df["al_s"].to_numpy(), "AL_p90_s": df["al_p90_s"].to_numpy(), "AL_CV": df["al_cv"].to_numpy(),
        "ST": df["st_samples_per_param_s"].to_numpy(),
        "samples_per_s": df["train_samples_per_s"].to_numpy(),
        "AMU_GB": df["amu_gb"].to_numpy(), "peak_GB": df["peak_memory_gb"].to_numpy(),
        "PCU": df["pcu"].to_numpy(dtype=float),
        "AEC_W": df["aec_w"].to_numpy(), "energy_J": df["energy_j"].to_numpy(),
        "trainable_params": df["params_trainable"].to_numpy(), "trainable_share": df["trainable_share"].to_numpy(),
        "total_params": df["params_total"].to_numpy(),
        "adapter_MB": df["adapter_bytes"].to_numpy() / 1e6,
        "data_order": q("data_order_sha256"),
        "heldout_items": q("heldout_rows_sha256"),
        "before_computed_by": (df["quality_before_computed_by"] if "quality_before_computed_by" in df
                               else df["label"]).to_numpy(),
    }).reset_index(drop=True)


def loss_curves(res):
    """Training loss per step of every run, long form (method, step, loss), from the records' raw steps."""
    frames = [pd.DataFrame(r.raw["steps"]).assign(method=r.params["method"], model=model_label(r.params["model"]))
              [["model", "method", "step", "loss", "seconds"]]
              for r in res.records if r.status == "ok" and r.raw.get("steps")]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def loss_plot(curves):
    """Training loss against step, one line per method (raw per-step values: the runs are short)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    several = curves["model"].nunique() > 1
    sns.lineplot(data=curves, x="step", y="loss", hue="method", style="model" if several else "method",
                 markers=True, dashes=several, ax=ax)
    ax.set(xlabel="optimizer step", ylabel="training loss (nats/answer token, log scale)", yscale="log")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return fig


def leaderboard(table):
    """Our per-metric ranks (1 = best), per model, of the methods the paper's leaderboard has."""
    ours = table[table["method"].isin(PAPER_METHOD_NAMES)].copy()
    ours["method"] = ours["method"].map(PAPER_METHOD_NAMES)
    return rank_methods(ours, LEADERBOARD_METRICS, {"Perf": True})


def parameter_counts(table) -> dict[str, float]:
    """Each base model's parameters (counted, the same base for every method)."""
    return table.groupby("model", sort=False)["total_params"].median().to_dict() if len(table) else {}


def leaderboards(table) -> list[Leaderboard]:
    return against_paper(leaderboard(table), AXIS, GROUP, parameter_counts(table)) if len(table) else []


def data_order_line(table) -> str:
    """Whether every run of each model trained on the same rows in the same order and was scored on the same
    items."""
    if table.empty:
        return "*No results yet.*"
    if "model" in table and table["model"].nunique() > 1:
        return "\n\n".join(f"**{model}**: " + data_order_line(group.drop(columns="model"))
                             for model, group in table.groupby("model", sort=False))
    orders, items = table["data_order"].unique(), table["heldout_items"].unique()
    reused = table[table["before_computed_by"] != table["label"]].groupby("before_computed_by")["method"]
    by_base = "; ".join(f"the scores of run `{run}` by {', '.join(methods)}" for run, methods in reused)
    base = (f" Accuracy before training was reused where the base model's fingerprint (every weight tensor, the "
            f"items, the scoring code and packages) matched an earlier run's: {by_base}." if by_base else "")
    if len(orders) == 1 and len(items) == 1:
        return (f"All {len(table)} runs trained on the same rows in the same order (data-order hash "
                f"`{orders[0]}`, over the source row ids of every step) and were scored on the same held-out items "
                f"(hash `{items[0]}`)." + base)
    by = table.groupby("data_order")["method"].apply(lambda m: ", ".join(m))
    return ("**The runs did not all see the same data**: "
            + "; ".join(f"`{h}`: {methods}" for h, methods in by.items())
            + f" ({len(items)} distinct held-out sets). Compare only runs that share a hash.")


def _records_by(res) -> dict[tuple[str, str], object]:
    return {(model_label(r.params["model"]), r.params["method"]): r for r in res.ok_records}


def _timed_seconds(record) -> list[float]:
    return [s["seconds"] for s in record.raw.get("steps", [])[record.params.get("timing_warmup_steps", 0):]]


def compare(record_a, record_b, metric: str, tolerance: float) -> Difference | None:
    """Step times by a bootstrap interval over the timed steps; held-out accuracy after training by a paired
    bootstrap over the same items (None where the runs were not scored on the same items). No rule reads the
    training loss."""
    if metric == "AL_s":
        a, b = _timed_seconds(record_a), _timed_seconds(record_b)
        return bootstrap_ratio(a, b) if a and b else None
    if metric == "accuracy":
        qa, qb = record_a.quality, record_b.quality
        if not qa.get("correct_after") or qa.get("heldout_rows_sha256") != qb.get("heldout_rows_sha256"):
            return None
        return paired_accuracy(qa["correct_after"], qb["correct_after"])
    raise ValueError(f"no comparison rule for {metric!r}")


def findings(res, table) -> list[Finding]:
    """The chapter's claims (``book/paper/claims.csv``) on every base model. A claim whose direction is ``ranks``
    expects what the paper's leaderboard of the model's size group shows."""
    runs = _records_by(res)
    variants = variants_by_model(runs)
    counts = parameter_counts(table)

    def expected(claim, model):
        group, why = size_group(AXIS, GROUP, counts.get(model))
        ranks = paper_ranks(AXIS, GROUP, group)
        perf = ranks[ranks["metric"] == "Perf"].set_index("method")["paper_rank"]
        subject, baseline = PAPER_METHOD_NAMES[claim["subject"]], PAPER_METHOD_NAMES[claim["baseline"]]
        if subject not in perf or baseline not in perf or perf[subject] == perf[baseline]:
            return None, ""
        better = perf[subject] < perf[baseline]  # the paper's Perf rank 1 = the lowest final loss = the best
        direction = "higher" if better else "lower"
        return direction, (f"at {group} the paper ranks {subject} {int(perf[subject])} and {baseline} "
                           f"{int(perf[baseline])} on quality (its final loss), so {subject}'s held-out accuracy "
                           f"should be {direction}; {why}")

    def run_compare(claim, model, subject, baseline):
        return compare(runs[model, subject], runs[model, baseline], claim["metric"], float(claim["tolerance"] or 0))

    return decide_claims("peft", AXIS, variants, run_compare, METRIC_WORDS, expected=expected)


def accuracy_changes(res) -> pd.DataFrame:
    """Held-out accuracy after against before training, per run, paired over the same items: the change in
    accuracy points with its paired bootstrap 95% interval (``paired_accuracy``'s draws, rescaled from relative to
    points), and whether the method improves over its base (the interval above 0), worsens it (below 0) or is
    inconclusive."""
    rows = []
    for (model, method), r in _records_by(res).items():
        before, after = r.quality.get("correct_before"), r.quality.get("correct_after")
        if not before or not after or len(before) != len(after):
            continue
        diff = paired_accuracy(after, before)
        base = (sum(before) / len(before)) or 1.0  # paired_accuracy's differences are relative to this
        verdict = {AGREES: IMPROVES, DISAGREES: WORSENS}.get(decide(diff, "higher"), INCONCLUSIVE)
        rows.append({"model": model, "method": method, "before": sum(before) / len(before),
                     "after": sum(after) / len(after), "items": len(after), "change": diff.estimate * base,
                     "low": diff.low * base, "high": diff.high * base, "verdict": verdict, "how": diff.how})
    return pd.DataFrame(rows)


CHANGE_COLUMNS = {"model": "model", "method": "method", "before": "accuracy before", "after": "accuracy after",
                  "change": "change (points)", "interval": "95% interval (points)", "verdict": "against the base",
                  "items": "items"}


def show_changes(res) -> None:
    """Per method: held-out accuracy before and after, the paired change with its interval, the verdict."""
    from IPython.display import display

    changes = accuracy_changes(res)
    if changes.empty:
        return
    changes = changes.assign(
        interval=[f"{100 * lo:+.1f} to {100 * hi:+.1f}" for lo, hi in zip(changes["low"], changes["high"])],
        change=[f"{100 * x:+.1f}" for x in changes["change"]])
    columns = CHANGE_COLUMNS if changes["model"].nunique() > 1 else {k: v for k, v in CHANGE_COLUMNS.items()
                                                                      if k != "model"}
    display(show(changes, columns, {"before": "{:.3f}", "after": "{:.3f}"}))


def observations(res, table) -> list[str]:
    """Numbers the paper does not claim: held-out accuracy before and after, paired over the same items."""
    changes = accuracy_changes(res)
    out = []
    for model, group in changes.groupby("model", sort=False) if len(changes) else []:
        prefix = f"{model}: " if changes["model"].nunique() > 1 else ""
        by = {v: list(group.loc[group["verdict"] == v, "method"]) for v in (IMPROVES, WORSENS, INCONCLUSIVE)}
        out.append(
            f"{prefix}held-out accuracy on {int(group['items'].iloc[0])} items never trained on: before "
            f"{group['before'].median():.3f} (median), after {group['after'].min():.3f}-{group['after'].max():.3f}. "
            f"By a paired {100 * CONFIDENCE:.0f}% interval over the items, "
            + "; ".join(f"{len(ms)} of {len(group)} methods {word}" + (f" ({', '.join(ms)})" if ms else "")
                        for word, ms in (("improve over the base", by[IMPROVES]), ("worsen it", by[WORSENS]),
                                         ("are inconclusive", by[INCONCLUSIVE])))
            + ".")
    for model, group in table.groupby("model", sort=False):
        prefix = f"{model}: " if table["model"].nunique() > 1 else ""
        datasets = {r.params.get("dataset") for r in res.ok_records if model_label(r.params["model"]) == model}
        mass = ("the probability of answering exactly *yes* or *no*" if datasets == {"boolq"}
                else "the probability of the exact gold answer")
        out.append(f"{prefix}{mass} went from {group['answer_mass_before'].median():.3f} to "
                   f"{group['answer_mass_after'].median():.3f} (median over methods), the gold answer's "
                   f"log-probability from {group['gold_logprob_before'].median():.2f} to "
                   f"{group['gold_logprob_after'].median():.2f}.")
    return out


def caveats(res, table) -> list[str]:
    items = int(table["n_heldout"].min()) if len(table) else None
    return common_caveats(res, parameter_counts(table), 1e9, 200, items)


def findings_text(res, table) -> str:
    if table.empty:
        return "*No results yet.*"
    return findings_markdown(findings(res, table), observations(res, table), caveats(res, table))


def summary(res, table) -> str:
    """The chapter's opening lines: what this run found, per base model, from the records."""
    if table.empty:
        return "*No results yet: run `make reproduce AXIS=peft`.*"
    found = findings(res, table)
    changes = accuracy_changes(res)

    def per_model(model: str, g: pd.DataFrame) -> str:
        mine = changes[changes["model"] == model] if len(changes) else changes
        improved = list(mine.loc[mine["verdict"] == IMPROVES, "method"]) if len(mine) else []
        return (f": {len(improved)} of {len(g)} methods improve held-out accuracy over the base by "
                f"a paired {100 * CONFIDENCE:.0f}% interval" + (f" ({', '.join(improved)})" if improved else "")
                + f"; the highest accuracy after training is {g.loc[g['acc_after'].idxmax(), 'method']}'s "
                f"({g['acc_after'].max():.3f}), the fastest step {g.loc[g['AL_s'].idxmin(), 'method']}'s "
                f"({g['AL_s'].min():.3g} s/step), the slowest {g.loc[g['AL_s'].idxmax(), 'method']}'s "
                f"({g['AL_s'].max():.3g} s/step); the smallest saved adapter "
                f"{g.loc[g['adapter_MB'].idxmin(), 'method']}'s ({g['adapter_MB'].min():.2f} MB).")
    return opening_summary(f"fine-tuned {table['model'].nunique()} base model(s) with {table['method'].nunique()} "
                           "method(s)", found, table, per_model)


# --- what the page shows: table column -> header with its unit, split into tables a 1280 px page holds ----------

QUALITY_COLUMNS = {"model": "model", "method": "method", "lr": "peak lr", "final_loss": "final loss (nats/token)",
                   "accuracy_before": "accuracy before (± s.e.)", "accuracy_after": "accuracy after (± s.e.)",
                   "answer_mass_before": "answer mass before", "answer_mass_after": "answer mass after"}
COST_COLUMNS = {"model": "model", "method": "method", "AL_s": "AL (s/step)", "AL_p90_s": "p90 step (s)",
                "ST": "ST (samples/param/s)", "AMU_GB": "AMU (GB)", "PCU": "PCU (%)", "AEC_W": "AEC (W)",
                "energy_J": "energy (J)"}
SIZE_COLUMNS = {"model": "model", "method": "method", "trainable_params": "trainable parameters",
                "trainable_share": "trainable share", "adapter_MB": "saved adapter (MB)"}
FORMATS = {"lr": "{:g}", "ST": "{:.3g}", "trainable_params": "{:,.0f}", "trainable_share": "{:.2%}",
           "energy_J": "{:.0f}", "adapter_MB": "{:.2f}"}
LEGEND = {"final_loss": "final loss", "al_s": "AL", "st_samples_per_param_s": "ST", "amu_gb": "AMU", "pcu": "PCU",
          "aec_w": "AEC", "energy_j": "energy", "params_trainable": "trainable parameters",
          "adapter_bytes": "saved adapter"}


def show_tables(table) -> None:
    """Quality, costs and sizes per (model, method), as three tables."""
    from IPython.display import display

    if len(table):  # accuracy with its standard error in one column: fewer, narrower columns
        table = table.assign(**{f"accuracy_{when}": [f"{a:.2f} ± {se:.2f}" for a, se in
                                                     zip(table[f"acc_{when}"], table[f"acc_{when}_se"])]
                                for when in ("before", "after")})
    for columns in (QUALITY_COLUMNS, COST_COLUMNS, SIZE_COLUMNS):
        if len(table) and table["model"].nunique() == 1:
            columns = {k: v for k, v in columns.items() if k != "model"}
        display(show(table, columns, FORMATS))


def legend(res):
    return show(methods_legend(res, LEGEND), {"metric": "metric", "how obtained": "how obtained"})


# --- against the machine's limits (reports/roofline.py) -----------------------------------------

def show_roofline(res: StudyResults) -> None:
    """Training-step MFU and MBU per method, the roofline plot, the cost model's memory against AMU."""
    from . import roofline as rl

    rl.show_section(res, lambda r: str(r.params.get("method") or r.label),
                    {"train_mfu": "training-step MFU", "train_mbu": "training-step MBU",
                     "pcu": "PCU (NVML utilization.gpu)"}, lambda name: False, "")
