"""What the vision-generation chapter shows (SD3.5 and Wan 2.1): tables, grids and clips, trade-offs, and
findings whose verdicts are computed from the records (no torch import)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import precisions
from ..records import RESULTS_DIR, run_dir
from .findings import Finding, common_caveats, decide_claims, findings_markdown
from .load import StudyResults
from .verdicts import Difference, bootstrap_ratio, paired_ratio, point_difference, tracked_difference
from .dit import fd_difference

FAMILY = {"sd3": "SD3.5 (text-to-image)", "wan": "Wan 2.1 (text-to-video)"}
PRECISION_ORDER = precisions.names("lvm")
METHOD_ORDER = ("lora", "rslora", "dora", "loha", "lokr", "glora", "full")
METHOD_NAMES = {"lora": "LoRA", "rslora": "RSLoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr", "glora": "GLoRA",
                "full": "Full"}


def family_of(model: str) -> str:
    return "wan" if model.lower().startswith("wan") else "sd3"


def _col(frame: pd.DataFrame, name: str) -> np.ndarray:
    return frame[name].values if name in frame else np.full(len(frame), np.nan)


def _table(res: StudyResults, key: str, order: tuple[str, ...], columns: dict[str, str],
           megabytes: str) -> pd.DataFrame:
    """One row per successful run: model, family, ``key`` (precision or method, in ``order``) and ``columns``
    (ours <- record column; NaN where a record lacks one), the bytes column ``megabytes`` in MB."""
    ok = res.ok
    if not len(ok):
        return pd.DataFrame()
    t = pd.DataFrame({"model": ok["param_model"].values, key: ok[f"param_{key}"].values, "run_id": ok["run_id"].values})
    t["family"] = [family_of(m) for m in t["model"]]
    for ours, theirs in columns.items():
        t[ours] = _col(ok, theirs)
    t[megabytes] = t[megabytes] / 1e6
    t["order"] = [order.index(v) if v in order else 99 for v in t[key]]
    return t.sort_values(["family", "order"]).drop(columns="order").reset_index(drop=True)


def quant_table(res: StudyResults) -> pd.DataFrame:
    t = _table(res, "precision", PRECISION_ORDER, {
        "model_MB": "model_bytes", "MCR": "mcr", "PSNR_dB": "quality_psnr_db", "SSIM": "quality_ssim",
        "SSIM_min": "quality_ssim_min", "FD": "quality_fd", "FD_reference": "quality_fd_reference",
        "FD_noise_floor": "quality_fd_noise_floor",
        "step_s": "step_latency_s", "frames_per_s": "frames_per_s", "AMU_GB": "amu_gb", "AEC_W": "aec_w",
        "energy_J": "energy_j", "s_per_image": "latency_s_per_image", "s_per_clip": "latency_s_per_clip"},
        megabytes="model_MB")
    if t.empty:
        return t
    t["s_per_sample"] = t["s_per_image"].fillna(t["s_per_clip"])
    return t.drop(columns=["s_per_image", "s_per_clip"])


def finetune_table(res: StudyResults) -> pd.DataFrame:
    t = _table(res, "method", METHOD_ORDER, {
        "trainable_params": "trainable_params", "adapter_MB": "adapter_bytes",
        "heldout_loss_base": "quality_heldout_loss_base", "heldout_loss": "quality_heldout_loss",
        "final_loss": "quality_final_loss", "FD_base": "quality_fd_base", "FD": "quality_fd",
        "FD_noise_floor": "quality_fd_noise_floor", "AL_s": "al_s",
        "ST": "st_samples_per_s", "AMU_GB": "amu_gb", "AEC_W": "aec_w"}, megabytes="adapter_MB")
    if t.empty:
        return t
    t["heldout_change_pct"] = 100 * (t["heldout_loss"] / t["heldout_loss_base"] - 1)
    t["method"] = t["method"].map(lambda m: METHOD_NAMES.get(m, m))
    return t


def base_note(res: StudyResults) -> str:
    """Which numbers come from small models pretrained here, and what pretraining did (held-out loss)."""
    lines = []
    for record in res.ok_records:
        q = record.quality
        if "base_heldout_loss" not in q or record.params["model"] in {r.split(":")[0] for r in lines}:
            continue
        lines.append(f"{record.params['model']}: pretrained here for {q['base_base_steps']} flow-matching steps on "
                     f"{q['base_train_data']}; held-out loss {q['base_heldout_loss_init']:.3f} untrained -> "
                     f"{q['base_heldout_loss']:.3f} pretrained (VAE reconstruction MSE {q['base_vae_heldout_mse']:.3f})")
    if not lines:
        return "The records hold the paper's checkpoints (no base was pretrained here)."
    return ("**Small models pretrained here, not the released checkpoints.** Every number below comes from these "
            "bases:\n\n" + "\n".join(f"- {line}" for line in lines))


def media(res: StudyResults, table: pd.DataFrame, key: str, filename: str, root: Path | None = None
          ) -> list[tuple[str, Path]]:
    """(label, path) of each run's saved grid or clip that exists, in the table's order."""
    out = []
    if table.empty:
        return out
    for label, model, run_id in zip(table[key], table["model"], table["run_id"], strict=True):
        path = run_dir(res.study, res.profile, run_id, root or RESULTS_DIR) / filename
        if path.exists():
            out.append((f"{model}, {label}", path))
    return out


def tradeoff_plot(table: pd.DataFrame, x: str, y: str, hue: str, xlabel: str, ylabel: str, logx: bool = False):
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    families = sorted(table["family"].unique())
    fig, axes = plt.subplots(1, len(families), figsize=(5.2 * len(families), 3.6), squeeze=False)
    for ax, fam in zip(axes[0], families, strict=True):
        part = table[table["family"] == fam]
        sns.scatterplot(data=part, x=x, y=y, hue=hue, s=70, ax=ax)
        for _, row in part.iterrows():
            ax.annotate(row[hue], (row[x], row[y]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set(title=FAMILY.get(fam, fam), xlabel=xlabel, ylabel=ylabel, xscale="log" if logx else "linear")
        ax.legend_.remove() if ax.legend_ else None
    fig.tight_layout()
    return fig


# --- findings -------------------------------------------------------------------------------------------------
# The claims are rows of book/paper/claims.csv (chapter = the study), decided by reports.verdicts' rules:
# per-item values of two runs on the same items (held-out losses under the same times and noise, per-image PSNR and
# SSIM against one reference) by a paired bootstrap over items; step times by a bootstrap over the timed steps;
# counted bytes and parameters exactly.

BASE = "base"  # the fine-tuning claims' name for the base before training
PRETRAINED, UNTRAINED = "pretrained", "untrained"  # the quantization claims' names for the base's two states
METRIC_WORDS = {"heldout_loss": "the held-out flow-matching loss", "model_bytes": "the denoiser's counted bytes",
                "ssim": "the mean SSIM to the reference's samples", "psnr_db": "the mean PSNR to the reference's samples",
                "step_latency_s": "the time per denoising step", "trainable_params": "the trainable parameters",
                "AL_s": "the training step time (AL)", "AMU_GB": "the memory in use while training (AMU)",
                "fd": "FD (EfficientNet-Lite0) of the samples against held-out real images"}
PER_FRAME = {"ssim": "ssim_per_frame", "psnr_db": "psnr_db_per_frame"}
# AMU is one tracked value per run; in the published cpu records LoRA and RSLoRA, the same computation, differ by
# up to 14% (SD3 0.737 vs 0.647 GB: the process's resident memory moves with the allocator), so 15% is its noise.
AMU_TOLERANCE = 0.15


def _label(model: str) -> str:
    return f"{FAMILY.get(family_of(model), model)}: {model}"


def _runs(res: StudyResults, key: str) -> dict[str, dict[str, object]]:
    """{model: {precision or method: its record}} of the successful runs (the latest one per grid point)."""
    out: dict[str, dict[str, object]] = {}
    for record in sorted(res.ok_records, key=lambda r: r.started or ""):
        out.setdefault(record.params["model"], {})[record.params[key]] = record
    return out


def _paired(a, b) -> Difference | None:
    return paired_ratio(a, b) if a and b and len(a) == len(b) else None


def _exact(subject, baseline, what: str) -> Difference | None:
    if subject is None or baseline is None or subject.value is None or baseline.value is None:
        return None
    return point_difference(subject.value, baseline.value, 0.0, what)


def quant_findings(res: StudyResults) -> list[Finding]:
    """The quantization claims (``claims.csv``, chapter ``lvm_quantization``) on each model's runs, and the base's
    pretraining (pretrained against untrained, from the per-item held-out losses the records carry)."""
    runs = _runs(res, "precision")
    references = {m: next(iter(r.values())).params["reference_precision"] for m, r in runs.items()}
    with_base = {m for m, r in runs.items() if any("base_heldout_item_losses" in x.raw for x in r.values())}
    variants = {_label(m): [*r, *([PRETRAINED, UNTRAINED] if m in with_base else [])] for m, r in runs.items()}
    models = {_label(m): m for m in runs}

    def compare(claim, label, subject, baseline):
        by, metric = runs[models[label]], claim["metric"]
        if metric == "heldout_loss":  # the base, from any run's record (every run loads the same base)
            raw = next(r.raw for r in by.values() if "base_heldout_item_losses" in r.raw)
            return _paired(raw["base_heldout_item_losses"], raw["base_heldout_item_losses_init"])
        a, b = by[subject], by[baseline]
        if metric == "model_bytes":
            return _exact(a.metrics.get("model_bytes"), b.metrics.get("model_bytes"), "counted bytes, exact")
        if metric in PER_FRAME:
            return _paired(a.raw.get(PER_FRAME[metric]), b.raw.get(PER_FRAME[metric]))
        if metric == "step_latency_s":
            return bootstrap_ratio(a.raw.get("step_seconds", []), b.raw.get("step_seconds", []))
        if metric == "fd":
            return fd_difference(a.quality.get("fd"), b.quality.get("fd"), b.quality.get("fd_noise_floor"))
        return None

    def resolve(label, name):
        return references[models[label]] if name == "reference" else precisions.resolve_claim_name(name)

    found = []
    for label in variants:  # one model at a time: a margin of "floor" is that model's noise floor
        found += decide_claims("lvm_quantization", "inference", {label: variants[label]}, compare, METRIC_WORDS,
                               resolve=resolve, margin=lambda claim, label=label: _margin(claim, runs[models[label]]))
    return found


def _margin(claim, by: dict) -> float:
    """A ``not_lower`` claim's allowed drop: its tolerance, or (``floor``) the noise floor relative to the
    baseline's FD, from the baseline's record (no record of it: no margin)."""
    if claim["tolerance"] != "floor":
        return float(claim["tolerance"])
    baseline = next((by[n] for n in claim["baseline"].split("|") if n in by), None)  # the first present
    q = baseline.quality if baseline is not None else {}
    return q["fd_noise_floor"] / q["fd"] if q.get("fd_noise_floor") is not None and q.get("fd") else 0.0


def finetune_findings(res: StudyResults) -> list[Finding]:
    """The fine-tuning claims (``claims.csv``, chapter ``lvm_finetune``) on each model's runs: every method's held-out
    loss against the base's on the same items, and the costs of the methods against full fine-tuning."""
    runs = _runs(res, "method")
    variants = {_label(m): [*r, BASE] for m, r in runs.items()}
    models = {_label(m): m for m in runs}

    def compare(claim, label, subject, baseline):
        by, metric = runs[models[label]], claim["metric"]
        a = by[subject]
        if metric == "heldout_loss":
            b = a.raw.get("heldout_item_losses_base") if baseline == BASE else by[baseline].raw.get("heldout_item_losses")
            return _paired(a.raw.get("heldout_item_losses"), b)
        if metric == "fd":  # every run's record holds the base's FD and the floor (same prompts and seed)
            fd_b = a.quality.get("fd_base") if baseline == BASE else by[baseline].quality.get("fd")
            return fd_difference(a.quality.get("fd"), fd_b, a.quality.get("fd_noise_floor"))
        b = by[baseline]
        if metric == "trainable_params":
            return _exact(a.metrics.get("trainable_params"), b.metrics.get("trainable_params"), "counted, exact")
        if metric == "AMU_GB":
            return tracked_difference(a.metrics.get("amu_gb"), b.metrics.get("amu_gb"), AMU_TOLERANCE) \
                if "amu_gb" in a.metrics and "amu_gb" in b.metrics else None
        if metric == "AL_s":
            def timed(r):
                return [x["seconds"] for x in r.raw.get("steps", [])[r.params.get("timing_warmup_steps", 0):]]
            return bootstrap_ratio(timed(a), timed(b))
        return None

    return decide_claims("lvm_finetune", "vision", variants, compare, METRIC_WORDS)


def _floor_phrase(part: pd.DataFrame, reference: float) -> str:
    """The noise floor beside a family's FDs, and plainly when it is too large for FD to decide anything."""
    floor = part["FD_noise_floor"].dropna() if "FD_noise_floor" in part else pd.Series(dtype=float)
    if not len(floor):
        return " -- these records predate the noise floor, so no verdict"
    text = f" (noise floor {floor.iloc[0]:.2f}: real images against the same reference; the verdicts are under the claims)"
    if floor.iloc[0] >= 0.5 * reference:
        text += (f" -- the floor is {100 * floor.iloc[0] / reference:.0f}% of the {reference:.2f} it is measured "
                 "against: too few real images (frames) to tell a change of FD from noise, so FD decides nothing here")
    return text


def observations(qt: pd.DataFrame, ft: pd.DataFrame) -> list[str]:
    """Every run's FD beside its noise floor (one sample set per run: the floor is its noise)."""
    out = []
    for fam, part in qt.groupby("family") if len(qt) else ():
        out.append(f"{FAMILY.get(fam, fam)}, quantization: FD (EfficientNet-Lite0) "
                   + ", ".join(f"{r.precision} {r.FD:.2f}" for r in part.itertuples())
                   + _floor_phrase(part, part["FD"].iloc[0]) + ".")
    for fam, part in ft.groupby("family") if len(ft) else ():
        out.append(f"{FAMILY.get(fam, fam)}, fine-tuning: FD of samples for the new captions, base "
                   f"{part['FD_base'].iloc[0]:.2f}, after " + ", ".join(f"{r.method} {r.FD:.2f}" for r in part.itertuples())
                   + _floor_phrase(part, part["FD_base"].iloc[0]) + ".")
    return out


def findings_text(quant: StudyResults, finetune: StudyResults, qt: pd.DataFrame, ft: pd.DataFrame) -> str:
    found = (quant_findings(quant) if len(qt) else []) + (finetune_findings(finetune) if len(ft) else [])
    if not found and qt.empty and ft.empty:
        return "*No results yet.*"
    caveats = common_caveats(quant if len(qt) else finetune, {}, 0.0)
    return findings_markdown(found, observations(qt, ft), caveats)
