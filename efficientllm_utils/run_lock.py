"""One process at a time per run: an exclusive lock on ``<run dir>/.claim`` while the run executes.

Two invocations of the same profile (two ``make reproduce`` at once, on one machine or several sharing the results
filesystem) then never execute the same grid point together. The lock is ``flock``'s, which the kernel releases
when its holder dies (a killed worker, a cancelled Slurm job), so a claim is never stale; on NFS, Linux maps it to
a POSIX lock held by the server's lock manager. The file also says who holds it, for the other invocation's message.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from .records import now

CLAIM_NAME = ".claim"


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": now()}


def holder(directory: Path) -> str:
    """Who holds (or last held) the claim on a run, in words."""
    try:
        info = json.loads((directory / CLAIM_NAME).read_text())
    except (OSError, ValueError):
        return "another process"
    job = f", Slurm job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{job}, since {info.get('since')}"


@contextlib.contextmanager
def claim(directory: Path) -> Iterator[bool]:
    """Yield True while this process holds the run's claim, False (at once) when another process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / CLAIM_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner()).encode(), 0)
        yield True
    finally:
        os.close(fd)  # releases the lock
