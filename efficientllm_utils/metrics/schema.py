"""The paper's efficiency metrics, declared once: the record column every study writes each one to, the units it
may carry, which direction is better and how it is obtained. Reports rank and plot through these declarations; a
test holds every published record to them (a metric under another name or unit fails there). No torch import."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str  # the paper's abbreviation
    column: str  # the record's flat column (``RunRecord.flat``) the studies write it to
    units: tuple[str, ...]  # the units a record may carry it in (inference per request, training per step)
    lower_is_better: bool
    obtained: str  # how the studies obtain it


PAPER_METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("AMU", "amu_gb", ("GB",), True,
           "measured: mean memory in use over the tracker's samples (NVML's used memory on a GPU, the process's RSS "
           "on a CPU)"),
    Metric("PCU", "pcu", ("fraction",), False,
           "measured: mean NVML GPU utilisation over the tracker's samples; unavailable without a GPU"),
    Metric("AL", "al_s", ("s/request", "s/iter"), True,
           "measured: mean wall time per request (inference) or per training step after the warm-up steps"),
    Metric("TT", "tt_tokens_per_param_s", ("tokens/param/s",), False,
           "measured: training tokens per parameter per second, from the raw steps"),
    Metric("ST", "st_samples_per_param_s", ("samples/param/s",), False,
           "measured: fine-tuning samples per parameter per second, from the raw steps"),
    Metric("IT", "it_tokens_per_s", ("tokens/s",), False, "measured: generated tokens per second of decoding"),
    Metric("AEC", "aec_w", ("W",), True,
           "measured by an energy counter where the machine has one, else estimated (labelled) from CPU time"),
    Metric("MCR", "mcr", ("ratio",), False,
           "measured: the reference precision's counted bytes over the run's (lvm records it; the quantization "
           "report multiplies the same ratio by the quality kept)"),
)}
