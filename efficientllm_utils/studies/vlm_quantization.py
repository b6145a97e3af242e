"""The vision-language quantization study: a Qwen2.5-VL whose language model is loaded at one precision.

1. size: the bytes the loaded model really holds (``studies.quantization.measure_size``: counted per tensor);
   for int8/int4 bitsandbytes quantises the language model's linear layers and leaves the vision tower and the
   head in floating point (``models.unquantized_modules``); bf16/fp16 hold every weight at that precision;
2. quality: held-out answer accuracy (log-likelihood over each task's answer set), and fidelity to the reference
   precision: the flip rate of answers (``quality.flips``) and the KL divergence KL(reference || this) of the
   answer distributions (the answer set's probabilities renormalised; ``quality.fidelity`` per task). The
   reference's answers come from the reference model, loaded in this run, or from an earlier run that scored the
   very same weights, items, code and packages (``score_cache``);
3. inference: time to first token with an image in the prompt and decode latency (per output token) of fixed-
   length greedy generation with no sampler running, then the same requests under the resource tracker.
"""
from __future__ import annotations

import gc
import time
from collections import defaultdict
from pathlib import Path

import torch

from .. import models, quality, score_cache
from ..finetune.train import collate, model_extras, threads
from ..metrics.inference import generation_benchmark, inference_metrics, time_one_request
from ..metrics.tracker import ResourceTracker
from ..metrics.values import MetricValue
from .vlm_run import VLMQuantizationRun
from ..vlm import data as vdata
from ..vlm import scoring
from ..vlm.base import base_provenance, base_source, heldout_items, load_processor  # noqa: F401 (re-exported)
from .quantization import measure_size  # noqa: F401 (re-exported)
from .vlm_finetune import items_fingerprint, tuned_checkpoint

REFERENCE_DIR = ".reference"
_SCORING_CODE = ("vlm/scoring.py", "vlm/data.py", "vlm/processor.py", "models.py", "studies/vlm_quantization.py")
_SCORING_PACKAGES = ("torch", "transformers", "bitsandbytes", "accelerate", "pillow")


def model_source(p: VLMQuantizationRun) -> str:
    """What this run quantizes: the fine-tuning study's model of ``p.finetune_run()`` (trained once and cached, its
    adapter merged), else the base (``base_source``)."""
    run = p.finetune_run()
    return str(tuned_checkpoint(run)) if run is not None else base_source(p)


def process_cpu_seconds() -> float:
    """CPU seconds this process (the run's kernel) used so far: about the wall time the run needs at 1 thread on an
    idle machine, whatever the load was here (as the fine-tuning record's ``process_cpu_s``)."""
    import psutil

    return sum(psutil.Process().cpu_times()[:2])


def load(source: str, p: VLMQuantizationRun, precision: str | None = None):
    """The model at ``precision`` (default: the run's) and its processor; returns (model, processor, seconds)."""
    torch.manual_seed(p.seed)
    t0 = time.perf_counter()
    with threads(p.num_threads):
        model, _ = models.load_causal_lm(source, precision or p.precision, p.device, p.cpu_4bit_kernel)
    return model, load_processor(source, p), time.perf_counter() - t0


def score(model, processor, items: list[vdata.VQAItem], p: VLMQuantizationRun) -> dict:
    """Accuracy per task and overall, each item's prediction and its answer distribution."""
    result = scoring.evaluate(model, processor, items, batch_size=p.eval_batch_size, num_threads=p.num_threads)
    result["distributions"] = [d.float() for d in scoring.answer_distributions(result["scores"])]
    return result


def _by_task(items: list[vdata.VQAItem], values: list) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    for item, value in zip(items, values):
        out[item.task].append(value)
    return dict(out)


def _reference_part(items, scored: dict) -> dict:
    return {"predictions": _by_task(items, scored["predictions"]),
            "distributions": {t: torch.stack(d) for t, d in _by_task(items, scored["distributions"]).items()}}


def reference_fingerprint(model, items, p: VLMQuantizationRun) -> str:
    inputs = {"items": items_fingerprint(items),
              "settings": {k: getattr(p, k) for k in ("reference_precision", "device", "eval_batch_size")}}
    return score_cache.fingerprint(model, inputs, _SCORING_CODE, _SCORING_PACKAGES)


def reference_outputs(source: str, p: VLMQuantizationRun, cache_dir: Path | None, run_label: str = "manual"):
    """The reference precision's answers and answer distributions (None when this run is the reference): loaded
    and scored here, or read from an earlier run's identical computation; the reference model is freed after."""
    if p.precision == p.reference_precision:
        return None
    items = heldout_items(p)
    model, processor, _ = load(source, p, p.reference_precision)
    try:
        return score_cache.cached(reference_fingerprint(model, items, p),
                                  lambda: _reference_part(items, score(model, processor, items, p)), cache_dir,
                                  run_label)
    finally:
        del model
        gc.collect()


def measure_quality(model, processor, p: VLMQuantizationRun, reference: dict | None, cache_dir: Path | None = None,
                    run_label: str = "manual") -> tuple[dict, dict]:
    """Accuracy (overall = ``mean_accuracy``, the quantization report's quality; per task), the flip rate and the
    answer-distribution KL against the reference; returns (quality, raw per-item values)."""
    items = heldout_items(p)
    scored = score(model, processor, items, p)
    own = _reference_part(items, scored)
    # no reference: this run is the reference, stored for the others; 0 flips and 0 KL by construction
    reference, source, fingerprint = score_cache.resolve_reference(
        reference, lambda: own, lambda: reference_fingerprint(model, items, p), cache_dir, run_label, "items",
        p.reference_precision)
    flipped = quality.flips(reference["predictions"], own["predictions"])
    kl = {t: quality.fidelity(reference["distributions"][t], own["distributions"][t]) for t in own["distributions"]}
    kl_items = [x for t in kl.values() for x in t["kl_per_token"]]
    result = {
        "mean_accuracy": scored["accuracy"], "accuracy": scored["accuracy"], "accuracy_stderr": scored["stderr"],
        "per_task": scored["per_task"], **{f"acc_{t}": a for t, a in scored["per_task"].items()},
        "n_per_task": scored["n_per_task"],
        "majority": {t: vdata.majority_share([i for i in items if i.task == t])[1] for t in p.tasks},
        # the most frequent gold answer per task and each item's gold answer: "above the majority class" per item
        "majority_answer": {t: vdata.majority_share([i for i in items if i.task == t])[0] for t in p.tasks},
        "answers": _by_task(items, [i.answer for i in items]),
        "perplexity": None,  # not measured: the study scores answers to image questions, not text perplexity
        "flip_rate": flipped["flip_rate"], "flip_items": flipped["flip_items"],
        "kl_to_reference": sum(kl_items) / len(kl_items),  # nats per item, over the answer set
        "kl_to_reference_per_task": {t: v["kl_to_reference"] for t, v in kl.items()},
        "kl_of": "answer distribution (softmax of the answer set's log-likelihoods), per held-out question",
        "top1_agreement": 1 - flipped["flip_rate"],
        "reference_source": source, "reference_fingerprint": fingerprint,
        # per task, as the LLM quantization records hold them (reports/quantization.py pairs runs over these)
        "predictions": _by_task(items, scored["predictions"]), "correct": _by_task(items, scored["correct"]),
        "heldout_tasks": [i.task for i in items],
    }
    raw = {"kl_per_item": {t: v["kl_per_token"] for t, v in kl.items()}, "flipped": flipped["flipped"],
           "reference_predictions": reference["predictions"], "scores": scored["scores"]}
    return result, raw


def request(processor, p: VLMQuantizationRun, device: str) -> tuple[torch.Tensor, dict]:
    """One fixed prompt with an image (the first held-out question): input_ids (1, n) and the image inputs."""
    item = heldout_items(p)[0]
    batch = collate([vdata.encode(processor, item.image, item.question, None, item.row)], 0)
    return batch["input_ids"].to(device), model_extras(batch, device)


def measure_inference(model, processor, p: VLMQuantizationRun) -> tuple[dict[str, MetricValue], dict]:
    """TTFT (prefill of the prompt with its image), TPOT (decode, s/token), AL and IT with no sampler running; then
    memory, utilisation and energy under the tracker over ``tracked_requests`` more requests."""
    input_ids, extras = request(processor, p, p.device)
    with threads(p.num_threads):
        samples = generation_benchmark(model, input_ids, p.new_tokens, warmup=p.warmup,
                                       min_iterations=p.min_iterations, min_seconds=p.min_seconds,
                                       model_inputs=extras)
        metrics = inference_metrics(samples, p.batch_size, p.new_tokens)
        with torch.no_grad(), ResourceTracker(interval_s=p.sample_interval_s, use_gpu=p.device == "cuda") as tracker:
            for _ in range(p.tracked_requests):
                time_one_request(model, input_ids, p.new_tokens, extras)
    metrics.update(tracker.metrics())
    tokens = p.tracked_requests * p.new_tokens
    metrics["energy_per_token_j"] = metrics["energy_j"].per(tokens, "J/token", "generated-tokens")
    raw = {"requests": samples, "tracker_samples": tracker.samples, "tracked_requests": p.tracked_requests,
           "prompt_tokens": int(input_ids.shape[1]), "image_tokens": int(extras["mm_token_type_ids"].sum())}
    return metrics, raw
