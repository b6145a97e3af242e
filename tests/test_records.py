"""Records on disk: atomic writes that keep the old file on failure, and ``aggregate`` run by two invocations at once."""
import os
import threading

import pandas as pd
import pytest

from efficientllm_utils import records
from efficientllm_utils.records import RunRecord, aggregate, read_record, run_dir, write_record


def _record(run_id: str, status: str = "ok") -> RunRecord:
    return RunRecord(run_id=run_id, study="selftest", profile="cpu", label=f"value={run_id}", status=status,
                     params={"value": run_id})


def test_a_failed_record_write_keeps_the_old_file_and_removes_its_temporary(results_root, monkeypatch):
    directory = run_dir("selftest", "cpu", "a", results_root)
    path = write_record(_record("a"), directory)
    before = path.read_text()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records.os, "fsync", disk_full)  # the new text is written, then syncing it fails
    with pytest.raises(OSError, match="No space left"):
        write_record(_record("a", status="failed"), directory)
    assert path.read_text() == before and read_record(directory).status == "ok"
    assert sorted(p.name for p in directory.iterdir()) == ["record.json"]  # no temporary left behind


def test_two_aggregates_of_one_profile_at_once_both_succeed(results_root, monkeypatch):
    """Both invocations write their temporaries before either renames (a barrier in ``os.replace``): with one
    fixed temporary name, the second rename finds its file gone (or renames the other's half-written one)."""
    for run_id in ("a", "b", "c"):
        write_record(_record(run_id), run_dir("selftest", "cpu", run_id, results_root))
    barrier, rename = threading.Barrier(2, timeout=30), os.replace

    def rename_together(src, dst):
        barrier.wait()  # both have written this file's temporary
        rename(src, dst)

    monkeypatch.setattr(records.os, "replace", rename_together)
    errors: list[BaseException] = []

    def invocation():
        try:
            aggregate("selftest", "cpu", results_root)
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=invocation) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and not any(t.is_alive() for t in threads)
    base = results_root / "selftest" / "cpu"
    frame = pd.read_parquet(base / "runs.parquet")
    assert sorted(frame["run_id"]) == ["a", "b", "c"] and (frame["status"] == "ok").all()
    assert pd.read_csv(base / "runs.csv")["run_id"].tolist() == frame["run_id"].tolist()
    assert not [p.name for p in base.iterdir() if p.name.endswith(".tmp")]


def test_a_run_records_the_fingerprint_of_the_code_it_ran(results_root):
    from efficientllm_utils.code_fingerprint import study_fingerprint

    context = records.RunContext(run_id="a", study="selftest", profile="cpu", label="value=a",
                                 result_dir=run_dir("selftest", "cpu", "a", results_root), params={"value": "a"})
    context.write({}, {}, {})
    code = read_record(context.result_dir).provenance["code"]
    assert code == study_fingerprint("selftest") and "efficientllm_utils.records" in code
    assert not any(name.startswith("efficientllm_utils.reports") for name in code)  # the book's code, not the run's
    assert "notebook:notebooks/selftest.ipynb" in code
