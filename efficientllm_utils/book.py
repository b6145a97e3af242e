"""Build the Jupyter Book (version 1: it builds offline) from the results on disk.

Chapter pages are MyST notebooks that read the results and are executed at
every build, so every page runs; the executed run notebooks are copied in as
they are, outputs and all, and are not executed again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import study_registry
from .paths import REPO_ROOT
from .portable import portable_notebook
from .published import PUBLISHED_DIR, SOURCES_FILE, book_view
from .records import NOTEBOOK_NAME, RESULTS_DIR, RunRecord, read_record

BOOK_DIR = REPO_ROOT / "book"


def copy_run_notebooks(results_root: Path, book_dir: Path = BOOK_DIR) -> list[Path]:
    """Copy every executed run notebook to ``book/runs/<study>/<profile>--<run_id>.ipynb``, made readable
    (``readable_run_notebook``)."""
    target_root = book_dir / "runs"
    shutil.rmtree(target_root, ignore_errors=True)
    copied = []
    for notebook in sorted(results_root.glob(f"*/*/*/{NOTEBOOK_NAME}")):
        run_id, profile, study = notebook.parent.name, notebook.parent.parent.name, notebook.parent.parent.parent.name
        target = target_root / study / f"{profile}--{run_id}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(readable_run_notebook(notebook, read_record(notebook.parent), results_root))
        copied.append(target)
    return copied


# --- run pages a reader can use -------------------------------------------------------------

def _short(value) -> str:
    """A model given as a hub id or a path shows its last part."""
    return Path(value).name if isinstance(value, str) and "/" in value else str(value)


def run_title(study: str, label: str, params: dict) -> str:
    """The title of a run's page: the study's ``run_title`` (``study_registry``) at the run's grid point (a grid key
    the template does not name is added in brackets)."""
    grid = dict(part.split("=", 1) for part in label.split(",") if "=" in part)
    template = study_registry.BY_NAME[study].run_title if study in study_registry.BY_NAME else None
    if template is None:
        return f"{study}: {', '.join(_short(v) for v in grid.values()) or label}"
    try:
        title = template.format(**{k: _short(v) for k, v in {**params, **grid}.items()})
    except KeyError:  # a field the template names is not in this study's records
        return f"{study}: {label}"
    others = [f"{k}={_short(v)}" for k, v in grid.items() if "{" + k + "}" not in template]
    return f"{title} ({', '.join(others)})" if others else title


def readable_run_notebook(notebook: Path, record: RunRecord | None, results_root: Path) -> str:
    """An executed run notebook as its book page shows it: portable (``portable_notebook``) and titled by its grid
    point."""
    nb = json.loads(portable_notebook(notebook.read_text(), results_root))
    if record is not None:
        title = run_title(record.study, record.label, record.params) + (" (failed)" if record.status != "ok" else "")
        if record.explored:  # not one of its profile's runs: say so where a reader lands
            title += f" (explored: {record.explored.summary()})"
        first = next((c for c in nb["cells"] if c["cell_type"] == "markdown"), None)
        source = "".join(first["source"]) if first else ""
        if source.startswith("# "):  # the notebook's generic title stays, as a subtitle
            heading, _, rest = source.partition("\n")
            first["source"] = f"# {title}\n\n*{heading[2:].strip()}*\n{rest}"
        else:
            nb["cells"].insert(0, {"cell_type": "markdown", "metadata": {}, "source": f"# {title}"})
    return json.dumps(nb, indent=1, ensure_ascii=False)


PACKAGE_DIR = Path(__file__).resolve().parent


def fingerprint(results_root: Path, book_dir: Path) -> str:
    """Changes whenever a result (of the view: local or published), a book source or the package's code changes."""
    paths = [*(p.resolve() for p in Path(results_root).glob("*/*/*/record.json")),
             *(p for p in book_dir.rglob("*") if p.is_file() and "_build" not in p.parts and "runs" not in p.parts),
             *PACKAGE_DIR.rglob("*.py")]
    digest = hashlib.sha256(str(Path(results_root).resolve()).encode())
    sources = Path(results_root) / SOURCES_FILE  # a view's: rewritten at every build, so its text counts
    digest.update(sources.read_bytes() if sources.exists() else b"")
    for path in sorted(paths):
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def build_book(results_root: Path = RESULTS_DIR, book_dir: Path = BOOK_DIR, quiet: bool = True,
               force: bool = False, published_root: Path | None = PUBLISHED_DIR, explored: bool = False) -> Path:
    """Build the HTML book; returns the path of its ``index.html``. Raises if a page fails.

    Each study's profiles come from ``results_root`` where it has records, else from the published copy
    (``published.book_view``; ``published_root=None``: local results only). Explored runs (``<profile>+explore``,
    ``manual``) are left out unless ``explored``: then they get their run pages, titled as explored, and each
    chapter names them, but its tables and findings keep to its profile's runs. Skipped when nothing it reads
    changed since the last successful build (``force`` rebuilds).
    """
    index = book_dir / "_build" / "html" / "index.html"
    stamp = book_dir / "_build" / ".fingerprint"
    view = book_dir / "_build" / "results_view"
    book_view(results_root, view, published_root, explored=explored)
    current = fingerprint(view, book_dir)
    if not force and index.exists() and stamp.exists() and stamp.read_text() == current:
        print("book: up to date (no result, page or code changed since the last build)", file=sys.stderr)
        return index
    copy_run_notebooks(view, book_dir)
    # chapter pages import libraries that import tqdm.auto, which warns in a kernel without ipywidgets, with a
    # machine path: not what a reader should see (run pages drop it in ``portable_notebook``)
    warnings_filter = ",".join(filter(None, (os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found")))
    env = {**os.environ, "EFFICIENTLLM_RESULTS": str(view), "PYTHONWARNINGS": warnings_filter}
    jb = Path(sys.executable).parent / "jupyter-book"
    # -W: a page whose code fails is a failed build, not a page with a traceback in it.
    # --all: chapter pages read results/, which Sphinx does not track, so every page is rebuilt.
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(book_dir), "-W", "--keep-going", "--all"]
    done = subprocess.run(cmd, env=env, capture_output=quiet, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed ({done.returncode}):\n{(done.stdout or '')[-4000:]}\n"
                           f"{(done.stderr or '')[-4000:]}")
    if not index.exists():
        raise RuntimeError(f"jupyter-book finished but wrote no {index}")
    stamp.write_text(current)
    return index
