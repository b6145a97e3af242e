"""``make gpu-check``: the GPU code paths, on a model of real size, in a few minutes.

Builds a Qwen2.5-1.5B-shaped model from its config (random weights, seeded: no
hub access is needed), then for each kind of precision of the registry that runs on CUDA, once (bf16, fp16, int8
and int4: bitsandbytes' LLM.int8() and nf4; fp32, the CPU reference, aside) measures the six
metrics with the same code the study uses: NVML memory/utilisation sampling,
the NVML energy counter, bitsandbytes int8/int4 on CUDA, counted model bytes.

Random weights make task accuracy meaningless, so quality here is *fidelity*:
the share of next-token predictions on held-out text that agree with bf16's.
MCR is computed with that fidelity and labelled so. Without a GPU it says so
and exits 0.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import precisions
from .metrics.tracker import visible_gpu_indices

QWEN25_1P5B = dict(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                   num_key_value_heads=2, intermediate_size=8960, max_position_embeddings=32768,
                   rope_theta=1_000_000.0, tie_word_embeddings=True)
PRECISIONS = tuple(name for name in precisions.one_of_each_kind("cuda") if name != "fp32")


def _gpu_available() -> str | None:
    """None when a CUDA GPU and NVML are usable, else the reason they are not."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if not visible_gpu_indices():
        return "NVML sees no GPU"
    return None


@torch.no_grad()
def _next_token_predictions(model, windows: torch.Tensor) -> torch.Tensor:
    return model(input_ids=windows.to("cuda")).logits.argmax(-1).cpu()


def main() -> int:
    reason = _gpu_available()
    if reason and (visible_gpu_indices() or torch.cuda.is_available()):  # a GPU is there but torch or NVML cannot
        # use it: a failure, not "nothing to check"
        print(f"gpu-check: FAILED: a GPU is present but {reason} (a CPU-only torch build? no pynvml? driver and "
              f"CUDA versions?); torch {torch.__version__}, CUDA build {torch.version.cuda}.")
        return 1
    if reason:
        print(f"gpu-check: no GPU here ({reason}); nothing to check. Run it on a machine with an NVIDIA GPU.")
        return 0
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from . import models, quality
    from .studies.quantization_run import QuantizationRun
    from .studies import quantization as q

    t_start = time.perf_counter()
    print(f"gpu-check on {torch.cuda.get_device_name(0)}: Qwen2.5-1.5B shapes, random weights (seed 0)", flush=True)
    torch.manual_seed(0)
    checkpoint = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    Qwen2ForCausalLM(Qwen2Config(**QWEN25_1P5B)).to(torch.bfloat16).save_pretrained(checkpoint)
    # A real tokenizer for real-text prompts: SmolLM2's ids (49k) all lie inside Qwen's vocabulary.
    tokenizer = AutoTokenizer.from_pretrained(models.resolve_source("smollm2-135m-instruct"))
    tokenizer.save_pretrained(checkpoint)
    text_ids = tokenizer(quality.heldout_text(40_000), add_special_tokens=False).input_ids
    windows = torch.tensor(text_ids[: 8 * 256]).view(8, 256)

    rows, reference = [], None
    for precision in PRECISIONS:
        p = QuantizationRun(model=str(checkpoint), precision=precision, reference_precision="bf16", device="cuda",
                            prompt_tokens=128, new_tokens=64, warmup=2, min_iterations=5, min_seconds=3.0,
                            tracked_requests=5, sample_interval_s=0.1)
        model, tok, load_s = q.load(p)
        size, size_raw = q.measure_size(model)
        predictions = _next_token_predictions(model, windows)
        reference = predictions if reference is None else reference
        fidelity = float((predictions == reference).float().mean())
        metrics, _ = q.measure_inference(model, tok, p)
        rows.append({"precision": precision, "load_s": load_s, "fidelity": fidelity,
                     "linear_layers": size_raw["linear_layers"],
                     **{k: v.model_dump() for k, v in {**size, **metrics}.items()}})
        print(f"  {precision}: loaded in {load_s:.1f}s, {size['model_bytes'].value / 1e9:.2f} GB counted", flush=True)
        del model
        torch.cuda.empty_cache()

    ref_bytes = rows[0]["model_bytes"]["value"]
    print("\nprecision  AMU_GB  PCU    AL_s    IT_tok/s  AEC_W   MCR(fidelity)  model_GB  (methods below)")
    for r in rows:
        r["mcr_fidelity"] = ref_bytes / r["model_bytes"]["value"] * r["fidelity"]
        print(f"{r['precision']:<10} {r['amu_gb']['value']:6.2f}  {r['pcu']['value']:.3f}  {r['al_s']['value']:.4f}  "
              f"{r['it_tokens_per_s']['value']:8.1f}  {r['aec_w']['value']:6.1f}  {r['mcr_fidelity']:13.2f}  "
              f"{r['model_bytes']['value'] / 1e9:8.3f}")
    first = rows[0]
    print("\nmethods: " + "; ".join(f"{k}={first[k]['method']}" for k in ("amu_gb", "pcu", "al_s", "aec_w")))
    print("MCR here = (bytes_bf16 / bytes) x next-token agreement with bf16 (random weights: no task accuracy)")
    print(f"gpu-check finished in {time.perf_counter() - t_start:.0f}s")
    out = os.environ.get("GPU_CHECK_OUT")
    if out:
        Path(out).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
