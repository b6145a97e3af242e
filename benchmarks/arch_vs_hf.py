"""Time our attention and MoE modules against the transformers reference modules.

Pairs (same config, same weights, same input; outputs are checked to agree first):

* GQA: ``GroupedQueryAttention`` vs ``Qwen2Attention`` (SDPA);
* MLA: ``MultiHeadLatentAttention`` vs ``DeepseekV3Attention`` (SDPA);
* MoE: ``SparseMoE`` vs ``Qwen2MoeSparseMoeBlock`` (shared expert), with HF's
  ``eager`` expert loop and, where it can run, its ``grouped_mm`` kernel.

Shapes default to one layer of the paper's 0.5B model (hidden 896, 14 heads,
2 KV heads, head 64; MLA latent 112; 8 experts, top-2). Forward runs under
``no_grad``; "fwd+bwd" is forward plus backward of ``out.sum()``. The two
sides alternate within each repetition so that machine noise hits both alike.
Prints a markdown table of median and p90 milliseconds and the ratio ours/HF; ``--json PATH`` also writes the
timings with the machine's provenance (``records.provenance``: hardware, packages, load), which the attention
chapter shows (``RESULT``, committed).

    python -m benchmarks.arch_vs_hf [--batch 2] [--seq 128] [--reps 10] [--device cpu] [--json PATH]   # repo root
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding

from efficientllm_utils.arch import paper_config
from efficientllm_utils.arch.attention import AttentionContext, GroupedQueryAttention
from efficientllm_utils.arch.ffn import SparseMoE
from efficientllm_utils.arch.hf_reference import (deepseek_v3_attention, mla_state_dict, moe_block, moe_state_dict,
                                                  qwen2_config)
from efficientllm_utils.arch.mla import MultiHeadLatentAttention
from efficientllm_utils.reports.architecture import MODULE_TIMINGS as RESULT  # the run the attention chapter shows
from efficientllm_utils.arch.position import RotaryEmbedding

SIZE = "0.5B"  # one layer of the paper's smallest model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def forward_and_backward(module: torch.nn.Module, call: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        call().sum().backward()
    return step


def no_grad(call: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            call()
    return step


def compare(ours: Callable[[], None], reference: Callable[[], None], warmup: int, reps: int,
            device: torch.device) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        ours()
        reference()
    ours_times, reference_times = [], []
    for rep in range(reps):
        first_ours = rep % 2 == 0
        for is_ours in (first_ours, not first_ours):
            (ours_times if is_ours else reference_times).append(timed(ours if is_ours else reference, device))
    return ours_times, reference_times


def p90(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, round(0.9 * (len(values) - 1)))]


def attention_pairs(x: torch.Tensor, device: torch.device):
    """(name, reference name, ours call, reference call, ours module, reference module) for GQA and MLA."""
    b, t, _ = x.shape
    positions = torch.arange(t, device=device).expand(b, -1)

    config = paper_config(SIZE)
    gqa_reference = Qwen2Attention(qwen2_config(config, attn_implementation="sdpa"), layer_idx=0).to(device)
    gqa = GroupedQueryAttention(config, layer_idx=0).to(device)
    gqa.load_state_dict(gqa_reference.state_dict(), strict=True)
    gqa_rope = Qwen2RotaryEmbedding(gqa_reference.config).to(device)(x, positions)
    gqa_ctx = AttentionContext(rotary=None,
                               query_rope=RotaryEmbedding(config.head_dim, config.rope_theta)(positions),
                               mask=None, is_causal=True, padded=False, cache=None)
    yield ("GQA", "Qwen2Attention", lambda: gqa(x, gqa_ctx), lambda: gqa_reference(x, gqa_rope, None)[0],
           gqa, gqa_reference)

    config = paper_config(SIZE, attention="mla")
    mla_reference = deepseek_v3_attention(config, attn_implementation="sdpa").to(device)
    mla = MultiHeadLatentAttention(config, layer_idx=0).to(device)
    mla.load_state_dict(mla_state_dict(mla_reference), strict=True)
    mla_rope = DeepseekV3RotaryEmbedding(mla_reference.config).to(device)(x, positions)
    mla_ctx = AttentionContext(rotary=None,
                               query_rope=RotaryEmbedding(config.qk_rope_head_dim, config.rope_theta)(positions),
                               mask=None, is_causal=True, padded=False, cache=None)
    causal = torch.full((t, t), float("-inf"), device=device).triu(1)[None, None]
    yield ("MLA", "DeepseekV3Attention", lambda: mla(x, mla_ctx), lambda: mla_reference(x, mla_rope, causal)[0],
           mla, mla_reference)


def moe_pairs(x: torch.Tensor, device: torch.device):
    config = paper_config(SIZE, ffn="moe", n_shared_experts=1)
    ours = SparseMoE(config).to(device)
    for implementation in ("eager", "grouped_mm"):
        reference = moe_block(config, experts_implementation=implementation).to(device)
        with torch.no_grad():  # HF experts start as torch.empty: give them our weights
            for name, tensor in moe_state_dict(reference).items():
                tensor.copy_(ours.state_dict()[name])
            try:
                reference(x)
            except (RuntimeError, NotImplementedError) as error:  # grouped_mm needs a kernel for this device/dtype
                print(f"skipping Qwen2MoeSparseMoeBlock[{implementation}]: {error}")
                continue
        yield ("MoE 8x top-2 + shared", f"Qwen2MoeSparseMoeBlock[{implementation}]", lambda: ours(x)[0],
               lambda reference=reference: reference(x), ours, reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", type=Path, help=f"also write the timings and provenance here (the book's: {RESULT})")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)
    hidden_size = paper_config(SIZE).hidden_size
    x = torch.randn(args.batch, args.seq, hidden_size, device=device)
    atol = 1e-4 if dtype == torch.float32 else 5e-2

    rows = []
    for name, reference_name, ours_call, reference_call, ours, reference in (
            *attention_pairs(x, device), *moe_pairs(x, device)):
        with torch.no_grad():
            torch.testing.assert_close(ours_call(), reference_call(), atol=atol, rtol=0)
        for mode, ours_step, reference_step in (
                ("fwd", no_grad(ours_call), no_grad(reference_call)),
                ("fwd+bwd", forward_and_backward(ours, ours_call), forward_and_backward(reference, reference_call))):
            ours_times, reference_times = compare(ours_step, reference_step, args.warmup, args.reps, device)
            rows.append((name, reference_name, mode, ours_times, reference_times))

    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(f"\ndevice={device} ({threads} threads), dtype={args.dtype}, torch {torch.__version__}, "
          f"x=({args.batch}, {args.seq}, {hidden_size}), {args.reps} reps after {args.warmup} warm-up\n")
    print("| module | HF reference | pass | ours median ms | ours p90 ms | HF median ms | HF p90 ms | ours/HF |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, reference_name, mode, ours_times, reference_times in rows:
        ours_median, reference_median = statistics.median(ours_times), statistics.median(reference_times)
        print(f"| {name} | {reference_name} | {mode} | {1e3 * ours_median:.1f} | {1e3 * p90(ours_times):.1f} | "
              f"{1e3 * reference_median:.1f} | {1e3 * p90(reference_times):.1f} | "
              f"{ours_median / reference_median:.2f} |")
    if args.json:
        from efficientllm_utils.records import atomic_write_text, now, provenance

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps({
            "finished": now(), "device": str(device), "threads": threads, "dtype": args.dtype,
            "torch": torch.__version__, "input_shape": [args.batch, args.seq, hidden_size], "reps": args.reps,
            "warmup": args.warmup, "provenance": provenance(),
            "rows": [{"module": name, "reference": reference_name, "pass": mode, "ours_s": ours_times,
                      "reference_s": reference_times}
                     for name, reference_name, mode, ours_times, reference_times in rows]}, indent=1))


if __name__ == "__main__":
    main()
