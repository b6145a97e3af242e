"""Dask clusters beyond this machine: an existing scheduler (``EXECUTOR=dask``) or Slurm jobs (``EXECUTOR=slurm``).

With Slurm, each Dask worker is one Slurm job started by dask-jobqueue's ``SLURMCluster``: the job asks Slurm for
``gpus_per_job`` GPUs, Slurm's GRES allocation sets its ``CUDA_VISIBLE_DEVICES``, and its single-threaded worker
offers the same number as the Dask resource ``GPU`` that GPU runs ask for. The cluster adapts between no jobs and
``min(max_jobs, pending runs)``, so a lost job is replaced while runs are pending, and every job is cancelled when
the profile ends, on an error, on Ctrl-C or on SIGTERM. The settings come from ``params/cluster/slurm.yaml``.
"""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .params import PARAMS_DIR, ParamsError, format_error

SLURM_PROFILES = PARAMS_DIR / "cluster" / "slurm.yaml"
RUN_TASK_PREFIX = "run"  # runner submits keys "run-<run_id>"; Dask groups their durations under this prefix


class ClusterError(RuntimeError):
    """The cluster cannot give the runs what they ask for; raised before any run is submitted."""


class SlurmProfile(BaseModel):
    """What each worker job asks Slurm for, and how many jobs run at once."""

    model_config = ConfigDict(extra="forbid")
    description: str = ""
    partition: str | None = None
    account: str | None = None
    gpus_per_job: int = Field(1, ge=0)
    cpus_per_job: int = Field(4, ge=1)
    memory: str = Field("32GB", pattern=r"^\d+(\.\d+)?\s*[KMGT]i?B$")
    walltime: str = Field("08:00:00", pattern=r"^(\d+-)?\d{1,2}(:\d{2}){1,2}$")
    max_jobs: int = Field(8, ge=1)
    gpu_directive: str = "--gres=gpu:{gpus}"
    extra_directives: list[str] = Field(default_factory=list)
    setup: list[str] = Field(default_factory=list)
    scheduler_host: str | None = None

    def directives(self) -> list[str]:
        gpus = [self.gpu_directive.format(gpus=self.gpus_per_job)] if self.gpus_per_job else []
        return gpus + list(self.extra_directives)


def load_slurm_profile(name: str | None = None, overrides: dict[str, Any] | None = None,
                       path: Path = SLURM_PROFILES) -> SlurmProfile:
    """The named profile of ``params/cluster/slurm.yaml`` with ``overrides``; ParamsError names the bad field."""
    raw = yaml.safe_load(path.read_text())
    name = name or raw["default_profile"]
    if name not in raw["profiles"]:
        raise ParamsError(f"{path}: cluster profile {name!r} is not one of {sorted(raw['profiles'])}")
    try:
        return SlurmProfile.model_validate({**raw["profiles"][name], **(overrides or {})})
    except ValidationError as err:
        raise ParamsError(format_error(f"{path.name} cluster profile '{name}'", err)) from None


def slurm_cluster(profile: SlurmProfile, log_directory: Path):
    """A ``SLURMCluster`` (no jobs yet) whose jobs match ``profile``."""
    from dask_jobqueue import SLURMCluster

    from .metrics.tracker import CUDA_ORDER_ENV

    return SLURMCluster(
        job_name="efficientllm",
        queue=profile.partition,
        account=profile.account,
        cores=1,  # one thread: a worker runs one run at a time, like the local cluster
        processes=1,
        job_cpu=profile.cpus_per_job,
        memory=profile.memory,
        walltime=profile.walltime,
        job_extra_directives=profile.directives(),
        # CUDA's device numbers in NVML's (PCI bus) order, as the local workers have them (metrics.tracker)
        job_script_prologue=[*(f"export {k}={v}" for k, v in CUDA_ORDER_ENV.items()), *profile.setup],
        worker_extra_args=["--resources", f"GPU={profile.gpus_per_job}", "--no-dashboard"],
        log_directory=str(log_directory),
        scheduler_options={"host": profile.scheduler_host, "dashboard_address": ":0"},  # any free port
        silence_logs="error",
    )


def check_slurm_accepts(job_script: str) -> None:
    """Fail fast when Slurm could never start the worker job (``sbatch --test-only``), instead of waiting forever."""
    try:
        test = subprocess.run(["sbatch", "--test-only"], input=job_script, capture_output=True, text=True,
                              timeout=60)
    except FileNotFoundError:
        raise ClusterError("EXECUTOR=slurm needs Slurm's sbatch on PATH (run it on a login node)") from None
    if test.returncode != 0:
        directives = [line.removeprefix("#SBATCH ") for line in job_script.splitlines() if line.startswith("#SBATCH")]
        raise ClusterError(f"Slurm would never start a worker job with {' '.join(directives)}: "
                           f"{test.stderr.strip() or test.stdout.strip()} (change the cluster profile or --slurm)")


@contextlib.contextmanager
def _interrupts_unwind() -> Iterator[None]:
    """Ctrl-C and SIGTERM (a closed session, scancel of this process) raise KeyboardInterrupt, which cancels the
    jobs on its way out and exits non-zero (dask_jobqueue's import sets SIGINT to a silent ``sys.exit()``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def open_slurm(profile: SlurmProfile, n_pending: int, log_directory: Path, max_retries: int):
    """Yield ``(client, resources each worker will offer)``; cancel every job on the way out."""
    import dask
    import dask_jobqueue  # noqa: F401 - imported before _interrupts_unwind, which replaces its SIGINT handler
    from distributed import Client

    # Runs last minutes to hours: tell the adaptive target so before any has finished, one job per pending run.
    settings = {"distributed.scheduler.allowed-failures": max_retries,
                "distributed.scheduler.default-task-durations": {RUN_TASK_PREFIX: "1h"}}
    with dask.config.set(settings), _interrupts_unwind():
        cluster = slurm_cluster(profile, log_directory)
        try:
            check_slurm_accepts(cluster.job_script())
            max_jobs = min(profile.max_jobs, n_pending)
            cluster.adapt(minimum_jobs=0, maximum_jobs=max_jobs, interval="1s")
            print(f"slurm: up to {max_jobs} job(s) of {' '.join(profile.directives()) or 'no GPU'}, "
                  f"{profile.cpus_per_job} CPU(s), {profile.memory}, {profile.walltime}; dashboard "
                  f"{cluster.dashboard_link}; job logs in {log_directory}", file=sys.stderr)
            with Client(cluster) as client:
                yield client, [{"GPU": profile.gpus_per_job}]
        finally:
            cluster.close()  # scancel of every job this cluster started


@contextlib.contextmanager
def open_scheduler(address: str, wait_for_workers_s: float = 30):
    """Yield ``(client, resources the workers offer)`` for an existing scheduler; its workers stay up."""
    from distributed import Client

    with Client(address, timeout="30s") as client:
        with contextlib.suppress(TimeoutError):
            client.wait_for_workers(1, timeout=wait_for_workers_s)
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        yield client, [w.get("resources", {}) for w in workers]
