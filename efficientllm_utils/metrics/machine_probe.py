"""The machine's measured limits: peak dense-matmul FLOP/s per dtype and peak memory bandwidth, probed once per machine.

MFU and MBU (``metrics.roofline``) divide a run's achieved rate by these peaks. They are measured with torch on
the device the runs use (the CPU, or CUDA with synchronisation), once per machine, and cached under
``.cache/machine_probe/`` keyed by what decides them: the CPU model, its flags and core count, the torch version and
its thread count, and the device (a GPU's name). Every record's provenance carries the cached figures (``records.provenance``); a run never
re-measures them. ``python -m efficientllm_utils probe`` shows them, ``--refresh`` measures again.

How each peak is measured (the record says so beside each figure):

* matmul: ``n x n`` products, ``64 x n`` by ``n x n`` ones (a short prompt's tokens through a layer) and ``64 x 4n``
  by ``4n x n`` ones (through an FFN's down projection: on the 2-core AVX2 EPYC this was written on, oneDNN's bf16
  and fp16 kernels ran 12-20% faster there, bf16 11.0 against 9.8 GFLOP/s at 1 thread), with ``F.linear`` (the op ``nn.Linear`` runs) and ``torch.matmul`` (on a CPU
  without AVX512-BF16 only the first reaches oneDNN's bf16/fp16 kernels, and those run several times faster on the
  64-row shapes) at ``n`` = 256, 512, ... (doubled until one product takes >= 0.2 s, the device's cap, or
  ``seconds_per_dtype`` is spent; a GPU from n = 1024 to 16384, 12 s a dtype, timing up to 20 calls between two
  syncs, so the launch gap is not in each call's time), each repeated and its **best** (shortest) time kept; the peak is the best rate
  over the shapes and sizes (a peak, not a typical rate: on a shared machine the short products that run between
  interruptions show what the cores can do). FLOPs = 2 rows inner out. int8 runs ``torch._int_mm``
  (int8 x int8 -> int32) where it has a kernel; otherwise it is recorded missing with the error.
* bandwidth: a large tensor (well beyond the last-level cache) copied (bytes read + written) and summed (bytes read),
  each repeated, the best time kept; the peak is the higher of the two rates.
* on a GPU, the vendor's published peaks for the model (``PUBLISHED_GPU_PEAKS``) are recorded beside the measured
  ones, labelled as published, never used in their place.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from ..paths import REPO_ROOT

# bump a device's when its procedure changes: older caches are then ignored (cuda 5: larger shapes, batched syncs)
PROBE_VERSION = {"cpu": 4, "cuda": 5}
DTYPES = ("fp32", "bf16", "fp16", "int8")
ROWS = 64  # the short side of the second shape probed: oneDNN's bf16/fp16 kernels are far faster on it on some CPUs
FFN_RATIO = 4  # the third shape's input is this much wider than its output (an FFN's down projection)
MAX_CALL_S = 0.2  # a product this long already shows the sustained rate: stop growing n
MAX_N = {"cpu": 2048, "cuda": 16384}  # an H100 reaches its bf16 peak only past n = 4096
# calls timed between two syncs (at most; fewer where the batch would pass BATCH_S): a sync per call on a GPU times
# the launch gap with each kernel, which at n <= 2048 is a good part of it
CALLS_PER_SYNC = {"cpu": 1, "cuda": 20}
BATCH_S = 0.05
SECONDS_PER_DTYPE = {"cpu": 2.0, "cuda": 12.0}  # the matmul probe's budget per dtype (a GPU: about 1.5 s a size)
MIN_N = {"cpu": 256, "cuda": 1024}  # the first size probed
BANDWIDTH_BYTES = {"cpu": 256 * 2 ** 20, "cuda": 2 * 2 ** 30}  # per tensor; far beyond any last-level cache
MATMUL_METHOD = "measured:torch-linear-or-matmul(best-of-repeats-shapes-and-sizes,2-rows-inner-out-flops)"
BANDWIDTH_METHOD = "measured:torch-copy-and-sum(best-of-repeats,max-of-copy-read+write-and-sum-read)"

# Dense (no structured sparsity) peaks from NVIDIA's datasheets, per GPU model, matched against the NVML name in
# this order (the first substring that matches wins). FLOP/s; int8 in OP/s; bandwidth in bytes/s.
PUBLISHED_GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    # the NVL and Grace Hopper parts before the SXM names they contain ("GH200" contains "H200")
    ("GH200 144G", {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12, "int8": 1979e12, "bandwidth": 4.9e12}),  # HBM3e
    ("GH200", {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12, "int8": 1979e12, "bandwidth": 4.0e12}),  # 96 GB HBM3
    ("H200 NVL", {"fp32": 60e12, "bf16": 835e12, "fp16": 835e12, "int8": 1671e12, "bandwidth": 4.8e12}),
    ("H100 NVL", {"fp32": 60e12, "bf16": 835e12, "fp16": 835e12, "int8": 1671e12, "bandwidth": 3.9e12}),
    ("H200", {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12, "int8": 1979e12, "bandwidth": 4.8e12}),
    ("H100 PCIe", {"fp32": 51e12, "bf16": 756e12, "fp16": 756e12, "int8": 1513e12, "bandwidth": 2.0e12}),
    ("H100", {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12, "int8": 1979e12, "bandwidth": 3.35e12}),  # SXM5
    ("A100 80GB PCIe", {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12, "int8": 624e12, "bandwidth": 1.935e12}),
    ("A100-SXM4-80GB", {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12, "int8": 624e12, "bandwidth": 2.039e12}),
    ("A100", {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12, "int8": 624e12, "bandwidth": 1.555e12}),  # 40 GB
]
PUBLISHED_SOURCE = "published by the vendor (NVIDIA datasheet, dense, no sparsity)"


def cache_dir() -> Path:
    return Path(os.environ.get("EFFICIENTLLM_PROBE_CACHE", REPO_ROOT / ".cache" / "machine_probe"))


# --- what identifies a machine -----------------------------------------------------------------

def _cpu_model_and_flags() -> tuple[str, str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), ""
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.machine())
    flags = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("flags")), "")
    return model, flags


def _gpu_name() -> str | None:
    """NVML's name of the first visible GPU (no torch import: the record's provenance reads the cache cheaply)."""
    try:
        import pynvml

        from .tracker import visible_gpu_indices

        indices = visible_gpu_indices()
        if not indices:
            return None
        return pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(indices[0]))
    except Exception:
        return None


def machine_key(device: str, threads: int) -> dict[str, Any]:
    """What decides the peaks: CPU model, flags and cores, the torch version and its intra-op threads, the device
    (a GPU's name). Runs under the Dask runner get one torch thread per worker, a user's shell all cores: each
    thread count is probed once."""
    model, flags = _cpu_model_and_flags()
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {"probe_version": PROBE_VERSION[device], "device": device, "cpu": model,
            "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16], "logical_cores": os.cpu_count(),
            "torch": torch_version, "gpu": _gpu_name() if device == "cuda" else None, "torch_threads": threads}


def _machine_hash(device: str) -> str:
    key = {k: v for k, v in machine_key(device, 0).items() if k != "torch_threads"}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _threads(threads: int | None) -> int:
    if threads is not None:
        return threads
    import torch

    return torch.get_num_threads()


def cache_path(device: str, threads: int | None = None) -> Path:
    return cache_dir() / f"{device}-{_machine_hash(device)}-{_threads(threads)}t.json"


def cached(device: str, threads: int | None = None) -> dict | None:
    """The probe of this machine for ``device`` at ``threads`` torch threads (default: torch's current setting) if it
    was measured, else None; never measures."""
    try:
        return json.loads(cache_path(device, threads).read_text())
    except (OSError, ValueError):
        return None


def cached_all() -> dict[str, dict]:
    """Every cached probe of this machine (``cpu-1t``, ``cpu-2t``, ``cuda-8t``, ...): what a record's provenance
    carries. Reads files only: no torch import, no measuring."""
    out = {}
    for device in MAX_N:
        for path in sorted(cache_dir().glob(f"{device}-{_machine_hash(device)}-*t.json")):
            try:
                out[path.stem.split("-", 1)[0] + "-" + path.stem.rsplit("-", 1)[1]] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
    return out


def load_or_measure(device: str = "cpu", refresh: bool = False) -> dict:
    """This machine's probe for ``device`` at torch's current thread count: from the cache, or measured once and
    cached (under a lock, so that runs started together measure it once)."""
    if device not in MAX_N:
        raise ValueError(f"device must be one of {sorted(MAX_N)}, got {device!r}")
    threads = _threads(None)
    path = cache_path(device, threads)
    if not refresh and (probe := cached(device, threads)) is not None:
        return probe
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run waits, then reads what this one measured
        if not refresh and (probe := cached(device, threads)) is not None:
            return probe
        probe = {**measure(device), "key": machine_key(device, threads)}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(probe, indent=1))
        os.replace(tmp, path)
    return probe


# --- measuring ---------------------------------------------------------------------------------

def _best_time(fn: Callable[[], object], sync: Callable[[], None], seconds: float, min_repeats: int = 3,
               calls: int = 1) -> tuple[float, int]:
    """Shortest wall time of ``fn`` over repeats (at least ``min_repeats``, until ``seconds`` passed); one warm-up.
    Each repeat times up to ``calls`` calls with one sync after them (fewer where they would pass ``BATCH_S``)."""
    t0 = time.perf_counter()
    fn()
    sync()
    batch = max(1, min(calls, int(BATCH_S / max(time.perf_counter() - t0, 1e-9))))
    best, repeats, start = float("inf"), 0, time.perf_counter()
    while repeats < min_repeats or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / batch)
        repeats += 1
    return best, repeats


def _operands(dtype_name: str, rows: int, inner: int, out: int, device):
    """``x`` (rows, inner) and a weight ``w`` (out, inner), as ``nn.Linear`` holds it."""
    import torch

    if dtype_name == "int8":
        return [torch.randint(-64, 64, shape, dtype=torch.int8, device=device)
                for shape in ((rows, inner), (out, inner))]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    return [torch.randn(shape, device=device).to(dtype) for shape in ((rows, inner), (out, inner))]


def _shapes(n: int) -> list[tuple[int, int, int]]:
    """(rows, inner, out) products probed at size ``n``: square, a short prompt's tokens through a square layer, and
    through a layer 4x wider on its input (an FFN's down projection, where some CPU kernels run fastest)."""
    return [(n, n, n), (ROWS, n, n), (ROWS, FFN_RATIO * n, n)]


def matmul_peak(dtype_name: str, device: str = "cpu", seconds_per_dtype: float | None = None) -> dict:
    """Best dense-matmul rate for one dtype (FLOP/s; int8: OP/s), or the reason it could not run."""
    import torch

    seconds_per_dtype = seconds_per_dtype or SECONDS_PER_DTYPE[device]
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    # the ops the models run: nn.Linear's F.linear (x @ W^T, which reaches oneDNN's bf16/fp16 kernels on a CPU where
    # torch.matmul of two square bf16 tensors does not) and torch.matmul; int8: torch._int_mm
    products = {"int_mm": lambda x, w: torch._int_mm(x, w.t())} if dtype_name == "int8" else \
        {"linear": torch.nn.functional.linear, "matmul": lambda x, w: torch.matmul(x, w.t())}
    unit = "OP/s" if dtype_name == "int8" else "FLOP/s"
    started = time.perf_counter()
    best = None  # (rate, n, repeats, seconds, op)
    try:
        n = MIN_N[device]
        while n <= MAX_N[device]:
            slowest = 0.0
            for rows, inner, out in _shapes(n):
                x, w = _operands(dtype_name, rows, inner, out, device)
                flops = 2 * rows * inner * out
                for op, product in products.items():
                    t, repeats = _best_time(lambda: product(x, w), sync,
                                            seconds_per_dtype / 4 / len(_shapes(n)) / len(products),
                                            calls=CALLS_PER_SYNC[device])
                    slowest = max(slowest, t)
                    if best is None or flops / t > best[0]:
                        best = (flops / t, n, repeats, t, f"{op}({rows}x{inner}x{out})")
            if slowest >= MAX_CALL_S or time.perf_counter() - started > seconds_per_dtype:
                break
            n *= 2
    except (RuntimeError, NotImplementedError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        return {"value": None, "unit": unit, "method": f"unavailable:no {dtype_name} matmul kernel on {device} "
                                                      f"({reason})"}
    rate, n, repeats, t, op = best
    return {"value": rate, "unit": unit, "method": MATMUL_METHOD, "n": n, "op": op, "repeats": repeats, "best_s": t,
            "probe_s": time.perf_counter() - started}


def bandwidth_peak(device: str = "cpu", seconds: float = 2.0) -> dict:
    """Best memory bandwidth (bytes/s) of a large copy (read + write) and a large sum (read)."""
    import torch

    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    size = BANDWIDTH_BYTES[device]
    src = torch.ones(size // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_s, copy_n = _best_time(lambda: dst.copy_(src), sync, seconds / 2)
    read_s, read_n = _best_time(lambda: src.sum(), sync, seconds / 2)
    copy_rate, read_rate = 2 * size / copy_s, size / read_s
    return {"value": max(copy_rate, read_rate), "unit": "bytes/s", "method": BANDWIDTH_METHOD,
            "copy_bytes_per_s": copy_rate, "read_bytes_per_s": read_rate, "tensor_bytes": size,
            "repeats": {"copy": copy_n, "sum": read_n}}


def published_peaks(gpu_name: str | None) -> dict | None:
    """The vendor's published peaks for a GPU model (``PUBLISHED_GPU_PEAKS``), or None for one not in the table."""
    if not gpu_name:
        return None
    for pattern, peaks in PUBLISHED_GPU_PEAKS:
        if pattern in gpu_name:
            return {"gpu": gpu_name, "matched": pattern, "source": PUBLISHED_SOURCE, **peaks}
    return None


def measure(device: str = "cpu", seconds_per_dtype: float | None = None) -> dict:
    """Probe the device now (no cache): matmul peaks per dtype, bandwidth, threads, how long it took."""
    import torch

    started = time.perf_counter()
    peaks = {name: matmul_peak(name, device, seconds_per_dtype) for name in DTYPES}
    bandwidth = bandwidth_peak(device, seconds_per_dtype or 2.0)
    gpu = _gpu_name() if device == "cuda" else None
    return {"device": device, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch_threads": torch.get_num_threads(), "matmul": peaks, "bandwidth": bandwidth,
            "published": published_peaks(gpu), "probe_s": time.perf_counter() - started,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


# --- reading a probe ---------------------------------------------------------------------------

def peak_flops(probe: dict | None, dtype_name: str) -> float | None:
    if not probe:
        return None
    return (probe.get("matmul", {}).get(dtype_name) or {}).get("value")


def peak_bandwidth(probe: dict | None) -> float | None:
    return ((probe or {}).get("bandwidth") or {}).get("value")


def describe(probe: dict) -> str:
    """The probe as a few lines of text (the CLI's output)."""
    lines = [f"device {probe['device']} ({probe['key']['cpu']}, {probe['key']['logical_cores']} logical cores"
             + (f", {probe['key']['gpu']}" if probe["key"].get("gpu") else "")
             + f"; torch {probe['key']['torch']}, {probe['torch_threads']} threads), measured {probe['measured_at']} "
               f"in {probe['probe_s']:.1f} s"]
    published = probe.get("published") or {}
    for name, peak in probe["matmul"].items():
        value = f"{peak['value'] / 1e9:,.1f} G{peak['unit']}" if peak["value"] else peak["method"]
        extra = f" ({peak.get('op', 'matmul')}, best of {peak['repeats']})" if peak["value"] else ""
        pub = f"; published {published[name] / 1e12:,.0f} T{peak['unit']}" if published.get(name) else ""
        lines.append(f"  matmul {name}: {value}{extra}{pub}")
    bw = probe["bandwidth"]
    pub = f"; published {published['bandwidth'] / 1e9:,.0f} GB/s" if published.get("bandwidth") else ""
    lines.append(f"  bandwidth: {bw['value'] / 1e9:,.1f} GB/s (copy {bw['copy_bytes_per_s'] / 1e9:,.1f}, "
                 f"sum {bw['read_bytes_per_s'] / 1e9:,.1f}; best of repeats){pub}")
    return "\n".join(lines)

