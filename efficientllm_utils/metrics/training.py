"""Metrics of a training phase shared by the training studies: per-step latency (AL and its spread) and the resource
tracker's metrics over the phase."""
from __future__ import annotations

from .stats import spread_metrics, summarize
from .tracker import ResourceTracker
from .values import MetricValue


def step_latency_metrics(step_seconds: list[float], warmup_steps: int) -> tuple[dict[str, MetricValue], str]:
    """AL (mean s/iter) with p50, p90 and CV over the steps after ``warmup_steps``; also returns the counter label."""
    timed = step_seconds[warmup_steps:]
    if not timed:
        raise ValueError(f"{len(step_seconds)} steps leave no timed step after {warmup_steps} warm-up steps")
    stats = summarize(timed)
    counter = f"perf-counter(train-step,{len(timed)}-steps-after-{warmup_steps}-warm-up)"
    return {
        "al_s": MetricValue.measured(stats["mean"], "s/iter", counter),
        **spread_metrics(stats, "al", "s/iter", counter),
    }, counter


def tracker_metrics(tracker: ResourceTracker) -> dict[str, MetricValue]:
    """The tracker's metrics over the training phase (AMU, PCU, AEC, energy, ...), its wall time as ``train_wall_s``."""
    tracked = tracker.metrics()
    tracked["train_wall_s"] = tracked.pop("phase_wall_s")
    return tracked


def tracker_metrics_per(tracker: ResourceTracker, name: str, count: float, unit: str,
                        basis: str) -> dict[str, MetricValue]:
    """``tracker_metrics`` and the training's energy per trained token or sample (``name``: ``count`` of them)."""
    tracked = tracker_metrics(tracker)
    return tracked | {name: tracked["energy_j"].per(count, unit, basis)}
