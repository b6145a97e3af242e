"""Write the two vision-generation notebooks (``lvm_quantization.ipynb``, ``lvm_finetune.ipynb``), without outputs.

One notebook per axis; the family (SD3.5 or Wan 2.1) is the ``model`` parameter's. Each parameters cell holds
every field of the study's run model at its params file's default-profile values (the first grid point).

    .venv/bin/python notebooks/lvm/make_lvm_notebooks.py   # from the repository root
"""
from __future__ import annotations

from pathlib import Path

import nbformat

from efficientllm_utils.params import LVMFinetuneRun, LVMQuantizationRun, notebook_parameters_source

HERE = Path(__file__).resolve().parent

QUANT_INTRO = """# Vision generation: the denoiser quantized

One grid point of the `lvm_quantization` study: the denoising transformer of Stable Diffusion 3.5 (text-to-image,
MMDiT) or Wan 2.1 (text-to-video, 3D DiT) at one precision, through diffusers' bitsandbytes integration. The CPU
profile's models are small, built from configs with diffusers' own classes and pretrained here on real data
(cached); the `paper` profile loads the real checkpoints.

**Method.** Load the pipeline with the fp32 reference denoiser; generate the samples of fixed prompts and one
seed; swap in the denoiser at the run's precision (counted bytes, layer classes); generate the same samples under
the resource tracker with each denoiser step timed; score PSNR and SSIM against the reference per image (frame)
and *FD (EfficientNet-Lite0)* against held-out real images (not Inception FID)."""

QUANT_SETUP = """from efficientllm_utils.params import LVMQuantizationRun
from efficientllm_utils.records import RunContext, metrics_table
from efficientllm_utils.studies import lvm_quantization as quant

p = LVMQuantizationRun.from_namespace(globals())
run = RunContext.from_namespace(globals(), p)
p"""

QUANT_CELLS = [
    ("## 1. The reference pipeline, its samples and the real images", """setup = quant.prepare(p)
print(setup.real_source, "| base:", {k: setup.base.get(k) for k in ("heldout_loss_init", "heldout_loss")})"""),
    ("## 2. The denoiser at the run's precision", """memory, layers = quant.quantized(p, setup)
{**{k: m.value for k, m in memory.items()}, **layers}"""),
    ("## 3. Generation under the resource tracker", """timed, speed = quant.generate(p, setup)
{k: m.value for k, m in speed.items()}"""),
    ("## 4. Fidelity to the reference and FD", """quality = quant.quality(p, setup, timed, run.result_dir)
quality"""),
    ("## Result record", """record = run.write(metrics={**memory, **speed}, quality=quality,
                   raw={"step_seconds": timed.step_seconds, **layers})
metrics_table(record)"""),
    (None, """from IPython.display import Image, Video, display

display(Image(filename=str(run.result_dir / quant.GRID_FILE)))  # same prompts and seed for every precision
if (run.result_dir / quant.CLIP_FILE).exists():
    display(Video(str(run.result_dir / quant.CLIP_FILE), embed=True))"""),
]


def notebook(study: str, run_model, intro: str, setup: str, cells: list, prefix: str) -> nbformat.NotebookNode:
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    parameters = code(notebook_parameters_source(study, run_model))
    parameters.metadata["tags"] = ["parameters"]
    out = [md(intro), parameters, code(setup)]
    for title, source in cells:
        out += ([md(title)] if title else []) + [code(source)]
    nb = nbformat.v4.new_notebook(cells=out)
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating gives the same file
        cell.id = f"{prefix}-{i:02d}"
    return nb


def notebooks() -> dict[str, nbformat.NotebookNode]:
    out = {"lvm_quantization.ipynb": notebook("lvm_quantization", LVMQuantizationRun, QUANT_INTRO, QUANT_SETUP,
                                              QUANT_CELLS, "lvmq")}
    out["lvm_finetune.ipynb"] = notebook("lvm_finetune", LVMFinetuneRun, FT_INTRO, FT_SETUP, FT_CELLS, "lvmf")
    return out


FT_INTRO = """# Vision generation: the denoiser fine-tuned

One grid point of the `lvm_finetune` study (the paper's Table 13): one method (LoRA, RSLoRA, DoRA, LoHa, LoKr
through `peft`, or full fine-tuning) adapts the pretrained denoiser of Stable Diffusion 3.5 or Wan 2.1 to data the
base has not seen. Every method runs the same flow-matching loop on the same examples, order, times, noise and
seed. The CPU profile's bases are small models pretrained here (cached).

**Method.** Encode the new training and held-out examples to latents; score the base on them (held-out
flow-matching loss; samples for the new captions and their *FD (EfficientNet-Lite0)*, not Inception FID); build
the method, train it under the resource tracker (AL, ST, AMU, AEC from the raw steps and samples); score again
with the same prompts and seed; measure the adapter's bytes on disk."""

FT_SETUP = """from efficientllm_utils.params import LVMFinetuneRun
from efficientllm_utils.records import RunContext, metrics_table
from efficientllm_utils.studies import lvm_finetune as ft

p = LVMFinetuneRun.from_namespace(globals())
run = RunContext.from_namespace(globals(), p)
p"""

FT_CELLS = [
    ("## 1. The new data as latents", """data = ft.load_data(p)
print(data.train_source, "|", data.heldout_source)"""),
    ("## 2. The base on the new data", """base = ft.measure_base(data, p, run.result_dir)
base"""),
    ("## 3. The method, trained under the resource tracker", """built = ft.build(data, p)
print(built.description)
steps, tracker = ft.finetune(built, data, p)
train_metrics = ft.training_metrics(built, steps, tracker, p)
{k: m.value for k, m in train_metrics.items()}"""),
    ("## 4. After: held-out loss, samples and FD", """quality = ft.measure_after(built, data, p, steps, base, run.result_dir)
quality"""),
    ("## Result record", """from efficientllm_utils.lvm.train import curve

record = run.write(metrics=train_metrics, quality=quality,
                   raw={"steps": curve(steps), "tracker_samples": tracker.samples})
metrics_table(record)"""),
    (None, """import matplotlib.pyplot as plt
import seaborn as sns
from IPython.display import Image, Video, display

sns.set_theme(style="whitegrid")
fig, ax = plt.subplots(figsize=(6, 3.4))
ax.plot([s.step for s in steps], [s.loss for s in steps], lw=1, label="training batch")
ax.axhline(quality["heldout_loss_base"], ls=":", color="grey", lw=1, label="held-out, base")
ax.axhline(quality["heldout_loss"], ls="--", color="black", lw=1, label="held-out, after")
ax.set(xlabel="step", ylabel="flow-matching loss", title=f"{run.label}")
ax.legend()
fig.tight_layout()
plt.show()
display(Image(filename=str(run.result_dir / ft.BEFORE_GRID_FILE)))  # the base, same prompts and seed
display(Image(filename=str(run.result_dir / ft.GRID_FILE)))  # after fine-tuning
if (run.result_dir / ft.CLIP_FILE).exists():
    display(Video(str(run.result_dir / ft.CLIP_FILE), embed=True))"""),
]

if __name__ == "__main__":
    for name, nb in notebooks().items():
        nbformat.write(nb, HERE / name)
        print(HERE / name)
