"""Estimated GPU-hours of a profile (the book's "Running on a cluster" page): the grid times the per-run time.

Per run, the first that applies:

1. ``measured``: the run's own record on that profile (its ``duration_s``);
2. ``median of measured``: the median ``duration_s`` of the study's records on that profile, for runs not yet run;
3. ``FLOPs model``: training FLOPs at an assumed sustained throughput, for training studies without records:
   pretraining ``3 x analytical forward FLOPs per token (arch.analysis) x tokens``, fine-tuning ``6 x parameters
   x tokens`` with the parameter count read from the model id (every sequence at ``max_length``: an upper bound);
4. none: no estimate (quantization without records: its time is evaluation over whole tasks, not modelled here).

GPU-hours = hours x GPUs the run asks for (``runner.gpus_of``). Every figure is an estimate and says which rule made it.
"""
from __future__ import annotations

import re
import statistics
from pathlib import Path

from . import study_registry
from .params import RunSpec, expand, params_path
from .records import load_records
from .runner import gpus_of

ASSUMED_MFU = 0.40  # a typical training model-FLOPs utilisation (also make plan's, plan.py)
# 40% of the 989 TFLOP/s dense bf16 peak of an H100/H200 SXM
ASSUMED_SUSTAINED_FLOPS = ASSUMED_MFU * 989e12
PRETRAIN_STUDIES = tuple(s.name for s in study_registry.STUDIES if s.run_model == "architecture_run:PretrainRun")
# parameter counts of models whose id does not say it (from their model cards)
KNOWN_PARAMS = {"microsoft/phi-4": 14.7e9, "microsoft/Phi-3.5-mini-instruct": 3.8e9}


def params_in_model_id(model: str) -> float | None:
    """Parameters from a hub id such as ``Qwen/Qwen2.5-7B-Instruct`` (7e9); None when it does not say."""
    if model in KNOWN_PARAMS:
        return KNOWN_PARAMS[model]
    sizes = re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)[Bb](?![a-zA-Z])", model.split("/")[-1].replace("-", " "))
    return float(sizes[-1]) * 1e9 if sizes else None


def training_flops(spec: RunSpec) -> float | None:
    """Training FLOPs of one run by the FLOPs model (None: no model for this study)."""
    p = spec.params
    transformer = spec.study == "attention_free" and p.get("architecture") == "transformer"
    if spec.study in PRETRAIN_STUDIES or transformer:
        from .arch.analysis import flops_per_token

        config = spec.run_params().decoder_config()
        tokens = p["steps"] * p["batch_size"] * p["seq_len"]
        # forward + backward = 3 forwards; the average token of a causal block attends to (S + 1) / 2 keys
        return 3 * flops_per_token(config, (p["seq_len"] + 1) / 2) * tokens
    if spec.study == "attention_free":
        from .arch.attention_free import meta_param_count

        # 6 FLOPs per parameter and token (forward + backward); Mamba's scan and Pythia's attention not counted
        return 6 * meta_param_count(spec.run_params().hf_config()) * p["steps"] * p["batch_size"] * p["seq_len"]
    if spec.study == "peft":
        n_params = params_in_model_id(p["model"])
        if n_params is None:
            return None
        return 6 * n_params * p["steps"] * p["batch_size"] * p.get("grad_accum", 1) * p["max_length"]
    return None


def run_costs(study: str, profile: str = "paper", root: Path | None = None) -> list[dict]:
    """One row per grid point: GPUs, hours and how the hours were obtained."""
    specs = expand(params_path(study), profile)
    durations = {r.run_id: r.duration_s for r in load_records(study, profile, root) if r.duration_s}
    median = statistics.median(durations.values()) if durations else None
    rows = []
    for spec in specs:
        if spec.run_id in durations:
            hours, how = durations[spec.run_id] / 3600, "measured"
        elif median is not None:
            hours, how = median / 3600, f"median of {len(durations)} measured"
        elif (flops := training_flops(spec)) is not None:
            hours, how = flops / ASSUMED_SUSTAINED_FLOPS / 3600, "FLOPs model"
        else:
            hours, how = None, "not estimated"
        gpus = max(gpus_of(spec), 1)  # a CPU run still holds a worker job
        rows.append({"study": study, "label": spec.label, "gpus": gpus, "hours": hours,
                     "gpu_hours": None if hours is None else hours * gpus, "how": how})
    return rows


def axis_costs(studies: list[str], profile: str = "paper", root: Path | None = None):
    """One row per study: runs, GPU-hours (estimated), and how many runs each rule estimated."""
    import pandas as pd

    frame = pd.DataFrame([row for study in studies for row in run_costs(study, profile, root)])
    summary = frame.groupby("study", sort=False).agg(
        runs=("label", "size"), gpus_per_run=("gpus", "max"),
        estimated_gpu_hours=("gpu_hours", lambda v: v.sum() if v.notna().all() else None))
    summary["how"] = frame.groupby("study", sort=False)["how"].agg(
        lambda v: ", ".join(f"{n} {how}" for how, n in v.value_counts().items()))
    return summary.reset_index()
