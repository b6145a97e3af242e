"""Write ``notebooks/lvm/dit.ipynb``, the one notebook of the DiT attention and MoE studies, without outputs.

The parameters cell holds every ``DiTRun`` field at ``params/dit_attention.yaml``'s default-profile values
(the first grid point), so a notebook run by hand reproduces one run of the CPU profile; the runner injects
each run's values and ``study`` (``dit_attention`` or ``dit_moe``).

    .venv/bin/python notebooks/lvm/make_dit_notebook.py   # from the repository root
"""
from __future__ import annotations

from pathlib import Path

import nbformat

from efficientllm_utils.params import DiTRun, notebook_parameters_source

HERE = Path(__file__).resolve().parent

INTRO = """# Diffusion transformers: swapped attention and mixture of experts

One grid point of the `dit_attention` study (the paper's Table 10: the attention kind changes) or of the `dit_moe`
study (Table 11: dense FFN or 8 routed experts). A class-conditional DiT with adaLN-Zero blocks, whose attention
and FFN are the LLM architecture axis's modules run non-causally over the image patches, is trained from scratch
with flow matching on CIFAR-10 images, then sampled. The runner (`make reproduce AXIS=dit`) executes this notebook
once per grid point of `params/dit_attention.yaml` and `params/dit_moe.yaml` with papermill; you can also run it by
hand with other values.

**Method.** Hold out a fixed split; its two halves give the FD reference and the noise floor. Build the DiT (seeded),
count its parameters and its analytical FLOPs; sample the untrained model and score it (the baseline); train under
the resource tracker (1 s samples), keeping every step's loss and time and a moving average of the weights; compute
AL (s/iter) and TT (patch tokens/param/s) from the raw steps; then, for the averaged weights, the held-out
flow-matching loss, `n_samples` class-balanced samples (timed: sampling latency per image) and their
*FD (EfficientNet-Lite0)*, which is not Inception FID. Every metric records how it was obtained."""

SETUP = """from efficientllm_utils.params import DiTRun
from efficientllm_utils.records import RunContext, metrics_table
from efficientllm_utils.studies import dit

p = DiTRun.from_namespace(globals())  # a wrong value fails here, naming the field and the allowed values
run = RunContext.from_namespace(globals(), p)
dit.set_threads(p)
p"""

DATA = """data = dit.load_data(p)
print(data.splits.source, f"| FD noise floor (two held-out halves): {data.noise_floor_fd:.2f}")"""

MODEL = """model = dit.build_model(p)
model_metrics, model_raw = dit.measure_model(model, p)
untrained = dit.measure_untrained(model, p, data)
{**{k: m.value for k, m in model_metrics.items()}, **untrained}"""

TRAIN = """steps, tracker, sampled = dit.train(model, p, data)  # sampled: the moving average of the weights
train_metrics = dit.training_metrics(steps, model_metrics["params_total"].value, p, tracker)
{k: m.value for k, m in train_metrics.items()}"""

QUALITY = """quality, sample_metrics, images = dit.measure_quality(sampled, p, data, steps, untrained, run.result_dir)
quality"""

RECORD = """record = run.write(metrics={**model_metrics, **train_metrics, **sample_metrics}, quality=quality,
                   raw={"steps": dit.loss_curve(steps), "tracker_samples": tracker.samples, **model_raw})
metrics_table(record)"""

PLOT = """import matplotlib.pyplot as plt
import seaborn as sns
from IPython.display import Image

sns.set_theme(style="whitegrid")
fig, ax = plt.subplots(figsize=(6, 3.4))
ax.plot([s.step for s in steps], [s.flow_loss for s in steps], lw=1)
ax.axhline(quality["heldout_loss"], ls="--", color="grey", lw=1, label="held-out")
ax.set(xlabel="step", ylabel="flow-matching loss", title=f"{run.label}: FD {quality['fd']:.1f} "
       f"(untrained {quality['fd_init']:.1f}, floor {quality['fd_noise_floor']:.1f})")
ax.legend()
fig.tight_layout()
plt.show()
Image(filename=str(run.result_dir / dit.GRID_FILE))  # one row per class: airplane, automobile, ..., truck"""


def notebook() -> nbformat.NotebookNode:
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    parameters = code(notebook_parameters_source("dit_attention", DiTRun))
    parameters.metadata["tags"] = ["parameters"]
    cells = [md(INTRO), parameters, code(SETUP),
             md("## 1. Data: the training images, the held-out halves and the FD noise floor"), code(DATA),
             md("## 2. Model, its analytical costs, and the untrained baseline"), code(MODEL),
             md("## 3. Training under the resource tracker"), code(TRAIN),
             md("## 4. Quality: held-out loss, samples and FD (EfficientNet-Lite0)"), code(QUALITY),
             md("## Result record"), code(RECORD), code(PLOT)]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating gives the same file
        cell.id = f"dit-{i:02d}"
    return nb


if __name__ == "__main__":
    path = HERE / "dit.ipynb"
    nbformat.write(notebook(), path)
    print(path)
