"""Parameter grids: named profiles in ``params/<study>.yaml``, validated before any work.

A params file names the notebook that runs one grid point, and profiles. Each
profile has ``fixed`` settings and a ``grid`` whose cartesian product gives the
runs. Every run is validated against its study's pydantic model
(``extra="forbid"``), so an unknown field, precision or model fails at once with
the field's name and the allowed values, before anything is written.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .models import OFFLINE_MODELS, PRECISIONS
from .quality import TASKS

REPO_ROOT = Path(__file__).resolve().parent.parent
PARAMS_DIR = REPO_ROOT / "params"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ParamsError(ValueError):
    """A params file or profile that cannot run; the message names the field and allowed values."""


# --- run models: one per study ------------------------------------------------------------

class RunParams(BaseModel):
    """Settings shared by every study."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0

    @classmethod
    def from_namespace(cls, namespace: dict[str, Any]):
        """Validate the values a notebook's parameters cell defined (names = field names)."""
        return cls.model_validate({k: namespace[k] for k in cls.model_fields if k in namespace})


def _check_model_source(value: str) -> str:
    if value in OFFLINE_MODELS or HUB_ID.match(value) or Path(value).is_dir():
        return value
    raise ValueError(f"model {value!r} is not an offline model {sorted(OFFLINE_MODELS)}, "
                     "a hub id like 'Qwen/Qwen2.5-7B', or an existing local directory")


class QuantizationRun(RunParams):
    """One model at one precision: quality, memory, latency, throughput and energy."""

    model: str
    precision: Literal[PRECISIONS]  # type: ignore[valid-type]
    reference_precision: Literal[PRECISIONS] = "fp32"  # type: ignore[valid-type]
    tasks: list[Literal[TASKS]] = Field(default_factory=lambda: list(TASKS))  # type: ignore[valid-type]
    n_per_task: int | None = Field(25, ge=1)  # None: the whole task
    ppl_tokens: int = Field(2048, ge=16)
    ppl_seq_len: int = Field(256, ge=8)
    prompt_tokens: int = Field(64, ge=1)
    new_tokens: int = Field(32, ge=2)
    batch_size: int = Field(1, ge=1)
    warmup: int = Field(1, ge=0)
    min_iterations: int = Field(5, ge=1)
    min_seconds: float = Field(5.0, ge=0)
    sample_interval_s: float = Field(0.1, gt=0)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return _check_model_source(value)


class SelfTestRun(RunParams):
    """A near-empty run that can fail on purpose: checks the runner, a cluster, and the failure paths."""

    mode: Literal["ok", "raise", "kill"] = "ok"
    value: int = 0
    sleep_s: float = Field(0.0, ge=0)


STUDIES: dict[str, type[RunParams]] = {
    "quantization": QuantizationRun,
    "selftest": SelfTestRun,
}


# --- params files --------------------------------------------------------------------------

class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str
    hardware: str
    fixed: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)


class ParamsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study: str
    notebook: str
    default_profile: str
    profiles: dict[str, Profile]


class RunSpec(BaseModel):
    """One grid point, ready to execute."""

    model_config = ConfigDict(frozen=True)
    study: str
    profile: str
    notebook: str
    run_id: str
    label: str  # the grid values that make this run differ from its siblings
    params: dict[str, Any]


def run_id_for(study: str, params: dict[str, Any], label: str) -> str:
    """Stable id: readable grid values plus a hash of every parameter."""
    digest = hashlib.sha256(json.dumps({"study": study, **params}, sort_keys=True, default=str).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9.=_-]+", "_", label).strip("_")[:80]
    return f"{slug}-{digest}" if slug else digest


def _error_lines(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(root)"
        message = e["msg"].removeprefix("Value error, ")
        lines.append(f"field '{field}': {message} (got {e.get('input')!r})")
    return lines


def _format_error(where: str, err: ValidationError) -> str:
    return "\n".join(f"{where}: {line}" for line in _error_lines(err))


def params_path(study: str) -> Path:
    return PARAMS_DIR / f"{study}.yaml"


def load_params_file(path: Path) -> ParamsFile:
    if not path.exists():
        known = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))
        raise ParamsError(f"no params file {path}; studies with params: {known}")
    try:
        raw = yaml.safe_load(path.read_text())
        parsed = ParamsFile.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(str(path), err)) from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if parsed.study not in STUDIES:
        raise ParamsError(f"{path}: field 'study': {parsed.study!r} is not one of {sorted(STUDIES)}")
    if parsed.default_profile not in parsed.profiles:
        raise ParamsError(f"{path}: field 'default_profile': {parsed.default_profile!r} is not one of "
                          f"{sorted(parsed.profiles)}")
    if not (REPO_ROOT / parsed.notebook).exists():
        raise ParamsError(f"{path}: field 'notebook': {parsed.notebook} does not exist")
    return parsed


def expand(path: Path, profile: str | None = None, overrides: dict[str, Any] | None = None) -> list[RunSpec]:
    """All runs of one profile, each validated; raises ``ParamsError`` listing every problem."""
    params_file = load_params_file(path)
    name = profile or params_file.default_profile
    if name not in params_file.profiles:
        raise ParamsError(f"{path}: profile {name!r} is not one of {sorted(params_file.profiles)}")
    chosen = params_file.profiles[name]
    model = STUDIES[params_file.study]
    keys = list(chosen.grid)
    specs: list[RunSpec] = []
    problems: dict[str, list[str]] = {}  # error line -> labels of the runs it affects
    for values in itertools.product(*(chosen.grid[k] for k in keys)):
        point = dict(zip(keys, values))
        merged = {**chosen.fixed, **point, **(overrides or {})}
        label = ",".join(f"{k}={v}" for k, v in point.items())
        try:
            params = model.model_validate(merged).model_dump(mode="json")
        except ValidationError as err:
            for line in _error_lines(err):
                problems.setdefault(line, []).append(label)
            continue
        specs.append(RunSpec(study=params_file.study, profile=name, notebook=params_file.notebook,
                             run_id=run_id_for(params_file.study, params, label), label=label, params=params))
    if problems:
        raise ParamsError("\n".join(f"{path.name} profile '{name}': {line} [in runs: {'; '.join(labels)}]"
                                    for line, labels in problems.items()))
    if not specs:
        raise ParamsError(f"{path}: profile {name!r} expands to no runs")
    ids = [s.run_id for s in specs]
    if len(set(ids)) != len(ids):
        raise ParamsError(f"{path}: profile {name!r} has duplicate grid points")
    return specs
