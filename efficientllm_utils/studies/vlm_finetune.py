"""The vision-language fine-tuning study: one method on a Qwen2.5-VL, through the LLM axis's procedure.

The phases, the training loop, the metrics, the adapter's bytes and the base scores' cache are
``studies/finetune.py``'s (``build``, ``train``, ``training_metrics``, ``parameter_metrics``, ``save``, ``raw``);
what differs is the base and the data:

1. base: a released Qwen2.5-VL by hub id (``paper``), or the small Qwen2.5-VL around SmolLM2's real weights whose
   vision tower and merger were aligned on captioned images with the language model frozen (``align.py``, cached);
   QLoRA loads its language model in 4-bit, the vision tower stays fp32;
2. data: questions about real images with closed answer sets (``vlm/data.py``: Fashion-MNIST or CIFAR-10 images, easy-VQA), the
   training questions of every task interleaved, the held-out questions from each task's fixed test split;
3. quality: the paper's final training loss, and held-out answer accuracy (log-likelihood over the answer set)
   before and after training, per task, beside the majority-class baseline.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .. import assets, models, score_cache
from .. import finetune as ft
from .vlm_run import VLMFinetuneRun
from ..vlm import align
from ..vlm import data as vdata
from ..vlm import scoring
from ..vlm.base import base_provenance, base_source, heldout_items, load_processor  # noqa: F401 (re-exported)
from ..finetune.methods import cleanup
from .finetune import ADAPTER_DIR, BASE_EVAL_DIR, Data, merged_adapter, sha256_of  # noqa: F401 (re-exported)
from .finetune import build, parameter_metrics, raw, save, train, training_metrics  # noqa: F401 (re-exported)


def load_data(p: VLMFinetuneRun, processor) -> Data:
    """The training examples (tasks interleaved, images encoded by the processor) and the held-out items."""
    t0 = time.perf_counter()
    per_task = [vdata.load_items(task, "train", p.n_train_per_task, p.seed) for task in p.tasks]
    train_items = vdata.interleave(*per_task)
    examples = vdata.training_examples(train_items, processor)
    items = heldout_items(p)
    meta = {"tasks": list(p.tasks), "n_train": len(examples), "n_heldout": len(items),
            "train_rows": [(i.task, i.row) for i in train_items],
            "majority": {t: vdata.majority_share([i for i in items if i.task == t]) for t in p.tasks},
            "tokens_per_example": sum(e.n_tokens for e in examples) / len(examples)}
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = ft.InstructionData("vlm:" + "+".join(p.tasks), examples, [], items, meta)
    return Data(tokenizer, pad, data, items, "the tasks' fixed test splits (never trained on)", time.perf_counter() - t0)


def load_base(source: str, p: VLMFinetuneRun):
    """The base this run's method starts from (fp32; QLoRA: the language model in 4-bit); returns (model, s)."""
    t0 = time.perf_counter()
    with ft.threads(p.num_threads):
        model = ft.load_base_model(source, p.method, p.method_settings(), p.device)
    return model, time.perf_counter() - t0


# --- held-out accuracy ------------------------------------------------------------------------

def evaluate(model, processor, data: Data, p: VLMFinetuneRun) -> dict:
    t0 = time.perf_counter()
    with merged_adapter(model) as merged:
        result = scoring.evaluate(model, processor, data.eval_items, batch_size=p.eval_batch_size,
                                  num_threads=p.num_threads)
    result["merged_adapter"] = merged
    result["seconds"] = time.perf_counter() - t0
    return result


_SCORING_CODE = ("vlm/scoring.py", "vlm/data.py", "vlm/processor.py", "finetune/train.py", "studies/vlm_finetune.py")
_SCORING_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "pillow")


def items_fingerprint(items: list[vdata.VQAItem]) -> list:
    return [(i.task, i.row, i.question, i.answer, list(i.choices), hashlib.sha256(i.image.tobytes()).hexdigest()[:16])
            for i in items]


def evaluate_base(model, processor, data: Data, p: VLMFinetuneRun, cache_dir: Path | None,
                  run_label: str = "manual") -> dict:
    """Held-out scores BEFORE training, reused from an earlier run whose base had the same fingerprint (every
    weight, the items and their images, the scoring settings, code and packages), as ``studies/finetune.py`` does."""
    inputs = {"items": items_fingerprint(data.eval_items),
              "settings": {k: getattr(p, k) for k in ("eval_batch_size", "num_threads", "device")}}
    key = score_cache.fingerprint(model, inputs, _SCORING_CODE, _SCORING_PACKAGES)
    return score_cache.cached(key, lambda: evaluate(model, processor, data, p), cache_dir, run_label)


# --- the record ------------------------------------------------------------------------------

def quality(before: dict, after: dict, result: ft.TrainResult, data: Data, p: VLMFinetuneRun) -> dict:
    """Final training loss (the paper's quality), held-out accuracy before/after overall and per task, the
    majority-class baseline per task, and the fingerprints that show every run trained on the same rows in order."""
    losses = result.losses
    k = min(p.final_loss_steps, len(losses))
    out = {
        "final_loss": sum(losses[-k:]) / k, "initial_loss": losses[0], "final_loss_steps": k,
        "eval_items": data.eval_source, "n_heldout": before["n"],
        "before_computed_by": before.get("computed_by", "this run"), "base_fingerprint": before.get("fingerprint"),
        "data_order_sha256": sha256_of([s.rows for s in result.steps]),
        "heldout_rows_sha256": sha256_of([(i.task, i.row) for i in data.eval_items]),
    }
    for task, (answer, share) in data.data.meta["majority"].items():
        out[f"majority_{task}"] = share
        out[f"majority_answer_{task}"] = answer
        out[f"n_heldout_{task}"] = before["n_per_task"][task]
    for when, ev in (("before", before), ("after", after)):
        out.update({f"accuracy_{when}": ev["accuracy"], f"accuracy_{when}_stderr": ev["stderr"],
                    f"gold_logprob_{when}": ev["gold_logprob"], f"answer_mass_{when}": ev["answer_mass"],
                    f"predictions_{when}": ev["predictions"], f"correct_{when}": ev["correct"]})
        out.update({f"acc_{task}_{when}": acc for task, acc in ev["per_task"].items()})
    out["accuracy_change"] = after["accuracy"] - before["accuracy"]
    out["heldout_tasks"] = [i.task for i in data.eval_items]
    out["heldout_answers"] = [i.answer for i in data.eval_items]
    return out


def example_images(items: list[vdata.VQAItem], per_task: int = 4) -> list[dict]:
    """The first held-out questions of each task with their image as a base64 PNG: what the book shows beside
    each method's answer (the report reads records without importing torch or the data code)."""
    import base64
    import io

    from PIL import Image

    out, seen = [], {}
    for n, item in enumerate(items):
        if seen.get(item.task, 0) >= per_task:
            continue
        seen[item.task] = seen.get(item.task, 0) + 1
        buffer = io.BytesIO()
        Image.fromarray(item.image).save(buffer, format="PNG")
        out.append({"item": n, "task": item.task, "question": item.question, "answer": item.answer,
                    "choices": list(item.choices), "png_base64": base64.b64encode(buffer.getvalue()).decode()})
    return out


# --- the fine-tuned model, for the quantization study ------------------------------------------------------------

TUNED_VERSION = 1  # bump when the procedure changes: a new key, a new checkpoint
# settings that change no trained weight: scoring, timing and the threads (as the alignment stage's key)
_NOT_TRAINING = ("n_heldout_per_task", "eval_batch_size", "num_threads", "timing_warmup_steps", "final_loss_steps",
                 "sample_interval_s")


def tuned_dir(p: VLMFinetuneRun) -> Path:
    """Where ``tuned_checkpoint`` keeps ``p``'s fine-tuned model: ``.cache/models/vlm-tuned-<key>``, ``key`` a hash of
    every setting its weights depend on."""
    spec = {"run": p.model_dump(exclude=set(_NOT_TRAINING)), "version": TUNED_VERSION}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return assets.cache_dir().parent / "models" / f"vlm-tuned-{key}"


def tuned_checkpoint(p: VLMFinetuneRun) -> Path:
    """The base fine-tuned as the fine-tuning study's run ``p`` (its method, data, order, steps and seed), the
    adapter merged into the weights (peft's ``merge_and_unload``; freeze and full: the trained weights themselves),
    saved once as a plain Qwen2.5-VL checkpoint beside the aligned one (``models.build_once``: concurrent first runs
    wait for one build) and reused by every later run. Its ``align.SETTINGS_FILE`` is the aligned base's, plus
    ``finetune``: the run's settings, losses and seconds."""
    def make(staging: Path) -> None:
        t0, cpu0 = time.perf_counter(), time.process_time()
        source = base_source(p)
        processor = load_processor(source, p)
        data = load_data(p, processor)
        model, _ = load_base(source, p)
        built, counts = build(model, p)
        result, _ = train(built, data, p)
        trained = built.model.merge_and_unload() if hasattr(built.model, "merge_and_unload") else built.model
        cleanup(built)
        trained.requires_grad_(False)
        trained.save_pretrained(staging)
        processor.tokenizer.save_pretrained(staging)
        info = align.checkpoint_info(source) | {"finetune": {
            "study": "vlm_peft", "method": p.method, "merged": hasattr(built.model, "merge_and_unload"),
            "settings": p.model_dump(exclude=set(_NOT_TRAINING)), "trainable_params": counts["trainable"],
            "loss_summary": result.loss_summary(), "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - cpu0, "version": TUNED_VERSION}}
        (staging / align.SETTINGS_FILE).write_text(json.dumps(info, indent=1))

    return models.build_once(tuned_dir(p), make)
