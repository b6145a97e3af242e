"""Parameter grids: named profiles in ``params/<study>.yaml``, validated before any work.

A params file names its study (``study_registry``: the study's run model and notebook), and profiles. Each
profile has ``fixed`` settings and a ``grid`` whose cartesian product gives the runs; a profile may also name
``variants`` (bundles of settings) that a grid over ``variant`` selects, for runs that differ in several fields at
once. Every run is validated against its study's pydantic run model (a subclass of ``RunParams`` with
``extra="forbid"``, beside its study: ``studies/<...>_run.py``), so an unknown field, precision or model fails at
once with the field's name and the allowed values, before anything is written.

This is the bottom of the package's configuration: it imports no domain module (the run models are looked up in
the study registry by name), so records, the CLI and the report layer can use it without loading torch.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import study_registry
from .paths import REPO_ROOT

PARAMS_DIR = REPO_ROOT / "params"
# Explored runs (made with ``--set``/``--grid`` values the profile does not have, or a notebook run by hand) never
# share a folder with a profile's own runs: ``<profile>+explore/`` and ``manual/`` beside the profiles' folders.
EXPLORE_TAG = "+explore"
MANUAL_PROFILE = "manual"


class ParamsError(ValueError):
    """A params file or profile that cannot run; the message names the field and allowed values."""


def is_explored(profile: str) -> bool:
    """A results folder of explored runs (``cpu+explore``, ``manual``), not a profile's own runs."""
    return profile == MANUAL_PROFILE or profile.endswith(EXPLORE_TAG)


class Exploration(BaseModel):
    """How an explored run departs from a profile of its params file: what differs, and who made it."""

    model_config = ConfigDict(frozen=True)
    profile: str  # the profile it was made from (a notebook run by hand: the params file's default profile)
    changed: dict[str, Any] = Field(default_factory=dict)  # field -> value, where not the profile's run's value
    outside_grid: list[str] = Field(default_factory=list)  # fields of ``changed`` the grid varies: values it lacks
    how: Literal["cli", "notebook"] = "cli"  # --set/--grid, or a notebook run by hand (JupyterLab, papermill -p)

    def summary(self) -> str:
        """e.g. "precision=int4-fp4 (outside the grid); from profile cpu"."""
        parts = [f"{k}={v}" + (" (outside the grid)" if k in self.outside_grid else "")
                 for k, v in self.changed.items()]
        return f"{', '.join(parts) or 'no setting changed'}; from profile {self.profile}"


class RunParams(BaseModel):
    """Settings shared by every study; each study's run model (``study_registry``) subclasses it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0
    ASSETS: ClassVar[tuple[str, ...]] = ()  # the offline assets (assets.py) every run of the study reads

    def required_assets(self) -> tuple[str, ...]:
        """The assets this run reads: what ``make reproduce``/``make assets`` fetch for its axis."""
        return self.ASSETS

    @classmethod
    def from_namespace(cls, namespace: dict[str, Any]):
        """Validate the values a notebook's parameters cell defined (names = field names)."""
        return cls.model_validate({k: namespace[k] for k in cls.model_fields if k in namespace})


def one_of(value: str, allowed, what: str) -> str:
    """``value`` if it is among ``allowed``, else a ``ValueError`` naming ``what`` and the allowed values."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


def check_timed_steps(timing_warmup_steps: int, steps: int) -> None:
    """A run that leaves its first ``timing_warmup_steps`` training steps out of the timings keeps one timed step."""
    if timing_warmup_steps >= steps:
        raise ValueError(f"timing_warmup_steps={timing_warmup_steps} leaves no timed step of steps={steps}")


T = TypeVar("T")


def registry_lookup(lookup: Callable[[str], T], name: str, wording: str = "{}") -> T:
    """``lookup(name)`` in ``study_registry``; the ValueError naming what it knows is raised as a ``ParamsError``,
    its words put where ``wording`` has ``{}``."""
    try:
        return lookup(name)
    except ValueError as err:
        raise ParamsError(wording.format(err)) from None


def run_model(study: str) -> type[RunParams]:
    """The run model of a registered study; a ``ParamsError`` names the registered studies."""
    return registry_lookup(study_registry.run_model, study, "field 'study': {}")


# --- params files --------------------------------------------------------------------------

class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str
    hardware: str
    fixed: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    # named bundles of settings: a grid over ``variant`` adds the named bundle to ``fixed``, so runs can
    # differ in several fields at once (dense-small vs moe-8x2 vs dense-large)
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)


class ParamsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study: str
    default_profile: str
    profiles: dict[str, Profile]


class RunSpec(BaseModel):
    """One grid point, ready to execute."""

    model_config = ConfigDict(frozen=True)
    study: str
    profile: str  # the results folder: the profile's name, or ``<profile>+explore`` for an explored run
    notebook: str
    run_id: str
    label: str  # derived from ``params`` (``run_label``): what makes this run differ from its siblings
    params: dict[str, Any]
    explored: Exploration | None = None  # how the run departs from its profile; None: one of the profile's runs

    def run_params(self) -> RunParams:
        """The run's params as its study's run model."""
        return run_model(self.study).model_validate(self.params)


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
        got = f" (got {e.get('input')!r})" if e["loc"] else ""  # a whole-run check: the run's label says which
        lines.append(f"field '{field}': {message}{got}")
    return lines


def format_error(where: str, err: ValidationError) -> str:
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
        raise ParamsError(format_error(str(path), err)) from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if parsed.study not in study_registry.BY_NAME:
        raise ParamsError(f"{path}: field 'study': {parsed.study!r} is not one of {sorted(study_registry.BY_NAME)}")
    reserved = [p for p in parsed.profiles if is_explored(p) or "+" in p]
    if reserved:
        raise ParamsError(f"{path}: profile names {reserved} are reserved for explored runs ({MANUAL_PROFILE!r}, "
                          f"'+' as in '<profile>{EXPLORE_TAG}')")
    if parsed.default_profile not in parsed.profiles:
        raise ParamsError(f"{path}: field 'default_profile': {parsed.default_profile!r} is not one of "
                          f"{sorted(parsed.profiles)}")
    return parsed


def _merge(chosen: Profile, point: dict[str, Any]) -> dict[str, Any]:
    """A grid point's settings before validation: ``fixed``, then the named variant's bundle, then the point."""
    return {**chosen.fixed, **chosen.variants.get(point.get("variant"), {}), **point}


def _validate_grid(chosen: Profile, model: type[RunParams], axes: dict[str, list[Any]], settings: dict[str, Any]
                   ) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """The validated params of every point of ``axes`` (``settings`` on top of each), and the problems found:
    error line -> the grid points it affects."""
    runs, problems = [], {}
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values))
        where = ",".join(f"{k}={v}" for k, v in point.items())
        if chosen.variants and "variant" in point and point["variant"] not in chosen.variants:
            problems.setdefault(f"field 'variant': {point['variant']!r} is not one of {sorted(chosen.variants)} "
                                "(the profile's variants: bundles of settings, one per run)", []).append(where)
            continue
        try:
            runs.append(model.model_validate({**_merge(chosen, point), **settings}).model_dump(mode="json"))
        except ValidationError as err:
            for line in _error_lines(err):
                problems.setdefault(line, []).append(where)
    return runs, problems


def label_value(value: Any) -> str:
    """A value as a label shows it: as Python prints it, lists and mappings without commas (they separate fields)."""
    if isinstance(value, list):
        return "[" + " ".join(label_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + " ".join(f"{k}:{label_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def run_label(study: str, chosen: Profile, params: dict[str, Any], own: list[dict[str, Any]] | None = None
              ) -> tuple[str, dict[str, Any], list[str]]:
    """``(label, changed, outside_grid)`` of a run with these validated ``params``, against the profile ``chosen``.

    The label is the run's value of every field the profile's grid varies, then every field whose value is not the
    profile's (``changed``): against the profile's run with the same grid values, or, for grid values the profile
    lacks (``outside_grid``), against its fixed settings and bundle at those values. So the label is read from the
    params a run executes with, and two runs of one profile with the same label have the same params. ``own``: the
    profile's own runs' params (computed when not given).
    """
    if own is None:
        own, _ = _validate_grid(chosen, run_model(study), chosen.grid, {})
    keys = list(chosen.grid)
    outside = [k for k in keys if all(run.get(k) != params.get(k) for run in own)]
    base = next((run for run in own if all(run.get(k) == params.get(k) for k in keys)), None)
    if base is None:  # off the profile's grid: its settings at these grid values
        model = run_model(study)
        raw = _merge(chosen, {k: params.get(k) for k in keys})
        try:
            base = model.model_validate(raw).model_dump(mode="json")
        except ValidationError:  # not valid without the run's other changes: compare with the settings as written
            base = {**{n: f.get_default(call_default_factory=True) for n, f in model.model_fields.items()}, **raw}
    changed = {k: v for k, v in params.items() if k in outside or v != base.get(k)}
    label = ",".join([f"{k}={label_value(params.get(k))}" for k in keys]
                     + [f"{k}={label_value(v)}" for k, v in changed.items() if k not in keys])
    return label, changed, outside


def expand(path: Path, profile: str | None = None, overrides: dict[str, Any] | None = None,
           grid: dict[str, list[Any]] | None = None) -> list[RunSpec]:
    """All runs of one profile, each validated; raises ``ParamsError`` listing every problem.

    ``overrides`` (``--set``) set a field in every run; on a field the grid varies, the grid is narrowed to that one
    value (for ``variant``, a bundle the profile names). ``grid`` (``--grid``) replaces a grid axis (or adds one) with
    several values. A run whose params are not one of the profile's own runs is *explored*: its spec says what
    departs from the profile (``explored``), and its results go to their own folder, ``<profile>+explore``.
    """
    params_file = load_params_file(path)
    name = profile or params_file.default_profile
    if name not in params_file.profiles:
        raise ParamsError(f"{path}: profile {name!r} is not one of {sorted(params_file.profiles)}")
    chosen = params_file.profiles[name]
    model = run_model(params_file.study)
    overrides, grid = dict(overrides or {}), dict(grid or {})
    both = sorted(set(overrides) & set(grid))
    if both:
        raise ParamsError(f"{both} given both as a single value (--set) and as a grid (--grid): give one")
    if any(not isinstance(values, list) or not values for values in grid.values()):
        raise ParamsError(f"a grid axis takes one or more values, got {grid}")
    own, problems = _validate_grid(chosen, model, chosen.grid, {})  # the profile's own runs
    narrowed = {k: [overrides.pop(k)] for k in list(overrides)
                if k in chosen.grid or (k == "variant" and chosen.variants)}  # a bundle name selects its bundle
    axes = {**chosen.grid, **narrowed, **grid}
    if axes != chosen.grid or overrides:
        runs, problems = _validate_grid(chosen, model, axes, overrides)
    else:
        runs = own
    if problems:
        raise ParamsError("\n".join(f"{path.name} profile '{name}': {line} [in runs: {'; '.join(points)}]"
                                    for line, points in problems.items()))
    if not runs:
        raise ParamsError(f"{path}: profile {name!r} expands to no runs")
    specs = []
    for params in runs:
        label, changed, outside = run_label(params_file.study, chosen, params, own)
        explored = Exploration(profile=name, changed=changed, outside_grid=outside) if changed else None
        specs.append(RunSpec(study=params_file.study, profile=name + EXPLORE_TAG if explored else name,
                             notebook=study_registry.study(params_file.study).notebook, run_id=run_id_for(params_file.study, params, label),
                             label=label, params=params, explored=explored))
    ids = [s.run_id for s in specs]
    if len(set(ids)) != len(ids):
        raise ParamsError(f"{path}: profile {name!r} has duplicate grid points")
    return specs


def notebook_run(study: str | None, params: dict[str, Any]) -> tuple[str, str, Exploration]:
    """``(run_id, label, explored)`` of a notebook run by hand (JupyterLab, ``papermill -p``) with these validated
    ``params``: labelled like a CLI run (``run_label``), against the default profile of ``params/<study>.yaml``."""
    if study not in study_registry.BY_NAME:
        raise ParamsError(f"field 'study': {study!r} is not one of {sorted(study_registry.BY_NAME)} (the notebook's "
                          "parameters cell names it)")
    params_file = load_params_file(params_path(study))
    base = params_file.default_profile
    label, changed, outside = run_label(study, params_file.profiles[base], params)
    return (run_id_for(study, params, label), label,
            Exploration(profile=base, changed=changed, outside_grid=outside, how="notebook"))


def notebook_parameters_source(study: str, model: type[RunParams]) -> str:
    """The ``parameters`` cell of a generated notebook: every ``model`` field at the first grid point of
    ``params/<study>.yaml``'s default profile (so a notebook run by hand reproduces that run), then the fields the
    runner sets."""
    raw = yaml.safe_load(params_path(study).read_text())
    profile = raw["profiles"][raw["default_profile"]]
    point = {k: v[0] for k, v in profile.get("grid", {}).items()}
    values = {**profile.get("fixed", {}), **profile.get("variants", {}).get(point.get("variant"), {}), **point}
    params = model.model_validate(values).model_dump(mode="json")

    def python(value) -> str:
        return "None" if value is None else repr(value) if isinstance(value, (str, float, int)) else json.dumps(value)

    lines = [f"# Parameters (papermill replaces this cell's values; names match {model.__name__}'s fields).",
             f"# Defaults: the first run of params/{study}.yaml's {raw['default_profile']!r} profile."]
    lines += [f"{name} = {python(value)}" for name, value in params.items()]
    lines += [f"study = {study!r}  # the params file this notebook's runs belong to",
              f"# Set by the runner (run by hand: the record goes to results/{study}/{MANUAL_PROFILE}/<run_id>/)",
              "run_id = None", "profile = None", "label = None", "explored = None", "result_dir = None"]
    return "\n".join(lines)
