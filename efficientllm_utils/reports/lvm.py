"""What the vision-generation chapter shows (SD3.5 and Wan 2.1): tables, grids and clips, trade-offs, and
findings whose verdicts are computed from the records (no torch import)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..records import RESULTS_DIR, run_dir
from .common import StudyResults

FAMILY = {"sd3": "SD3.5 (text-to-image)", "wan": "Wan 2.1 (text-to-video)"}
PRECISION_ORDER = ("fp32", "bf16", "fp16", "int8", "int4-nf4")
METHOD_ORDER = ("lora", "rslora", "dora", "loha", "lokr", "full")
METHOD_NAMES = {"lora": "LoRA", "rslora": "RSLoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr", "full": "Full"}
# thresholds of the verdicts, stated in the chapter
SSIM_KEEPS_FIDELITY = 0.95  # mean SSIM to the fp32 reference's samples
LOSS_TIE = 0.01  # relative held-out loss gap under which two methods tie


def family_of(model: str) -> str:
    return "wan" if model.lower().startswith("wan") else "sd3"


def _col(frame: pd.DataFrame, name: str) -> np.ndarray:
    return frame[name].values if name in frame else np.full(len(frame), np.nan)


def quant_table(res: StudyResults) -> pd.DataFrame:
    ok = res.ok
    if not len(ok):
        return pd.DataFrame()
    t = pd.DataFrame({"model": ok["param_model"].values, "precision": ok["param_precision"].values,
                      "run_id": ok["run_id"].values})
    t["family"] = [family_of(m) for m in t["model"]]
    t["model_MB"] = _col(ok, "model_bytes") / 1e6
    t["MCR"] = _col(ok, "mcr")
    for ours, theirs in {"PSNR_dB": "quality_psnr_db", "SSIM": "quality_ssim", "SSIM_min": "quality_ssim_min",
                         "FD": "quality_fd", "FD_reference": "quality_fd_reference", "step_s": "step_latency_s",
                         "frames_per_s": "frames_per_s", "AMU_GB": "amu_gb", "AEC_W": "aec_w",
                         "energy_J": "energy_j"}.items():
        t[ours] = _col(ok, theirs)
    per_sample = [c for c in ("latency_s_per_image", "latency_s_per_clip") if c in ok]
    t["s_per_sample"] = ok[per_sample].bfill(axis=1).iloc[:, 0].values if per_sample else np.nan
    t["order"] = [PRECISION_ORDER.index(p) if p in PRECISION_ORDER else 99 for p in t["precision"]]
    return t.sort_values(["family", "order"]).drop(columns="order").reset_index(drop=True)


def finetune_table(res: StudyResults) -> pd.DataFrame:
    ok = res.ok
    if not len(ok):
        return pd.DataFrame()
    t = pd.DataFrame({"model": ok["param_model"].values, "method": ok["param_method"].values,
                      "run_id": ok["run_id"].values})
    t["family"] = [family_of(m) for m in t["model"]]
    for ours, theirs in {"trainable_params": "trainable_params", "adapter_MB": "adapter_bytes",
                         "heldout_loss_base": "quality_heldout_loss_base", "heldout_loss": "quality_heldout_loss",
                         "final_loss": "quality_final_loss", "FD_base": "quality_fd_base", "FD": "quality_fd",
                         "AL_s": "al_s", "ST": "st_samples_per_s", "AMU_GB": "amu_gb", "AEC_W": "aec_w"}.items():
        t[ours] = _col(ok, theirs)
    t["adapter_MB"] = t["adapter_MB"] / 1e6
    t["heldout_change_pct"] = 100 * (t["heldout_loss"] / t["heldout_loss_base"] - 1)
    t["order"] = [METHOD_ORDER.index(m) if m in METHOD_ORDER else 99 for m in t["method"]]
    t["method"] = t["method"].map(lambda m: METHOD_NAMES.get(m, m))
    return t.sort_values(["family", "order"]).drop(columns="order").reset_index(drop=True)


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

def quant_findings(table: pd.DataFrame) -> list[str]:
    out = []
    if table.empty:  # no runs yet
        return out
    for fam, part in table.groupby("family"):
        by = part.set_index("precision")
        name = FAMILY.get(fam, fam)
        if {"int4-nf4", "fp32"} <= set(by.index):
            q = by.loc["int4-nf4"]
            keeps = q["SSIM"] >= SSIM_KEEPS_FIDELITY
            out.append(f"**{name}, int4 (NF4) keeps fidelity at a fraction of the memory: "
                       f"{'transfers' if keeps else 'does not transfer'}.** Its denoiser holds "
                       f"{q['model_MB']:.3g} MB against {by.loc['fp32', 'model_MB']:.3g} MB (MCR {q['MCR']:.2f}, "
                       f"counted bytes), with mean SSIM {q['SSIM']:.3f} (PSNR {q['PSNR_dB']:.1f} dB) to the fp32 "
                       f"samples (threshold {SSIM_KEEPS_FIDELITY}); FD {q['FD']:.2f} against fp32's "
                       f"{by.loc['fp32', 'FD']:.2f}.")
        if {"int8", "int4-nf4"} <= set(by.index):
            closer = by.loc["int8", "PSNR_dB"] > by.loc["int4-nf4", "PSNR_dB"]
            out.append(f"**{name}, int8 is closer to the reference than int4: {'yes' if closer else 'no'}** "
                       f"(PSNR {by.loc['int8', 'PSNR_dB']:.1f} against {by.loc['int4-nf4', 'PSNR_dB']:.1f} dB).")
        if {"int8", "fp32"} <= set(by.index):
            slower = by.loc["int8", "step_s"] > by.loc["fp32", "step_s"]
            out.append(f"**{name}, memory is not speed on this hardware: int8 steps are "
                       f"{'slower' if slower else 'not slower'} than fp32** ({by.loc['int8', 'step_s']:.3g} against "
                       f"{by.loc['fp32', 'step_s']:.3g} s per denoising step, one timed generation each, a shared CPU: "
                       f"bitsandbytes dequantizes on the fly).")
    return out


def finetune_findings(table: pd.DataFrame) -> list[str]:
    out = []
    if table.empty:  # no runs yet
        return out
    for fam, part in table.groupby("family"):
        name = FAMILY.get(fam, fam)
        lowered = part[part["heldout_loss"] < part["heldout_loss_base"]]["method"].tolist()
        out.append(f"**{name}, every method lowers the held-out loss on the new data: "
                   f"{'yes' if len(lowered) == len(part) else 'no'}** ({len(lowered)} of {len(part)}; base "
                   f"{part['heldout_loss_base'].iloc[0]:.4f}, after: " + ", ".join(
                       f"{m} {v:.4f}" for m, v in zip(part["method"], part["heldout_loss"], strict=True)) + ").")
        better_fd = part[part["FD"] < part["FD_base"]]["method"].tolist()
        out.append(f"**{name}, samples for the new captions move closer to the real new data (FD, Lite0): "
                   f"{len(better_fd)} of {len(part)} methods** (base FD {part['FD_base'].iloc[0]:.2f}; after "
                   f"{part['FD'].min():.2f}-{part['FD'].max():.2f}; one sample set per run, no interval).")
        if "Full" in set(part["method"]):
            best = part.loc[part["heldout_loss"].idxmin()]
            full = part[part["method"] == "Full"].iloc[0]
            tie = (full["heldout_loss"] - best["heldout_loss"]) / best["heldout_loss"] <= LOSS_TIE
            out.append(f"**{name}, full fine-tuning reaches the lowest held-out loss: "
                       f"{'transfers' if tie else 'does not transfer'}** (full {full['heldout_loss']:.4f}; best "
                       f"{best['method']} {best['heldout_loss']:.4f}; ties within {LOSS_TIE:.0%}).")
            adapters = part[part["method"] != "Full"]
            if len(adapters):
                cheapest = adapters.loc[adapters["trainable_params"].idxmin()]
                out.append(f"**{name}, the LoRA-family methods are the cheapest: "
                           f"{'transfers' if adapters['trainable_params'].max() < full['trainable_params'] else 'no'}** "
                           f"(trainable parameters {adapters['trainable_params'].min():.0f}-"
                           f"{adapters['trainable_params'].max():.0f}, least {cheapest['method']}, against "
                           f"{full['trainable_params']:.0f} for full; stored {adapters['adapter_MB'].min():.3g}-"
                           f"{adapters['adapter_MB'].max():.3g} MB against {full['adapter_MB']:.3g} MB).")
    return out
