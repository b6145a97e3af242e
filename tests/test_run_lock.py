"""What keeps two invocations and broken files from spoiling a profile: run claims, unreadable records, the
executor settings; no run executes here (seconds)."""
import subprocess
import sys
import time

import pytest

from efficientllm_utils import cli, runner
from efficientllm_utils.run_lock import claim, holder
from efficientllm_utils.clusters import load_slurm_profile
from efficientllm_utils.params import PARAMS_DIR, ParamsError, expand
from efficientllm_utils.records import RunRecord, aggregate, load_records, now, run_dir, write_record


def _smoke():
    return expand(PARAMS_DIR / "selftest.yaml", "smoke")


def _write_ok(spec, root, **fields):
    record = RunRecord(run_id=spec.run_id, study=spec.study, profile=spec.profile, label=spec.label, status="ok",
                       params=spec.params, quality={"value": spec.params["value"]}, finished=now(), **fields)
    write_record(record, run_dir(spec.study, spec.profile, spec.run_id, root))


def test_a_claim_excludes_other_processes_until_released(results_root):
    spec = _smoke()[0]
    directory = run_dir(spec.study, spec.profile, spec.run_id, results_root)
    holder_script = ("import sys, time; from pathlib import Path; from efficientllm_utils.run_lock import claim\n"
                     "with claim(Path(sys.argv[1])) as owned:\n    print(owned, flush=True); time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", holder_script, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "True"
        with claim(directory) as owned:
            assert not owned
        assert f"pid {other.pid}" in holder(directory)
        outcome = runner.execute_claimed_run(spec, str(results_root))  # the runner does not start a kernel
        assert outcome.status == "elsewhere" and f"pid {other.pid}" in outcome.note
        assert not (directory / "notebook.ipynb").exists()
    finally:
        other.kill()
        other.wait()
    with claim(directory) as owned:  # the kernel released the dead holder's lock
        assert owned


def test_a_run_finished_by_another_invocation_is_not_run_again(results_root):
    spec = _smoke()[0]
    since = now()
    time.sleep(0.01)
    _write_ok(spec, results_root)  # another invocation finished it after this one listed its pending runs
    outcome = runner.execute_claimed_run(spec, str(results_root), since=since)
    assert outcome.status == "skipped" and "another process" in outcome.note


def test_an_unreadable_record_is_a_failed_run_and_the_others_go_on(results_root, capsys):
    specs = _smoke()
    for spec in specs:
        _write_ok(spec, results_root)
    broken = run_dir(specs[1].study, specs[1].profile, specs[1].run_id, results_root) / "record.json"
    broken.write_text(broken.read_text()[:40])  # truncated, as by a full disk or a killed copy

    code = cli.main(["run", "selftest", "--profile", "smoke", "--results", str(results_root)])
    err = capsys.readouterr().err
    assert code == 1  # counted as failed; nothing ran, nothing raised
    assert f"[unreadable] {specs[1].label}: UnreadableRecord: unreadable record {broken}" in err
    assert err.count("[skip]") == 2
    rows = aggregate("selftest", "smoke", results_root).set_index("label")["status"]
    assert rows.to_dict() == {specs[0].label: "ok", specs[1].run_id: "failed", specs[2].label: "ok"}
    assert "unreadable record" in next(r.error for r in load_records("selftest", "smoke", results_root)
                                       if r.status == "failed")
    todo, _ = runner.pending_runs(specs, results_root, retry_failed=True)
    assert [s.run_id for s in todo] == [specs[1].run_id]  # --retry-failed re-runs it, only it


def test_gpu_requests_become_dask_resources():
    cpu, gpu = _smoke()[0], expand(PARAMS_DIR / "selftest.yaml", "smoke", {"gpus": 2})[0]
    assert runner.gpus_of(cpu) == 0 and runner.gpus_of(gpu) == 2
    assert runner.gpus_of(expand(PARAMS_DIR / "selftest.yaml", "smoke", {"device": "cuda"})[0]) == 1
    runner.check_resources([gpu], [{"GPU": 1}, {"GPU": 2}])
    with pytest.raises(runner.ResourceError, match=r"ask for up to 2 GPU\(s\).*largest Dask worker offers 1"):
        runner.check_resources([gpu, cpu], [{"GPU": 1}])
    runner.check_resources([gpu, cpu], [{"GPU": 2}], exact=True)
    with pytest.raises(runner.ResourceError, match="ask for 2 GPU.*each worker job holds 4"):
        runner.check_resources([gpu], [{"GPU": 4}], exact=True)  # a Slurm job's runs see all its GPUs


def test_slurm_profile_is_validated_before_any_work(results_root, capsys):
    profile = load_slurm_profile("gpu", {"partition": "h200", "gpus_per_job": 4, "extra_directives": ["--qos=x"]})
    assert profile.directives() == ["--gres=gpu:4", "--qos=x"] and profile.cpus_per_job == 8
    assert load_slurm_profile("loopback").max_jobs == 2
    with pytest.raises(ParamsError, match="cluster profile 'nope' is not one of"):
        load_slurm_profile("nope")
    for bad, field in (("gpus_per_job=-1", "gpus_per_job"), ("memory=lots", "memory"), ("qeue=gpu", "qeue")):
        code = cli.main(["run", "selftest", "--profile", "smoke", "--results", str(results_root),
                         "--executor", "slurm", "--slurm", bad])
        assert code == 2 and f"field '{field}'" in capsys.readouterr().err
    assert cli.main(["run", "selftest", "--results", str(results_root), "--executor", "dask"]) == 2
    assert "--scheduler" in capsys.readouterr().err
    assert not any(results_root.iterdir())  # nothing was run or written
