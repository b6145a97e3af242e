"""``notebooks/vlm/``: ``vlm_peft.ipynb`` and ``vlm_quantization.ipynb`` (a Qwen2.5-VL fine-tuned, or its language
model quantized); the measurements are ``studies.vlm_finetune`` and ``studies.vlm_quantization``."""
from __future__ import annotations

import nbformat

from ..notebook_builder import build, opening_cells, setup_source
from ..studies.vlm_run import VLMFinetuneRun, VLMQuantizationRun

PEFT_INTRO = """# Vision-language fine-tuning: one method on a Qwen2.5-VL

One grid point of the `vlm_peft` study. The runner (`make reproduce AXIS=vlm`) executes this notebook once per
method with papermill, injecting the values of `params/vlm_peft.yaml`; you can also run it by hand.

**Method.** The base is transformers' `Qwen2_5_VLForConditionalGeneration`: on the CPU profiles a small one whose
language model is the real SmolLM2-135M-Instruct (transplanted exactly) and whose vision tower and merger were
aligned on captioned train images with the language model frozen (a cached stage); on the `paper` profile
Qwen2.5-VL-7B-Instruct by hub id. Questions about real images (CIFAR-10 photos, easy-VQA shapes) are scored on fixed
held-out test splits by log-likelihood over each task's closed answer set; the method is built through the LLM
axis's fine-tuning library (`peft`) and trained by its one loop (same questions in the same order, same steps,
schedule and seed) under the resource tracker; then the held-out questions are scored again and the adapter saved.
The paper's quality metric is the final training loss; every metric records how it was obtained."""

PEFT_DATA = """source = vft.base_source(p)  # the small model: aligned once, then read from the cache
processor = vft.load_processor(source, p)
data = vft.load_data(p, processor)
model, load_s = vft.load_base(source, p)
{"train questions": len(data.data.train), "held-out questions": len(data.eval_items),
 "majority-class baseline": data.data.meta["majority"], "data_s": round(data.seconds, 1), "load_s": round(load_s, 1)}"""

PEFT_BEFORE = """before = vft.evaluate_base(model, processor, data, p, run.result_dir.parent / vft.BASE_EVAL_DIR, run.label)
{k: before[k] for k in ("accuracy", "per_task", "gold_logprob", "answer_mass", "computed_by", "seconds")}"""

PEFT_TRAIN = """built, counts = vft.build(model, p)
print(built.description)
result, tracker = vft.train(built, data, p)
metrics = {**vft.parameter_metrics(counts), **vft.training_metrics(result.steps, counts["total"],
                                                                   p.timing_warmup_steps, tracker)}
[(s.step, round(s.loss, 3), round(s.seconds, 2)) for s in result.steps]"""

PEFT_AFTER = """after = vft.evaluate(built.model, processor, data, p)
adapter_metrics, adapter_raw = vft.save(built, run.result_dir / vft.ADAPTER_DIR)
{k: after[k] for k in ("accuracy", "per_task", "gold_logprob", "answer_mass", "seconds")}"""

PEFT_RECORD = """from efficientllm_utils.cpu_4bit import run_provenance

record = run.write(metrics={**metrics, **adapter_metrics},
                   quality=vft.quality(before, after, result, data, p),
                   raw={**vft.raw(result, tracker, built, data, before, after, counts, {"load": load_s}, adapter_raw),
                        "examples": vft.example_images(data.eval_items)},
                   provenance_extra={**run_provenance(built.model), **vft.base_provenance(source, p)})
metrics_table(record)"""

PEFT_PLOT = """import pandas as pd
import seaborn as sns

steps = pd.DataFrame(result.to_records())
ax = sns.lineplot(data=steps, x="step", y="loss", marker="o")
ax.set(ylabel="training loss (answer tokens, before the step's update)",
       title=f"{p.method}: loss per step; held-out accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f}");"""

QUANT_INTRO = """# Vision-language quantization: one precision of a Qwen2.5-VL's language model

One grid point of the `vlm_quantization` study (`make reproduce AXIS=vlm`). The model is, on the CPU profiles, one
run of the fine-tuning study (`finetune_profile`, `finetune_method`: trained once and cached, its adapter merged
into the weights) of the small Qwen2.5-VL around SmolLM2-135M-Instruct with its aligned vision
tower; on `paper`: Qwen2.5-VL-7B-Instruct as released. Its language model is loaded at the run's precision (float, or
bitsandbytes int8/int4 with the vision tower kept in floating point); its bytes are counted; the held-out questions
are answered by log-likelihood over each task's answer set and compared with the reference precision's answers (flip
rate) and answer distributions (KL divergence); then time to first token with an image in the prompt, decode latency,
and memory and energy under the tracker."""

QUANT_LOAD = """source = vq.model_source(p)  # the fine-tuned model (trained once, cached) or the base
reference = vq.reference_outputs(source, p, run.result_dir.parent / vq.REFERENCE_DIR, run.label)
model, processor, load_s = vq.load(source, p)
size_metrics, size_raw = vq.measure_size(model)
{k: m.value for k, m in size_metrics.items()} | {"load_s": round(load_s, 1), "linear layers": size_raw["linear_layers"]}"""

QUANT_QUALITY = """quality, quality_raw = vq.measure_quality(model, processor, p, reference,
                                        run.result_dir.parent / vq.REFERENCE_DIR, run.label)
{k: quality[k] for k in ("accuracy", "per_task", "flip_rate", "kl_to_reference", "reference_source")}"""

QUANT_INFERENCE = """inference_metrics, inference_raw = vq.measure_inference(model, processor, p)
{k: m.value for k, m in inference_metrics.items()}"""

QUANT_RECORD = """from efficientllm_utils.cpu_4bit import run_provenance

record = run.write(metrics={**size_metrics, **inference_metrics}, quality=quality,
                   raw={**quality_raw, **inference_raw, "size": size_raw, "load_s": load_s,
                        "process_cpu_s": vq.process_cpu_seconds()},
                   provenance_extra={**run_provenance(model), **vq.base_provenance(source, p)})
metrics_table(record)"""


def peft_notebook() -> nbformat.NotebookNode:
    return build([
        *opening_cells(PEFT_INTRO, "vlm_peft", VLMFinetuneRun, setup_source(VLMFinetuneRun, "vlm_finetune", "vft")),
        ("md", "## 1. Base model and questions"), ("code", PEFT_DATA),
        ("md", "## 2. Held-out accuracy before training\n\nReused from an earlier run of this profile whose base had "
               "the same fingerprint (weights, items and images, scoring settings, code and packages)."),
        ("code", PEFT_BEFORE),
        ("md", "## 3. The method, trained under the resource tracker"), ("code", PEFT_TRAIN),
        ("md", "## 4. Held-out accuracy after training, and the adapter on disk"), ("code", PEFT_AFTER),
        ("md", "## Result record"), ("code", PEFT_RECORD), ("code", PEFT_PLOT)], "vlmp")


def quantization_notebook() -> nbformat.NotebookNode:
    return build([
        *opening_cells(QUANT_INTRO, "vlm_quantization", VLMQuantizationRun,
                       setup_source(VLMQuantizationRun, "vlm_quantization", "vq")),
        ("md", "## 1. The reference's answers, the model at this precision, its bytes"), ("code", QUANT_LOAD),
        ("md", "## 2. Answers: accuracy, flips and KL against the reference"), ("code", QUANT_QUALITY),
        ("md", "## 3. Time to first token with an image, decode latency, memory and energy"), ("code", QUANT_INFERENCE),
        ("md", "## Result record"), ("code", QUANT_RECORD)], "vlmq")


def notebooks() -> dict[str, nbformat.NotebookNode]:
    return {"notebooks/vlm/vlm_peft.ipynb": peft_notebook(),
            "notebooks/vlm/vlm_quantization.ipynb": quantization_notebook()}
