"""``notebooks/dit/dit.ipynb``: one notebook for both DiT studies (the runner sets ``study``: ``dit_attention`` or
``dit_moe``); the measurement is ``studies.dit``."""
from __future__ import annotations

import nbformat

from ..notebook_builder import build, opening_cells, setup_source
from ..studies.dit_run import DiTRun

DIT_INTRO = """# Diffusion transformers: swapped attention and mixture of experts

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

DIT_DATA = """data = dit.load_data(p)
print(data.splits.source, f"| FD noise floor (two held-out halves): {data.noise_floor_fd:.2f}")"""

DIT_MODEL = """model = dit.build_model(p)
model_metrics, model_raw = dit.measure_model(model, p)
untrained = dit.measure_untrained(model, p, data)
{**{k: m.value for k, m in model_metrics.items()}, **untrained}"""

DIT_TRAIN = """steps, tracker, sampled = dit.train(model, p, data)  # sampled: the moving average of the weights
train_metrics = dit.training_metrics(steps, model_metrics["params_total"].value, p, tracker)
{k: m.value for k, m in train_metrics.items()}"""

DIT_QUALITY = """quality, sample_metrics, images = dit.measure_quality(sampled, p, data, steps, untrained, run.result_dir)
quality"""

DIT_RECORD = """record = run.write(metrics={**model_metrics, **train_metrics, **sample_metrics}, quality=quality,
                   raw={"steps": dit.loss_curve(steps), "tracker_samples": tracker.samples, **model_raw})
metrics_table(record)"""

DIT_PLOT = """import matplotlib.pyplot as plt
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


def notebooks() -> dict[str, nbformat.NotebookNode]:
    return {"notebooks/dit/dit.ipynb": build([
        *opening_cells(DIT_INTRO, "dit_attention", DiTRun, setup_source(DiTRun, "dit", extra="dit.set_threads(p)\n")),
        ("md", "## 1. Data: the training images, the held-out halves and the FD noise floor"), ("code", DIT_DATA),
        ("md", "## 2. Model, its analytical costs, and the untrained baseline"), ("code", DIT_MODEL),
        ("md", "## 3. Training under the resource tracker"), ("code", DIT_TRAIN),
        ("md", "## 4. Quality: held-out loss, samples and FD (EfficientNet-Lite0)"), ("code", DIT_QUALITY),
        ("md", "## Result record"), ("code", DIT_RECORD), ("code", DIT_PLOT)], "dit")}
