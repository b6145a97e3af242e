"""The attention-free study's report: what its book page shows beyond the architecture studies' tables, computed
from the records: both parameter counts, and the cache or state one sequence holds as the context grows (measured
from the real cache beside the formula) with the decode time at the same contexts."""
from __future__ import annotations

import re

import pandas as pd

from . import architecture as ar
from .display import finish_panels, show
from .findings import findings_markdown
from .load import StudyResults

BASELINE = "transformer"
PARAMS_TOLERANCE = 0.05  # each attention-free model is sized to the transformer's parameter count within +-5%
_STATE_COLUMN = re.compile(r"^state_ctx(\d+)_bytes$")


def state_contexts(frame: pd.DataFrame) -> list[int]:
    """Context lengths with state measurements in the study's flat frame, shortest first."""
    return sorted({int(m.group(1)) for col in frame.columns if (m := _STATE_COLUMN.match(col))})


def state_curves(res: StudyResults) -> pd.DataFrame:
    """Per run and context: the cache or state bytes of one sequence (formula and measured) and the decode timings,
    long form: model, variant, context, analytical_bytes, measured_bytes, latency_s, tpot_s, ..."""
    df = res.ok.sort_values("started") if len(res.ok) else res.ok
    if df.empty:
        return pd.DataFrame()
    decode = ar.decode_curves(res)
    rows = []
    for (_, r), params in zip(df.iterrows(), ar._params(df)):
        for context in state_contexts(df):
            rows.append({"model": ar.model_key(res.study, params), "variant": params.get("variant"),
                         "context": context, "analytical_bytes": r.get(f"state_ctx{context}_bytes"),
                         "measured_bytes": r.get(f"state_ctx{context}_bytes_measured")})
    states = pd.DataFrame(rows)
    return states.merge(decode, on=["model", "variant", "context"], how="left") if len(decode) else states


def params_table(table: pd.DataFrame) -> pd.DataFrame:
    """Each model's counted parameters beside its group's transformer's, and their relative difference."""
    if table.empty:
        return pd.DataFrame()
    rows = []
    for model, group in table.groupby("model", sort=False):
        base = group.loc[group["variant"] == BASELINE, "params_M"]
        for _, r in group.iterrows():
            ref = base.iloc[0] if len(base) else float("nan")
            rows.append({"model": model, "variant": r["variant"], "params": r["params_M"] * 1e6,
                         "transformer_params": ref * 1e6, "difference_pct": 100 * (r["params_M"] / ref - 1),
                         "within_tolerance": abs(r["params_M"] / ref - 1) <= PARAMS_TOLERANCE if len(base)
                         else None})
    return pd.DataFrame(rows)


def state_plot(curves: pd.DataFrame):
    """Cache or state bytes per sequence (measured: markers; formula: dashed) and decode cost against context."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import NullLocator

    sns.set_theme(style="whitegrid")
    panels = [("measured_bytes", "cache or state (bytes/sequence)")]
    panels += [(col, label) for col, label in (("latency_s", "decode latency (s/request)"),
                                                ("tpot_s", "TPOT, median (s/output token)")) if col in curves]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.7), squeeze=False)
    contexts = sorted(curves["context"].unique())
    style = "model" if curves["model"].nunique() > 1 else None
    for ax, (column, label) in zip(axes[0], panels):
        last = ax is axes[0][-1]
        sns.lineplot(data=curves, x="context", y=column, hue="variant", style=style, marker="o", ax=ax, legend=last)
        if column == "measured_bytes":
            sns.lineplot(data=curves, x="context", y="analytical_bytes", hue="variant", style=style, ax=ax,
                         legend=False, lw=0.8, linestyle="--")
            ax.set(yscale="log")
        ax.set(xscale="log", xticks=contexts, xticklabels=contexts, xlabel="context (prompt tokens)", ylabel=label)
        ax.xaxis.set_minor_locator(NullLocator())  # the y axis keeps its minor labels: a range within one decade
    return finish_panels(fig, axes)


def state_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Measured bytes per sequence, one column per context, and whether every measurement equals its formula."""
    if curves.empty:
        return pd.DataFrame()
    wide = curves.pivot_table(index=["model", "variant"], columns="context", values="measured_bytes",
                              sort=False).reset_index()
    wide.columns = [f"ctx{col}" if isinstance(col, (int, float)) else col for col in wide.columns]
    equal = (curves["measured_bytes"] == curves["analytical_bytes"]).groupby(
        [curves["model"], curves["variant"]], sort=False).all()
    wide["equals_formula"] = [bool(equal[m, v]) for m, v in zip(wide["model"], wide["variant"])]
    return wide


def observations(table: pd.DataFrame, curves: pd.DataFrame) -> list[str]:
    """What the state and decode measurements show, per model group (numbers, no verdict: the paper states none)."""
    out = []
    if curves.empty:
        return out
    first, last = curves["context"].min(), curves["context"].max()
    for model, group in curves.groupby("model", sort=False):
        prefix = f"{model}: " if curves["model"].nunique() > 1 else ""
        by = group.set_index(["variant", "context"])
        parts, timings = [], {"latency_s": [], "tpot_s": []}
        for variant in dict.fromkeys(group["variant"]):
            a, b = by.loc[(variant, first), "measured_bytes"], by.loc[(variant, last), "measured_bytes"]
            parts.append(f"{variant} {a:,.0f} B -> {b:,.0f} B ({b / a:.3g}x)")
            for column, items in timings.items():
                if column in by and pd.notna(by.loc[(variant, first), column]):
                    ta, tb = by.loc[(variant, first), column], by.loc[(variant, last), column]
                    items.append(f"{variant} {ta:.3g} s -> {tb:.3g} s ({tb / ta:.2f}x)")
        out.append(f"{prefix}cache or state of one sequence from {first} to {last} tokens of context (measured): "
                   + ", ".join(parts) + f" ({last / first:g}x the context).")
        if timings["latency_s"]:
            out.append(f"{prefix}a whole request (prefill of the prompt, then greedy tokens) after {first} and after "
                       f"{last} tokens of context: " + ", ".join(timings["latency_s"]) + ".")
        if timings["tpot_s"]:
            out.append(f"{prefix}the median time per output token after the first (decoding from the cache or "
                       f"state alone), after {first} and after {last} tokens: " + ", ".join(timings["tpot_s"]) + ".")
    equal = (curves["measured_bytes"] == curves["analytical_bytes"])
    out.append(f"{int(equal.sum())} of {len(equal)} measured cache sizes equal their formula exactly.")
    return out


def flops_coverage(res: StudyResults) -> str:
    """Which models have a FLOPs count, as their records say: the forward FLOPs per token and the training-step MFU
    of each model, or the reason the record gives for their absence."""
    def shown(metric, how) -> str:
        if metric is None:
            return "not in the record"
        if metric.value is None:
            return "missing (" + metric.method.split(":", 1)[1] + ")"
        return how(metric.value)

    parts = []
    for record in sorted(res.ok_records, key=lambda r: r.started or ""):
        name = record.params.get("architecture") or record.label
        m = record.metrics
        parts.append(f"{name}: forward FLOPs {shown(m.get('flops_per_token'), lambda v: f'{v / 1e6:.2f} MFLOP/token')}"
                     f", training-step MFU {shown(m.get('train_mfu'), lambda v: f'{v:.3f}')}")
    return ("FLOPs counts, per model, as the records hold them (analytical where the project has a FLOPs model of the "
            "model's layers): " + "; ".join(parts) + ".") if parts else ""


def summary(res: StudyResults, table: pd.DataFrame, curves: pd.DataFrame) -> str:
    """The chapter's opening lines, from the records."""
    if table.empty:
        return f"*No results yet: run `make reproduce AXIS={res.study}`.*"
    lines = [ar.summary(res, table)]
    if len(curves):
        last = curves["context"].max()
        at_last = curves[curves["context"] == last].set_index("variant")["measured_bytes"]
        lines.append(f"- After {last} tokens of context one sequence holds "
                     + ", ".join(f"{v} {b:,.0f} B" for v, b in at_last.items()) + " of cache or state (measured).")
    return "\n".join(lines)


def findings_text(res: StudyResults, table: pd.DataFrame, curves: pd.DataFrame) -> str:
    if table.empty:
        return "*No results yet.*"
    # this study repeats no run: the noise is the architecture studies' (floors, raised by their repeated runs)
    tol = {**ar.TIE_TOLERANCE, **ar.noise_tolerances(res.profile)}
    return findings_markdown(ar.findings(res, tol), observations(table, curves), ar.caveats(res, table, tol))


PARAMS_COLUMNS = {"model": "model", "variant": "model kind", "params": "parameters (counted)",
                  "transformer_params": "transformer's parameters", "difference_pct": "difference (%)",
                  "within_tolerance": "within +-5%"}


def show_params(table: pd.DataFrame):
    frame = params_table(table)
    drop = {"model"} if len(frame) and frame["model"].nunique() == 1 else set()
    return show(frame, {k: v for k, v in PARAMS_COLUMNS.items() if k not in drop},
                  {"params": "{:,.0f}", "transformer_params": "{:,.0f}", "difference_pct": "{:+.1f}"})


def show_state(curves: pd.DataFrame):
    frame = state_table(curves)
    if frame.empty:
        return show(frame, {})
    drop = {"model"} if frame["model"].nunique() == 1 else set()
    columns = {col: (f"{col[3:]} tokens (bytes)" if col.startswith("ctx") else
                     {"model": "model", "variant": "model kind", "equals_formula": "measured = formula"}[col])
               for col in frame.columns if col not in drop}
    return show(frame, columns, {h: "{:,.0f}" for h in columns if h.startswith("ctx")})
