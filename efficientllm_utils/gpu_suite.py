"""``make gpu-suite``: the prepared check for the day a GPU is available (about 10 minutes; not yet timed on one).

In order of value, each step only after the one before succeeded:

1. ``gpu-check`` (``gpu_check.py``): NVML sampling, the energy counter, bitsandbytes int8/int4 on CUDA;
2. ``plan`` against the device it runs on (H100 or H200 by the NVML name): refuses before any run that will not fit;
3. the ``gpu`` profiles' highest-value points, run through the runner like ``make run`` (same run ids, records in
   ``results/<study>/gpu/``, so the book shows them as this profile's GPU results with the device in the record's
   provenance): the Qwen2.5-1.5B shape at bf16 and int4-nf4 (quantization), then LoRA on SmolLM2 (peft).

Without a GPU it says so and exits 0, like ``gpu-check``.
"""
from __future__ import annotations

import sys
from pathlib import Path

# (study, the labels of the gpu profile's runs to execute), in order of value
SUITE: list[tuple[str, list[str]]] = [
    ("quantization", ["model=shape:qwen2.5-1.5b,precision=bf16", "model=shape:qwen2.5-1.5b,precision=int4-nf4"]),
    ("peft", ["method=lora"]),
]
PROFILE = "gpu"


def device_target() -> str:
    """``h200`` on an H200, else ``h100`` (the plan's smaller target: a run that fits it fits the larger one)."""
    import torch

    return "h200" if "H200" in torch.cuda.get_device_name(0) else "h100"


def suite_specs():
    """The suite's runs of the gpu profiles (a label no longer in a profile fails here, before any work)."""
    from .params import expand, params_path

    out = []
    for study, labels in SUITE:
        specs = {spec.label: spec for spec in expand(params_path(study), PROFILE)}
        missing = sorted(set(labels) - set(specs))
        if missing:
            raise ValueError(f"gpu-suite: {study}'s {PROFILE} profile has no run {missing}; its runs: {sorted(specs)}")
        out.append((study, [specs[label] for label in labels]))
    return out


def main(results_root: Path) -> int:
    from . import gpu_check, plan
    from .runner import execute

    reason = gpu_check._gpu_available()
    if reason:
        print(f"gpu-suite: no GPU here ({reason}); nothing to check. Run it on a machine with an NVIDIA GPU.")
        return 0
    runs = suite_specs()
    if gpu_check.main() != 0:
        print("gpu-suite: gpu-check failed; stopping before the runs", file=sys.stderr)
        return 1
    target = device_target()
    if plan.main([study for study, _ in SUITE], PROFILE, target) != 0:
        return 2
    for study, specs in runs:
        print(f"== gpu-suite: {study} {PROFILE}: {', '.join(s.label for s in specs)}", file=sys.stderr)
        if execute(specs, results_root).failed:
            print(f"gpu-suite: {study} failed; its records and notebooks hold the tracebacks", file=sys.stderr)
            return 1
    print(f"gpu-suite: done; `make book` shows the records under {results_root}/<study>/{PROFILE}/")
    return 0
