"""Result records: one flat JSON file per run, written atomically, with full provenance."""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
import platform
import re
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import psutil
from pydantic import BaseModel, Field

from .code_fingerprint import study_fingerprint
from .metrics import machine_probe
from .metrics.values import MetricValue, flatten
from .params import MANUAL_PROFILE, Exploration, notebook_run
from .paths import REPO_ROOT

RESULTS_DIR = Path(os.environ.get("EFFICIENTLLM_RESULTS", REPO_ROOT / "results"))
RECORD_NAME = "record.json"
NOTEBOOK_NAME = "notebook.ipynb"
GRID_FILE = "samples.png"  # a generative run's grid of samples (DiT, lvm), which its chapter shows
TRACKED_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "torchao", "optimum-quanto", "accelerate",
                    "papermill", "dask", "distributed", "pandas", "numpy", "nvidia-ml-py", "jupyter-book")


class RunRecord(BaseModel):
    run_id: str
    study: str
    profile: str
    label: str  # the run's grid values and any setting that departs from its profile, derived from params
    status: Literal["ok", "failed"]
    explored: Exploration | None = None  # None: a run of its profile's grid, as the params file has it
    params: dict[str, Any]
    metrics: dict[str, MetricValue] = Field(default_factory=dict)
    quality: dict[str, Any] = Field(default_factory=dict)
    raw: dict[str, Any] = Field(default_factory=dict)  # raw samples behind the summaries
    error: str | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)
    started: str | None = None
    finished: str | None = None
    duration_s: float | None = None

    def flat(self) -> dict[str, Any]:
        """One row for the aggregate table: ids, params, metrics with units and methods, quality scalars."""
        row: dict[str, Any] = {k: getattr(self, k) for k in ("run_id", "study", "profile", "label", "status",
                                                           "duration_s", "started", "finished")}
        row["explored"] = self.explored.summary() if self.explored else None
        row.update({f"param_{k}": (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in self.params.items()})
        row.update(flatten(self.metrics))
        row.update({f"quality_{k}": v for k, v in self.quality.items() if isinstance(v, (int, float, str)) or v is None})
        row["git_commit"] = self.provenance.get("git_commit")
        row["hardware"] = self.provenance.get("hardware", {}).get("summary")
        row["cpu_4bit_kernel"] = (self.provenance.get("cpu_4bit") or {}).get("kernel")
        row["error"] = error_headline(self.error) if self.error else None
        return row


def error_headline(error: str) -> str:
    """The line of a traceback that names the exception (the last such line), else its last line."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", line)]
    return (named or lines or [""])[-1]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def run_dir(study: str, profile: str, run_id: str, root: Path | None = None) -> Path:
    return (root or RESULTS_DIR) / study / profile / run_id


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename: readers see the old file or the new, never half."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(record: RunRecord, directory: Path) -> Path:
    path = directory / RECORD_NAME
    atomic_write_text(path, record.model_dump_json(indent=1))
    return path


class UnreadableRecord(ValueError):
    """A record file that exists but cannot be parsed (truncated, edited by hand, an older format)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"unreadable record {path}: {reason}")
        self.path = path


def read_record(directory: Path) -> RunRecord | None:
    """The run's record, None when it has none; raises ``UnreadableRecord`` naming the file when it is broken."""
    path = directory / RECORD_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise UnreadableRecord(path, str(err)) from None
    try:
        return RunRecord.model_validate_json(text)
    except ValueError as err:  # pydantic's ValidationError: invalid JSON or fields
        reason = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in err.errors()[:3]) \
            if hasattr(err, "errors") else str(err)
        raise UnreadableRecord(path, reason) from None


def unreadable_as_failed(err: UnreadableRecord, study: str, profile: str, run_id: str, label: str | None = None,
                         params: dict[str, Any] | None = None) -> RunRecord:
    """Stand-in for a broken record: a failed run that says why (``--retry-failed`` re-runs it)."""
    return RunRecord(run_id=run_id, study=study, profile=profile, label=label or run_id, status="failed",
                     params=params or {}, error=f"UnreadableRecord: {err}")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_flags() -> dict[str, bool]:
    """The CPU features that decide bf16 speed and bitsandbytes' 4-bit path, from /proc/cpuinfo."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return {}
    return {name: name in flags for name in wanted}


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "logical_cores": psutil.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "gpus": [],
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import pynvml

        from .metrics.tracker import visible_gpus

        for token, i in visible_gpus():  # the GPUs this run may use, not every GPU of the node
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            info["gpus"].append({"name": pynvml.nvmlDeviceGetName(h), "cuda_visible_as": token,
                                 "memory_gb": round(pynvml.nvmlDeviceGetMemoryInfo(h).total / 1e9, 1)})
        info["node_gpus"] = pynvml.nvmlDeviceGetCount()
        info["nvidia_driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception:
        pass
    info["cpu_flags"] = cpu_flags()  # AVX512-BF16/AMX decide bf16 speed and bitsandbytes' 4-bit CPU kernel
    # the thread pools the run computed with: the environment's OpenMP limit, torch's intra-op threads when loaded
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    gpus = ", ".join(g["name"] for g in info["gpus"]) or "no GPU"
    bf16 = [name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))
            if info["cpu_flags"].get(flag)]
    info["summary"] = (f"{info['cpu']} ({info['logical_cores']} logical cores, {info['ram_gb']} GB RAM, "
                       f"{'+'.join(bf16) or ('no AVX512-BF16' if info['cpu_flags'] else 'CPU flags unknown')}); {gpus}")
    return info


def provenance() -> dict[str, Any]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        # changed tracked files other than the published results (``make reproduce`` refreshes those between studies)
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)published")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "hardware": hardware(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),  # a run on a Slurm worker job
        "load_average": load_average(),
        # the machine's probed peaks (matmul FLOP/s per dtype, bandwidth) behind MFU/MBU: read from the cache
        # the probe left once per machine (metrics/machine_probe.py), never re-measured here
        "machine_probe": machine_probe.cached_all(),
    }


def load_average() -> dict[str, float] | None:
    """The machine's load averages when the record is written: above its core count, other work shared the CPUs
    during the run (the book says so beside the run's times)."""
    try:
        one, five, fifteen = os.getloadavg()
    except (OSError, AttributeError):  # not on every platform
        return None
    return {"1m": round(one, 2), "5m": round(five, 2), "15m": round(fifteen, 2)}


def load_records(study: str, profile: str, root: Path | None = None) -> list[RunRecord]:
    base = (root or RESULTS_DIR) / study / profile
    records = []
    for directory in sorted(base.glob("*/")):
        try:
            record = read_record(directory)
        except UnreadableRecord as err:  # one broken file must not hide the others
            record = unreadable_as_failed(err, study, profile, directory.name)
        if record is not None:
            records.append(record)
    return records


def aggregate(study: str, profile: str, root: Path | None = None):
    """Write ``runs.csv`` and ``runs.parquet`` for one study and profile; return the DataFrame.

    Load it with ``pandas.read_parquet("results/<study>/<profile>/runs.parquet")``.
    """
    import pandas as pd

    base = (root or RESULTS_DIR) / study / profile
    frame = pd.DataFrame([r.flat() for r in load_records(study, profile, root)])
    base.mkdir(parents=True, exist_ok=True)
    # each file through its own uniquely named temporary: two invocations on one profile never share one
    atomic_write_text(base / "runs.csv", frame.to_csv(index=False))
    atomic_write_bytes(base / "runs.parquet", frame.to_parquet(index=False))
    return frame


class RunContext(BaseModel):
    """Where a notebook's result goes and how it is labelled; the runner injects these, a run by hand derives them."""

    run_id: str
    study: str
    profile: str
    label: str
    result_dir: Path
    params: dict[str, Any]
    explored: Exploration | None = None
    started: str = Field(default_factory=now)

    @classmethod
    def from_namespace(cls, namespace: dict[str, Any], params: BaseModel) -> "RunContext":
        """The runner's run (it injected ``run_id``, ``label`` and ``explored``, derived from the same params), or
        a notebook run by hand: labelled from ``params`` against the study's default profile
        (``params.notebook_run``), its record in ``results/<study>/manual/<run_id>/``."""
        dumped = params.model_dump(mode="json")
        study = namespace.get("study")
        if namespace.get("run_id") is None:  # by hand: JupyterLab, or papermill -p without the runner
            run_id, label, explored = notebook_run(study, dumped)
            profile = MANUAL_PROFILE
        else:
            run_id, label, profile = namespace["run_id"], namespace["label"], namespace["profile"]
            explored = Exploration.model_validate(namespace["explored"]) if namespace.get("explored") else None
        result_dir = Path(namespace.get("result_dir") or run_dir(study, profile, run_id))
        result_dir = result_dir if result_dir.is_absolute() else RESULTS_DIR / result_dir  # the runner's are relative
        return cls(run_id=run_id, study=study, profile=profile, label=label, result_dir=result_dir, params=dumped,
                   explored=explored)

    def write(self, metrics: dict[str, MetricValue], quality: dict[str, Any], raw: dict[str, Any],
              provenance_extra: dict[str, Any] | None = None) -> RunRecord:
        """Write this run's successful record (atomically) and return it. ``provenance_extra``: what the study
        knows of how it ran (e.g. ``{"cpu_4bit": cpu_4bit.kernel_report(model)}``), added to the provenance."""
        finished = now()
        duration = (dt.datetime.fromisoformat(finished) - dt.datetime.fromisoformat(self.started)).total_seconds()
        record = RunRecord(run_id=self.run_id, study=self.study, profile=self.profile, label=self.label,
                           explored=self.explored, status="ok", params=self.params, metrics=metrics, quality=quality,
                           raw=raw, provenance={**provenance(), "code": study_fingerprint(self.study),
                                                **(provenance_extra or {})},
                           started=self.started, finished=finished, duration_s=duration)
        write_record(record, self.result_dir)
        return record


def metrics_table(record: RunRecord):
    """The record's metrics as a small DataFrame (value, unit, how obtained) for display."""
    import pandas as pd

    return pd.DataFrame([{"metric": k, "value": m.value, "unit": m.unit, "how obtained": m.method}
                         for k, m in record.metrics.items()]).set_index("metric")
