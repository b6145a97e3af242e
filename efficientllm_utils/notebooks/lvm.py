"""``notebooks/lvm/``: ``lvm_quantization.ipynb`` and ``lvm_finetune.ipynb`` (SD3.5 and Wan 2.1; the family is the
``model`` parameter's); the measurements are ``studies.lvm_quantization`` and ``studies.lvm_finetune``."""
from __future__ import annotations

import nbformat

from ..notebook_builder import build, opening_cells, setup_source
from ..studies.lvm_run import LVMFinetuneRun, LVMQuantizationRun

QUANT_INTRO = """# Vision generation: the denoiser quantized

One grid point of the `lvm_quantization` study: the denoising transformer of Stable Diffusion 3.5 (text-to-image,
MMDiT) or Wan 2.1 (text-to-video, 3D DiT) at one precision, through diffusers' bitsandbytes integration. The CPU
profile's models are small, built from configs with diffusers' own classes and pretrained here on real data
(cached); the `paper` profile loads the real checkpoints.

**Method.** Load the pipeline with the fp32 reference denoiser; generate the samples of fixed prompts and one
seed; swap in the denoiser at the run's precision (counted bytes, layer classes); generate the same samples under
the resource tracker with each denoiser step timed; score PSNR and SSIM against the reference per image (frame)
and *FD (EfficientNet-Lite0)* against held-out real images (not Inception FID)."""


QUANT_CELLS = [
    ("md", "## 1. The reference pipeline, its samples and the real images\n\nThe reference's samples are computed by "
           "the first run of the profile and reused by the others (the very same pipeline weights, prompts, settings, "
           "code and packages)."),
    ("code", """setup = quant.prepare(p, run.result_dir.parent / quant.REFERENCE_DIR, run.label)
print(setup.real_source, "| reference reused:", setup.reference_reused, "| base:",
      {k: setup.base.get(k) for k in ("heldout_loss_init", "heldout_loss")})"""),
    ("md", "## 2. The denoiser at the run's precision"),
    ("code", """memory, layers = quant.quantized(p, setup)
{**{k: m.value for k, m in memory.items()}, **layers}"""),
    ("md", "## 3. Generation under the resource tracker"),
    ("code", """timed, speed = quant.generate(p, setup)
{k: m.value for k, m in speed.items()}"""),
    ("md", "## 4. Fidelity to the reference and FD"),
    ("code", """quality, per_frame = quant.quality(p, setup, timed, run.result_dir)
quality"""),
    ("md", "## Result record"),
    ("code", """record = run.write(metrics={**memory, **speed}, quality=quality,
                   raw={"step_seconds": timed.step_seconds, **layers, **per_frame})
metrics_table(record)"""),
    ("code", """from IPython.display import Image, Video, display

display(Image(filename=str(run.result_dir / quant.GRID_FILE)))  # same prompts and seed for every precision
if (run.result_dir / quant.CLIP_FILE).exists():
    display(Video(str(run.result_dir / quant.CLIP_FILE), embed=True))"""),
]

FT_INTRO = """# Vision generation: the denoiser fine-tuned

One grid point of the `lvm_finetune` study (the paper's Table 13): one method (LoRA, RSLoRA, DoRA, LoHa, LoKr,
GLoRA through `peft`, or full fine-tuning) adapts the pretrained denoiser of Stable Diffusion 3.5 or Wan 2.1 to
data the base has not seen. Every method runs the same flow-matching loop on the same examples, order, times,
noise and seed. The CPU profile's bases are small models pretrained here (cached).

**Method.** Encode the new training and held-out examples to latents; score the base on them (held-out
flow-matching loss; samples for the new captions and their *FD (EfficientNet-Lite0)*, not Inception FID); build
the method, train it under the resource tracker (AL, ST, AMU, AEC from the raw steps and samples); score again
with the same prompts and seed; measure the adapter's bytes on disk."""


FT_CELLS = [
    ("md", "## 1. The new data as latents"),
    ("code", """data = ft.load_data(p)
print(data.train_source, "|", data.heldout_source)"""),
    ("md", "## 2. The base on the new data\n\nThe same for every method: computed by the first run of the profile "
           "and reused by the others (the very same base weights, held-out latents, prompts, settings, code and "
           "packages)."),
    ("code", """base, base_items = ft.measure_base(data, p, run.result_dir, run.result_dir.parent / ft.BASE_DIR, run.label)
base"""),
    ("md", "## 3. The method, trained under the resource tracker"),
    ("code", """built = ft.build(data, p)
print(built.description)
steps, tracker = ft.finetune(built, data, p)
train_metrics = ft.training_metrics(built, steps, tracker, p)
{k: m.value for k, m in train_metrics.items()}"""),
    ("md", "## 4. After: held-out loss, samples and FD"),
    ("code", """quality, after_items = ft.measure_after(built, data, p, steps, base, run.result_dir)
quality"""),
    ("md", "## Result record"),
    ("code", """from efficientllm_utils.lvm.train import curve

record = run.write(metrics=train_metrics, quality=quality,
                   raw={"steps": curve(steps), "tracker_samples": tracker.samples, **base_items, **after_items})
metrics_table(record)"""),
    ("code", """import matplotlib.pyplot as plt
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


def notebooks() -> dict[str, nbformat.NotebookNode]:
    return {
        "notebooks/lvm/lvm_quantization.ipynb": build([
            *opening_cells(QUANT_INTRO, "lvm_quantization", LVMQuantizationRun,
                           setup_source(LVMQuantizationRun, "lvm_quantization", "quant")), *QUANT_CELLS], "lvmq"),
        "notebooks/lvm/lvm_finetune.ipynb": build([
            *opening_cells(FT_INTRO, "lvm_finetune", LVMFinetuneRun,
                           setup_source(LVMFinetuneRun, "lvm_finetune", "ft")), *FT_CELLS], "lvmf"),
    }
