"""The architecture-pretraining studies: attention, positional encoding and MoE, one decoder variant per run.

Every run of a study pretrains the same small Qwen2.5-style decoder from scratch on
the same data in the same order, for the same steps, schedule and seed; only the
part under study (attention, positions, FFN) changes. Phases:

1. model: the run's ``DecoderConfig`` and a seeded model; parameters (total and
   active per token, counted), analytical forward FLOPs per token and KV-cache
   bytes per token, and the bytes a real prefill leaves in the cache (measured);
2. pretraining under the resource tracker, sampling every ``sample_interval_s``
   (the paper: 1 s), returning raw per-step samples from which AL (s/iter) and TT
   (tokens/param/s) are computed, with the tracker's AMU, PCU, AEC and energy;
3. quality: perplexity on held-out text (never trained on), the paper's quality metric;
4. decoding: fixed-length greedy generation at several context lengths, timed with
   no sampler running (``metrics.inference``), to show how each variant's decode
   cost grows with the context;
5. roofline: each training step's MFU, each context's prefill MFU and decode MBU against the machine probe's
   peaks, with their roofline-bound times and the cost model's training memory (``metrics.roofline``).

The ``cpu``/``smoke`` profiles read ``text_data``'s offline corpus with its BPE; the
``paper`` profile streams FineWeb-Edu from the Hugging Face hub (``datasets``,
imported only there) with a hub tokenizer.
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import distributed, text_data
from ..arch import EfficientDecoderForCausalLM
from ..arch.analysis import flops_per_token, kv_cache_bytes_per_token, measure_kv_cache_bytes_per_token, param_counts
from ..arch.train import StepSample, evaluate_perplexity, pretrain
from ..arch.config import DecoderConfig
from ..metrics import machine_probe, model_costs, roofline
from ..metrics.inference import generation_benchmark, inference_metrics
from ..metrics.tracker import ResourceTracker
from ..metrics.training import step_latency_metrics, tracker_metrics_per
from ..metrics.values import MetricValue
from .architecture_run import PretrainRun

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PEAK_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}  # which probed matmul peak a run's MFU is held against
# decode metrics kept per context length: name in the record <- name in metrics.inference
DECODE_METRICS = {"latency_s": "al_s", "ttft_s": "ttft_p50_s", "tpot_s": "tpot_p50_s",
                  "tokens_per_s": "it_tokens_per_s"}


@dataclass
class Data:
    """What one run reads: a tokenizer, an endless iterator of training batches, held-out batches and a prompt."""

    tokenizer: object
    train: Iterator[torch.Tensor]  # (batch_size, seq_len) int64, the same order for every variant of a study
    heldout: list[torch.Tensor]  # (b, seq_len) int64, never trained on
    prompt: torch.Tensor  # (1, max(decode_contexts)) int64 held-out tokens: the decode prompts are its prefixes
    source: str


# --- data --------------------------------------------------------------------------------------

def _heldout_batches(blocks: Iterable[torch.Tensor], eval_tokens: int) -> list[torch.Tensor]:
    out, tokens = [], 0
    for batch in blocks:
        if tokens >= eval_tokens:
            break
        out.append(batch)
        tokens += batch.numel()
    if not out:
        raise ValueError("no held-out batch could be cut")
    return out


def offline_data(p: PretrainRun) -> Data:
    """``text_data``'s corpus: training blocks in a seeded order, the fixed held-out split for perplexity."""
    tokenizer = text_data.load_tokenizer(p.vocab_size)
    train = text_data.token_blocks("train", p.seq_len, p.batch_size, seed=p.seed, vocab_size=p.vocab_size,
                                   repeat=True)
    heldout = _heldout_batches(text_data.token_blocks("heldout", p.seq_len, p.batch_size, shuffle=False,
                                                      vocab_size=p.vocab_size), p.eval_tokens)
    stream = text_data.token_ids("heldout", p.vocab_size)
    need = max(p.decode_contexts)
    if len(stream) < need:
        raise ValueError(f"the held-out split has {len(stream)} tokens, fewer than the longest decode context {need}")
    prompt = torch.from_numpy(stream[:need].astype("int64"))[None]
    return Data(tokenizer, train, heldout, prompt, "offline: text_data (Shakespeare, Wikipedia, Lee news)")


def pack_documents(texts: Iterable[str], tokenizer, seq_len: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Tokenize documents, join them with the end-of-text token and cut (batch_size, seq_len) batches."""
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    size = seq_len * batch_size
    for text in texts:
        buffer.extend(tokenizer(text, add_special_tokens=False).input_ids)
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= size:
            yield torch.tensor(buffer[:size], dtype=torch.long).view(batch_size, seq_len)
            del buffer[:size]


def hub_data(p: PretrainRun) -> Data:
    """The paper's data: ``p.dataset`` (FineWeb-Edu, ``sample-350BT``) streamed from the hub.

    The first documents of the stream, up to ``eval_tokens`` (plus the longest decode prompt), are held
    out; training reads the documents after them, in stream order, the same for every variant.
    """
    try:
        from datasets import load_dataset  # only this profile needs the hub and `datasets`
    except ImportError as err:
        raise ImportError("data='hub' needs the `datasets` package: pip install datasets") from err
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(p.tokenizer)
    if len(tokenizer) > p.vocab_size:
        raise ValueError(f"tokenizer {p.tokenizer} has {len(tokenizer)} tokens, more than vocab_size={p.vocab_size}")

    def documents(skip: int = 0) -> Iterator[str]:
        stream = load_dataset(p.dataset, p.dataset_config, split="train", streaming=True)
        return (row["text"] for row in (stream.skip(skip) if skip else stream))

    heldout, heldout_docs, tokens = [], 0, 0
    prompt_ids: list[int] = []
    for text in documents():
        ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        heldout_docs += 1
        if len(prompt_ids) < max(p.decode_contexts):
            prompt_ids += ids
        heldout += ids
        tokens += len(ids)
        if tokens >= p.eval_tokens + p.seq_len and len(prompt_ids) >= max(p.decode_contexts):
            break
    blocks = torch.tensor(heldout[: len(heldout) // p.seq_len * p.seq_len], dtype=torch.long).view(-1, p.seq_len)
    heldout_batches = _heldout_batches(blocks.split(p.batch_size), p.eval_tokens)
    prompt = torch.tensor(prompt_ids[: max(p.decode_contexts)], dtype=torch.long)[None]
    train = pack_documents(documents(skip=heldout_docs), tokenizer, p.seq_len, p.batch_size)
    return Data(tokenizer, train, heldout_batches, prompt,
                f"hub: {p.dataset} ({p.dataset_config}), first {heldout_docs} documents held out")


def load_data(p: PretrainRun) -> Data:
    return hub_data(p) if p.data == "hub" else offline_data(p)


# --- model ------------------------------------------------------------------------------------

def build_model(p: PretrainRun, tokenizer) -> EfficientDecoderForCausalLM:
    """The run's decoder, initialised from ``p.seed``, on ``p.device`` in ``p.dtype``."""
    config = p.decoder_config()
    eos = tokenizer.eos_token_id
    config.eos_token_id = config.pad_token_id = config.bos_token_id = eos
    torch.manual_seed(p.seed)
    model = EfficientDecoderForCausalLM(config).to(device=p.device, dtype=DTYPES[p.dtype])
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos
    return model


def measure_model(model: EfficientDecoderForCausalLM, p: PretrainRun,
                  data: Data) -> tuple[dict[str, MetricValue], dict]:
    """Parameters (counted), FLOPs per token and KV-cache bytes per token (formula and a real prefill)."""
    config = model.config
    counts = param_counts(model)
    dtype_bytes = next(model.parameters()).element_size()
    counted = "counted-module-parameters"
    ctx = p.seq_len
    metrics = {
        "params_total": MetricValue.measured(counts["total"], "params", counted),
        "params_active": MetricValue.measured(counts["active"], "params", f"{counted}(top-k-experts-only)"),
        "params_embedding": MetricValue.measured(counts["embedding"], "params", counted),
        # the average token of a causal block of seq_len tokens attends to (seq_len + 1) / 2 keys
        "flops_per_token": MetricValue.estimated(flops_per_token(config, (ctx + 1) / 2), "FLOP/token",
                                                 f"analytical-forward-flops(context={(ctx + 1) / 2:g})"),
        "kv_cache_bytes_per_token": MetricValue.estimated(kv_cache_bytes_per_token(config, dtype_bytes), "bytes/token",
                                                          f"analytical-formula({p.dtype})"),
    }
    for context in p.decode_contexts:
        metrics[f"decode_ctx{context}_flops_per_token"] = MetricValue.estimated(
            flops_per_token(config, context), "FLOP/token", f"analytical-forward-flops(context={context})")
    model.eval()
    measured = measure_kv_cache_bytes_per_token(model, data.prompt[:, : min(p.seq_len, data.prompt.shape[1])]
                                                 .to(p.device))
    metrics["kv_cache_bytes_per_token_measured"] = MetricValue.measured(measured, "bytes/token",
                                                                        "cache-tensor-bytes-after-prefill")
    raw = {"config": {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))},
           "param_counts": counts}
    return metrics, raw


# --- pretraining ------------------------------------------------------------------------------

def train(model: EfficientDecoderForCausalLM, p: PretrainRun,
          data: Data) -> tuple[list[StepSample], ResourceTracker | distributed.GroupTracker]:
    """Pretrain under the resource tracker; returns the raw step samples and the tracker.

    ``p.nproc > 1``: the training spans ``nproc`` processes (``distributed``: each builds the same seeded model,
    trains on its rows of every batch under ``p.parallel``); ``model`` then receives rank 0's trained weights and the
    tracker is the group's (per-rank peak memory, the slowest rank's time, the world size)."""
    if p.nproc > 1:
        return _train_group(model, p)
    with ResourceTracker(interval_s=p.sample_interval_s, use_gpu=p.device == "cuda") as tracker:
        samples = pretrain(model, data.train, steps=p.steps, lr=p.lr, warmup=p.warmup_steps, min_lr=p.min_lr,
                           weight_decay=p.weight_decay, seed=p.seed)
    return samples, tracker


def _train_group(model: EfficientDecoderForCausalLM, p: PretrainRun):
    device = next(model.parameters()).device
    model.to("cpu")  # the ranks' GPUs to themselves while they train
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "weights.pt")
        results = distributed.launch(_pretrain_rank, (p, weights), p.nproc, run_name=p.attention)
        model.load_state_dict(torch.load(weights))
    model.to(device)
    samples = distributed.merge_steps([r.steps for r in results], summed=("tokens",),
                                      averaged=("loss", "lm_loss", "aux_loss"))
    return samples, distributed.GroupTracker(results, p.parallel)


def _pretrain_rank(p: PretrainRun, weights: str) -> distributed.RankResult:
    """One rank of a multi-process pretraining (run by ``distributed.launch`` in its own process)."""
    with distributed.rank_group(p.device) as rank:
        data = load_data(p)
        fsdp_bf16 = p.parallel == "fsdp" and p.dtype == "bfloat16"  # FSDP keeps fp32 shards, computes in bf16
        model = build_model(p.model_copy(update={"device": rank.device,
                                                 "dtype": "float32" if fsdp_bf16 else p.dtype}), data.tokenizer)
        model = distributed.wrap(model, p.parallel, rank, bf16_compute=fsdp_bf16)
        blocks = (rank.shard(batch) for batch in data.train)
        with ResourceTracker(interval_s=p.sample_interval_s, use_gpu=p.device == "cuda") as tracker:
            samples = pretrain(model, blocks, steps=p.steps, lr=p.lr, warmup=p.warmup_steps, min_lr=p.min_lr,
                               weight_decay=p.weight_decay, seed=p.seed)
        distributed.save_full_weights(model, weights, rank)
        return distributed.RankResult(rank.rank, samples, tracker.metrics(), tracker.samples,
                                      distributed.peak_memory_bytes(rank, tracker), tracker.wall_s)


def training_metrics(samples: list[StepSample], total_params: int, timing_warmup_steps: int,
                     tracker: ResourceTracker | None = None) -> dict[str, MetricValue]:
    """AL, its spread, and TT from the raw step samples (the first ``timing_warmup_steps`` left out),
    plus the tracker's AMU, PCU, AEC and energy over the whole training phase.

    * AL: mean seconds per training iteration (forward + backward + optimizer step);
    * TT: tokens processed / total parameters / seconds, over the timed steps (the paper's
      "tokens per parameter per second").
    """
    out, counter = step_latency_metrics([s.seconds for s in samples], timing_warmup_steps)
    timed = samples[timing_warmup_steps:]
    seconds = [s.seconds for s in timed]
    tokens = sum(s.tokens for s in timed)
    out |= {
        "tt_tokens_per_param_s": MetricValue.measured(tokens / total_params / sum(seconds), "tokens/param/s", counter),
        "train_tokens_per_s": MetricValue.measured(tokens / sum(seconds), "tokens/s", counter),
    }
    if tracker is not None:
        out |= tracker_metrics_per(tracker, "energy_per_token_j", sum(s.tokens for s in samples), "J/token",
                                   "trained-tokens")
    return out


def measure_quality(model: EfficientDecoderForCausalLM, data: Data, samples: list[StepSample]) -> dict:
    """Held-out perplexity (the study's quality), and the start and end of the training loss."""
    heldout = [b.to(next(model.parameters()).device) for b in data.heldout]
    result = evaluate_perplexity(model, heldout)
    tail = samples[-max(1, len(samples) // 10):]
    aux = [s.aux_loss for s in tail if s.aux_loss is not None]
    return {
        "perplexity": result["perplexity"],
        "heldout_loss": result["loss"],
        "heldout_tokens": result["tokens"],
        "initial_loss": samples[0].lm_loss,
        "final_loss": sum(s.lm_loss for s in tail) / len(tail),  # mean over the last tenth of the steps
        "final_aux_loss": sum(aux) / len(aux) if aux else None,
        "trained_tokens": sum(s.tokens for s in samples),
        "data": data.source,
    }


# --- decoding ---------------------------------------------------------------------------------

def measure_decode(model: EfficientDecoderForCausalLM, p: PretrainRun,
                   data: Data) -> tuple[dict[str, MetricValue], dict]:
    """Fixed-length greedy generation (``new_tokens``) after prompts of each ``decode_contexts`` length."""
    model.eval()
    metrics: dict[str, MetricValue] = {}
    raw: dict[str, list[dict]] = {}
    for context in p.decode_contexts:
        prompt = data.prompt[:, :context].to(p.device)
        samples = generation_benchmark(model, prompt, p.new_tokens, warmup=p.decode_warmup,
                                       min_iterations=p.decode_iterations, min_seconds=p.decode_min_seconds)
        summary = inference_metrics(samples, 1, p.new_tokens)
        for ours, theirs in DECODE_METRICS.items():
            metrics[f"decode_ctx{context}_{ours}"] = summary[theirs]
        raw[str(context)] = samples
    return metrics, raw


def loss_curve(samples: list[StepSample]) -> list[dict]:
    """The raw per-step samples as plain dicts (the record keeps them: the loss curve and step times)."""
    return [asdict(s) for s in samples]



# --- against the machine's limits -------------------------------------------------------------

# transformers decoders with standard attention, whose FLOPs ``metrics.model_costs`` counts from their modules
COUNTED_HF_DECODERS = ("gpt_neox", "llama", "qwen2")


def forward_flops_per_token(model, context: float) -> float | None:
    """Analytical forward FLOPs per token: our decoder's (``arch.analysis``), a standard-attention ``transformers``
    decoder's (Pythia: ``model_costs``); None for a model without a FLOPs model here (Mamba, RWKV)."""
    if isinstance(model.config, DecoderConfig):
        return flops_per_token(model.config, context)
    if getattr(model.config, "model_type", None) in COUNTED_HF_DECODERS:
        return model_costs.flops_per_token(model, context)
    return None


def _cache_bytes(metrics: dict[str, MetricValue], context: int, extra_tokens: float) -> float:
    """Analytical cache or state bytes of one sequence after ``context + extra_tokens`` tokens: the per-context
    state of the attention-free study where the record has it, else the KV bytes per token x tokens."""
    growth = metrics["kv_cache_bytes_per_token"].value
    state = metrics.get(f"state_ctx{context}_bytes")
    return (state.value + growth * extra_tokens) if state is not None else growth * (context + extra_tokens)


def measure_roofline(model, p: PretrainRun, metrics: dict[str, MetricValue]) -> tuple[dict[str, MetricValue], dict]:
    """Training and decoding against the machine's limits, from this run's ``metrics`` (parameters, KV bytes per
    token, AL, TTFT and TPOT per context): MFU, MBU and the roofline-bound time of each phase, and the cost model's
    training memory (weights, gradients, AdamW's moments; activations not counted) beside AMU.

    * train step: 3 x the forward FLOPs of ``batch_size x seq_len`` tokens; bytes: weights, gradients and moments,
      each touched at least once; timed by AL.
    * prefill at context c: c tokens at the average causal context, the head at the last only
      (``model_costs.prefill_flops``); timed by TTFT (which includes the first step).
    * decode at context c: one token at the mean context ``c + new_tokens / 2``, reading every weight once and the
      cache; timed by TPOT."""
    probe = machine_probe.load_or_measure(p.device)
    dtype, dtype_bytes = PEAK_DTYPE[p.dtype], DTYPES[p.dtype].itemsize
    params = int(metrics["params_total"].value)
    weights = model_costs.weight_bytes_read_per_token(model, params * dtype_bytes)
    training_parts = roofline.training_memory_parts(params, dtype_bytes)
    if dtype_bytes < 4:  # training.MasterWeights: fp32 masters and their gradients, AdamW's moments of them
        training_parts |= {"fp32-masters+gradients": 8 * params, "adamw-moments": 8 * params}
    tokens = p.batch_size * p.seq_len
    forward = forward_flops_per_token(model, (p.seq_len + 1) / 2)
    flops_method = "analytical" if forward is not None else f"{type(model).__name__} has none in this project"
    train_step = roofline.Phase("train-step", flops=None if forward is None else roofline.TRAIN_FLOPS_PER_FORWARD
                                * tokens * forward, bytes=sum(training_parts.values()),
                                seconds=metrics["al_s"].value, dtype=dtype, flops_method=flops_method,
                                bytes_method="counted-params-x(weights+gradients+adamw-moments)",
                                seconds_method="al-mean")
    out = roofline.phase_metrics(train_step, probe, "train")
    phases = [train_step]
    for context in p.decode_contexts:
        prefill_flops = forward_flops_per_token(model, (context + 1) / 2)
        prefill = roofline.Phase(f"prefill-ctx{context}", flops=None if prefill_flops is None else
                                 model_costs.prefill_flops(model, prefill_flops, context, 1),
                                 bytes=weights + _cache_bytes(metrics, context, 0),
                                 seconds=metrics[f"decode_ctx{context}_ttft_s"].value, dtype=dtype,
                                 flops_method=flops_method, seconds_method="ttft-p50")
        decode = roofline.Phase(f"decode-ctx{context}",
                                flops=forward_flops_per_token(model, context + p.new_tokens / 2),
                                bytes=weights + _cache_bytes(metrics, context, p.new_tokens / 2),
                                seconds=metrics[f"decode_ctx{context}_tpot_s"].value, dtype=dtype,
                                flops_method=flops_method, bytes_method="counted-weights+analytical-cache",
                                seconds_method="tpot-p50")
        out[f"decode_ctx{context}_prefill_mfu"] = roofline.mfu(prefill, probe)
        out |= roofline.phase_metrics(decode, probe, f"decode_ctx{context}")  # decode_ctx<c>_mfu, _mbu, _bound_s
        phases += [prefill, decode]
    out["predicted_memory_gb"] = roofline.predicted_memory(training_parts, f"counted params x {dtype_bytes} bytes"
                                                           f"{' + fp32 masters' if dtype_bytes < 4 else ''}; "
                                                           "activations not counted")
    return out, {"phases": [roofline.point(ph) for ph in phases], "probe": probe, "weight_bytes_read": weights,
                 "training_memory_parts": training_parts}
