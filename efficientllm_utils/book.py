"""Build the Jupyter Book (version 1: it builds offline) from the results on disk.

Chapter pages are MyST notebooks that read the results and are executed at
every build, so every page runs; the executed run notebooks are copied in as
they are, outputs and all, and are not executed again.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .records import NOTEBOOK_NAME, RESULTS_DIR

BOOK_DIR = Path(__file__).resolve().parent.parent / "book"


def copy_run_notebooks(results_root: Path, book_dir: Path = BOOK_DIR) -> list[Path]:
    """Copy every executed run notebook to ``book/runs/<study>/<profile>--<run_id>.ipynb``."""
    target_root = book_dir / "runs"
    shutil.rmtree(target_root, ignore_errors=True)
    copied = []
    for notebook in sorted(results_root.glob(f"*/*/*/{NOTEBOOK_NAME}")):
        run_id, profile, study = notebook.parent.name, notebook.parent.parent.name, notebook.parent.parent.parent.name
        target = target_root / study / f"{profile}--{run_id}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(notebook, target)
        copied.append(target)
    return copied


PACKAGE_DIR = Path(__file__).resolve().parent


def fingerprint(results_root: Path, book_dir: Path) -> str:
    """Changes whenever a result, a book source or the package's code changes."""
    paths = [*Path(results_root).glob("*/*/*/record.json"),
             *(p for p in book_dir.rglob("*") if p.is_file() and "_build" not in p.parts and "runs" not in p.parts),
             *PACKAGE_DIR.rglob("*.py")]
    digest = hashlib.sha256(str(Path(results_root).resolve()).encode())
    for path in sorted(paths):
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def build_book(results_root: Path = RESULTS_DIR, book_dir: Path = BOOK_DIR, quiet: bool = True,
               force: bool = False) -> Path:
    """Build the HTML book; returns the path of its ``index.html``. Raises if a page fails.

    Skipped when nothing it reads changed since the last successful build (``force`` rebuilds).
    """
    index = book_dir / "_build" / "html" / "index.html"
    stamp = book_dir / "_build" / ".fingerprint"
    current = fingerprint(results_root, book_dir)
    if not force and index.exists() and stamp.exists() and stamp.read_text() == current:
        print("book: up to date (no result, page or code changed since the last build)", file=sys.stderr)
        return index
    copy_run_notebooks(results_root, book_dir)
    env = {**os.environ, "EFFICIENTLLM_RESULTS": str(Path(results_root).resolve())}
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
