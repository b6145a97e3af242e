"""``notebooks/llm/``: the four architecture-pretraining notebooks (attention, positional_encoding, moe,
attention_free).

The first three differ only in their title and introduction: the measurement is ``studies.architecture``. The
attention-free notebook runs the same cells through ``studies.attention_free`` (``AttentionFreeRun``), plus the
cache or state per sequence against context length."""
from __future__ import annotations

import nbformat

from ..notebook_builder import build, opening_cells, setup_source
from ..studies.architecture_run import PretrainRun
from ..studies.attention_free_run import AttentionFreeRun

INTRO = {
    "attention": ("Architecture pretraining: attention", "attention",
                  "the attention kind (MHA, GQA, MQA, MLA, NSA); the position encoding and the FFN stay fixed"),
    "positional_encoding": ("Architecture pretraining: positional encoding", "position",
                            "the position encoding (RoPE, fixed sinusoidal absolute, learnable absolute, T5 relative "
                            "bias, none) on the GQA backbone"),
    "moe": ("Architecture pretraining: mixture of experts", "variant",
            "the FFN: dense, top-k routed experts at the dense model's active parameters, and a dense model as large "
            "as the mixture in total parameters"),
    "attention_free": ("Architecture pretraining: attention-free models", "variant",
                       "the model: our transformer, Mamba, RWKV (RWKV-4) or Pythia (GPT-NeoX), each from "
                       "`transformers` and sized to the transformer's parameter count"),
}
# study -> (run model, study module): the attention-free study has its own run fields and cache measurement
RUNNERS = {"attention_free": (AttentionFreeRun, "attention_free")}

METHOD = """**Method.** Build the decoder from the run's parameters (seeded) and count its parameters, its analytical
FLOPs and KV-cache bytes per token, and the cache a real prefill leaves; pretrain it from scratch under the resource
tracker (sampling every `sample_interval_s`, 1 s as in the paper), keeping every step's loss and time; compute AL
(s/iter) and TT (tokens/param/s) from the raw steps after `timing_warmup_steps`; score held-out perplexity; then time
fixed-length greedy decoding after prompts of each `decode_contexts` length, with no sampler running. Every metric
records how it was obtained."""

OWN_METHOD = """ The model is our decoder (`architecture: transformer`) or `transformers`' Mamba, RWKV-4 or Pythia
(no FLOPs model for those: recorded as unavailable). After building it, the cache or recurrent state one sequence
holds after a prefill of each `decode_contexts` length is read from the model's real cache object and set beside its
formula."""

MODEL = """data = arch.load_data(p)
model = arch.build_model(p, data.tokenizer)
model_metrics, model_raw = arch.measure_model(model, p, data)
{k: m.value for k, m in model_metrics.items() if not k.startswith("decode_")}"""

TRAIN = """samples, tracker = arch.train(model, p, data)
train_metrics = arch.training_metrics(samples, model_metrics["params_total"].value, p.timing_warmup_steps, tracker)
{k: m.value for k, m in train_metrics.items()}"""

QUALITY = """quality = arch.measure_quality(model, data, samples)
quality"""

DECODE = """decode_metrics, decode_raw = arch.measure_decode(model, p, data)"""

ROOFLINE = """roofline_metrics, roofline_raw = arch.measure_roofline(model, p, {**model_metrics, **train_metrics,
                                                                   **decode_metrics})
{k: m.value for k, m in roofline_metrics.items()}"""

RECORD = """record = run.write(metrics={{**model_metrics, **train_metrics, **decode_metrics, **roofline_metrics}},
                   quality=quality,
                   raw={{"steps": arch.loss_curve(samples), "tracker_samples": tracker.samples, "decode": decode_raw,
                        "roofline": roofline_raw, **model_raw}}{provenance})
metrics_table(record)"""

OWN_PROVENANCE = ',\n                   provenance_extra={"model": arch.implementation(model, p)}'

STATE = """import pandas as pd

pd.DataFrame(arch.state_curve(model_metrics, p.decode_contexts))"""

PLOT = """import matplotlib.pyplot as plt
import seaborn as sns

sns.set_theme(style="whitegrid")
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
left.plot([s.step for s in samples], [s.lm_loss for s in samples], lw=1)
left.axhline(quality["heldout_loss"], ls="--", color="grey", lw=1, label=f"held-out (ppl {quality['perplexity']:.1f})")
left.set(xlabel="step", ylabel="training loss (next-token cross-entropy)", title=run.label)
left.legend()
contexts = [int(c) for c in decode_raw]
right.plot(contexts, [decode_metrics[f"decode_ctx{c}_latency_s"].value for c in contexts], "o-")
right.set(xscale="log", xticks=contexts, xticklabels=contexts, xlabel="context length (prompt tokens)",
          ylabel=f"s per request ({p.new_tokens} new tokens)", title="greedy decoding")
fig.tight_layout()"""


def notebook(study: str) -> nbformat.NotebookNode:
    title, field, swapped = INTRO[study]
    run_model, module = RUNNERS.get(study, (PretrainRun, "architecture"))
    own = study in RUNNERS
    intro = (f"# {title}\n\nOne grid point of the `{study}` study: "
             f"{'a small language model' if own else 'a small Qwen2.5-style decoder'} pretrained from scratch, "
             f"where the runs differ only in {swapped} (parameter `{field}`). The runner (`make reproduce "
             f"AXIS={study}`, or `AXIS=architecture` for the four studies) executes this notebook once per grid "
             f"point of `params/{study}.yaml` with papermill; you can also run it by hand with other values.\n\n"
             f"{METHOD}" + (OWN_METHOD if own else ""))
    setup = setup_source(run_model, module, "arch",
                         "arch.set_threads(p)  # torch threads for the whole run (num_threads)\n" if own else "")
    return build([
        *opening_cells(intro, study, run_model, setup),
        ("md", "## 1. Data, model and its analytical costs"),
        ("code", MODEL),
        *([("md", "Cache or recurrent state of one sequence after a prefill of each context length: the formula "
                  "(analytical) beside the bytes the model's real cache object holds (measured)."), ("code", STATE)]
          if own else []),
        ("md", "## 2. Pretraining under the resource tracker"),
        ("code", TRAIN),
        ("md", "## 3. Quality: held-out perplexity"),
        ("code", QUALITY),
        ("md", "## 4. Greedy decoding at several context lengths"),
        ("code", DECODE),
        ("md", "## 5. Against the machine's limits: MFU, MBU and the cost model\n\nEach training step's MFU "
               "(3 x the analytical forward FLOPs of its tokens over AL, against the probed matmul peak of the run's "
               "dtype); at each context, the prefill's MFU (over TTFT) and the decode step's MBU (every weight once "
               "plus the cache, over TPOT, against the probed bandwidth), with each phase's roofline-bound time; and "
               "the predicted training memory (weights, gradients, AdamW's moments). The machine probe runs once per "
               "machine and is cached (`python -m efficientllm_utils probe`)."),
        ("code", ROOFLINE),
        ("md", "## Result record"),
        ("code", RECORD.format(provenance=OWN_PROVENANCE if own else "")),
        ("code", PLOT),
    ], study[:4])


def notebooks() -> dict[str, nbformat.NotebookNode]:
    return {f"notebooks/llm/{study}.ipynb": notebook(study) for study in INTRO}
