"""Per-step latency metrics of a training loop (AL and its spread), shared by the training studies."""
from __future__ import annotations

from .stats import summarize
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
        "al_p50_s": MetricValue.measured(stats["p50"], "s/iter", counter),
        "al_p90_s": MetricValue.measured(stats["p90"], "s/iter", counter),
        "al_cv": MetricValue.measured(stats["cv"], "ratio", counter),
    }, counter
