import math

import numpy as np
import pytest

from efficientllm_utils.metrics import stats, tracker
from efficientllm_utils.metrics.values import MetricValue, flatten


def test_summarize_matches_numpy_percentiles():
    samples = list(range(1, 101))
    s = stats.summarize(samples)
    assert s["n"] == 100 and s["mean"] == 50.5 and s["p50"] == 50.5
    assert s["p90"] == pytest.approx(np.percentile(samples, 90)) and s["p99"] == pytest.approx(99.01)
    assert s["cv"] == pytest.approx(np.std(samples, ddof=1) / 50.5)
    with pytest.raises(ValueError):
        stats.summarize([])


def test_dual_stop_rule_needs_both_iterations_and_time(monkeypatch):
    clock = iter(range(1000))  # every perf_counter call advances one "second"
    monkeypatch.setattr(stats.time, "perf_counter", lambda: next(clock))
    calls = []
    out = stats.repeat_until(lambda: calls.append(1) or len(calls), warmup=2, min_iterations=3, min_seconds=10)
    assert out[0] == 3  # two warm-up calls were discarded
    assert len(out) >= 10  # time, not the iteration count, stopped it
    quick = stats.repeat_until(lambda: 1, warmup=0, min_iterations=5, min_seconds=0)
    assert len(quick) == 5


def test_metric_value_refuses_invented_numbers():
    with pytest.raises(ValueError):
        MetricValue(value=1.0, unit="W", method="unavailable:no counter")
    with pytest.raises(ValueError):
        MetricValue(value=None, unit="W", method="measured:nvml")
    with pytest.raises(ValueError):
        MetricValue(value=1.0, unit="W", method="guessed")
    with pytest.raises(ValueError):
        MetricValue.measured(math.nan, "W", "x")
    flat = flatten({"aec_w": MetricValue.unavailable("W", "no-gpu")})
    assert flat == {"aec_w": None, "aec_w_unit": "W", "aec_w_method": "unavailable:no-gpu"}


def test_tracker_on_cpu_samples_memory_and_labels_energy(monkeypatch, tmp_path):
    monkeypatch.setattr(tracker, "RAPL_ROOT", tmp_path / "no-powercap")
    with tracker.ResourceTracker(interval_s=0.01, use_gpu=False) as t:
        a = np.random.rand(400, 400)
        for _ in range(1_000_000):  # busy until the sampling thread has added a sample, however fast this CPU is
            a = a @ a / 400
            if len(t.samples) >= 2:  # the one taken on entry and one from the thread
                break
    m = t.metrics()
    assert len(t.samples) >= 3  # and one on exit
    assert m["amu_gb"].value > 0.01 and m["amu_gb"].method.startswith("measured:psutil")
    assert m["pcu"].value is None and m["pcu"].method.startswith("unavailable:")
    assert m["energy_j"].method.startswith("estimated:cpu-time-x-watts")
    assert m["energy_j"].value == pytest.approx(t.cpu_seconds * tracker.ASSUMED_WATTS_PER_BUSY_CORE)
    assert m["aec_w"].value == pytest.approx(m["energy_j"].value / t.wall_s)


def test_tracker_reads_rapl_with_wraparound(monkeypatch, tmp_path):
    domain = tmp_path / "intel-rapl:0"
    domain.mkdir()
    (domain / "energy_uj").write_text("999000000")
    (domain / "max_energy_range_uj").write_text("1000000000")
    monkeypatch.setattr(tracker, "RAPL_ROOT", tmp_path)
    t = tracker.ResourceTracker(interval_s=0.05, use_gpu=False)
    with t:
        (domain / "energy_uj").write_text("4000000")  # wrapped: 1 J before the wrap + 4 J after
    energy = t.metrics()["energy_j"]
    assert energy.method == "measured:rapl-package-energy-counter(whole-machine)"
    assert energy.value == pytest.approx(5.0)


def test_tracker_refuses_gpu_when_there_is_none(monkeypatch):
    monkeypatch.setattr(tracker, "visible_gpu_indices", lambda: [])
    with pytest.raises(RuntimeError, match="no visible GPU"):
        tracker.ResourceTracker(use_gpu=True)
