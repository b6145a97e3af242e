"""The fine-tuning study's report: what ``book/peft.md`` shows, computed from the records.

Kept apart from ``finetune.py`` (the measurement procedure) so that a book page reads records
without importing torch, transformers and peft.
"""
from __future__ import annotations

import pandas as pd

from .. import report

# our method names -> the paper's leaderboard names (book/paper/leaderboard_ranks.csv, axis fine_tuning, group peft);
# QLoRA is not in the paper's leaderboard
PAPER_METHOD_NAMES = {"lora": "LoRA", "loraplus": "LoRA-Plus", "rslora": "RSLoRA", "dora": "DoRA", "pissa": "PiSSA",
                      "freeze": "Freeze", "full": "Full"}
# leaderboard metric -> results_table column; quality is the final training loss, lower is better
LEADERBOARD_METRICS = {"Perf": "final_loss", "AMU": "AMU_GB", "PCU": "PCU", "AL": "AL_s", "ST": "ST", "AEC": "AEC_W"}
# Relative gaps this small are ties in one run on a shared 2-core CPU (AL: report.TIE_TOLERANCE's floor; the final
# loss: a floor for the mean of 3 short steps, on the same sequences for every method)
FINDINGS_TOLERANCE = {"AL_s": 0.05, "final_loss": 0.05}


def results_table(res):
    """One row per run (method) of a ``report.StudyResults`` of this study, in the params file's order."""
    df = res.ok
    if df.empty:
        return pd.DataFrame()
    order = {m: i for i, m in enumerate(PAPER_METHOD_NAMES | {"qlora": ""})}
    df = df.assign(_order=df["param_method"].map(order)).sort_values(["_order", "started"])

    def q(name: str):
        return df[f"quality_{name}"].to_numpy()

    return pd.DataFrame({
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
        "yes_share_after": q("yes_share_after"),
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
    frames = [pd.DataFrame(r.raw["steps"]).assign(method=r.params["method"])[["method", "step", "loss", "seconds"]]
              for r in res.records if r.status == "ok" and r.raw.get("steps")]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def loss_plot(curves):
    """Training loss against step, one line per method (raw per-step values: the runs are short)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    sns.lineplot(data=curves, x="step", y="loss", hue="method", style="method", markers=True, dashes=False, ax=ax)
    ax.set(xlabel="optimizer step", ylabel="training loss (answer tokens)", yscale="log")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return fig


def leaderboard(table):
    """Our per-metric ranks (1 = best) of the methods the paper's leaderboard has."""
    ours = table[table["method"].isin(PAPER_METHOD_NAMES)].copy()
    ours["method"] = ours["method"].map(PAPER_METHOD_NAMES)
    return report.rank_methods(ours, LEADERBOARD_METRICS, {"Perf": False})


def data_order_line(table) -> str:
    """Whether every run trained on the same rows in the same order and was scored on the same items."""
    if table.empty:
        return "*No results yet.*"
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


def findings(table, tolerance: dict[str, float] | None = None) -> str:
    """Plain statements, computed from this run's table, on the paper's fine-tuning claims."""
    if table.empty:
        return "*No results yet.*"
    tol = {**FINDINGS_TOLERANCE, **(tolerance or {})}
    t = table.rename(columns={"method": "variant"})
    by = t.set_index("variant")
    methods = list(by.index)
    lines = []
    if {"lora", "rslora"} <= set(methods):
        lo, rs = by.loc["lora"], by.loc["rslora"]
        gap = 100 * (rs["final_loss"] / lo["final_loss"] - 1)
        beats = None if abs(gap) <= 100 * tol["final_loss"] else gap < 0
        scale = (f"alpha/sqrt(r) = {rs_scale:.2f} vs alpha/r = {lo_scale:.2f}"
                 if (rs_scale := _scale(table, "rslora", True)) and (lo_scale := _scale(table, "lora", False)) else "")
        lines.append(
            f"- **RSLoRA beats LoRA only at large scale** (paper: RSLoRA has the lowest loss of all methods at "
            f"14B-24B, e.g. 0.41 vs LoRA's 0.48 on Qwen2.5-14B; at 1B-3B it ranks 5 of 7 on loss, though still ahead "
            f"of LoRA's 7, and at 7B-8B behind LoRA). Here, at 135M, RSLoRA's final loss is "
            f"{rs['final_loss']:.3f} vs LoRA's {lo['final_loss']:.3f} ({gap:+.1f}%)"
            + (f"; at the same lr its update is scaled by {scale}" if scale else "") + ". "
            + report._verdict(None if beats is None else not beats)
            + ("" if beats is not True else
               f" RSLoRA is ahead even at this small scale: at rank {int(rs['rank'])} its larger scaling acts as a "
               f"larger step size over {_steps(table)} steps, which is not the rank-stability effect the paper "
               "attributes to scale."))
    if "freeze" in methods:
        al = report.standing(t, "AL_s", "freeze", methods, tolerance=tol["AL_s"])
        r = by.loc["freeze"]
        lines.append(
            f"- **Freeze has the lowest latency** (paper: AL rank 1 at every size, e.g. 0.25 s/iter on "
            f"Llama-3.2-1B). Here Freeze is {al} on AL ({r['AL_s']:.2f} s/iter vs {by['AL_s'].median():.2f} median): "
            f"the backward pass stops at the first trained layer ({r['trainable_share']:.1%} of the parameters "
            f"train). {report._verdict(al.first)}")
    if "dora" in methods:
        al = report.standing(t, "AL_s", "dora", methods, tolerance=tol["AL_s"])
        r = by.loc["dora"]
        slower = r["AL_s"] / by.loc["lora", "AL_s"] if "lora" in methods else None
        lines.append(
            f"- **DoRA is the slowest** (paper: AL rank 7 of 7 at 1B-3B). Here DoRA is {al} on AL "
            f"({r['AL_s']:.2f} s/iter" + (f", {slower:.2f}x LoRA's" if slower else "")
            + "): in every forward pass each adapted layer builds its full adapted weight W + sBA to take its "
            "norms, and during training (with LoRA dropout on) peft's DoRA sends the dropped-out input through the "
            "base layer a second time. "
            f"{report._verdict(al.last)}")
    near_chance = [m for m in methods if abs(by.loc[m, "acc_after"] - 0.5) <= 2 * by.loc[m, "acc_after_se"]]
    lines.append(
        f"- **Held-out accuracy** ({int(table['acc_after'].notna().sum())} methods, "
        f"{_n_items(table)} BoolQ items never trained on): before training {by['acc_before'].median():.2f} "
        f"(median), after {by['acc_after'].min():.2f}-{by['acc_after'].max():.2f}; "
        f"{len(near_chance)} of {len(methods)} methods end within two standard errors (about "
        f"{2 * by['acc_after_se'].median():.2f}) of chance (0.5). A 135M model after "
        f"{_steps(table)} steps of {_batch(table)} sequences does not learn reading comprehension; what the training "
        f"does teach "
        f"is the answer format: the probability the model gives to answering exactly *yes* or *no* rises from "
        f"{by['answer_mass_before'].median():.2f} to {by['answer_mass_after'].median():.2f} (median), and the "
        f"gold answer's log-probability from {by['gold_logprob_before'].median():.2f} to "
        f"{by['gold_logprob_after'].median():.2f}.")
    lines.append(
        f"- **Noise.** One run per method on a shared CPU: AL gaps under {100 * tol['AL_s']:.0f}% and final-loss gaps "
        f"under {100 * tol['final_loss']:.0f}% count as ties (the median coefficient of variation of a step's time "
        f"is {table['AL_CV'].median():.2f}). AEC without an energy counter is estimated from CPU time: it follows how "
        "much CPU a run got, not the method's power draw.")
    return "\n".join(lines)


def _scale(table, method: str, rs: bool) -> float | None:
    """The LoRA scaling a run used (alpha/sqrt(r) for rsLoRA, alpha/r otherwise), from its record's params."""
    row = table[table["method"] == method]
    if row.empty or "alpha" not in row or "rank" not in row:
        return None
    alpha, rank = float(row["alpha"].iloc[0]), float(row["rank"].iloc[0])
    return alpha / (rank ** 0.5 if rs else rank)


def _n_items(table) -> str:
    return str(int(table["n_heldout"].iloc[0])) if "n_heldout" in table else "the"


def _steps(table) -> str:
    return str(int(table["steps"].iloc[0])) if "steps" in table else "a few"


def _batch(table) -> str:
    return str(int(table["batch_size"].iloc[0])) if "batch_size" in table else "a few"
