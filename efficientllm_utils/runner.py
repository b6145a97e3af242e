"""Execute a profile's runs: one papermill execution per run, scheduled by Dask distributed.

- Each run executes the study's notebook in a fresh kernel process (papermill),
  on a Dask worker: a local cluster by default, or an existing scheduler.
- The local cluster has one single-threaded worker per GPU, each pinned with
  ``CUDA_VISIBLE_DEVICES``, or one worker on a CPU-only machine, so that runs
  never share a device and disturb each other's timings.
- A run whose record exists is skipped (``force`` re-runs it); a run that raises,
  loses its kernel or its worker is recorded as failed with its traceback, and
  the others go on. Records are written atomically, so an interrupted profile
  resumes where it stopped.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .params import REPO_ROOT, RunSpec
from .records import NOTEBOOK_NAME, RunRecord, error_headline, now, provenance, read_record, run_dir, write_record

PROGRESS_TOPIC = "efficientllm-progress"


class ResourceError(RuntimeError):
    """The runs ask for resources that no worker offers; raised before anything is submitted."""


@dataclass
class RunOutcome:
    run_id: str
    label: str
    status: str  # ok | failed | skipped
    duration_s: float | None = None  # None: not known (a lost worker)
    error: str | None = None


@dataclass
class Summary:
    outcomes: list[RunOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def _announce(event: str, spec: RunSpec) -> None:
    """Tell the client which run a worker started (shown in the progress line)."""
    try:
        from distributed import get_worker

        get_worker().log_event(PROGRESS_TOPIC, {"event": event, "label": spec.label, "run_id": spec.run_id})
    except (ImportError, ValueError):  # not on a Dask worker
        pass


def execute_run(spec: RunSpec, results_root: str, timeout_s: float | None = None) -> RunOutcome:
    """Execute one run's notebook with papermill; record a failure instead of raising."""
    import papermill

    directory = run_dir(spec.study, spec.profile, spec.run_id, Path(results_root))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "record.json").unlink(missing_ok=True)  # a forced re-run must not find the old record
    started, t0 = now(), time.perf_counter()
    _announce("start", spec)
    # result_dir relative to the results folder (the kernel gets the folder in its environment): no machine path
    # in the executed notebook
    parameters = {**spec.params, "run_id": spec.run_id, "study": spec.study, "profile": spec.profile,
                  "label": spec.label, "result_dir": str(directory.relative_to(Path(results_root)))}
    env = {**QUIET_KERNEL_ENV, "EFFICIENTLLM_RESULTS": str(Path(results_root).resolve())}
    try:
        papermill.execute_notebook(str(REPO_ROOT / spec.notebook), str(directory / NOTEBOOK_NAME),
                                   parameters=parameters, cwd=str(REPO_ROOT), progress_bar=False,
                                   execution_timeout=timeout_s, kernel_name="python3",
                                   kernel_manager_class=kernel_manager(directory / KERNEL_LOG, env),
                                   iopub_timeout=60)  # a loaded machine delays output messages past nbclient's 4 s
        record = read_record(directory)
        if record is None or record.run_id != spec.run_id:
            raise RuntimeError("the notebook finished without writing its result record")
        return RunOutcome(spec.run_id, spec.label, record.status, time.perf_counter() - t0, record.error)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a record
        if isinstance(exc, KeyboardInterrupt):
            raise
        error = "".join(traceback.format_exception(exc))
        record = RunRecord(run_id=spec.run_id, study=spec.study, profile=spec.profile, label=spec.label,
                           status="failed", params=spec.params, error=error, provenance=provenance(),
                           started=started, finished=now(), duration_s=time.perf_counter() - t0)
        write_record(record, directory)
        return RunOutcome(spec.run_id, spec.label, "failed", record.duration_s, error)
    finally:
        _announce("end", spec)


KERNEL_LOG = "kernel.log"  # beside the record: the kernel process's own output (startup, shutdown, crashes)
# Progress bars and library chatter off in the kernels the runner starts: run pages show what a reader needs
QUIET_KERNEL_ENV = {
    "TQDM_DISABLE": "1",  # every tqdm bar (tqdm reads TQDM_* defaults from the environment)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's and transformers' ("Loading weights") bars
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}


def kernel_manager(log_path: Path, env: dict[str, str]):
    """A jupyter kernel manager class whose kernels run with ``env`` added to their environment and write their
    process output to ``log_path`` instead of the runner's terminal (ipykernel's "running over TCP without
    encryption" warning at every start, its "KeyboardInterrupt caught in kernel" at shutdown). What a cell prints
    still reaches the executed notebook, through the kernel's messages."""
    from jupyter_client import AsyncKernelManager

    class RunKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            kw["env"] = {**kw.get("env", os.environ), **env}
            with open(log_path, "ab") as log:  # the kernel inherits the file; ours closes after the launch
                return await super()._async_launch_kernel(kernel_cmd, **{**kw, "stdout": log, "stderr": log})

    return RunKernelManager


def pending_runs(specs: list[RunSpec], results_root: Path, force: bool = False,
                 retry_failed: bool = False) -> tuple[list[RunSpec], list[RunOutcome]]:
    """Split runs into those to execute and those whose record already exists."""
    todo, done = [], []
    for spec in specs:
        record = None if force else read_record(run_dir(spec.study, spec.profile, spec.run_id, results_root))
        if record is None or (retry_failed and record.status == "failed"):
            todo.append(spec)
        else:
            done.append(RunOutcome(spec.run_id, spec.label, "skipped" if record.status == "ok" else "failed",
                                   record.duration_s, record.error))
    return todo, done


# --- Dask ----------------------------------------------------------------------------------

def local_cluster(n_gpus: int):
    """One single-threaded worker per GPU (pinned), or one worker without a GPU."""
    import dask
    from distributed import Nanny, Scheduler, SpecCluster

    # A run that kills its worker is recorded as failed, not retried on the next worker.
    dask.config.set({"distributed.scheduler.allowed-failures": 0})
    workers = {}
    for i in range(max(n_gpus, 1)):
        options: dict = {"nthreads": 1, "memory_limit": 0, "host": "127.0.0.1"}
        if n_gpus:
            options["env"] = {"CUDA_VISIBLE_DEVICES": str(i)}
            options["resources"] = {"GPU": 1}
        workers[f"worker-{i}"] = {"cls": Nanny, "options": options}
    # no dashboard; its HTTP server on a free port, so a second cluster on the machine does not warn about 8787
    scheduler = {"cls": Scheduler, "options": {"dashboard": False, "dashboard_address": "127.0.0.1:0",
                                               "host": "127.0.0.1"}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40)


def check_resources(specs: list[RunSpec], worker_resources: list[dict]) -> None:
    """Fail fast when a run needs a GPU that no worker offers (instead of waiting forever)."""
    if not worker_resources:
        raise ResourceError("the Dask cluster has no workers")
    needs_gpu = [s.label for s in specs if s.params.get("device") == "cuda"]
    if needs_gpu and not any(r.get("GPU", 0) >= 1 for r in worker_resources):
        raise ResourceError(f"{len(needs_gpu)} run(s) ask for device=cuda (e.g. [{needs_gpu[0]}]) but no Dask "
                            "worker offers a GPU resource; use a CPU profile or a cluster with GPU workers")


def _gpu_count() -> int:
    from .metrics.tracker import visible_gpu_indices

    return len(visible_gpu_indices())


def execute(specs: list[RunSpec], results_root: Path, *, force: bool = False, retry_failed: bool = False,
            scheduler_address: str | None = None, timeout_s: float | None = None, stream=None) -> Summary:
    """Execute every pending run of ``specs`` and return what happened to each."""
    stream = stream or sys.stderr
    todo, done = pending_runs(specs, results_root, force, retry_failed)
    summary = Summary(outcomes=list(done))
    for outcome in done:
        print(f"[skip] {outcome.label} ({outcome.status}, record exists; --force re-runs)", file=stream)
    if not todo:
        return summary
    from distributed import Client, as_completed

    n_gpus = _gpu_count()
    if any(s.params.get("device") == "cuda" for s in todo) and not n_gpus and not scheduler_address:
        raise ResourceError("runs ask for device=cuda but this machine has no visible GPU")
    cluster = None if scheduler_address else local_cluster(n_gpus)
    client = Client(scheduler_address or cluster)
    try:
        workers = client.scheduler_info()["workers"].values()
        check_resources(todo, [w.get("resources", {}) for w in workers])
        running: dict[str, str] = {}

        def on_event(event):
            _, msg = event
            if msg["event"] == "start":
                running[msg["run_id"]] = msg["label"]
            else:
                running.pop(msg["run_id"], None)
            _progress_line(stream, len(summary.outcomes) - len(done), len(todo), t0, running)

        client.subscribe_topic(PROGRESS_TOPIC, on_event)
        t0 = time.perf_counter()
        futures = {}
        for priority, spec in enumerate(todo):  # keep the params file's order
            resources = {"GPU": 1} if spec.params.get("device") == "cuda" else None
            future = client.submit(execute_run, spec, str(results_root), timeout_s, key=f"run-{spec.run_id}",
                                   resources=resources, priority=-priority, pure=False)
            futures[future] = spec
        for future in as_completed(futures):
            spec = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # the worker died: record it as the run's failure
                outcome = _record_lost_worker(spec, results_root, exc)
            summary.outcomes.append(outcome)
            running.pop(spec.run_id, None)
            took = "?" if outcome.duration_s is None else f"{outcome.duration_s:.1f}"
            print(f"[{outcome.status}] {outcome.label} in {took}s"
                  + (f": {error_headline(outcome.error)}" if outcome.error else ""), file=stream)
            _progress_line(stream, len(summary.outcomes) - len(done), len(todo), t0, running)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return summary


def _record_lost_worker(spec: RunSpec, results_root: Path, exc: BaseException) -> RunOutcome:
    error = ("the Dask worker running this run died (killed, or out of memory): "
             + "".join(traceback.format_exception(exc)))
    record = RunRecord(run_id=spec.run_id, study=spec.study, profile=spec.profile, label=spec.label,
                       status="failed", params=spec.params, error=error, provenance=provenance(), finished=now())
    write_record(record, run_dir(spec.study, spec.profile, spec.run_id, results_root))
    return RunOutcome(spec.run_id, spec.label, "failed", None, error)


def _progress_line(stream, finished: int, total: int, t0: float, running: dict[str, str]) -> None:
    elapsed = time.perf_counter() - t0
    eta = f"{elapsed / finished * (total - finished):.0f}s" if finished else "?"
    current = ", ".join(running.values()) or "-"
    print(f"  progress: {finished}/{total} runs done | running: {current} | elapsed {elapsed:.0f}s | eta {eta}",
          file=stream, flush=True)
