"""The inference-quantization study: one model at one precision, measured in three phases.

1. size: bytes the loaded model really holds (counted, per dtype), and its layer kinds;
2. quality: multiple-choice accuracy and held-out perplexity;
3. inference: timing of fixed-length greedy generation with no sampler running,
   then the same requests again under the resource tracker (memory, utilisation,
   energy), so that instrumentation never disturbs the latency figures.
"""
from __future__ import annotations

import time

import torch

from .. import models, quality
from ..metrics.inference import generation_benchmark, inference_metrics, time_one_request
from ..metrics.tracker import ResourceTracker
from ..metrics.values import MetricValue
from ..params import QuantizationRun


def load(p: QuantizationRun):
    """Load the model at the run's precision; returns (model, tokenizer, load seconds)."""
    torch.manual_seed(p.seed)
    t0 = time.perf_counter()
    model, tokenizer = models.load_causal_lm(p.model, p.precision, p.device)
    return model, tokenizer, time.perf_counter() - t0


def measure_size(model) -> tuple[dict[str, MetricValue], dict]:
    counted = models.count_model_bytes(model)
    metrics = {
        "model_bytes": MetricValue.measured(counted["total_bytes"], "bytes", "counted-tensor-bytes"),
        "linear_weight_bytes": MetricValue.measured(counted["linear_weight_bytes"], "bytes", "counted-tensor-bytes"),
    }
    return metrics, {**counted, "linear_layers": models.linear_layer_kinds(model)}


def measure_quality(model, tokenizer, p: QuantizationRun) -> dict:
    """Mean accuracy over the tasks (the study's quality score), per-task results, perplexity."""
    scores = quality.evaluate_tasks(model, tokenizer, p.tasks, p.n_per_task, seed=p.seed)
    ppl = quality.perplexity(model, tokenizer, quality.heldout_text(), seq_len=p.ppl_seq_len, max_tokens=p.ppl_tokens)
    return {
        "mean_accuracy": scores["mean_accuracy"],
        "perplexity": ppl["perplexity"],
        "perplexity_tokens": ppl["tokens"],
        **{f"acc_{task}": r["accuracy"] for task, r in scores["tasks"].items()},
        **{f"acc_{task}_stderr": r["stderr"] for task, r in scores["tasks"].items()},
        "n_per_task": p.n_per_task,
        "predictions": {task: r["predictions"] for task, r in scores["tasks"].items()},
        "correct": {task: r["correct"] for task, r in scores["tasks"].items()},  # per item: paired comparisons
    }


def prompt_ids(tokenizer, p: QuantizationRun) -> torch.Tensor:
    """A fixed prompt of exactly ``prompt_tokens`` real-text tokens, repeated ``batch_size`` times."""
    ids = tokenizer(quality.heldout_text(20_000), add_special_tokens=False).input_ids[: p.prompt_tokens]
    return torch.tensor([ids] * p.batch_size, device=p.device)


def measure_inference(model, tokenizer, p: QuantizationRun) -> tuple[dict[str, MetricValue], dict]:
    """Latency/throughput (no sampler running), then memory/energy under the tracker."""
    inputs = prompt_ids(tokenizer, p)
    samples = generation_benchmark(model, inputs, p.new_tokens, warmup=p.warmup, min_iterations=p.min_iterations,
                                   min_seconds=p.min_seconds)
    metrics = inference_metrics(samples, p.batch_size, p.new_tokens)
    with torch.no_grad(), ResourceTracker(interval_s=p.sample_interval_s, use_gpu=p.device == "cuda") as tracker:
        for _ in range(p.tracked_requests):
            time_one_request(model, inputs, p.new_tokens)
    metrics.update(tracker.metrics())
    energy = metrics["energy_j"]
    tokens = p.tracked_requests * p.batch_size * p.new_tokens
    metrics["energy_per_token_j"] = MetricValue(value=energy.value / tokens, unit="J/token",
                                                method=f"{energy.method}/generated-tokens")
    raw = {"requests": samples, "tracker_samples": tracker.samples, "tracked_requests": p.tracked_requests}
    return metrics, raw
