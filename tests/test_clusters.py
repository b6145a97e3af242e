"""The selftest's smoke profile on a real single-node Slurm (EXECUTOR=slurm) and on a Dask scheduler and workers
started as separate processes on loopback (EXECUTOR=dask), each run asking for one GPU (two fake ones), through the
CLI as ``make run`` calls it. Each test checks that every run saw the CUDA_VISIBLE_DEVICES of the worker that ran it,
that a run whose worker (job) is lost mid-way is re-run and completes, and that the quality figures equal the local
executor's for the same parameters. Slurm comes from Debian's packages (tests/local_slurm.py); without it (or root)
its tests skip and say why.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from efficientllm_utils import runner
from efficientllm_utils.clusters import ClusterError, load_slurm_profile
from efficientllm_utils.params import PARAMS_DIR, expand
from efficientllm_utils.records import load_records, run_dir

from .local_slurm import LocalSlurm, SlurmUnavailable

pytestmark = pytest.mark.slow

SMOKE = ["run", "selftest", "--profile", "smoke", "--set", "gpus=1"]
N_RUNS = 3


def _smoke_specs():
    return expand(PARAMS_DIR / "selftest.yaml", "smoke", {"gpus": 1})


PROFILE = "smoke+explore"  # gpus=1 is not the smoke profile's setting: its runs are recorded as explored


@pytest.fixture(scope="module")
def local_quality(tmp_path_factory) -> dict:
    """The local executor's quality figures for the same runs, as on a machine with two GPUs (one worker each)."""
    root = tmp_path_factory.mktemp("local") / "results"
    real_gpu_pins = runner._gpu_pins
    runner._gpu_pins = lambda: ["0", "1"]  # the selftest never touches the devices, so two pinned workers suffice
    try:
        summary = runner.execute(_smoke_specs(), root, executor="local")
    finally:
        runner._gpu_pins = real_gpu_pins
    assert [o.status for o in summary.outcomes] == ["ok"] * N_RUNS
    return {r.label: r.quality for r in load_records("selftest", PROFILE, root)}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    instance = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        instance.start()
    except SlurmUnavailable as why:
        instance.stop()
        pytest.skip(f"no local Slurm: {why}")
    yield instance
    instance.stop()


def _in_progress(results: Path) -> tuple[Path, dict] | None:
    """A run that has started (its claim names who holds it) and has no record yet."""
    for claim_file in sorted((results / "selftest" / PROFILE).glob("*/.claim")):
        if not (claim_file.parent / "record.json").exists():
            try:
                return claim_file.parent, json.loads(claim_file.read_text())
            except ValueError:  # being written
                pass
    return None


def _run_and_interrupt(cmd: list[str], env: dict, results: Path, observe, interrupt, timeout_s: float):
    """Run the CLI; call ``observe()`` while it runs; ``interrupt(holder)`` once, on the first run seen mid-way."""
    log = open(results.parent / "cli.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "efficientllm_utils", *cmd, "--results", str(results)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    victim, deadline = None, time.monotonic() + timeout_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            observe()
            if victim is None and (started := _in_progress(results)):
                victim = started
                interrupt(victim[1])
            time.sleep(0.3)
    finally:
        if proc.poll() is None:  # out of time: SIGTERM cancels its Slurm jobs, SIGKILL if that hangs
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = (results.parent / "cli.log").read_text()
    assert proc.returncode == 0, output[-3000:]
    assert victim is not None, "no run was seen mid-way"
    return victim, output


def _no_jobs_left(slurm, wait_s: float = 20) -> bool:
    deadline = time.monotonic() + wait_s  # a cancelled job stays "completing" for a moment
    while slurm.run("squeue", "-h").strip() and time.monotonic() < deadline:
        time.sleep(0.5)
    return not slurm.run("squeue", "-h").strip()


def _check_records(results: Path, local_quality: dict) -> dict:
    records = {r.label: r for r in load_records("selftest", PROFILE, results)}
    assert len(records) == N_RUNS and all(r.status == "ok" for r in records.values())
    assert {label: r.quality for label, r in records.items()} == local_quality
    return records


@pytest.mark.timeout(600)  # the local reference (module fixture) included; minutes when the machine is shared
def test_smoke_profile_on_slurm(slurm, local_quality, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    gpu_of_job: dict[str, str] = {}  # Slurm's GRES index of each job, read while it runs

    def observe():
        for job in slurm.run("squeue", "-h", "-t", "R", "-o", "%i").split():
            if job not in gpu_of_job and (index := slurm.gpu_index_of_job(job)) is not None:
                gpu_of_job[job] = index

    cancelled = []

    def cancel_job(holder):
        observe()
        cancelled.append(holder["slurm_job_id"])
        slurm.run("scancel", holder["slurm_job_id"])

    (victim_dir, _), output = _run_and_interrupt(
        [*SMOKE, "--executor", "slurm", "--cluster-profile", "loopback"], slurm.env, results, observe, cancel_job, 300)
    records = _check_records(results, local_quality)
    for r in records.values():  # the run saw the GPU that Slurm gave the job its worker ran in
        assert r.provenance["slurm_job_id"] in gpu_of_job
        assert r.provenance["cuda_visible_devices"] == r.raw["cuda_visible_devices"] == gpu_of_job[
            r.provenance["slurm_job_id"]]
    victim = next(r for r in records.values() if r.run_id == victim_dir.name)
    assert cancelled[0] is not None and victim.provenance["slurm_job_id"] != cancelled[0]  # re-run in another job
    assert _no_jobs_left(slurm)  # every job ended with the profile
    assert (results / "slurm-logs").is_dir()


@pytest.mark.timeout(120)
def test_slurm_request_that_cannot_be_met_fails_fast(slurm, monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    specs = _smoke_specs()
    too_big = load_slurm_profile("loopback", {"gpus_per_job": 3})  # the node has two
    with pytest.raises(ClusterError, match="Slurm would never start a worker job with .*--gres=gpu:3"):
        runner.execute(specs, tmp_path, executor="slurm", slurm=too_big)
    two_per_run = expand(PARAMS_DIR / "selftest.yaml", "smoke", {"gpus": 2})
    with pytest.raises(runner.ResourceError, match="ask for up to 2 GPU.*largest Dask worker offers 1"):
        runner.execute(two_per_run, tmp_path, executor="slurm", slurm=load_slurm_profile("loopback"))
    assert _no_jobs_left(slurm)


@pytest.mark.timeout(240)
def test_ctrl_c_cancels_the_slurm_jobs(slurm, tmp_path):
    cmd = [sys.executable, "-m", "efficientllm_utils", *SMOKE, "--executor", "slurm", "--cluster-profile", "loopback",
           "--results", str(tmp_path / "results")]
    proc = subprocess.Popen(cmd, env=slurm.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # Ctrl-C as in a terminal, even where pytest ignores SIGINT
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 180
    while not slurm.run("squeue", "-h").strip() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "interrupted" in err
    assert _no_jobs_left(slurm)


@pytest.fixture
def dask_processes(tmp_path):
    """A scheduler and two single-threaded workers (``CUDA_VISIBLE_DEVICES`` 0 and 1, resource GPU=1) on loopback."""
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "2"}
    python = [sys.executable, "-m"]
    procs = [subprocess.Popen([*python, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--dashboard-address", ":0", "--scheduler-file", str(scheduler_file)],
                              env=env, start_new_session=True, stderr=subprocess.DEVNULL)]
    for gpu in (0, 1):
        procs.append(subprocess.Popen([*python, "distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file),
                                       "--host", "127.0.0.1", "--nthreads", "1", "--resources", "GPU=1",
                                       "--no-dashboard", "--memory-limit", "0", "--name", f"gpu{gpu}"],
                                      env={**env, "CUDA_VISIBLE_DEVICES": str(gpu)}, start_new_session=True,
                                      stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 60
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    yield json.loads(scheduler_file.read_text())["address"], procs[1:]
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.timeout(600)  # the local reference (module fixture) included; minutes when the machine is shared
def test_smoke_profile_on_a_dask_scheduler(dask_processes, local_quality, tmp_path):
    address, nannies = dask_processes
    results = tmp_path / "results"
    results.mkdir()
    gpu_of_worker: dict[int, str] = {}  # worker process pid -> its CUDA_VISIBLE_DEVICES, read while it lives

    def observe():
        for nanny in nannies:
            for child in psutil.Process(nanny.pid).children():
                gpu_of_worker.setdefault(child.pid, child.environ().get("CUDA_VISIBLE_DEVICES"))

    killed = []

    def kill_worker(holder):
        observe()
        killed.append(holder["pid"])
        os.kill(holder["pid"], signal.SIGKILL)  # its nanny starts a new worker process

    (victim_dir, _), _ = _run_and_interrupt([*SMOKE, "--executor", "dask", "--scheduler", address], os.environ,
                                            results, observe, kill_worker, 300)
    records = _check_records(results, local_quality)
    for r in records.values():  # the run saw the CUDA_VISIBLE_DEVICES of the worker that ran it
        assert r.raw["cuda_visible_devices"] == gpu_of_worker[r.raw["worker_pid"]] in ("0", "1")
    victim = next(r for r in records.values() if r.run_id == victim_dir.name)
    assert victim.raw["worker_pid"] != killed[0]  # re-run by another worker process
