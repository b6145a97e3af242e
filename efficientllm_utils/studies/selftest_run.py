"""The self-test study's run model (``notebooks/selftest.ipynb`` runs it)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..params import RunParams

class SelfTestRun(RunParams):
    """A near-empty run that can fail on purpose: checks the runner, a cluster, and the failure paths."""

    mode: Literal["ok", "raise", "kill"] = "ok"
    value: int = 0
    sleep_s: float = Field(0.0, ge=0)
    gpus: int = Field(0, ge=0)  # GPUs the run asks the scheduler for (not used): checks a cluster's GPU allocation
