"""The verdict rules: the interval of a difference between two runs (bootstrap, paired bootstrap, noise
tolerance; estimates never evidence) and the verdict it gives a claim."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

# A claim about a difference of a subject against a baseline (or against each of several others) is decided on an
# interval of that difference, never on the two point values alone:
# * accuracy: both scored on the same items; a paired bootstrap interval over items of the difference;
# * latency and throughput: a bootstrap interval of the ratio of means from the raw samples of each run;
# * values per item of two runs on the same items (per-item loss under the same noise, per-image fidelity): a
#   paired bootstrap interval over items of the ratio of means;
# * a single value per run (perplexity, memory, loss): the value, with a relative noise tolerance (the spread of
#   repeated runs where the profile has them) as its interval;
# * a difference between two estimated values (energy without a counter) is no evidence at all.
# The claim agrees when the whole interval lies beyond the tolerance on the claimed side, disagrees when it lies
# beyond it on the other side, and is inconclusive otherwise.

AGREES, DISAGREES, INCONCLUSIVE = "agrees", "disagrees", "inconclusive"
CONFIDENCE = 0.95
BOOTSTRAP_DRAWS = 4000
LATENCY_TOLERANCE = 0.03  # relative: interval bounds within +-3% of "no difference" are not a difference
MIN_SAMPLES = 5  # fewer timed samples per run than this: no interval (a bootstrap of 2 values means nothing)
MIN_ITEMS = 30  # fewer scored items than this: no interval for an accuracy difference


@dataclass
class Difference:
    """The relative difference of a subject against a baseline (subject / baseline - 1), with its interval."""

    estimate: float
    low: float
    high: float
    how: str  # how the interval was obtained, a phrase
    estimated: bool = False  # both values are estimates (no evidence)

    def __str__(self) -> str:
        if not np.isfinite(self.estimate):
            return f"no relative difference ({self.how})"
        if not np.isfinite([self.low, self.high]).all():
            return f"{100 * self.estimate:+.1f}% ({self.how})"
        if self.low == self.high == self.estimate:
            return f"{100 * self.estimate:+.1f}% ({self.how})"
        return (f"{100 * self.estimate:+.1f}% ({100 * CONFIDENCE:.0f}% interval {100 * self.low:+.1f}% to "
                f"{100 * self.high:+.1f}%, {self.how})")


def undefined_difference(subject, baseline) -> Difference | None:
    """No relative difference, hence no verdict, where a value (or sample) is NaN or infinite or the baseline's
    mean is zero."""
    a, b = np.atleast_1d(np.asarray(subject, float)), np.atleast_1d(np.asarray(baseline, float))
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return Difference(float("nan"), -np.inf, np.inf, "a value is NaN or infinite")
    if b.mean() == 0:
        return Difference(float("nan"), -np.inf, np.inf, "the baseline is zero")
    return None


def bootstrap_ratio(subject: list[float], baseline: list[float], seed: int = 0) -> Difference:
    """Relative difference of the means of two independent samples (e.g. request latencies of two runs), with a
    percentile bootstrap interval (each sample resampled on its own)."""
    a, b = np.asarray(subject, float), np.asarray(baseline, float)
    if (undefined := undefined_difference(a, b)) is not None:
        return undefined
    if min(len(a), len(b)) < MIN_SAMPLES:
        return Difference(a.mean() / b.mean() - 1, -np.inf, np.inf,
                          f"only {len(a)} and {len(b)} timed samples: too few for an interval, fewer than "
                          f"{MIN_SAMPLES}")
    rng = np.random.default_rng(seed)
    ratios = (rng.choice(a, (BOOTSTRAP_DRAWS, len(a))).mean(1) / rng.choice(b, (BOOTSTRAP_DRAWS, len(b))).mean(1))
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return Difference(a.mean() / b.mean() - 1, low - 1, high - 1,
                      f"bootstrap over {len(a)} and {len(b)} timed samples")


def widened(diff: Difference, spread: float, what: str) -> Difference:
    """``diff``'s interval widened by ``spread`` (relative) on either side: a bootstrap over the samples of one run
    sees only that run's noise, not how much two identical runs differ (``what`` names that spread)."""
    if not spread or not np.isfinite([diff.low, diff.high]).all():
        return diff
    return Difference(diff.estimate, diff.low - spread, diff.high + spread,
                      f"{diff.how}, widened by {what} +-{100 * spread:.1f}%", diff.estimated)


def paired_accuracy(subject: list[int], baseline: list[int], seed: int = 0) -> Difference:
    """Relative accuracy difference of two runs scored on the same items (1 = correct), with a paired bootstrap
    interval over items (relative to the baseline's accuracy); no interval under ``MIN_ITEMS`` items, and with no
    item answered differently the rule of three (a share of at most 3/n) instead of a degenerate bootstrap."""
    a, b = np.asarray(subject, float), np.asarray(baseline, float)
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired accuracy needs the same items: {len(a)} vs {len(b)}")
    if not np.isin(np.concatenate([a, b]), (0, 1)).all():
        raise ValueError("paired accuracy needs answers scored 0 (wrong) or 1 (right), got "
                         f"{sorted(set(np.concatenate([a, b]).tolist()) - {0.0, 1.0})[:5]}")
    base = b.mean() or 1.0
    flips, n = int((a != b).sum()), len(a)
    estimate = (a.mean() - b.mean()) / base
    if n < MIN_ITEMS:
        return Difference(estimate, -np.inf, np.inf, f"{n} items, {flips} answered differently: too few items for "
                                                     f"an interval, fewer than {MIN_ITEMS}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, (BOOTSTRAP_DRAWS, n))
    diffs = (a[idx] - b[idx]).mean(1) / base
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail])
    if flips == 0:  # the bootstrap cannot see a share it never drew: the rule of three bounds it (95%)
        low, high = -3 / n / base, 3 / n / base
    return Difference(estimate, float(low), float(high), f"paired bootstrap over {n} items, {flips} answered "
                                                         "differently")


def paired_ratio(subject: list[float], baseline: list[float], seed: int = 0) -> Difference:
    """Relative difference of the means of two runs' values on the same items (e.g. per-item held-out losses under
    the same noise, per-image SSIM against one reference), with a paired bootstrap interval over items; no interval
    under ``MIN_SAMPLES`` items."""
    a, b = np.asarray(subject, float), np.asarray(baseline, float)
    if len(a) != len(b) or not len(a):
        raise ValueError(f"a paired difference needs the same items: {len(a)} vs {len(b)}")
    if (undefined := undefined_difference(a, b)) is not None:
        return undefined
    estimate, n = a.mean() / b.mean() - 1, len(a)
    if n < MIN_SAMPLES:
        return Difference(estimate, -np.inf, np.inf, f"only {n} items: too few for an interval, fewer than "
                                                     f"{MIN_SAMPLES}")
    idx = np.random.default_rng(seed).integers(0, n, (BOOTSTRAP_DRAWS, n))
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(a[idx].mean(1) / b[idx].mean(1), [tail, 100 - tail])
    return Difference(estimate, float(low - 1), float(high - 1), f"paired bootstrap over {n} items")


def mean_interval(values: list[float], cluster_size: int = 1, seed: int = 0) -> tuple[float, float, float]:
    """The mean of ``values`` with a percentile bootstrap interval (``CONFIDENCE``), resampling consecutive blocks
    of ``cluster_size`` values as units (the positions of one text window are not independent draws; items are, at
    ``cluster_size=1``). NaN bounds under ``MIN_SAMPLES`` blocks; shares (0/1 values) that are all 0 or all 1 get the
    rule of three (at most 3/n away) instead of a degenerate bootstrap, as ``paired_accuracy``."""
    x = np.asarray(values, float)
    if not len(x):
        return float("nan"), float("nan"), float("nan")
    if np.isin(x, (0, 1)).all() and len(set(x.tolist())) == 1 and len(x) >= MIN_SAMPLES:
        edge = float(x[0])
        return edge, max(0.0, edge - 3 / len(x)), min(1.0, edge + 3 / len(x))
    blocks = [x[i: i + cluster_size] for i in range(0, len(x), max(1, cluster_size))]
    if len(blocks) < MIN_SAMPLES:
        return float(x.mean()), float("nan"), float("nan")
    sums, counts = np.array([b.sum() for b in blocks]), np.array([len(b) for b in blocks])
    idx = np.random.default_rng(seed).integers(0, len(blocks), (BOOTSTRAP_DRAWS, len(blocks)))
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(sums[idx].sum(1) / counts[idx].sum(1), [tail, 100 - tail])
    return float(x.mean()), float(low), float(high)


def point_difference(subject: float, baseline: float, tolerance: float, what: str) -> Difference:
    """One value per run: the relative difference, its interval the noise ``tolerance`` on either side."""
    if (undefined := undefined_difference(subject, baseline)) is not None:
        return undefined
    est = subject / baseline - 1
    return Difference(est, est - tolerance, est + tolerance, f"+-{100 * tolerance:.0f}% {what}" if tolerance else what)


def estimated_difference(subject: float, baseline: float) -> Difference:
    est = subject / baseline - 1 if baseline else float("nan")
    return Difference(est, est, est, "estimated", estimated=True)


def is_estimate(method: object) -> bool:
    return isinstance(method, str) and method.startswith("estimated:")


def tracked_difference(subject, baseline, tolerance: float) -> Difference | None:
    """Two runs' values of one tracker metric (``MetricValue``s): None when either is missing, an estimate's
    difference (never evidence) when either is estimated, else the difference within ``tolerance``."""
    if subject.value is None or baseline.value is None:
        return None
    if is_estimate(subject.method) or is_estimate(baseline.method):
        return estimated_difference(subject.value, baseline.value)
    return point_difference(subject.value, baseline.value, tolerance, "tolerance: one tracked phase per run")


def decide(diff: Difference, expect: str, tolerance: float = 0.0) -> str:
    """The verdict on a claim that the subject is ``lower`` / ``higher`` than the baseline, or ``not_lower``
    (at most ``tolerance`` lower: a non-inferiority margin), from the interval of the difference."""
    if diff.estimated or not np.isfinite([diff.low, diff.high]).all():
        return INCONCLUSIVE
    if expect == "lower":
        return AGREES if diff.high < -tolerance else DISAGREES if diff.low > tolerance else INCONCLUSIVE
    if expect == "higher":
        return AGREES if diff.low > tolerance else DISAGREES if diff.high < -tolerance else INCONCLUSIVE
    if expect == "not_lower":
        return AGREES if diff.low >= -tolerance else DISAGREES if diff.high < -tolerance else INCONCLUSIVE
    raise ValueError(f"expect must be lower, higher or not_lower, got {expect!r}")


def combine(verdicts: list[str]) -> str:
    """A claim made of parts (e.g. "lowest": lower than each other variant): any part that disagrees decides it;
    it agrees only when every part agrees."""
    if not verdicts:
        return INCONCLUSIVE
    if DISAGREES in verdicts:
        return DISAGREES
    return AGREES if all(v == AGREES for v in verdicts) else INCONCLUSIVE


def either(verdicts: list[str]) -> str:
    """A claim that holds when any one of its parts does (e.g. "better on at least one metric"): it agrees when any
    part agrees, disagrees only when every part disagrees."""
    if AGREES in verdicts:
        return AGREES
    return DISAGREES if verdicts and all(v == DISAGREES for v in verdicts) else INCONCLUSIVE


def diff_margin(diff: Difference) -> float:
    """Intervals from raw samples are held to ``LATENCY_TOLERANCE``; point values carry their tolerance already."""
    return LATENCY_TOLERANCE if diff.how.startswith("bootstrap over") else 0.0


def within_group_spread(frame: pd.DataFrame, group_column: str, value_column: str) -> float | None:
    """The largest relative spread (max / min - 1) of ``value_column`` within any group of rows that share
    ``group_column`` (runs with identical settings); None without a group of two or more values."""
    spreads = [g.max() / g.min() - 1 for _, g in frame.groupby(group_column)[value_column]
               if g.notna().sum() > 1 and g.min() > 0]
    return float(max(spreads)) if spreads else None
