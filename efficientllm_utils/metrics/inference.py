"""Timing of greedy generation with a fixed output length.

Every request generates exactly ``new_tokens`` tokens (``min_new_tokens ==
max_new_tokens``, greedy), so requests are comparable across precisions. A
streamer stamps each token as ``generate`` emits it, which gives time to first
token (prefill + first decode step) and time per output token from one call.
"""
from __future__ import annotations

import time

import torch
from transformers.generation.streamers import BaseStreamer

from .stats import repeat_until, spread_metrics, summarize
from .values import MetricValue


class TokenTimestamps(BaseStreamer):
    """Records ``perf_counter`` each time ``generate`` emits tokens (the first call is the prompt)."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued kernels (a CUDA clock read without it times launches, not work)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def pad_token_id(model) -> int | None:
    """The id ``generate`` pads with: the generation config's (first) end-of-sequence id. Chat models
    (Qwen2.5-*-Instruct, Phi-3.5, Qwen2.5-VL) list several eos ids, which transformers refuses as a pad id."""
    eos = model.generation_config.eos_token_id
    if isinstance(eos, (list, tuple)):
        return eos[0] if eos else None
    return eos


def time_one_request(model, input_ids: torch.Tensor, new_tokens: int, model_inputs: dict | None = None) -> dict:
    """One fixed-length greedy generation; returns its raw timings in seconds. ``model_inputs``: inputs beyond the
    text that ``generate`` passes on (a vision-language model's ``pixel_values``, ``image_grid_thw``, ...)."""
    streamer = TokenTimestamps()
    device = input_ids.device
    synchronize(device)
    start = time.perf_counter()
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            streamer=streamer, pad_token_id=pad_token_id(model),
                            **(model_inputs or {}))
    synchronize(device)
    end = time.perf_counter()
    generated = output.shape[1] - input_ids.shape[1]
    if generated != new_tokens:
        raise RuntimeError(f"generated {generated} tokens, expected exactly {new_tokens}")
    token_stamps = streamer.stamps[1:]  # drop the prompt echo
    ttft = token_stamps[0] - start
    tpot = (end - token_stamps[0]) / (new_tokens - 1) if new_tokens > 1 else float("nan")
    return {"latency_s": end - start, "ttft_s": ttft, "tpot_s": tpot}


def generation_benchmark(model, input_ids: torch.Tensor, new_tokens: int, *, warmup: int = 1,
                         min_iterations: int = 5, min_seconds: float = 5.0, max_iterations: int = 200,
                         model_inputs: dict | None = None) -> list[dict]:
    """Raw per-request timings under the dual stop rule (>= min_iterations and >= min_seconds)."""
    with torch.no_grad():
        return repeat_until(lambda: time_one_request(model, input_ids, new_tokens, model_inputs), warmup=warmup,
                            min_iterations=min_iterations, min_seconds=min_seconds, max_iterations=max_iterations)


def inference_metrics(samples: list[dict], batch_size: int, new_tokens: int) -> dict[str, MetricValue]:
    """AL (s/request), latency percentiles and CV, TTFT, TPOT and IT (tokens/s) from raw samples."""
    latency = summarize([s["latency_s"] for s in samples])
    ttft = summarize([s["ttft_s"] for s in samples])
    counter = "perf-counter"
    out = {
        "al_s": MetricValue.measured(latency["mean"], "s/request", counter),
        **spread_metrics(latency, "latency", "s", counter, percentiles=(50, 90, 99)),
        "ttft_p50_s": MetricValue.measured(ttft["p50"], "s", "perf-counter+streamer"),
        "it_tokens_per_s": MetricValue.measured(
            batch_size * new_tokens * len(samples) / sum(s["latency_s"] for s in samples), "tokens/s", counter),
    }
    if new_tokens > 1:
        out["tpot_p50_s"] = MetricValue.measured(summarize([s["tpot_s"] for s in samples])["p50"], "s",
                                                 "perf-counter+streamer")
    return out
