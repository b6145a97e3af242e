"""A fingerprint of the code a study's runs execute, so that a chapter can tell records made by older code.

The code of a study is its notebook's code cells (the study registry's ``notebook``) and every module of this package that the notebook imports,
followed through each module's own imports (top-level and inside functions), less the report layer (``reports``,
which only shows records). Each module is fingerprinted by a hash of its syntax tree without docstrings, so comments,
docstrings and formatting do not count; the notebook by its code cells' text. A record keeps one short hash per
module (``RunContext.write``: ``provenance["code"]``), so a page can name the modules that changed since."""
from __future__ import annotations

import ast
import hashlib
import json
from functools import lru_cache
from pathlib import Path

from . import study_registry
from .paths import REPO_ROOT

PACKAGE = "efficientllm_utils"
NOT_RUN_CODE = (f"{PACKAGE}.reports",)  # what the book runs, not the studies
HASH_CHARS = 12


def _module_file(name: str) -> Path | None:
    """``efficientllm_utils.studies.dit`` -> its file (a module, or a package's ``__init__.py``), if it exists."""
    base = REPO_ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """The package modules a module's syntax tree imports (absolute, and relative to ``name``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name if is_package else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            candidates = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for candidate in candidates:
            parts = candidate.split(".")
            # the module and the packages above it (importing a.b.c runs a/__init__ and a/b/__init__)
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in found if (m == PACKAGE or m.startswith(PACKAGE + ".")) and _module_file(m) is not None
            and not m.startswith(NOT_RUN_CODE)}


def _tree_hash(tree: ast.AST) -> str:
    """A module's syntax tree without docstrings, hashed."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) \
                and isinstance(node.body[0].value.value, str):
            node.body = node.body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:HASH_CHARS]


def notebook_code(path: Path) -> str:
    """The code cells of a notebook, joined."""
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@lru_cache(maxsize=None)
def _module(name: str) -> tuple[str, frozenset[str]]:
    """A package module's hash and the package modules it imports (read once per process)."""
    path = _module_file(name)
    tree = ast.parse(path.read_text())
    imports = frozenset(_imports(tree, name, path.name == "__init__.py"))
    return _tree_hash(tree), imports


def modules_of(code: str) -> dict[str, str]:
    """Every package module ``code`` imports, transitively -> the hash of its syntax tree."""
    todo = _imports(ast.parse(code), PACKAGE, True)
    hashes: dict[str, str] = {}
    while todo:
        name = todo.pop()
        if name in hashes:
            continue
        hashes[name], imports = _module(name)
        todo |= imports - set(hashes)
    return dict(sorted(hashes.items()))


@lru_cache(maxsize=None)
def study_fingerprint(study: str) -> dict[str, str]:
    """The code a study's runs execute, now: ``{"notebook:<path>": hash, "<module>": hash, ...}``; empty for a
    study the registry does not know or whose notebook is missing (nothing to fingerprint)."""
    registered = study_registry.BY_NAME.get(study)
    notebook = REPO_ROOT / registered.notebook if registered else None
    if notebook is None or not notebook.is_file():
        return {}
    code = notebook_code(notebook)
    return {f"notebook:{notebook.relative_to(REPO_ROOT)}": hashlib.sha256(code.encode()).hexdigest()[:HASH_CHARS],
            **modules_of(code)}


def changed_code(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """The modules (and notebook) whose code differs between a record's fingerprint and the code now: changed,
    added or removed, by name."""
    return sorted(name for name in set(recorded) | set(current) if recorded.get(name) != current.get(name))
