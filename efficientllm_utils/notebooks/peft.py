"""``notebooks/llm/peft.ipynb``: one fine-tuning method on one base model; the measurement is ``studies.finetune``."""
from __future__ import annotations

import nbformat

from ..notebook_builder import build, opening_cells, setup_source
from ..studies.finetune_run import FinetuneRun

INTRO = """# Fine-tuning: one method on one base model

One grid point of the fine-tuning study. The runner (`make reproduce AXIS=peft`) executes this notebook once per method
with papermill, injecting the values of `params/peft.yaml` (each method's own lr already resolved from the profile's
`method_overrides`); you can also run it by hand with other values.

**Method.** Load the base model (fp32; QLoRA: 4-bit NF4) and the instruction data (the `cpu` profile: ASDiv as a chat
task answered by the number alone; others: BoolQ, answer *yes* or *no*); score held-out items never trained on (the
number by greedy exact match, yes/no by log-likelihood); build the method through `peft`;
train with the one loop every method shares (same rows in the same order, same steps, schedule and seed) under the
resource tracker, sampling every second; score the held-out items again; save the adapter and count its bytes.
The paper's quality metric is the final training loss (recorded; the chapter decides on held-out accuracy); every
metric records how it was obtained."""

DATA = """data = fts.load_data(p)
model, load_s = fts.load_base(p)
{"train examples": len(data.data.train), "held-out items": len(data.eval_items), "held-out from": data.eval_source,
 "data_s": round(data.seconds, 1), "load_s": round(load_s, 1)}"""

BEFORE_INTRO = """## 2. Held-out accuracy before training

Every method but QLoRA starts from the same fp32 weights: when an earlier run of this profile scored a base with the
same fingerprint (every weight tensor, the items, the scoring settings, code and package versions), its scores are
reused and `computed_by` names that run."""

BEFORE = """before = fts.evaluate_base(model, data, p, run.result_dir.parent / fts.BASE_EVAL_DIR, run.label)
{k: before[k] for k in ("accuracy", "stderr", "gold_logprob", "answer_mass", "first_choice_share", "computed_by",
                        "seconds")}"""

TRAIN = """built, counts = fts.build(model, p)
print(built.description)
result, tracker = fts.train(built, data, p)
metrics = {**fts.parameter_metrics(counts), **fts.training_metrics(result.steps, counts["total"],
                                                                   p.timing_warmup_steps, tracker)}
roofline_metrics, roofline_raw = fts.measure_roofline(built, p, result.steps, counts["trainable"], metrics)
metrics |= roofline_metrics  # training-step MFU/MBU against the machine probe, the cost model's memory
[(s.step, round(s.loss, 3), round(s.seconds, 2)) for s in result.steps]"""

AFTER = """after = fts.evaluate(built.model, data, p)
adapter_metrics, adapter_raw = fts.save(built, run.result_dir / fts.ADAPTER_DIR)
{k: after[k] for k in ("accuracy", "stderr", "gold_logprob", "answer_mass", "first_choice_share", "seconds")}"""

RECORD = """from efficientllm_utils.cpu_4bit import run_provenance

record = run.write(metrics={**metrics, **adapter_metrics},
                   quality=fts.quality(before, after, result, data, p),
                   raw={**fts.raw(result, tracker, built, data, before, after, counts, {"load": load_s}, adapter_raw),
                        "roofline": roofline_raw},
                   provenance_extra=run_provenance(built.model))
metrics_table(record)"""

PLOT = """import pandas as pd
import seaborn as sns

steps = pd.DataFrame(result.to_records())
ax = sns.lineplot(data=steps, x="step", y="loss", marker="o")
ax.set(ylabel="training loss (answer tokens, before the step's update)",
       title=f"{p.model}, {p.method}: loss per step ({record.quality['final_loss']:.3f} over the last "
             f"{record.quality['final_loss_steps']})");"""


def notebooks() -> dict[str, nbformat.NotebookNode]:
    return {"notebooks/llm/peft.ipynb": build([
        *opening_cells(INTRO, "peft", FinetuneRun, setup_source(FinetuneRun, "finetune", "fts")),
        ("md", "## 1. Data and base model"),
        ("code", DATA),
        ("md", BEFORE_INTRO),
        ("code", BEFORE),
        ("md", "## 3. The method, trained under the resource tracker"),
        ("code", TRAIN),
        ("md", "## 4. Held-out accuracy after training, and the adapter on disk"),
        ("code", AFTER),
        ("md", "## Result record"),
        ("code", RECORD),
        ("code", PLOT),
    ], "peft")}
