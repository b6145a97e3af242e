"""Summaries of raw timing samples, and the dual stop rule of a benchmark loop."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .values import MetricValue


def spread_metrics(stats: dict[str, float], prefix: str, unit: str, counter: str,
                   percentiles: tuple[int, ...] = (50, 90)) -> dict[str, MetricValue]:
    """The spread of a ``summarize`` result as measured metrics: ``<prefix>_p<q>_s`` per percentile, then
    ``<prefix>_cv``."""
    out = {f"{prefix}_p{q}_s": MetricValue.measured(stats[f"p{q}"], unit, counter) for q in percentiles}
    out[f"{prefix}_cv"] = MetricValue.measured(stats["cv"], "ratio", counter)
    return out


def summarize(samples: list[float]) -> dict[str, float]:
    """Mean, median, p90, p99, standard deviation and coefficient of variation."""
    if not samples:
        raise ValueError("no samples to summarize")
    arr = np.asarray(samples, dtype=float)
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {
        "n": int(arr.size),
        "mean": mean,
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "std": std,
        "cv": std / mean if mean > 0 else float("nan"),
    }


def repeat_until(fn: Callable[[], object], *, warmup: int, min_iterations: int, min_seconds: float,
                 max_iterations: int = 10_000) -> list:
    """Call ``fn`` ``warmup`` times (discarded), then until BOTH at least
    ``min_iterations`` calls and ``min_seconds`` have passed (or ``max_iterations``).
    Returns what each measured call returned: the raw samples."""
    if min_iterations < 1 or max_iterations < min_iterations:
        raise ValueError("need 1 <= min_iterations <= max_iterations")
    for _ in range(warmup):
        fn()
    results = []
    started = time.perf_counter()
    while len(results) < max_iterations and (
            len(results) < min_iterations or time.perf_counter() - started < min_seconds):
        results.append(fn())
    return results
