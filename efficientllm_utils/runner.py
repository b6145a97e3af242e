"""Execute a profile's runs: one papermill execution per run, scheduled by Dask distributed.

- Each run executes the study's notebook in a fresh kernel process (papermill),
  on a Dask worker: a local cluster by default, or an existing scheduler.
- The local cluster has one single-threaded worker per GPU, each pinned with
  ``CUDA_VISIBLE_DEVICES``, or one worker on a CPU-only machine, so that runs
  never share a device and disturb each other's timings.
- Or the runs go to an existing scheduler (``executor="dask"``) or to Slurm jobs
  (``executor="slurm"``, ``clusters.py``); a run asks for ``gpus`` GPUs (one when
  ``device="cuda"``) as the Dask resource ``GPU``, which a worker offers when it
  holds that many devices.
- A run whose record exists is skipped (``force`` re-runs it); a run that raises or
  loses its kernel is recorded as failed with its traceback, and the others go on; a
  run whose worker is lost is retried ``max_retries`` times, then recorded as failed.
  A record that cannot be read counts as a failed run. Records are written
  atomically, so an interrupted profile resumes where it stopped, and a run is
  claimed while it executes (``run_lock.py``), so two invocations never run it twice.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .run_lock import claim, holder
from .params import RunSpec
from .paths import REPO_ROOT
from .records import (NOTEBOOK_NAME, RunRecord, UnreadableRecord, error_headline, now, provenance, read_record,
                      run_dir, unreadable_as_failed, write_record)

PROGRESS_TOPIC = "efficientllm-progress"
EXECUTORS = ("local", "dask", "slurm")


class ResourceError(RuntimeError):
    """The runs ask for resources that no worker offers; raised before anything is submitted."""


@dataclass
class RunOutcome:
    run_id: str
    label: str
    status: str  # ok | failed | skipped | elsewhere (another process holds its claim)
    duration_s: float | None = None  # None: not known (a lost worker)
    error: str | None = None
    note: str | None = None


@dataclass
class Summary:
    outcomes: list[RunOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


@dataclass
class StudyProgress:
    """Progress across every run of several axes (``make reproduce AXIS=all``), printed after each run: axis k of
    n, run i of m, the elapsed time and the estimated remaining time. The estimate is the published records'
    durations of the runs still to go (a run with no published record: the mean of those known), scaled by this
    machine's pace: the median, over the runs it executed, of each one's time against its published time. The
    median, so that one run whose kernel is much slower here than where it was published (bitsandbytes' 4-bit
    CPU kernel without AVX512-BF16: 9x) does not scale every run still to go."""

    total: int  # runs of every axis
    expected_s: dict[str, float]  # run id -> seconds its published record took
    n_axes: int
    axis: str = ""
    axis_index: int = 0
    done: int = 0
    paces: list[float] = field(default_factory=list)  # per run executed here: its time over its published time
    remaining_ids: set[str] = field(default_factory=set)
    t0: float = field(default_factory=time.perf_counter)

    def start_axis(self, axis: str, index: int) -> None:
        self.axis, self.axis_index = axis, index

    def _expected(self, run_id: str) -> float:
        known = list(self.expected_s.values())
        return self.expected_s.get(run_id, sum(known) / len(known) if known else 0.0)

    def finished(self, outcome: RunOutcome, executed: bool) -> None:
        self.done += 1
        self.remaining_ids.discard(outcome.run_id)
        if executed and outcome.duration_s is not None and self.expected_s.get(outcome.run_id):
            self.paces.append(outcome.duration_s / self.expected_s[outcome.run_id])

    def remaining_s(self) -> float | None:
        if not self.expected_s:
            return None
        pace = statistics.median(self.paces) if self.paces else 1.0
        return pace * sum(self._expected(r) for r in self.remaining_ids)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        left = self.remaining_s()
        eta = "?" if left is None else f"{left / 60:.1f} min (from the published runs' durations)"
        return (f"== study progress: axis {self.axis_index} of {self.n_axes} ({self.axis}) | run {self.done} of "
                f"{self.total} | elapsed {elapsed / 60:.1f} min | remaining ~{eta}")


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
                  "label": spec.label, "explored": spec.explored.model_dump(mode="json") if spec.explored else None,
                  "result_dir": str(directory.relative_to(Path(results_root)))}
    env = {**QUIET_KERNEL_ENV, **kernel_thread_environment(), "EFFICIENTLLM_RESULTS": str(Path(results_root).resolve())}
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
                           explored=spec.explored, status="failed", params=spec.params, error=error,
                           provenance=provenance(),
                           started=started, finished=now(), duration_s=time.perf_counter() - t0)
        write_record(record, directory)
        return RunOutcome(spec.run_id, spec.label, "failed", record.duration_s, error)
    finally:
        _announce("end", spec)


def _finished_since(directory: Path, since: str | None) -> RunRecord | None:
    """The run's record if it was written after ``since`` (by another invocation, or an orphaned attempt)."""
    try:
        record = read_record(directory)
    except UnreadableRecord:
        return None
    if record is None or since is None or record.finished is None or record.finished < since:
        return None
    return record


def execute_claimed_run(spec: RunSpec, results_root: str, timeout_s: float | None = None,
                        since: str | None = None) -> RunOutcome:
    """``execute_run`` under the run's claim; a run claimed elsewhere, or finished since ``since``, is not re-run."""
    directory = run_dir(spec.study, spec.profile, spec.run_id, Path(results_root))
    with claim(directory) as owned:
        if not owned:
            return RunOutcome(spec.run_id, spec.label, "elsewhere", note=f"being run by {holder(directory)}")
        done = _finished_since(directory, since)
        if done is not None:
            return RunOutcome(spec.run_id, spec.label, "skipped" if done.status == "ok" else "failed",
                              done.duration_s, done.error, note="finished by another process meanwhile")
        return execute_run(spec, results_root, timeout_s)


KERNEL_LOG = "kernel.log"  # beside the record: the kernel process's own output (startup, shutdown, crashes)
# Progress bars and library chatter off in the kernels the runner starts: run pages show what a reader needs
QUIET_KERNEL_ENV = {
    "TQDM_DISABLE": "1",  # every tqdm bar (tqdm reads TQDM_* defaults from the environment)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's and transformers' ("Loading weights") bars
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}


# Set by Dask's nanny for its own worker processes (``distributed.nanny.pre-spawn-environ``) and inherited by the
# kernels they launch: a 64 KiB malloc trim threshold makes glibc return freed memory at once, so torch on a CPU
# pays page faults on every allocation (a DiT run trained 1.9x slower with it). A kernel gets the C library's default.
KERNEL_ENV_DROPPED = ("MALLOC_TRIM_THRESHOLD_",)


# Dask's nanny also limits its workers' OpenMP/MKL/OpenBLAS pools to one thread (its single-threaded workers share
# the machine), and a kernel would inherit that: every run without its own ``num_threads`` computed on one core of
# a 2-core machine (SmolLM2's 800 PIQA items took 163 s in a quantization run against about 100 s on both cores).
# A run's kernel gets the cores its worker may use instead: its share of a local cluster's cores
# (``WORKER_CORES_ENV``, set by ``local_cluster``), else the cores this process may run on (a Slurm job's CPUs).
THREAD_ENV_NAMES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
WORKER_CORES_ENV = "EFFICIENTLLM_WORKER_CORES"


def worker_cores() -> int:
    """The cores a run on this worker may use (see ``THREAD_ENV_NAMES``)."""
    share = os.environ.get(WORKER_CORES_ENV)
    return int(share) if share else len(os.sched_getaffinity(0))


def kernel_thread_environment() -> dict[str, str]:
    """The thread-pool sizes of a run's kernel: the cores its worker may use."""
    return {name: str(worker_cores()) for name in THREAD_ENV_NAMES}


def kernel_environment(base: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """A run's kernel environment: the worker's, without ``KERNEL_ENV_DROPPED``, with ``extra``."""
    return {k: v for k, v in {**base, **extra}.items() if k not in KERNEL_ENV_DROPPED}


def kernel_manager(log_path: Path, env: dict[str, str]):
    """A jupyter kernel manager class whose kernels run with ``env`` added to their environment and write their
    process output to ``log_path`` instead of the runner's terminal (ipykernel's "running over TCP without
    encryption" warning at every start, its "KeyboardInterrupt caught in kernel" at shutdown). What a cell prints
    still reaches the executed notebook, through the kernel's messages."""
    from jupyter_client import AsyncKernelManager

    class RunKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            kw["env"] = kernel_environment(kw.get("env", os.environ), env)
            with open(log_path, "ab") as log:  # the kernel inherits the file; ours closes after the launch
                return await super()._async_launch_kernel(kernel_cmd, **{**kw, "stdout": log, "stderr": log})

    return RunKernelManager


def pending_runs(specs: list[RunSpec], results_root: Path, force: bool = False,
                 retry_failed: bool = False) -> tuple[list[RunSpec], list[RunOutcome]]:
    """Split runs into those to execute and those whose record already exists (an unreadable one: failed)."""
    todo, done = [], []
    for spec in specs:
        try:
            record = None if force else read_record(run_dir(spec.study, spec.profile, spec.run_id, results_root))
        except UnreadableRecord as err:
            record = unreadable_as_failed(err, spec.study, spec.profile, spec.run_id, spec.label, spec.params)
        if record is None or (retry_failed and record.status == "failed"):
            todo.append(spec)
        else:
            done.append(RunOutcome(spec.run_id, spec.label, "skipped" if record.status == "ok" else "failed",
                                   record.duration_s, record.error))
    return todo, done


# --- Dask ----------------------------------------------------------------------------------

def gpu_groups(pins: list[str], per_worker: int) -> list[list[str]]:
    """The local workers' GPUs: consecutive groups of ``per_worker`` of the visible ``pins``; the rest unused."""
    return [pins[i:i + per_worker] for i in range(0, len(pins) - per_worker + 1, per_worker)]


def local_cluster(gpus: int | list[str], max_retries: int = 2, gpus_per_worker: int = 1):
    """One single-threaded worker per GPU (pinned to its ``CUDA_VISIBLE_DEVICES`` entry: the user's own list's,
    UUIDs included, from :func:`~.metrics.tracker.visible_gpus`; an int n: entries 0..n-1), or one worker without
    a GPU. ``gpus_per_worker`` > 1 (runs of several processes, ``nproc``): one worker per that many GPUs, pinned to
    them all, offering them as one job; GPUs left over are not used."""
    from .metrics.tracker import CUDA_ORDER_ENV

    pins = [str(i) for i in range(gpus)] if isinstance(gpus, int) else list(gpus)
    groups = gpu_groups(pins, gpus_per_worker)
    import dask
    from distributed import Nanny, Scheduler, SpecCluster

    # A run whose worker dies (killed, out of memory) is retried this many times, then recorded as failed.
    dask.config.set({"distributed.scheduler.allowed-failures": max_retries})
    workers = {}
    share = max(1, len(os.sched_getaffinity(0)) // max(len(groups), 1))  # each worker's cores (kernel threads)
    for i in range(max(len(groups), 1)):
        options: dict = {"nthreads": 1, "memory_limit": 0, "host": "127.0.0.1", "env": {WORKER_CORES_ENV: share}}
        if groups:
            options["env"].update({"CUDA_VISIBLE_DEVICES": ",".join(groups[i]), **CUDA_ORDER_ENV})
            options["resources"] = {"GPU": len(groups[i])}
        workers[f"worker-{i}"] = {"cls": Nanny, "options": options}
    # no dashboard; its HTTP server on a free port, so a second cluster on the machine does not warn about 8787
    scheduler = {"cls": Scheduler, "options": {"dashboard": False, "dashboard_address": "127.0.0.1:0",
                                               "host": "127.0.0.1"}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40)


def gpus_of(spec: RunSpec) -> int:
    """GPUs a run asks for as one job: its ``gpus`` parameter where it has one, and for ``device="cuda"`` one per
    process (``nproc``, default 1; ``distributed``)."""
    per_process = int(spec.params.get("nproc") or 1) if spec.params.get("device") == "cuda" else 0
    return max(int(spec.params.get("gpus") or 0), per_process)


def _asking(specs: list[RunSpec]) -> str:
    """Which field makes these runs ask for their GPUs (named in a refusal)."""
    return "nproc" if any(int(s.params.get("nproc") or 1) > 1 for s in specs) else "device=cuda or gpus=N"


def check_resources(specs: list[RunSpec], worker_resources: list[dict], exact: bool = False) -> None:
    """Fail fast when a run needs more GPUs than any worker offers (instead of waiting forever).

    ``exact``: every worker sees all its GPUs (a Slurm job's), so a GPU run must ask for exactly that many.
    """
    if not worker_resources:
        raise ResourceError("the Dask cluster has no workers")
    most = max(r.get("GPU", 0) for r in worker_resources)
    fewer = [s for s in specs if exact and 0 < gpus_of(s) < most]
    if fewer:
        raise ResourceError(f"{len(fewer)} run(s) ask for {gpus_of(fewer[0])} GPU(s) (e.g. [{fewer[0].label}]) but "
                            f"each worker job holds {most:g} and its runs see them all; set gpus_per_job to the "
                            "runs' GPUs")
    short = [s for s in specs if gpus_of(s) > most]
    if short:
        asked = max(gpus_of(s) for s in short)
        offer = f"the largest Dask worker offers {most:g}" if most else "no Dask worker offers a GPU resource"
        raise ResourceError(f"{len(short)} run(s) ask for up to {asked} GPU(s) ({_asking(short)}; e.g. "
                            f"[{short[0].label}]) but {offer}; use a CPU profile, fewer processes (nproc) or "
                            "workers with more GPUs (EXECUTOR=slurm: gpus_per_job)")


def _gpu_pins() -> list[str]:
    from .metrics.tracker import visible_gpus

    return [token for token, _ in visible_gpus()]


@contextlib.contextmanager
def open_cluster(executor: str, n_pending: int, results_root: Path, *, scheduler_address: str | None = None,
                 slurm=None, max_retries: int = 2, gpus_per_run: int = 1):
    """Yield ``(client, resources each worker offers or will offer)`` for the chosen executor; close it after."""
    if executor == "dask":
        if not scheduler_address:
            raise ResourceError("EXECUTOR=dask needs the scheduler's address (--scheduler tcp://HOST:8786)")
        from .clusters import open_scheduler

        with open_scheduler(scheduler_address) as opened:
            yield opened
    elif executor == "slurm":
        from .clusters import load_slurm_profile, open_slurm

        with open_slurm(slurm or load_slurm_profile(), n_pending, results_root / "slurm-logs", max_retries) as opened:
            yield opened
    elif executor == "local":
        from distributed import Client

        with local_cluster(_gpu_pins(), max_retries, max(gpus_per_run, 1)) as cluster, Client(cluster) as client:
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            yield client, [w.get("resources", {}) for w in workers]
    else:
        raise ResourceError(f"executor {executor!r} is not one of {list(EXECUTORS)}")


def execute(specs: list[RunSpec], results_root: Path, *, force: bool = False, retry_failed: bool = False,
            executor: str = "local", scheduler_address: str | None = None, slurm=None, max_retries: int = 2,
            timeout_s: float | None = None, stream=None, progress: StudyProgress | None = None) -> Summary:
    """Execute every pending run of ``specs`` and return what happened to each.

    ``executor``: ``local`` (a cluster on this machine), ``dask`` (the scheduler at ``scheduler_address``) or
    ``slurm`` (workers as Slurm jobs, ``slurm``: a ``clusters.SlurmProfile``, default: the default profile).
    """
    stream = stream or sys.stderr
    results_root = Path(results_root).resolve()  # workers elsewhere write there: an absolute, shared path
    since = now()
    todo, done = pending_runs(specs, results_root, force, retry_failed)
    summary = Summary(outcomes=list(done))
    for outcome in done:
        if outcome.error and outcome.error.startswith("UnreadableRecord"):
            print(f"[unreadable] {outcome.label}: {error_headline(outcome.error)} (counted as failed; "
                  "--retry-failed re-runs it)", file=stream)
        else:
            print(f"[skip] {outcome.label} ({outcome.status}, record exists; --force re-runs)", file=stream)
        if progress is not None:
            progress.finished(outcome, executed=False)
    if progress is not None and done:
        print(progress.line(), file=stream, flush=True)
    if not todo:
        return summary
    from distributed import as_completed

    if scheduler_address and executor == "local":
        executor = "dask"
    if executor == "local" and any(gpus_of(s) for s in todo):
        pins = _gpu_pins()
        most = max(gpus_of(s) for s in todo)
        if most > len(pins):
            asking = [s for s in todo if gpus_of(s) > len(pins)]
            raise ResourceError(f"{len(asking)} run(s) ask for up to {most} GPU(s) ({_asking(asking)}; e.g. "
                                f"[{asking[0].label}]) but this machine has {len(pins) or 'no'} visible GPU(s)")
    with open_cluster(executor, len(todo), results_root, scheduler_address=scheduler_address, slurm=slurm,
                      max_retries=max_retries, gpus_per_run=max(gpus_of(s) for s in todo)) as (client, offered):
        check_resources(todo, offered, exact=executor == "slurm")
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
            resources = {"GPU": gpus_of(spec)} if gpus_of(spec) else None
            future = client.submit(execute_claimed_run, spec, str(results_root), timeout_s, since,
                                   key=f"run-{spec.run_id}", resources=resources, priority=-priority, pure=False)
            futures[future] = spec
        for future in as_completed(futures):
            spec = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # its worker died on every attempt: record it as the run's failure
                outcome = _record_lost_worker(spec, results_root, exc, since)
            summary.outcomes.append(outcome)
            running.pop(spec.run_id, None)
            _print_outcome(stream, outcome)
            _progress_line(stream, len(summary.outcomes) - len(done), len(todo), t0, running)
            if progress is not None:
                progress.finished(outcome, executed=True)
                print(progress.line(), file=stream, flush=True)
    return summary


def _print_outcome(stream, outcome: RunOutcome) -> None:
    if outcome.status == "elsewhere":
        print(f"[elsewhere] {outcome.label}: {outcome.note}; its record will appear there", file=stream)
        return
    took = "?" if outcome.duration_s is None else f"{outcome.duration_s:.1f}"
    print(f"[{outcome.status}] {outcome.label} in {took}s"
          + (f": {error_headline(outcome.error)}" if outcome.error else "")
          + (f" ({outcome.note})" if outcome.note else ""), file=stream)


def _record_lost_worker(spec: RunSpec, results_root: Path, exc: BaseException, since: str | None) -> RunOutcome:
    directory = run_dir(spec.study, spec.profile, spec.run_id, results_root)
    done = _finished_since(directory, since)
    if done is not None and done.status == "ok":  # an orphaned attempt finished after all
        return RunOutcome(spec.run_id, spec.label, "ok", done.duration_s, note="finished by an earlier attempt")
    error = ("the Dask worker running this run died on every attempt (killed, out of memory, or its Slurm job "
             "ended; Dask's allowed-failures bounds the retries): " + "".join(traceback.format_exception(exc)))
    record = RunRecord(run_id=spec.run_id, study=spec.study, profile=spec.profile, label=spec.label,
                       explored=spec.explored, status="failed", params=spec.params, error=error,
                       provenance=provenance(), finished=now())
    write_record(record, directory)
    return RunOutcome(spec.run_id, spec.label, "failed", None, error)


def _progress_line(stream, finished: int, total: int, t0: float, running: dict[str, str]) -> None:
    elapsed = time.perf_counter() - t0
    eta = f"{elapsed / finished * (total - finished):.0f}s" if finished else "?"
    current = ", ".join(running.values()) or "-"
    print(f"  progress: {finished}/{total} runs done | running: {current} | elapsed {elapsed:.0f}s | eta {eta}",
          file=stream, flush=True)
