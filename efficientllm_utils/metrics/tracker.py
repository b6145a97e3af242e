"""Background resource tracking: memory, utilisation, power and energy.

One ``ResourceTracker`` watches one phase of work (a training loop, a batch of
generations). A daemon thread samples at a fixed interval; energy comes from a
cumulative counter read at the start and end of the phase, never from the
samples alone, so a slow sampler cannot bias it.

Counters, best first:
- GPU: NVML ``memory.used``, ``utilization.gpu``, ``power.draw`` and the total
  energy counter (``nvmlDeviceGetTotalEnergyConsumption``, Volta and newer).
- CPU: psutil RSS and CPU times of this process; RAPL package energy where
  ``/sys/class/powercap`` is readable; otherwise energy is *estimated* as
  process CPU-seconds x an assumed power per busy core, and labelled so.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil

from .values import MetricValue

# Assumed power of one fully busy server core: a 200-250 W CPU package spread over
# 20-32 cores. Only used when no energy counter can be read; the label says so.
ASSUMED_WATTS_PER_BUSY_CORE = 8.0
RAPL_ROOT = Path("/sys/class/powercap")


def visible_gpus() -> list[tuple[str, int]]:
    """The GPUs this process may use, as ``(CUDA_VISIBLE_DEVICES entry, NVML index)``, in CUDA's order.

    The entries are the user's own (indices, ``GPU-<uuid>`` or ``MIG-<uuid>``; a MIG slice maps to its parent GPU's
    NVML index); unset, every GPU NVML sees. As CUDA does, the list stops at the first entry it cannot resolve.
    Indices match NVML's only under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, which the runner's workers set
    (:data:`CUDA_ORDER_ENV`)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [(str(i), i) for i in range(count)]
    out = []
    for token in (t.strip() for t in visible.split(",")):
        if token.isdigit() and int(token) < count:
            out.append((token, int(token)))
            continue
        if not token.startswith(("GPU-", "MIG-")):
            break
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(token)
            if token.startswith("MIG-"):
                handle = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
            out.append((token, pynvml.nvmlDeviceGetIndex(handle)))
        except Exception:
            break
    return out


def visible_gpu_indices() -> list[int]:
    """NVML indices of the GPUs this process may use (respects CUDA_VISIBLE_DEVICES: :func:`visible_gpus`)."""
    return [index for _, index in visible_gpus()]


# CUDA numbers GPUs fastest first unless told otherwise; NVML by PCI bus: one order for both
CUDA_ORDER_ENV = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def job_cores() -> int:
    """Cores this process may run on (its affinity: a Slurm job's or a container's cpuset), not the node's."""
    try:
        return len(psutil.Process().cpu_affinity()) or 1
    except (AttributeError, psutil.Error):  # no affinity on this platform
        return psutil.cpu_count() or 1


def _query(read):
    """One NVML reading, None where the device does not support it (a MIG slice's power or utilisation): an
    exception here would end the sampler thread silently."""
    try:
        return read()
    except Exception:
        return None


def _rapl_domains() -> list[Path]:
    """Readable RAPL package-energy counters (top-level ``intel-rapl:N`` domains)."""
    domains = []
    for path in sorted(RAPL_ROOT.glob("intel-rapl:*")):
        if path.name.count(":") == 1 and os.access(path / "energy_uj", os.R_OK):
            try:
                int((path / "energy_uj").read_text())
                domains.append(path)
            except (OSError, ValueError):
                continue
    return domains


class ResourceTracker:
    """Context manager that samples resources while a phase of work runs."""

    def __init__(self, interval_s: float = 0.1, use_gpu: bool | None = None):
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = interval_s
        self.gpu_indices = visible_gpu_indices() if use_gpu in (None, True) else []
        if use_gpu and not self.gpu_indices:
            raise RuntimeError("use_gpu=True but NVML sees no visible GPU")
        self.samples: list[dict] = []
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handles: list = []
        self.wall_s = 0.0

    # -- counters -------------------------------------------------------------------
    def _nvml(self):
        import pynvml

        return pynvml

    def _sample(self) -> dict:
        sample = {"t": time.perf_counter(), "rss_bytes": self._process.memory_info().rss}
        if self._handles:
            import torch

            nvml = self._nvml()
            sample["gpu_mem_bytes"] = [_query(lambda: nvml.nvmlDeviceGetMemoryInfo(h).used) for h in self._handles]
            sample["gpu_util_pct"] = [_query(lambda: nvml.nvmlDeviceGetUtilizationRates(h).gpu) for h in self._handles]
            sample["gpu_power_w"] = [_query(lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000) for h in self._handles]
            # what tensors hold (this process, every visible device), beside NVML's used memory (allocator cache and
            # other processes included)
            sample["torch_allocated_bytes"] = sum(torch.cuda.memory_allocated(i)
                                                  for i in range(torch.cuda.device_count()))
        return sample

    def _gpu_energy_mj(self) -> list[int] | None:
        try:
            return [self._nvml().nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]
        except Exception:  # counter not supported on this GPU
            return None

    def _rapl_uj(self) -> list[int]:
        return [int((d / "energy_uj").read_text()) for d in self._rapl]

    # -- lifecycle ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(self._sample())

    def __enter__(self) -> "ResourceTracker":
        if self.gpu_indices:
            nvml = self._nvml()
            nvml.nvmlInit()
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in self.gpu_indices]
            try:
                import torch

                if torch.cuda.is_available():  # each phase starts from its own memory: no earlier phase's cache
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
            except ImportError:
                pass
        self._rapl = _rapl_domains()
        self._cpu_start = self._process.cpu_times()
        self._gpu_energy_start = self._gpu_energy_mj() if self._handles else None
        self._rapl_start = self._rapl_uj()
        self.samples = [self._sample()]
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="resource-tracker", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._handles:
            import torch

            torch.cuda.synchronize()
        self.wall_s = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.samples.append(self._sample())
        cpu_end = self._process.cpu_times()
        self.cpu_seconds = (cpu_end.user - self._cpu_start.user) + (cpu_end.system - self._cpu_start.system)
        self._gpu_energy_end = self._gpu_energy_mj() if self._handles else None
        self._rapl_end = self._rapl_uj()
        if self._handles:
            import torch

            self.torch_peak_bytes = torch.cuda.max_memory_allocated()

    # -- metrics --------------------------------------------------------------------
    def energy(self) -> MetricValue:
        """Energy of the phase in joules, from the best available counter."""
        if self._gpu_energy_start is not None and self._gpu_energy_end is not None:
            joules = sum(e - s for s, e in zip(self._gpu_energy_start, self._gpu_energy_end)) / 1000
            return MetricValue.measured(joules, "J", "nvml-total-energy-counter")
        if self._handles:
            powers = [sum(s["gpu_power_w"]) for s in self.samples if None not in s["gpu_power_w"]]
            if not powers:  # a MIG slice reads neither counter; the CPU's would not be the GPU's energy
                return MetricValue.unavailable("J", "nvml-power-and-energy-not-supported(MIG slice?)")
            return MetricValue.measured(sum(powers) / len(powers) * self.wall_s, "J", "nvml-power-draw-sampler")
        if self._rapl:
            joules = 0.0
            for domain, start, end in zip(self._rapl, self._rapl_start, self._rapl_end):
                if end < start:  # the counter wrapped around
                    end += int((domain / "max_energy_range_uj").read_text())
                joules += (end - start) / 1e6
            return MetricValue.measured(joules, "J", "rapl-package-energy-counter(whole-machine)")
        return MetricValue.estimated(self.cpu_seconds * ASSUMED_WATTS_PER_BUSY_CORE, "J",
                                     f"cpu-time-x-watts({ASSUMED_WATTS_PER_BUSY_CORE:g}W-per-busy-core,assumed)")

    def metrics(self) -> dict[str, MetricValue]:
        """AMU, peak memory, PCU, CPU utilisation, energy and AEC for the phase."""
        out: dict[str, MetricValue] = {}
        n_cores = job_cores()
        total_ram = psutil.virtual_memory().total
        if self._handles:
            nvml = self._nvml()
            used = [sum(b for b in s["gpu_mem_bytes"] if b is not None) for s in self.samples]
            total = sum(nvml.nvmlDeviceGetMemoryInfo(h).total for h in self._handles)
            how = "nvml-memory-used-sampler(allocator-cache-included;emptied-at-phase-start)"
            out["amu_gb"] = MetricValue.measured(sum(used) / len(used) / 1e9, "GB", how)
            out["amu_fraction"] = MetricValue.measured(sum(used) / len(used) / total, "fraction", how)
            allocated = [s["torch_allocated_bytes"] for s in self.samples]
            out["amu_allocated_gb"] = MetricValue.measured(sum(allocated) / len(allocated) / 1e9, "GB",
                                                           "torch-cuda-memory-allocated-sampler")
            out["peak_memory_gb"] = MetricValue.measured(self.torch_peak_bytes / 1e9, "GB",
                                                         "torch-cuda-max-memory-allocated(reset-at-phase-start)")
            util = [sum(s["gpu_util_pct"]) / len(s["gpu_util_pct"]) for s in self.samples
                    if None not in s["gpu_util_pct"]]
            out["pcu"] = (MetricValue.measured(sum(util) / len(util) / 100, "fraction", "nvml-utilization-gpu-sampler")
                          if util else MetricValue.unavailable("fraction", "nvml-utilization-not-supported(MIG?)"))
        else:
            rss = [s["rss_bytes"] for s in self.samples]
            out["amu_gb"] = MetricValue.measured(sum(rss) / len(rss) / 1e9, "GB", "psutil-process-rss-sampler")
            out["amu_fraction"] = MetricValue.measured(sum(rss) / len(rss) / total_ram, "fraction", "psutil-process-rss-sampler")
            out["peak_memory_gb"] = MetricValue.measured(max(rss) / 1e9, "GB", "psutil-process-rss-sampler(max)")
            out["pcu"] = MetricValue.unavailable("fraction", "no-gpu(PCU is NVML utilization.gpu)")
        out["cpu_util"] = MetricValue.measured(self.cpu_seconds / (self.wall_s * n_cores), "fraction",
                                               "psutil-process-cpu-times/cores-this-process-may-use")
        energy = self.energy()
        out["energy_j"] = energy
        kind, how = energy.method.split(":", 1)
        out["aec_w"] = MetricValue(value=None if energy.value is None else energy.value / self.wall_s, unit="W",
                                   method=f"{kind}:{how}" + ("" if energy.value is None else "/wall-time"))
        out["phase_wall_s"] = MetricValue.measured(self.wall_s, "s", "perf-counter")
        return out
