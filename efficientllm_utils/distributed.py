"""Runs that span several processes: data-parallel (DDP) or fully sharded (FSDP) training through torchrun's launcher.

A run with ``nproc > 1`` trains in ``nproc`` processes started by ``torch.distributed``'s elastic launcher (what
``torchrun --standalone --nproc-per-node N`` runs), one per GPU (NCCL) or, on a CPU, one per process group member
(gloo). Every rank builds the same seeded model and reads the same batches; each global batch is split into equal
row shards, one per rank, and the gradients are averaged across ranks, so the group takes the steps one process
would take with the same ``batch_size`` (up to the order of floating-point sums). The notebook's process waits for
the group, loads rank 0's trained weights and goes on with evaluation alone.

- A rank that raises or dies ends the whole group (the launcher stops the others) and :func:`launch` raises
  :class:`RankFailed` naming the rank: the run is recorded as failed by the runner, never with part of the ranks'
  results.
- The group's record: per-rank peak memory and training time (``raw["ranks"]``), the slowest rank's time, the
  world size and the parallelism (:func:`group_metrics`).
- The scheduler gives such a run ``nproc`` GPUs as one job (``runner.gpus_of``); a run asking for more GPUs than a
  job can get is refused before any work (``runner.check_resources``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from .metrics.values import MetricValue

PARALLELISMS = ("ddp", "fsdp")


class ParallelSettings(BaseModel):
    """How many processes a training run spans, and how they share the model (fields of the training run models).

    ``ddp``: every rank holds the whole model and optimizer, gradients are all-reduced (``DistributedDataParallel``).
    ``fsdp``: parameters, gradients and AdamW's moments are sharded across the ranks (FSDP2, ``fully_shard`` per
    block then the root), in fp32 with bf16 compute when the run's dtype is bf16 (``MixedPrecisionPolicy``).
    ``batch_size`` is the global batch: each rank trains on ``batch_size / nproc`` of its rows."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    nproc: int = Field(1, ge=1, description="processes (one per GPU with device=cuda) the run's training spans")
    parallel: Literal[PARALLELISMS] = "ddp"  # type: ignore[valid-type]

    @model_serializer(mode="wrap")
    def _one_process_unsaid(self, handler):
        """A one-process run's parameters leave these fields out: its record and run id stay what they were before
        runs could span processes (``parallel`` means nothing with one)."""
        data = handler(self)
        if isinstance(data, dict) and self.nproc == 1:
            data.pop("nproc", None)
            data.pop("parallel", None)
        return data

    @model_validator(mode="after")
    def _batch_splits(self):
        batch = getattr(self, "batch_size", None)
        if self.nproc > 1 and batch is not None and batch % self.nproc:
            raise ValueError(f"batch_size={batch} does not split into nproc={self.nproc} equal shards: make "
                             "batch_size a multiple of nproc (it is the global batch)")
        return self


class RankFailed(RuntimeError):
    """A rank of a multi-process run raised or died; the launcher stopped the others."""


@dataclass(frozen=True)
class Rank:
    """This process's place in the group (inside :func:`rank_group`)."""

    rank: int
    world_size: int
    device: str  # "cpu" or "cuda:<local rank>"

    def shard(self, batch):
        """This rank's rows of a global batch (a tensor or a list): every ``world_size``-th from ``rank``."""
        return batch[self.rank::self.world_size]


@dataclass
class RankResult:
    """What one rank hands back: its per-step records, its tracker's metrics and samples, its peak memory."""

    rank: int
    steps: list
    metrics: dict[str, MetricValue]
    tracker_samples: list[dict]
    peak_memory_bytes: float
    train_s: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # anything else the study needs back


def launch(entry: Callable, args: tuple, nproc: int, run_name: str = "run") -> list[Any]:
    """Run ``entry(*args)`` in ``nproc`` processes as torchrun does (standalone rendezvous on a free local port, no
    restarts); return each rank's return value, rank 0 first. Raises :class:`RankFailed` when any rank fails."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"{run_name}-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.2,
                          start_method="spawn")
    try:
        returned = elastic_launch(config, entrypoint=entry)(*args)
    except ChildFailedError as err:
        failures = ", ".join(f"rank {rank} (exit {f.exitcode}{': ' + f.message if f.message else ''})"
                             for rank, f in sorted(err.failures.items()))
        raise RankFailed(f"{len(err.failures)} of {nproc} ranks failed, the group was stopped and no result kept: "
                         f"{failures}\n{err}") from None
    return [returned[r] for r in sorted(returned)]


@contextlib.contextmanager
def rank_group(device: str) -> Iterator[Rank]:
    """Inside a launched process: join the group (NCCL on a GPU, gloo on a CPU), pin this rank's GPU; leave after."""
    import torch
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield Rank(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()


def wrap(model, parallel: str, rank: Rank, bf16_compute: bool = False):
    """``model`` under DDP, or sharded in place by FSDP2 (each block of every ``nn.ModuleList``, then the root)."""
    import torch
    from torch import nn

    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [int(rank.device.split(":")[1])] if rank.device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16_compute else None, reduce_dtype=torch.float32)
    for blocks in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
        for block in blocks:
            fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrapped(model):
    """The model under a DDP wrapper (FSDP2 shards in place: the model itself)."""
    return getattr(model, "module", model)


def save_full_weights(model, path: str, rank: Rank) -> None:
    """Gather the whole model's weights (collective: every rank calls it) and save them on rank 0."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(unwrapped(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank.rank == 0:
        torch.save(state, path)


def peak_memory_bytes(rank: Rank, tracker) -> float:
    """This rank's peak: what tensors held on its GPU, or its process's RSS on a CPU."""
    if rank.device.startswith("cuda"):
        return float(tracker.torch_peak_bytes)
    return float(max(s["rss_bytes"] for s in tracker.samples))


def merge_steps(rank_steps: list[list], summed: Iterable[str] = (), averaged: Iterable[str] = ()) -> list:
    """The group's per-step records from each rank's (dataclasses of the same steps): rank 0's, with ``summed``
    fields added over the ranks, ``averaged`` fields averaged, and ``seconds`` the slowest rank's."""
    summed, averaged = tuple(summed), tuple(averaged)
    n = len(rank_steps)
    out = []
    for steps in zip(*rank_steps):
        changes = {"seconds": max(s.seconds for s in steps)}
        for name in summed:
            changes[name] = sum(getattr(s, name) for s in steps)
        for name in averaged:
            values = [getattr(s, name) for s in steps]
            changes[name] = None if values[0] is None else sum(values) / n
        out.append(dataclasses.replace(steps[0], **changes))
    return out


# Per-process counters add up over the ranks; counters that read the whole group's devices or machine (NVML over
# the job's GPUs, RAPL over the package) are read once, from rank 0.
_PER_PROCESS = ("psutil-process", "cpu-time-x-watts")


def group_metrics(results: list[RankResult], parallel: str) -> dict[str, MetricValue]:
    """The group's training metrics: rank 0's tracker metrics with per-process ones summed over the ranks, the
    slowest rank's training time, the largest per-rank peak memory, the world size, and each rank's peak memory
    and training time (``rank<r>_peak_memory_gb``, ``rank<r>_train_s``)."""
    first = results[0].metrics
    out: dict[str, MetricValue] = {}
    for name, metric in first.items():
        if metric.value is not None and any(k in metric.method for k in _PER_PROCESS) and name in (
                "amu_gb", "amu_fraction", "energy_j", "cpu_util"):
            out[name] = MetricValue(value=sum(r.metrics[name].value for r in results), unit=metric.unit,
                                    method=f"{metric.method}(sum-over-{len(results)}-ranks)")
        else:
            out[name] = metric
    if "aec_w" in out and out["energy_j"].value is not None:
        wall = max(r.metrics["phase_wall_s"].value for r in results)
        out["aec_w"] = MetricValue(value=out["energy_j"].value / wall, unit="W",
                                   method=out["energy_j"].method + "/slowest-rank-wall-time")
    out["phase_wall_s"] = MetricValue.measured(max(r.train_s for r in results), "s", "perf-counter(slowest-rank)")
    counter = "torch-cuda-max-memory-allocated" if "cuda" in first["peak_memory_gb"].method else "psutil-process-rss"
    out["peak_memory_gb"] = MetricValue.measured(max(r.peak_memory_bytes for r in results) / 1e9, "GB",
                                                 f"{counter}(largest-rank)")
    out["world_size"] = MetricValue.measured(len(results), "processes", f"torch.distributed({parallel})")
    for r in results:
        out[f"rank{r.rank}_peak_memory_gb"] = MetricValue.measured(r.peak_memory_bytes / 1e9, "GB", counter)
        out[f"rank{r.rank}_train_s"] = MetricValue.measured(r.train_s, "s", "perf-counter")
    return out


def ranks_raw(results: list[RankResult]) -> list[dict]:
    """Per rank: its peak memory (GB) and its training time (s), for the record's raw section."""
    return [{"rank": r.rank, "peak_memory_gb": r.peak_memory_bytes / 1e9, "train_s": r.train_s} for r in results]


class GroupTracker:
    """What the studies read from a ``ResourceTracker`` (``metrics()``, ``samples``), for a group of ranks."""

    def __init__(self, results: list[RankResult], parallel: str):
        self.results = results
        self.parallel = parallel
        self.samples = results[0].tracker_samples  # rank 0's sampler (the job's GPUs on a GPU)
        self.wall_s = max(r.train_s for r in results)

    def metrics(self) -> dict[str, MetricValue]:
        return group_metrics(self.results, self.parallel)

    def ranks(self) -> list[dict]:
        return ranks_raw(self.results)
