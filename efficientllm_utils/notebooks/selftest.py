"""``notebooks/selftest.ipynb``: a run that does almost nothing (or fails on purpose), to check the runner on a
machine or cluster."""
from __future__ import annotations

import nbformat

from ..notebook_builder import build, opening_cells
from ..studies.selftest_run import SelfTestRun

INTRO = """# Self-test: does the runner work on this machine or cluster?

A run that does almost nothing, and can fail on purpose (`mode="raise"` raises, `mode="kill"` kills its own kernel).
`python -m efficientllm_utils run selftest --profile smoke --executor slurm` (or `--scheduler tcp://host:8786`) checks a
cluster end to end: the record keeps the seeded mean it computed, the `CUDA_VISIBLE_DEVICES` it saw and its Slurm job."""

RUN = """import os, signal, time

import numpy as np
from efficientllm_utils.metrics.values import MetricValue
from efficientllm_utils.studies.selftest_run import SelfTestRun
from efficientllm_utils.records import RunContext

p = SelfTestRun.from_namespace(globals())
run = RunContext.from_namespace(globals(), p)
time.sleep(p.sleep_s)
if p.mode == "raise":
    raise ValueError(f"selftest failure on purpose (value={p.value})")
if p.mode == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
seeded_mean = float(np.random.default_rng([p.seed, p.value]).standard_normal(10_000).mean())  # same on any machine
record = run.write(metrics={"doubled": MetricValue.measured(2 * p.value, "1", "selftest-arithmetic")},
                   quality={"value": p.value, "seeded_mean": seeded_mean},
                   raw={"pid": os.getpid(), "worker_pid": os.getppid(),  # the kernel's parent: the Dask worker
                        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})
record.status"""


def notebooks() -> dict[str, nbformat.NotebookNode]:
    return {"notebooks/selftest.ipynb": build([*opening_cells(INTRO, "selftest", SelfTestRun), ("code", RUN)], "self")}
