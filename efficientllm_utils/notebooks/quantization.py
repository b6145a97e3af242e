"""``notebooks/llm/quantization.ipynb``: one model at one precision; the measurement is ``studies.quantization``."""
from __future__ import annotations

import nbformat

from ..notebook_builder import build, opening_cells, setup_source
from ..studies.quantization_run import QuantizationRun

INTRO = """# Inference quantization: one model at one precision

One grid point of the quantization study. The runner (`make reproduce AXIS=quantization`) executes this notebook once per
precision with papermill, injecting the values of `params/quantization.yaml`; you can also run it by hand with other values.

**Method.** Load the model at the chosen precision and count the bytes its tensors really hold; score it on real
multiple-choice tasks by log-likelihood (as lm-evaluation-harness does) and on held-out text by perplexity; time
fixed-length greedy generation with no sampler running; repeat the same requests under the resource tracker for memory,
utilisation and energy. Every metric records how it was obtained.

**Fidelity to the reference precision.** Accuracy on a few dozen items hides most of what a precision changes, so the
run also compares its outputs with those of the same model at `reference_precision`: the mean per-token KL divergence
KL(reference ‖ this precision) of the next-token distributions on the perplexity text (nats/token), how often the most
likely next token agrees, and the share of multiple-choice answers whose predicted choice flips (as llama.cpp's
`perplexity --kl-divergence` and Dutta et al. 2024, "Accuracy is not all you need", do). The reference's outputs are
computed from the reference model loaded in this run, or reused from an earlier run that computed them from the very
same weights, inputs, code and packages; the record says which."""

LOAD = """# The reference model is loaded (and freed) before this run's model; None when this run is the reference
reference_dir = run.result_dir.parent / q.REFERENCE_DIR
reference = q.reference_outputs(p, reference_dir, run.label)
model, tokenizer, load_s = q.load(p)
size_metrics, size_raw = q.measure_size(model)
{"load_s": round(load_s, 1), "linear layers": size_raw["linear_layers"], "bytes by dtype": size_raw["bytes_by_dtype"]}"""

QUALITY = """quality, fidelity_raw = q.measure_quality(model, tokenizer, p, reference, reference_dir, run.label)
{k: v for k, v in quality.items() if k != "predictions"}"""

INFERENCE = """inference_metrics, inference_raw = q.measure_inference(model, tokenizer, p)"""

ROOFLINE_INTRO = """## 4. Against the machine's limits: MFU, MBU and the cost model

Prefill MFU (analytical FLOPs over TTFT against the probed matmul peak of the precision's compute dtype) and decode
MBU (the bytes a decode step must read, weights once plus the KV cache, over TPOT against the probed bandwidth), with
each phase's roofline-bound time and the predicted memory (counted weights + KV cache). The machine probe runs once
per machine and is cached (`python -m efficientllm_utils probe`)."""

ROOFLINE = """roofline_metrics, roofline_raw = q.measure_roofline(model, tokenizer, p, {**size_metrics, **inference_metrics})
{k: m.value for k, m in roofline_metrics.items()}"""

RECORD = """from efficientllm_utils.cpu_4bit import run_provenance

record = run.write(metrics={**size_metrics, **inference_metrics, **roofline_metrics}, quality=quality,
                   raw={"size": size_raw, "load_s": load_s, "fidelity": fidelity_raw, **inference_raw,
                        "roofline": roofline_raw},
                   provenance_extra=run_provenance(model))
metrics_table(record)"""

PLOT = """import seaborn as sns

latencies = [r["latency_s"] for r in inference_raw["requests"]]
ax = sns.stripplot(x=latencies, size=6)
ax.set(xlabel=f"seconds per request ({p.new_tokens} new tokens, batch {p.batch_size})",
       title=f"{p.model} at {p.precision}: every timed request");"""


def notebooks() -> dict[str, nbformat.NotebookNode]:
    return {"notebooks/llm/quantization.ipynb": build([
        *opening_cells(INTRO, "quantization", QuantizationRun, setup_source(QuantizationRun, "quantization", "q")),
        ("md", "## 1. The reference precision's outputs, then load and count bytes"),
        ("code", LOAD),
        ("md", "## 2. Quality: multiple-choice accuracy, perplexity and fidelity to the reference"),
        ("code", QUALITY),
        ("md", "## 3. Inference: latency and throughput, then memory and energy"),
        ("code", INFERENCE),
        ("md", ROOFLINE_INTRO),
        ("code", ROOFLINE),
        ("md", "## Result record"),
        ("code", RECORD),
        ("code", PLOT),
    ], "quant")}
