"""The inference-quantization study: one model at one precision, measured in three phases.

1. size: bytes the loaded model really holds (counted, per dtype), and its layer kinds;
2. quality: multiple-choice accuracy and held-out perplexity, and fidelity to the reference precision
   (``reference_precision``): the mean per-token KL divergence KL(reference || this precision) of the
   next-token distributions on the perplexity text, top-1 next-token agreement, and the share of
   multiple-choice answers that flip. The reference's outputs come from the reference model itself,
   loaded in this run, or from an earlier run that computed them from the very same weights, inputs,
   code and packages (``score_cache``), so runs may execute in any order;
3. inference: timing of fixed-length greedy generation with no sampler running,
   then the same requests again under the resource tracker (memory, utilisation,
   energy), so that instrumentation never disturbs the latency figures;
4. roofline: prefill MFU and decode MBU from analytical FLOPs, counted bytes and the measured times against the
   machine probe's peaks, and the cost model's memory and decode-time predictions (``metrics.roofline``).
"""
from __future__ import annotations

import gc
import hashlib
import time
from pathlib import Path

import torch

from .. import cpu_4bit, models, precisions, quality, score_cache
from ..metrics import machine_probe, model_costs, roofline
from ..metrics.inference import generation_benchmark, inference_metrics, time_one_request
from ..metrics.tracker import ResourceTracker
from ..metrics.values import MetricValue
from ..precisions.counting import count_model_bytes, linear_layer_kinds
from .quantization_run import QuantizationRun


def load(p: QuantizationRun):
    """Load the model at the run's precision; returns (model, tokenizer, load seconds)."""
    torch.manual_seed(p.seed)
    t0 = time.perf_counter()
    model, tokenizer = models.load_causal_lm(p.model, p.precision, p.device, p.cpu_4bit_kernel)
    return model, tokenizer, time.perf_counter() - t0


def measure_size(model) -> tuple[dict[str, MetricValue], dict]:
    counted = count_model_bytes(model)
    metrics = {
        "model_bytes": MetricValue.measured(counted["total_bytes"], "bytes", "counted-tensor-bytes"),
        "linear_weight_bytes": MetricValue.measured(counted["linear_weight_bytes"], "bytes", "counted-tensor-bytes"),
    }
    return metrics, {**counted, "linear_layers": linear_layer_kinds(model)}


REFERENCE_DIR = ".reference"  # beside the runs of a profile: the reference precision's outputs by fingerprint
# what the reference's outputs depend on besides its weights and the inputs: this code and these packages
_SCORING_CODE = ("quality.py", "models.py", "precisions/floats.py", "studies/quantization.py")
_SCORING_PACKAGES = ("torch", "transformers", "bitsandbytes", "accelerate")


# tokens per scoring forward: on a 2-core CPU 512 scored 100 PIQA items in 12.7 s against 14.9 s at 2048 (fp32
# SmolLM2-135M, AVX2 EPYC, once, 2026-12-06). The cuda value is an assumption, not measured (no GPU was lent): a
# GPU's matmuls fill better with more rows; time it with `make gpu-check` on a lent GPU before relying on it.
SCORING_BATCH_TOKENS = {"cpu": 512, "cuda": 4096}


def score(model, tokenizer, p: QuantizationRun) -> dict:
    """The model's outputs that quality is computed from: per-task accuracy with each item's predicted choice,
    perplexity, and the next-token distributions at the first ``fidelity_tokens`` positions of the text.

    A 4-bit model on the dequantize path scores through its weights dequantised once (``cpu_4bit``): the same
    outputs bit for bit as its kernel, which dequantises at every call; its timed requests run the kernel."""
    with cpu_4bit.weights_dequantized_once(model):
        scores = quality.evaluate_tasks(model, tokenizer, p.tasks, p.n_per_task, seed=p.seed,
                                        max_batch_tokens=SCORING_BATCH_TOKENS.get(p.device, 2048))
        ppl = quality.perplexity(model, tokenizer, quality.heldout_text(), seq_len=p.ppl_seq_len,
                                 max_tokens=p.ppl_tokens, keep_distributions=p.fidelity_tokens or p.ppl_tokens)
    return {"scores": scores, "perplexity": ppl}


def _reference_part(outputs: dict) -> dict:
    """What the other precisions are compared with: the predicted choices and the distributions."""
    return {"predictions": {t: r["predictions"] for t, r in outputs["scores"]["tasks"].items()},
            "logprobs": outputs["perplexity"]["logprobs"]}


def reference_fingerprint(model, p: QuantizationRun) -> str:
    """``score_cache.fingerprint`` of the reference model's outputs: its weights, the text, the items, the settings."""
    inputs = {"text_sha256": hashlib.sha256(quality.heldout_text().encode()).hexdigest(),
              "items": {t: [(i.context, i.choices, i.gold) for i in quality.load_task(t, p.n_per_task, p.seed)]
                        for t in p.tasks},
              "settings": {k: getattr(p, k) for k in ("reference_precision", "device", "ppl_seq_len", "ppl_tokens",
                                                      "fidelity_tokens")}}
    return score_cache.fingerprint(model, inputs, _SCORING_CODE, _SCORING_PACKAGES)


def reference_outputs(p: QuantizationRun, cache_dir: Path | None, run_label: str = "manual") -> dict | None:
    """The reference precision's predicted choices and distributions, or None when this run is the reference.

    Loads the reference model (then frees it, before this run loads its own), fingerprints it, and reuses the
    outputs an earlier run stored under the same fingerprint in ``cache_dir``, or computes them and stores them.
    None too for a model whose quality is not measured (random weights of a paper shape)."""
    if p.precision == p.reference_precision or not p.scores_quality:
        return None
    model, tokenizer = models.load_causal_lm(p.model, p.reference_precision, p.device)
    try:
        return score_cache.cached(reference_fingerprint(model, p),
                                  lambda: _reference_part(score(model, tokenizer, p)), cache_dir, run_label)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure_quality(model, tokenizer, p: QuantizationRun, reference: dict | None = None,
                    cache_dir: Path | None = None, run_label: str = "manual") -> tuple[dict, dict]:
    """Mean accuracy over the tasks (the study's quality score), per-task results, perplexity, and fidelity to
    ``reference`` (``reference_outputs``; None: this run is the reference, whose outputs are stored in
    ``cache_dir`` for the other precisions). Returns (quality, raw per-token and per-item values).

    A ``shape:`` model's random weights have no quality to measure: the record says so instead of a number."""
    if not p.scores_quality:
        return {"not_measured": f"{p.model} has random weights of the paper model's shape: efficiency figures only; "
                                "quality comes from the real models of the profile"}, {}
    outputs = score(model, tokenizer, p)
    scores, ppl = outputs["scores"], outputs["perplexity"]
    # no reference: this run is the reference, compared with itself, 0 / 1 / 0 by construction
    reference, source, fingerprint = score_cache.resolve_reference(
        reference, lambda: _reference_part(outputs), lambda: reference_fingerprint(model, p), cache_dir, run_label,
        "inputs", p.reference_precision)
    predictions = {task: r["predictions"] for task, r in scores["tasks"].items()}
    close = quality.fidelity(reference["logprobs"], ppl["logprobs"])
    flipped = quality.flips(reference["predictions"], predictions)
    result = {
        "mean_accuracy": scores["mean_accuracy"],
        "perplexity": ppl["perplexity"],
        "perplexity_tokens": ppl["tokens"],
        **{f"acc_{task}": r["accuracy"] for task, r in scores["tasks"].items()},
        **{f"acc_{task}_stderr": r["stderr"] for task, r in scores["tasks"].items()},
        "n_per_task": p.n_per_task,
        "kl_to_reference": close["kl_to_reference"],  # nats/token
        "top1_agreement": close["top1_agreement"],
        "flip_rate": flipped["flip_rate"],
        "fidelity_tokens": close["fidelity_tokens"],
        "flip_items": flipped["flip_items"],
        "reference_source": source,
        "reference_fingerprint": fingerprint,
        "predictions": predictions,
        "correct": {task: r["correct"] for task, r in scores["tasks"].items()},  # per item: paired comparisons
    }
    raw = {"kl_per_token": close["kl_per_token"], "top1_agree": close["top1_agree"], "flipped": flipped["flipped"],
           "reference_predictions": reference["predictions"]}
    return result, raw


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
    tokens = p.tracked_requests * p.batch_size * p.new_tokens
    metrics["energy_per_token_j"] = metrics["energy_j"].per(tokens, "J/token", "generated-tokens")
    raw = {"requests": samples, "tracker_samples": tracker.samples, "tracked_requests": p.tracked_requests}
    return metrics, raw


def compute_dtype(precision: str, device: str) -> str:
    """The dtype the precision's matmuls run in on ``device``: which probed peak its MFU is held against (the
    registry's, e.g. bf16 for bitsandbytes' 4-bit layers; LLM.int8() finds its kernel's on the device)."""
    return precisions.get(precision).compute_dtype_for(device)


def measure_roofline(model, tokenizer, p: QuantizationRun, metrics: dict[str, MetricValue]) -> tuple[dict, dict]:
    """Prefill and decode against the machine's limits, from this run's ``metrics`` (counted bytes, TTFT, TPOT,
    AMU): MFU, MBU and the roofline-bound time of each phase, and the cost model's memory prediction.

    Prefill: ``batch x prompt_tokens`` tokens at the average causal context, the head at each sequence's last
    position only (``model_costs.prefill_flops``), timed by TTFT (which includes the first decode step). Decode: one
    step of ``batch`` tokens at the mean context of the generation, reading the weights once and each sequence's KV
    cache (its bytes per token measured from a real prefill), timed by TPOT."""
    probe = machine_probe.load_or_measure(p.device)
    inputs = prompt_ids(tokenizer, p)
    kv_per_token = model_costs.measured_kv_bytes_per_token(model, inputs[:1])
    weights = model_costs.weight_bytes_read_per_token(model, int(metrics["model_bytes"].value))
    dtype = compute_dtype(p.precision, p.device)
    b, prompt = p.batch_size, p.prompt_tokens
    decode_context = prompt + p.new_tokens / 2  # the mean context over the generated tokens
    prefill = roofline.Phase("prefill", flops=model_costs.prefill_flops(
                                 model, model_costs.flops_per_token(model, (prompt + 1) / 2), b * prompt, b),
                             bytes=weights + b * prompt * kv_per_token, seconds=metrics["ttft_p50_s"].value,
                             dtype=dtype, seconds_method="ttft-p50")
    out = roofline.phase_metrics(prefill, probe, "prefill")
    phases = [prefill]
    if "tpot_p50_s" in metrics:
        decode = roofline.Phase("decode", flops=b * model_costs.flops_per_token(model, decode_context),
                                bytes=weights + b * decode_context * kv_per_token, seconds=metrics["tpot_p50_s"].value,
                                dtype=dtype, seconds_method="tpot-p50")
        out |= roofline.phase_metrics(decode, probe, "decode")
        phases.append(decode)
    final_kv = b * (prompt + p.new_tokens) * kv_per_token
    out["predicted_memory_gb"] = roofline.predicted_memory(
        {"weights": metrics["model_bytes"].value, "kv-cache": final_kv}, "counted weights, KV at the final context")
    raw = {"phases": [roofline.point(ph) for ph in phases], "probe": probe, "weight_bytes_read": weights,
           "kv_bytes_per_token": kv_per_token, "decode_context": decode_context}
    return out, raw
