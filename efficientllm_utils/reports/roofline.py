"""Every run against the machine's limits, for the LLM chapters: the probe's peaks (measured, and the vendor's where
published), MFU/MBU per run with the reason where a record has none, the roofline plot, and the cost model's
predictions against measurement. Reads only the records (no torch): ``raw["roofline"]`` phases, the
``*_mfu``/``*_mbu``/``*_bound_s``/``predicted_memory_gb`` metrics and ``provenance["machine_probe"]``."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from ..metrics import roofline
from .display import show, styled
from .load import StudyResults

PHASE_KIND = {"prefill": "prefill", "decode": "decode", "train-step": "training step"}
Label = Callable[[object], str]


def _kind(phase_name: str) -> str:
    return PHASE_KIND.get(phase_name.split("-ctx")[0], phase_name)


def probe_of(res: StudyResults) -> dict | None:
    """The machine probe the study's runs were held against: the one the newest run used (``raw["roofline"]``),
    else one its provenance carries."""
    for record in sorted(res.ok_records, key=lambda r: r.finished or "", reverse=True):
        probe = (record.raw.get("roofline") or {}).get("probe") or next(
            iter((record.provenance.get("machine_probe") or {}).values()), None)
        if probe:
            return probe
    return None


def probe_table(probe: dict | None) -> pd.DataFrame:
    """The probe's peaks, one row per ceiling, with the vendor's published figure beside it where there is one."""
    if not probe:
        return pd.DataFrame()
    published = probe.get("published") or {}
    rows = []
    for name, peak in probe["matmul"].items():
        rows.append({"ceiling": f"dense matmul, {name}", "unit": f"G{peak['unit']}",
                     "measured": peak["value"] / 1e9 if peak["value"] else np.nan,
                     "published": published[name] / 1e9 if published.get(name) else np.nan,
                     "how obtained": (f"best of {peak['repeats']} products, {peak.get('op', 'matmul')}"
                                      + ("" if "(" in peak.get("op", "") else f" of {peak['n']} x {peak['n']}")
                                      if peak["value"] else peak["method"].removeprefix("unavailable:"))})
    bw = probe["bandwidth"]
    rows.append({"ceiling": "memory bandwidth", "unit": "GB/s", "measured": bw["value"] / 1e9,
                 "published": published["bandwidth"] / 1e9 if published.get("bandwidth") else np.nan,
                 "how obtained": f"best of repeated copies ({bw['copy_bytes_per_s'] / 1e9:.1f} GB/s, read + write) "
                                 f"and sums ({bw['read_bytes_per_s'] / 1e9:.1f} GB/s, read) of "
                                 f"{bw['tensor_bytes'] / 2 ** 20:.0f} MiB"})
    return pd.DataFrame(rows)


def probe_note(probe: dict | None) -> str:
    if not probe:
        return ("*These records carry no machine probe: they were made before runs were held against the "
                "machine's limits, so MFU and MBU are missing. Re-running the profile adds them.*")
    key = probe.get("key", {})
    source = f"; published: {probe['published']['source']}" if probe.get("published") else \
        "; no vendor figures (a CPU, or a GPU not in the package's table)"
    return (f"Machine probe of {key.get('cpu', '?')}" + (f" with {key['gpu']}" if key.get("gpu") else "")
            + f" ({probe['device']}, torch {key.get('torch')}, {probe['torch_threads']} threads), measured once on "
              f"{probe['measured_at']} in {probe['probe_s']:.0f} s and cached; every run of this machine reads the "
              f"same figures{source}." + _load_words(probe))


def _load_words(probe: dict) -> str:
    """A warning when other work shared the machine while it was probed: its peaks then read low, and MFU/MBU high."""
    load, cores = (probe.get("load_average") or [None])[0], (probe.get("key") or {}).get("logical_cores")
    if load is None or not cores or load <= cores:
        return ""
    return (f" The machine was shared while it was probed (load average {load:.1f} on {cores} cores): its peaks may "
            "read low, and MFU and MBU high, against an idle machine (`python -m efficientllm_utils probe --refresh` "
            "on an idle machine measures them again).")


def utilisation_table(res: StudyResults, label: Label, metrics: dict[str, str]) -> pd.DataFrame:
    """One row per run: each of ``metrics`` (record metric -> header) as a value, or the reason it is missing
    (a metric the probe could not give, or a record made before the probe)."""
    rows = []
    for record in res.ok_records:
        row = {"run": label(record)}
        dtypes = {ph["dtype"] for ph in (record.raw.get("roofline") or {}).get("phases", []) if ph.get("flops")}
        if dtypes:  # the dtype its products really compute in (LLM.int8() on an AVX2 CPU: fp32)
            row["MFU against the matmul peak of"] = ", ".join(sorted(dtypes))
        for name, header in metrics.items():
            metric = record.metrics.get(name)
            if metric is None:
                row[header] = "missing: record made before the machine probe"
            elif metric.value is None:
                row[header] = "missing: " + metric.method.removeprefix("unavailable:")
            else:  # above 100%: the probe's peak read low (a shared machine), or the kernel beat the probe's op
                row[header] = f"{100 * metric.value:.3g}%" + (" (above the probed peak)" if metric.value > 1 else "")
        rows.append(row)
    return pd.DataFrame(rows)


def points(res: StudyResults, label: Label) -> pd.DataFrame:
    """Every timed phase of every run that has them (``raw["roofline"]``): intensity and achieved FLOP/s."""
    rows = []
    for record in res.ok_records:
        for phase in (record.raw.get("roofline") or {}).get("phases", []):
            if phase.get("flops") is None:
                continue
            rows.append({"run": label(record), "phase": phase["name"], "kind": _kind(phase["name"]),
                         "dtype": phase["dtype"], "intensity": phase["intensity"],
                         "achieved_flops_per_s": phase["achieved_flops_per_s"], "seconds": phase["seconds"]})
    return pd.DataFrame(rows)


def roofline_plot(pts: pd.DataFrame, probe: dict | None):
    """Arithmetic intensity against achieved FLOP/s (log-log), with the machine's bandwidth slope and a compute
    ceiling per dtype the runs computed in (measured; dotted: the vendor's published peaks, on a GPU)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if pts.empty or not probe:
        return None
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(10, 4.6))
    bw = probe["bandwidth"]["value"]
    dtypes = list(dict.fromkeys(pts["dtype"]))
    peaks = {d: (probe["matmul"].get(d) or {}).get("value") for d in dtypes}
    low = min(pts["intensity"].min(), *(p / bw for p in peaks.values() if p)) / 3
    high = max(pts["intensity"].max(), *(p / bw for p in peaks.values() if p)) * 3
    xs = np.logspace(np.log10(low), np.log10(high), 200)
    palette = dict(zip(dtypes, sns.color_palette("dark", len(dtypes))))
    for dtype, peak in peaks.items():
        if peak:
            ax.plot(xs, [roofline.attainable_flops_per_s(x, peak, bw) for x in xs], color=palette[dtype], lw=1.5,
                    label=f"roofline, {dtype}: {peak / 1e9:.3g} GFLOP/s, {bw / 1e9:.3g} GB/s (probed)")
        published = (probe.get("published") or {})
        if published.get(dtype) and published.get("bandwidth"):
            ax.plot(xs, [roofline.attainable_flops_per_s(x, published[dtype], published["bandwidth"]) for x in xs],
                    ":", color=palette[dtype], lw=1, label=f"roofline, {dtype} (published by the vendor)")
    sns.scatterplot(data=pts, x="intensity", y="achieved_flops_per_s", hue="run", style="kind", s=70, ax=ax)
    top = max([p for p in peaks.values() if p] + [pts["achieved_flops_per_s"].max()]) * 3
    bottom = min(pts["achieved_flops_per_s"].min(), low * bw) / 3
    ax.set(xscale="log", yscale="log", ylim=(bottom, top), xlabel="arithmetic intensity (FLOP/byte)",
           ylabel="achieved FLOP/s",
           title="analytical FLOPs and bytes over measured time, under the probed ceilings")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1), fontsize=8)
    fig.tight_layout()
    return fig


def cost_model_table(res: StudyResults, label: Label, decode_phase: Callable[[str], bool]) -> pd.DataFrame:
    """Prediction against measurement per run: memory (cost model vs AMU) and decode time per token (roofline
    bound vs TPOT), each with their ratio and, beyond ``roofline.MEMORY_GAP``, where the difference goes."""
    rows = []
    for record in res.ok_records:
        m = record.metrics
        predicted, measured = m.get("predicted_memory_gb"), m.get("amu_gb")
        row = {"run": label(record)}
        if predicted is not None and predicted.value is not None and measured is not None and measured.value:
            row |= {"predicted_GB": predicted.value, "AMU_GB": measured.value,
                    "memory_ratio": measured.value / predicted.value}
            row["memory_gap"] = _memory_gap(row["memory_ratio"], measured.method, predicted.method)
        decode = [ph for ph in (record.raw.get("roofline") or {}).get("phases", []) if decode_phase(ph["name"])]
        if decode:
            ph = decode[-1]  # the longest context's
            bound = next((v.value for k, v in m.items() if k.endswith("bound_s") and v.value is not None
                          and _bound_key(ph["name"]) == k), None)
            if bound:
                row |= {"decode_phase": ph["name"], "bound_ms": 1e3 * bound, "tpot_ms": 1e3 * ph["seconds"],
                        "time_ratio": ph["seconds"] / bound}
                row["time_gap"] = _time_gap(row["time_ratio"])
        rows.append(row)
    return pd.DataFrame(rows)


def _bound_key(phase_name: str) -> str:
    """The metric holding a phase's roofline-bound time: ``decode_bound_s`` or ``decode_ctx<c>_bound_s``."""
    return f"{phase_name.replace('-', '_')}_bound_s"


def _gap(ratio: float, within: str, below: str) -> str | None:
    """The words for a measured / predicted ratio ``within`` 25% of 1 or ``below`` it; None above it (the caller
    says where the excess goes)."""
    if abs(ratio - 1) <= roofline.MEMORY_GAP:
        return within
    return below if ratio < 1 else None


def _memory_gap(ratio: float, measured_method: str, predicted_method: str) -> str:
    if gap := _gap(ratio, "within 25%",
                   "measured below prediction: AMU is a time average, and part of the weights was not yet resident"):
        return gap
    where = ("the process's resident memory (AMU on a CPU) also holds the interpreter, torch and its libraries and "
             "the tokenizer: framework overhead" if "rss" in measured_method else
             "device memory also holds the CUDA context and the allocator's cached blocks")
    activations = "; and the activations and temporaries, which the model does not count (not separated by this run)"
    return f"{where}{activations}"


def _time_gap(ratio: float) -> str:
    return _gap(ratio, "within 25%: the step runs at the bandwidth roofline",
                "faster than the bound: the weights partly stayed in cache, or the probe's peak is low") or (
        f"{100 * (1 - 1 / ratio):.0f}% of each step is time not spent reading the bytes the model must read: "
        "per-token framework overhead (Python, generate's bookkeeping, kernel calls) and kernels below the "
        "probed peak; this run does not separate the two")


COST_COLUMNS = {"run": "run", "predicted_GB": "predicted memory (GB)", "AMU_GB": "AMU (GB, measured)",
                "memory_ratio": "measured / predicted", "memory_gap": "where the difference goes",
                "decode_phase": "decode phase", "bound_ms": "roofline bound (ms/step)",
                "tpot_ms": "TPOT (ms/step, measured)", "time_ratio": "measured / bound",
                "time_gap": "where the time goes"}


def show_cost_model(table: pd.DataFrame):
    from IPython.display import Markdown

    if table.empty or not ({"predicted_GB", "bound_ms"} & set(table.columns)):
        return Markdown("*No cost-model predictions: these records were made before the cost model (re-run the "
                        "profile to get them).*")
    return show(table, COST_COLUMNS)


def decode_mbu_summary(res: StudyResults, label: Label, metric: str = "decode_mbu") -> str:
    """One sentence per run with the decode MBU: what share of the probed bandwidth decoding used."""
    parts = []
    for record in res.ok_records:
        value = record.metrics.get(metric)
        if value is not None and value.value is not None:
            parts.append(f"{label(record)} {100 * value.value:.2g}%")
    if not parts:
        return ""
    return ("Decode MBU (the bytes each decode step must read, over its measured time, against the probed "
            f"bandwidth): {', '.join(parts)}.")


def show_section(res: StudyResults, label: Label, metrics: dict[str, str], decode_phase: Callable[[str], bool],
                 mbu_metric: str) -> None:
    """A chapter's roofline section: the probe, MFU/MBU per run, the roofline plot, the cost model."""
    from IPython.display import Markdown, display

    if not res.ok_records:
        display(Markdown("*No results yet.*"))
        return
    probe = probe_of(res)
    display(Markdown(probe_note(probe)))
    if probe:
        display(show(probe_table(probe), {"ceiling": "ceiling", "unit": "unit", "measured": "measured",
                                             "published": "published by the vendor", "how obtained": "how obtained"}))
    display(styled(utilisation_table(res, label, metrics)))
    pts = points(res, label)
    if len(pts) and probe:
        roofline_plot(pts, probe)
        import matplotlib.pyplot as plt

        plt.show()
    summary = decode_mbu_summary(res, label, mbu_metric)
    if summary:
        display(Markdown(summary))
    display(show_cost_model(cost_model_table(res, label, decode_phase)))
