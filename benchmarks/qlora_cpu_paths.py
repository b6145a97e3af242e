"""QLoRA's training loss on both of bitsandbytes' CPU 4-bit paths, with the kernel pinned and left alone.

Runs the fine-tuning study's phases (data, 4-bit base, held-out scoring BEFORE training, training) for one
profile's QLoRA run, with LoRA beside it as the reference, on:

* ``this``: this machine's CPU as it is;
* ``avx512bf16``: bitsandbytes behaving as on a CPU with AVX512-BF16 (``cpu_4bit.emulate_avx512bf16_cpu``:
  the native fused kernel where this CPU has it, else the plain-torch reference of it);
* ``avx512bf16, left alone``: the same without ``cpu_4bit.pin_kernel``, i.e. what the study did before the
  kernel was pinned: scoring repacks the base for the fused kernel, which training then runs without a backward.

Prints the final loss (the study's quality: mean of the last ``final_loss_steps`` steps) of each.

    python -m benchmarks.qlora_cpu_paths [--profile cpu] [--steps N]   # from the repo root
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from efficientllm_utils import cpu_4bit
from efficientllm_utils import finetune as ft
from efficientllm_utils.params import expand, params_path
from efficientllm_utils.studies.finetune_run import FinetuneRun
from efficientllm_utils.studies import finetune as fts


@contextlib.contextmanager
def bitsandbytes_left_alone():
    """``pin_kernel`` reduced to a report: every layer keeps the kernel switch bitsandbytes gave it."""
    pin = cpu_4bit.pin_kernel
    cpu_4bit.pin_kernel = lambda model, kernel="dequantize": cpu_4bit.kernel_report(model)
    try:
        yield
    finally:
        cpu_4bit.pin_kernel = pin


def final_loss(p: FinetuneRun) -> tuple[float, dict, float]:
    t0 = time.perf_counter()
    data = fts.load_data(p)
    model, _ = fts.load_base(p)
    fts.evaluate_base(model, data, p, cache_dir=None)  # the study scores the base before training
    built, _ = fts.build(model, p)
    with ft.threads(p.num_threads):
        result = ft.train_model(built.model, built.param_groups, data.data.train, p.train_settings(), data.pad_token_id)
    k = min(p.final_loss_steps, len(result.losses))
    return sum(result.losses[-k:]) / k, cpu_4bit.run_provenance(built.model), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="override the profile's training steps")
    args = parser.parse_args()
    runs = {s.params["method"]: FinetuneRun.model_validate(s.params) for s in expand(params_path("peft"), args.profile)}
    if args.steps:
        runs = {m: p.model_copy(update={"steps": args.steps}) for m, p in runs.items()}
    avx = "avx512bf16" if cpu_4bit.cpu_has_avx512bf16() else "avx512bf16 (emulated)"
    scenarios = [  # method, CPU path, emulate AVX512-BF16, kernel pinned
        ("lora", "this", False, True),
        ("qlora", "this", False, True),
        ("qlora", avx, True, True),
        ("qlora", f"{avx}, kernel left to bitsandbytes", True, False),
    ]
    print(f"CPU flags: {cpu_4bit.cpu_flags()}; profile {args.profile}, {runs['qlora'].steps} steps")
    print("| method | CPU path | final loss | 4-bit layers packed for the fused kernel | seconds |")
    print("|---|---|---|---|---|")
    for method, label, emulate, pinned in scenarios:
        with contextlib.ExitStack() as stack:
            if emulate:
                stack.enter_context(cpu_4bit.emulate_avx512bf16_cpu())
            if not pinned:
                stack.enter_context(bitsandbytes_left_alone())
            torch.manual_seed(0)
            loss, provenance, seconds = final_loss(runs[method])
        packed = provenance.get("cpu_4bit", {}).get("layers_packed", "-")
        print(f"| {method} | {label} | {loss:.3f} | {packed} | {seconds:.0f} |", flush=True)

if __name__ == "__main__":
    main()
