"""A run against the machine's limits: MFU, MBU, arithmetic intensity and the roofline-bound time of each phase.

A *phase* is one timed unit of work with analytical counts: a prefill (FLOPs of the prompt's tokens), one decode
step (bytes it must read: the weights once plus every sequence's KV cache or state), one training step (3x the
forward FLOPs of its tokens: forward + backward). With the machine probe's peaks (``machine_probe``):

* MFU = analytical FLOPs / measured seconds / peak matmul FLOP/s of the compute dtype (compute-bound phases);
* MBU = bytes that must be read / measured seconds / peak memory bandwidth (decode);
* arithmetic intensity = FLOPs / bytes; the roofline-bound time = max(FLOPs / peak FLOP/s, bytes / bandwidth),
  the least time the phase can take on this machine.

PCU (NVML ``utilization.gpu``) keeps the paper's definition: the share of time a kernel ran, not the share of the
hardware used; these sit beside it. No torch here: the report layer reads the same functions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from . import machine_probe
from .values import MetricValue

TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (two matmuls per forward one): the usual 6N-per-token convention
MEMORY_GAP = 0.25  # prediction and measurement further apart than this (relative): the chapter says where it goes


@dataclass
class Phase:
    """One timed phase of a run: what it must compute and read (analytical or counted), and how long it took."""

    name: str  # "prefill", "decode", "train-step", "decode-ctx512", ...
    flops: float | None  # analytical FLOPs of one unit (a prefill, a decode step, a training step); None: no model
    bytes: float  # bytes it must read at least (weights once + cache or state)
    seconds: float  # measured wall time of that unit
    dtype: str  # compute dtype: which matmul peak applies (fp32, bf16, fp16, int8)
    flops_method: str = "analytical"
    bytes_method: str = "counted"
    seconds_method: str = "perf-counter"

    @property
    def intensity(self) -> float | None:
        """Arithmetic intensity (FLOP/byte)."""
        return None if self.flops is None else self.flops / self.bytes

    @property
    def achieved_flops_per_s(self) -> float | None:
        return None if self.flops is None else self.flops / self.seconds

    @property
    def achieved_bytes_per_s(self) -> float:
        return self.bytes / self.seconds


def roofline_seconds(flops: float, bytes_: float, peak_flops: float, peak_bandwidth: float) -> float:
    """The least time a phase can take: its FLOPs at the compute peak or its bytes at the bandwidth, whichever is
    longer."""
    return max(flops / peak_flops, bytes_ / peak_bandwidth)


def attainable_flops_per_s(intensity: float, peak_flops: float, peak_bandwidth: float) -> float:
    """The roofline: min(peak FLOP/s, intensity x bandwidth)."""
    return min(peak_flops, intensity * peak_bandwidth)


def _no_probe(unit: str) -> MetricValue:
    return MetricValue.unavailable(unit, "no machine probe for this device (python -m efficientllm_utils probe)")


def _utilisation(phase: Phase, fraction: float, counted: str, probe: dict, peak: str) -> MetricValue:
    """A measured share of a probed peak, its method naming what was counted, how the phase was timed and the peak."""
    return MetricValue.measured(fraction, "fraction", f"{counted}({phase.name})/{phase.seconds_method}/"
                                                      f"probed-peak({probe['device']},{peak})")


def mfu(phase: Phase, probe: dict | None) -> MetricValue:
    """Model-FLOPs utilisation of a phase against the probe's matmul peak for its dtype."""
    if phase.flops is None:
        return MetricValue.unavailable("fraction", f"no analytical FLOPs model ({phase.flops_method})")
    if not probe:
        return _no_probe("fraction")
    peak = machine_probe.peak_flops(probe, phase.dtype)
    if not peak:
        reason = (probe.get("matmul", {}).get(phase.dtype) or {}).get("method", f"no {phase.dtype} peak")
        return MetricValue.unavailable("fraction", f"no {phase.dtype} matmul peak on this machine "
                                                   f"({reason.removeprefix('unavailable:')})")
    return _utilisation(phase, phase.achieved_flops_per_s / peak, f"{phase.flops_method}-flops", probe,
                        f"{phase.dtype}-matmul")


def mbu(phase: Phase, probe: dict | None) -> MetricValue:
    """Model-bandwidth utilisation of a phase: the bytes it must read per second against the probe's bandwidth."""
    peak = machine_probe.peak_bandwidth(probe)
    if not peak:
        return _no_probe("fraction")
    return _utilisation(phase, phase.achieved_bytes_per_s / peak, f"{phase.bytes_method}-bytes", probe, "bandwidth")


def bound_seconds(phase: Phase, probe: dict | None) -> MetricValue:
    """The roofline-bound time of the phase on this machine (the cost model's time prediction)."""
    peak_flops, peak_bw = machine_probe.peak_flops(probe, phase.dtype), machine_probe.peak_bandwidth(probe)
    if phase.flops is None and peak_bw:  # the bytes alone bound it from below
        return MetricValue.estimated(phase.bytes / peak_bw, "s", f"roofline({phase.bytes_method}-bytes/bandwidth,"
                                                                  "no-flops-model,probed-peak)")
    if not (peak_flops and peak_bw):
        return MetricValue.unavailable("s", f"no {phase.dtype} matmul peak or bandwidth in the machine probe")
    return MetricValue.estimated(roofline_seconds(phase.flops, phase.bytes, peak_flops, peak_bw), "s",
                                 f"roofline(max({phase.flops_method}-flops/{phase.dtype}-peak,"
                                 f"{phase.bytes_method}-bytes/bandwidth),probed-peaks)")


def phase_metrics(phase: Phase, probe: dict | None, prefix: str) -> dict[str, MetricValue]:
    """``<prefix>_mfu``, ``<prefix>_mbu`` and ``<prefix>_bound_s`` of one phase, each with its method."""
    return {f"{prefix}_mfu": mfu(phase, probe), f"{prefix}_mbu": mbu(phase, probe),
            f"{prefix}_bound_s": bound_seconds(phase, probe)}


def point(phase: Phase) -> dict:
    """The phase as a plain dict for the record's ``raw["roofline"]`` (the chapter's roofline plot reads it)."""
    return {**asdict(phase), "intensity": phase.intensity, "achieved_flops_per_s": phase.achieved_flops_per_s,
            "achieved_bytes_per_s": phase.achieved_bytes_per_s}


def predicted_memory(parts: dict[str, float], method: str) -> MetricValue:
    """The cost model's memory prediction: the sum of counted or analytical parts (bytes), in GB."""
    return MetricValue.estimated(sum(parts.values()) / 1e9, "GB",
                                 f"cost-model({'+'.join(parts)};{method})")


def training_memory_parts(params: int, bytes_per_param: int = 4) -> dict[str, float]:
    """Weights, gradients and AdamW's two moments (torch keeps them in the parameters' dtype) of a model trained in
    one float dtype; activations are not counted (the chapter says so where they matter)."""
    return {"weights": params * bytes_per_param, "gradients": params * bytes_per_param,
            "adamw-moments": 2 * params * bytes_per_param}
