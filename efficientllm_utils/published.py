"""The published copy: results committed in the repository, so that a fresh clone's book shows every chapter
without running anything.

``published/<study>/<profile>/<run_id>/`` holds each run's ``record.json``, its executed ``notebook.ipynb``
(library noise and machine paths removed) and the pictures it saved for the book (sample grids, clips; up to
2 MB each), nothing else: no logs, claims, checkpoints or score caches. Pictures are compressed to keep the repository
small (``compact_picture``): a notebook's large PNG outputs become JPEG, a saved PNG becomes a 256-colour PNG of the
same name, each only when that is smaller. Every metric was computed on the originals before; the copy's pictures
are for looking at, and the chapters say so. ``make reproduce``
refreshes a study's copy after running one of ``PUBLISHED_PROFILES`` (``publish``).

The book reads a *view* (``book_view``): per study and profile, the local results when there are any, else the
published copy. Each chapter then says which it shows, with the commit, machine and date of the runs
(``provenance_line``), and flags runs whose parameters no longer match the params file (``stale_runs``).
"""
from __future__ import annotations

import base64
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .code_fingerprint import changed_code, study_fingerprint
from .params import is_explored
from .paths import REPO_ROOT
from .portable import portable_notebook, without_machine_paths
from .records import NOTEBOOK_NAME, RECORD_NAME, RunRecord, atomic_write_text, load_records, read_record

PUBLISHED_DIR = REPO_ROOT / "published"
PUBLISHED_PROFILES = ("cpu", "gpu")  # the profiles whose results the repository carries (smoke's are meaningless)
# a run's own pictures the book shows (sample grids, clips), kept when small enough to commit
MEDIA_SUFFIXES = (".png", ".jpg", ".gif", ".mp4", ".webm", ".svg")
MAX_MEDIA_BYTES = 2_000_000
SOURCES_FILE = "sources.json"  # in a view: where each study's profile comes from
COMPACT_ABOVE_BYTES = 16_000  # pictures smaller than this are copied as they are
NOTEBOOK_JPEG_QUALITY = 80
PICTURES_NOTE = ("pictures in the published copy are compressed (JPEG, or 256-colour PNG) to keep the repository "
                 "small; every metric was computed on the original pictures")


def publish(study: str, profile: str, results_root: Path, published_root: Path = PUBLISHED_DIR,
            run_ids: set[str] | None = None) -> Path:
    """Replace the published copy of one study's profile with the runs in ``results_root`` that belong to the
    params file's grid now (``run_ids``; default: the profile's current expansion), so a copy is never stale when
    made: each run's record and its executed notebook, made portable (paths relative to the results folder, no
    library noise: ``portable.portable_notebook``). Returns the copy's folder."""
    from .params import expand, params_path

    if run_ids is None:
        run_ids = {s.run_id for s in expand(params_path(study), profile)}
    source = Path(results_root) / study / profile
    runs = [d for d in sorted(source.glob("*/")) if d.name in run_ids and (d / RECORD_NAME).exists()]
    if not runs:
        raise FileNotFoundError(f"no records of the current {study} {profile} grid to publish under {source}")
    target = Path(published_root) / study / profile
    staging = target.with_name(f".{profile}.publishing")
    shutil.rmtree(staging, ignore_errors=True)
    for run in runs:
        record = read_record(run)
        out = staging / run.name
        out.mkdir(parents=True)
        text = without_machine_paths(record.model_dump_json(indent=1), results_root)  # e.g. an adapter's folder
        atomic_write_text(out / RECORD_NAME, RunRecord.model_validate_json(text).model_dump_json(indent=1))
        if (run / NOTEBOOK_NAME).exists():
            notebook = portable_notebook((run / NOTEBOOK_NAME).read_text(), results_root)
            atomic_write_text(out / NOTEBOOK_NAME, compact_notebook_pictures(notebook))
        for media in run.iterdir():
            if media.suffix in MEDIA_SUFFIXES and media.stat().st_size <= MAX_MEDIA_BYTES:
                if media.suffix == ".png":
                    (out / media.name).write_bytes(compact_picture(media.read_bytes(), "png")[1])
                else:
                    shutil.copy2(media, out / media.name)
    shutil.rmtree(target, ignore_errors=True)  # then swap in the new copy whole
    staging.rename(target)
    return target


def compact_picture(png: bytes, keep: str) -> tuple[str, bytes]:
    """``(format, bytes)`` of a PNG picture made smaller for the published copy: re-encoded as JPEG
    (``keep="any"``, for a notebook's output) or as a 256-colour PNG (``keep="png"``, for a file whose name the
    chapters use), whichever is asked, when that is smaller than the original; else the original."""
    from PIL import Image

    if len(png) < COMPACT_ABOVE_BYTES:
        return "png", png
    with Image.open(io.BytesIO(png)) as image:
        rgb = image.convert("RGBA")
        flat = Image.new("RGB", rgb.size, "white")
        flat.paste(rgb, mask=rgb.getchannel("A"))  # transparency onto white, as the page shows it
        buffer = io.BytesIO()
        if keep == "png":
            flat.quantize(256).save(buffer, "PNG", optimize=True)
        else:
            flat.save(buffer, "JPEG", quality=NOTEBOOK_JPEG_QUALITY, optimize=True)
    smaller = buffer.getvalue()
    if len(smaller) >= len(png):
        return "png", png
    return ("png" if keep == "png" else "jpeg"), smaller


def compact_notebook_pictures(notebook_json: str) -> str:
    """A notebook's JSON whose large PNG outputs are JPEG (``compact_picture``)."""
    nb = json.loads(notebook_json)
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" not in data:
                continue
            encoded = data["image/png"]
            png = base64.b64decode("".join(encoded) if isinstance(encoded, list) else encoded)
            kind, picture = compact_picture(png, "any")
            if kind == "jpeg":
                del data["image/png"]
                data["image/jpeg"] = base64.b64encode(picture).decode("ascii")
    return json.dumps(nb, indent=1, ensure_ascii=False)


def published_durations(study: str, profile: str, published_root: Path = PUBLISHED_DIR) -> dict[str, float]:
    """Seconds each published run of a study's profile took (its record's ``duration_s``), by run id: what
    ``make reproduce AXIS=all`` estimates the remaining time from."""
    return {r.run_id: r.duration_s for r in load_records(study, profile, published_root)
            if r.duration_s is not None and r.status == "ok"}


# --- what the book reads ------------------------------------------------------------------------

def _profiles_with_records(root: Path, study: str) -> list[str]:
    base = Path(root) / study
    return sorted(p.parent.parent.name for p in base.glob(f"*/*/{RECORD_NAME}")) if base.exists() else []


def book_view(results_root: Path, view_dir: Path, published_root: Path | None = PUBLISHED_DIR,
              explored: bool = False) -> dict:
    """Make ``view_dir`` a results folder of symlinks: each study's profiles from ``results_root`` where it has
    records, the others from ``published_root``; the folders of explored runs (``<profile>+explore``, ``manual``)
    only when ``explored``. Returns (and writes to ``sources.json``) study -> profile -> source ("local" or
    "published")."""
    shutil.rmtree(view_dir, ignore_errors=True)
    view_dir.mkdir(parents=True)
    sources: dict[str, dict[str, str]] = {}
    for kind, root in (("local", results_root), ("published", published_root)):
        if root is None or not Path(root).exists():
            continue
        for study_dir in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
            for profile in sorted(set(_profiles_with_records(root, study_dir.name))):
                if profile in sources.get(study_dir.name, {}):
                    continue  # local results win over the published copy
                if is_explored(profile) and not explored:
                    continue
                link = view_dir / study_dir.name / profile
                link.parent.mkdir(exist_ok=True)
                link.symlink_to((study_dir / profile).resolve(), target_is_directory=True)
                sources.setdefault(study_dir.name, {})[profile] = kind
    atomic_write_text(view_dir / SOURCES_FILE, json.dumps(sources, indent=1, sort_keys=True))
    return sources


def source_of(study: str, profile: str, root: Path) -> str | None:
    """"local" or "published" when ``root`` is a book view, else None (a plain results folder)."""
    path = Path(root) / SOURCES_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text()).get(study, {}).get(profile)


# --- what a chapter says about its results --------------------------------------------------------

@dataclass
class StaleRun:
    label: str
    changed: dict = field(default_factory=dict)  # field -> (recorded value, value in the params file now)


def stale_runs(study: str, profile: str, records: list[RunRecord]) -> tuple[list[StaleRun], list[str]]:
    """Runs whose parameters no longer match ``params/<study>.yaml``'s profile (with the fields that differ), and
    the grid points of the params file that have no run. A profile the params file no longer has makes every run
    stale."""
    from .params import ParamsError, expand, params_path

    try:
        specs = expand(params_path(study), profile)
    except (ParamsError, FileNotFoundError, KeyError) as err:
        return [StaleRun(r.label, {"profile": (profile, f"not expandable now: {err}")}) for r in records], []
    current = {s.run_id for s in specs}
    by_label = {s.label: s for s in specs}
    stale = []
    for record in records:
        if record.run_id in current:
            continue
        spec = by_label.get(record.label)
        now = spec.params if spec else {}
        keys = sorted(set(record.params) | set(now))
        changed = {k: (record.params.get(k), now.get(k)) for k in keys if record.params.get(k) != now.get(k)}
        stale.append(StaleRun(record.label, changed if spec else {"grid point": (record.label, "no longer in grid")}))
    recorded = {r.run_id for r in records}
    missing = [s.label for s in specs if s.run_id not in recorded and s.label not in {x.label for x in stale}]
    return stale, missing


def code_changes(study: str, records: list[RunRecord]) -> tuple[dict[str, list[str]], list[str]]:
    """Runs made by code that has changed since (label -> the changed modules, from the record's code fingerprint
    against the study's code now: ``code_fingerprint``), and the runs whose record has no fingerprint."""
    current = study_fingerprint(study)
    changed, unrecorded = {}, []
    for record in records:
        recorded = record.provenance.get("code")
        if not recorded:
            unrecorded.append(record.label)
        elif current and (names := changed_code(recorded, current)):
            changed[record.label] = names
    return changed, unrecorded


def _code_note(study: str, records: list[RunRecord]) -> list[str]:
    changed, unrecorded = code_changes(study, records)
    lines = []
    if changed:
        names = sorted({n.removeprefix("efficientllm_utils.") for v in changed.values() for n in v})
        shown = ", ".join(f"`{n}`" for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        lines.append(f"**Older code:** {len(changed)} of {len(records)} run(s) were made by code that has changed "
                     f"since (the modules their record fingerprinted against this checkout: {shown}). Their numbers "
                     "may not be what this code measures now; `make reproduce` re-runs them.")
    if unrecorded:
        lines.append(f"Code fingerprint not recorded for {len(unrecorded)} of {len(records)} run(s) (made before "
                     "records kept one): whether they ran the code of this checkout is not known; the commit above "
                     "says what they ran.")
    return lines


def provenance_line(records: list[RunRecord]) -> str:
    """Commit(s), machine(s) and dates of the runs, and how busy the machine was, in one sentence."""
    if not records:
        return ""
    commits = sorted({(r.provenance.get("git_commit") or "uncommitted")[:10]
                      + (" (with uncommitted changes)" if r.provenance.get("git_dirty") else "") for r in records})
    machines = sorted({r.provenance.get("hardware", {}).get("summary") or "unknown machine" for r in records})
    days = sorted({(r.finished or r.started or "")[:10] for r in records} - {""})
    dates = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}" if days else "unknown dates"
    text = f"code {', '.join(f'`{c}`' for c in commits)}, on {'; '.join(machines)}, {dates}"
    loads = [(r.provenance.get("load_average") or {}).get("5m") for r in records]
    cores = [r.provenance.get("hardware", {}).get("logical_cores") for r in records]
    busy = [load for load, n in zip(loads, cores) if load is not None and n and load > n + 1]
    if busy:
        text += (f"; {len(busy)} of {len(records)} runs ended with the machine busier than its "
                 f"{cores[0]} cores (5-minute load average up to {max(busy):.1f}), so their times are inflated "
                 f"by other work")
    return text


def results_note(study: str, profile: str, records: list[RunRecord], root: Path) -> str:
    """What a chapter says about the results it shows: their source, provenance, and stale or missing runs."""
    source = source_of(study, profile, root)
    where = {"published": "the published copy committed in the repository (`published/`, made by "
                          "`make reproduce`; run it to replace them with your own)",
             "local": "this machine's results (`results/`)"}.get(source, f"`{root}`")
    lines = [f"These results are {where}: {provenance_line(records)}."]
    if source == "published":
        lines[0] += f" The {PICTURES_NOTE}."
    stale, missing = stale_runs(study, profile, records)
    if stale:
        parts = [f"{s.label} ({', '.join(f'{k}: {a!r} then, {b!r} now' for k, (a, b) in s.changed.items())})"
                 for s in stale]
        lines.append(f"**Out of date:** {len(stale)} run(s) were made with parameters that no longer match "
                     f"`params/{study}.yaml`'s `{profile}` profile: {'; '.join(parts)}. "
                     f"`make reproduce` re-runs them.")
    lines += _code_note(study, records)
    if missing:
        lines.append(f"**Not run yet:** {', '.join(missing)} (in the params file, without a record).")
    explored = [r for p in _profiles_with_records(root, study) if is_explored(p) for r in load_records(study, p, root)]
    if explored:
        lines.append(f"**Explored runs**, not in this chapter's tables or findings (their settings are not the "
                     f"profile's; those the runner made have their own page): "
                     + "; ".join(f"{r.label} ({r.explored.summary() if r.explored else r.profile})" for r in explored)
                     + ".")
    return "\n\n".join(lines)
