"""Scores of a model cached on disk by a fingerprint of everything they depend on.

Two runs that would score the very same weights on the very same inputs with the same code and
packages get the same numbers; the second reads the first's instead of computing them again. The
fingerprint hashes every tensor of the model's state (names, dtypes, shapes, bytes; 4-bit weights
and their quantisation state included), a JSON description of the inputs and settings, the source
of the scoring code and the versions of the packages. Used by the fine-tuning study (the base
model's held-out scores before training) and the quantization study (the reference precision's
next-token distributions and answers). The result says who computed it (``computed_by``) and
whether this call did (``reused``).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

PACKAGE_DIR = Path(__file__).resolve().parent


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def fingerprint(model, inputs: Any, code: tuple[str, ...], packages: tuple[str, ...]) -> str:
    """sha256 of the model's state, ``inputs`` (JSON-able), the files ``code`` (relative to this package) and the
    versions of ``packages``."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 1-d: a 0-d tensor cannot be viewed as bytes
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest.update(json.dumps({
        "inputs": inputs,
        "code": {f: hashlib.sha256((PACKAGE_DIR / f).read_bytes()).hexdigest() for f in code},
        "packages": {name: _version(name) for name in packages},
    }, sort_keys=True).encode())
    return digest.hexdigest()


def cached(key: str, compute: Callable[[], dict], cache_dir: Path | None, run_label: str) -> dict:
    """``compute()``'s result, or the one stored under ``key`` in ``cache_dir`` (``None``: always compute).

    The result is a dict; it may hold tensors (stored with ``torch.save``). Adds ``reused``, ``computed_by``,
    ``fingerprint`` and ``seconds`` (of this call)."""
    from .records import atomic_write_bytes, now

    t0 = time.perf_counter()
    path = cache_dir / f"{key[:32]}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        stored = torch.load(path, weights_only=True)
        if stored.get("fingerprint") == key:
            result = stored["result"]
            result.update(reused=True, computed_by=stored["computed_by"], fingerprint=key,
                          seconds=time.perf_counter() - t0)
            return result
    result = compute()
    result.update(reused=False, computed_by=run_label, fingerprint=key)
    if path is not None:
        buffer = io.BytesIO()
        torch.save({"fingerprint": key, "computed_by": run_label, "finished": now(), "result": result}, buffer)
        atomic_write_bytes(path, buffer.getvalue())
    result["seconds"] = time.perf_counter() - t0
    return result


def resolve_reference(reference: dict | None, own: Callable[[], dict], key: Callable[[], str], cache_dir: Path | None,
                      run_label: str, inputs: str, reference_precision: str) -> tuple[dict, str, str]:
    """A quantization run's reference outputs, where they came from and their fingerprint. ``reference`` None: this
    run is the reference, its ``own()`` outputs stored under ``key()`` for the others; else the stored reference
    (``inputs``: what besides the weights, code and packages it was keyed on)."""
    if reference is None:
        stored = cached(key(), own, cache_dir, run_label)
        return own(), "this run is the reference", stored["fingerprint"]
    source = (f"reused from run {reference['computed_by']} (same reference weights, {inputs}, code and packages)"
              if reference["reused"] else f"computed in this run from the {reference_precision} model")
    return reference, source, reference["fingerprint"]
