"""The attention-free study: Mamba, RWKV and Pythia against our Qwen2.5-style transformer, one model per run.

The experiment is the architecture studies' (``studies.architecture``): the same tokenizer, data and data order,
seed, step budget and schedule, the same pretraining loop under the resource tracker, held-out perplexity and timed
greedy decoding. Only the model changes: ``architecture: transformer`` is our decoder, the others are
``transformers``' model classes (``arch.attention_free``), sized to the transformer's parameter count. What this
study adds is the cache each model keeps per sequence: its bytes after a prefill of each ``decode_contexts`` length,
read from the model's real cache object (measured) beside the formula (analytical).
"""
from __future__ import annotations

import importlib.metadata

import torch
from transformers import PreTrainedModel
from transformers.utils.import_utils import is_mambapy_available

from ..arch import attention_free as af
from ..arch.analysis import kv_cache_bytes_per_token
from ..metrics.values import MetricValue
from .attention_free_run import AttentionFreeRun
from . import architecture
from .architecture import (Data, load_data, loss_curve, measure_decode, measure_quality, measure_roofline, train,
                           training_metrics)

__all__ = ["Data", "load_data", "set_threads", "build_model", "measure_model", "train", "training_metrics",
           "measure_quality", "measure_decode", "measure_roofline", "loss_curve", "implementation", "state_curve"]


def set_threads(p: AttentionFreeRun) -> int:
    """Pin torch's intra-op threads for the whole run (``num_threads``; None leaves torch's setting)."""
    if p.num_threads is not None:
        torch.set_num_threads(p.num_threads)
    return torch.get_num_threads()


def build_model(p: AttentionFreeRun, tokenizer) -> PreTrainedModel:
    """The run's model, initialised from ``p.seed``, on ``p.device`` in ``p.dtype``."""
    if p.architecture == "transformer":
        return architecture.build_model(p, tokenizer)
    if p.architecture == "mamba" and p.use_mambapy and not is_mambapy_available():
        raise ImportError("use_mambapy=True needs the `mambapy` package (pip install mambapy==1.2.0); without it "
                          "transformers' Mamba falls back to a Python loop per token, too slow to train on a CPU")
    return af.build(p.hf_config(), p.seed, p.device, architecture.DTYPES[p.dtype], tokenizer.eos_token_id)


def _analytical_state_bytes(model: PreTrainedModel, p: AttentionFreeRun, context: int, dtype_bytes: int) -> int:
    if p.architecture == "transformer":
        return kv_cache_bytes_per_token(model.config, dtype_bytes) * context
    return af.state_bytes(model.config, context, dtype_bytes)


def _forward_flops(model: PreTrainedModel, p: AttentionFreeRun) -> MetricValue:
    """Analytical forward FLOPs per token at a training block's average context, by the model the roofline uses
    (``architecture.forward_flops_per_token``: Pythia's standard attention is counted), or missing with the reason."""
    context = (p.seq_len + 1) / 2
    flops = architecture.forward_flops_per_token(model, context)
    if flops is None:
        return MetricValue.unavailable("FLOP/token", f"no analytical FLOPs model for {type(model).__name__} in this "
                                                     "project")
    return MetricValue.estimated(flops, "FLOP/token", f"analytical-forward-flops(context={context:g})")


def measure_model(model: PreTrainedModel, p: AttentionFreeRun, data: Data) -> tuple[dict[str, MetricValue], dict]:
    """Parameters (counted); the bytes of cache or state one sequence holds after each ``decode_contexts`` prefill,
    by formula and from the real cache; per-token cache growth. The transformer also gets the architecture
    studies' FLOPs and KV figures."""
    dtype_bytes = next(model.parameters()).element_size()
    if p.architecture == "transformer":
        metrics, raw = architecture.measure_model(model, p, data)
    else:
        total = sum(t.numel() for t in model.parameters())  # a tied weight once
        counted = "counted-module-parameters"
        per_token = _analytical_state_bytes(model, p, 1, dtype_bytes) if p.architecture == "pythia" else 0
        metrics = {
            "params_total": MetricValue.measured(total, "params", counted),
            "params_active": MetricValue.measured(total, "params", f"{counted}(dense: all active)"),
            "params_embedding": MetricValue.measured(model.get_input_embeddings().weight.numel(), "params", counted),
            "flops_per_token": _forward_flops(model, p),
            "kv_cache_bytes_per_token": MetricValue.estimated(per_token, "bytes/token",
                                                              f"analytical-formula({p.dtype}; growth per token)"),
        }
        raw = {"config": {k: v for k, v in model.config.to_dict().items()
                          if isinstance(v, (int, float, str, bool, type(None)))},
               "param_counts": {"total": total, "active": total,
                                "embedding": metrics["params_embedding"].value}}
    model.eval()
    measured = {}
    for context in p.decode_contexts:
        measured[context] = af.measure_state_bytes(model, data.prompt[:, :context].to(p.device))
        metrics[f"state_ctx{context}_bytes"] = MetricValue.estimated(
            _analytical_state_bytes(model, p, context, dtype_bytes), "bytes/sequence",
            f"analytical-formula({p.dtype}, context={context})")
        metrics[f"state_ctx{context}_bytes_measured"] = MetricValue.measured(
            measured[context], "bytes/sequence", f"cache-tensor-bytes-after-prefill(context={context})")
    if p.architecture != "transformer":  # the transformer's is the architecture studies' bytes per prefill token
        first, last = min(measured), max(measured)
        growth = (measured[last] - measured[first]) / (last - first) if last > first else 0.0
        metrics["kv_cache_bytes_per_token_measured"] = MetricValue.measured(
            growth, "bytes/token", f"cache-tensor-bytes-growth(context {first}->{last})")
    return metrics, raw


def implementation(model: PreTrainedModel, p: AttentionFreeRun) -> dict:
    """What ran, for the record's provenance: the model class, its library and version, Mamba's scan, threads."""
    out = {"model_class": type(model).__name__, "module": type(model).__module__.split(".")[0],
           "torch_threads": torch.get_num_threads()}
    if out["module"] == "transformers":
        out["version"] = importlib.metadata.version("transformers")
    if p.architecture == "mamba":
        pscan = p.use_mambapy and is_mambapy_available()
        out["mamba_scan"] = f"mambapy {importlib.metadata.version('mambapy')} pscan" if pscan else \
            "transformers' sequential torch loop"
    if p.architecture == "rwkv":
        out["rwkv_version"] = "RWKV-4 (transformers' RwkvForCausalLM; RWKV-7 needs Triton or trains too slowly here)"
    return out


def state_curve(metrics: dict[str, MetricValue], contexts: list[int]) -> list[dict]:
    """(context, analytical, measured) bytes per sequence, for the notebook's table and plot."""
    return [{"context": c, "analytical_bytes": metrics[f"state_ctx{c}_bytes"].value,
             "measured_bytes": metrics[f"state_ctx{c}_bytes_measured"].value} for c in contexts]
