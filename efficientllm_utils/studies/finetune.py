"""The fine-tuning study: one method on one base model, measured in four phases.

Every run of a profile starts from the same base weights and trains on the same examples
in the same order, for the same steps, with the same seed and schedule; only the method
(and its peak lr, ``method_overrides`` in ``params/peft.yaml``) changes. Phases:

1. data and base: the tokenizer, the instruction data (ASDiv or BoolQ as a chat task, or one of
   the paper's SFT sets) and the base model (fp32, or 4-bit for QLoRA);
2. held-out accuracy BEFORE training, on items never trained on (the held-out split): ASDiv's by
   greedy exact match of the number, BoolQ's multiple-choice items by log-likelihood like
   lm-evaluation-harness, on the base that run
   trains (QLoRA's is the 4-bit base); a run whose base fingerprint (weights, items, scoring
   code and packages) matches an earlier run's reuses its scores and says so;
3. training under the resource tracker (sampling every ``sample_interval_s``, the paper's
   1 s): raw per-step samples (loss, seconds, sequences, tokens, example rows) from which the
   paper's metrics are computed: its quality = final training loss (mean of the last
   ``final_loss_steps`` steps; recorded, while the chapter decides quality on held-out accuracy),
   AL (s/iter), ST (samples / parameter / s), with AMU, PCU, AEC and energy from the tracker;
4. held-out accuracy AFTER training, then the adapter (or the trained weights of freeze and
   full) saved next to the record, its bytes on disk counted.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from pathlib import Path

import psutil
import torch

from .. import distributed
from .. import finetune as ft
from .. import score_cache
from ..finetune.methods import cleanup, is_4bit
from ..metrics.tracker import ResourceTracker
from ..metrics.training import step_latency_metrics, tracker_metrics_per
from ..metrics.values import MetricValue
from .finetune_run import FinetuneRun

ADAPTER_DIR = "adapter"  # under the run's result directory
BASE_EVAL_DIR = ".base_eval"  # beside the runs of a profile: base-model scores by base fingerprint


@dataclass
class Data:
    tokenizer: object
    pad_token_id: int
    data: ft.InstructionData  # training examples (and the held-out rows of the same source)
    eval_items: list  # quality.MCItem: held-out multiple-choice items, never trained on
    eval_source: str
    seconds: float


def sha256_of(value) -> str:
    """Short content hash of a JSON-able value (here: the rows a run trained on, in order)."""
    return hashlib.sha256(json.dumps(value, separators=(",", ":")).encode()).hexdigest()[:16]


# --- phase 1: data and base ----------------------------------------------------------------

def load_data(p: FinetuneRun) -> Data:
    """Tokenizer, training data and held-out items. BoolQ brings its own held-out items; with one of the
    paper's SFT sets (no gold choice) the held-out items are BoolQ's, so accuracy is on a task never trained on."""
    from transformers import AutoTokenizer

    from ..models import resolve_source

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(p.model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = ft.build_dataset(tokenizer, p.data_settings())
    if data.heldout_items:
        items, source = data.heldout_items, f"{data.meta['dataset']}, held-out split"
    else:
        boolq = ft.DataSettings(max_length=p.max_length, n_heldout=p.n_heldout, seed=p.seed)
        items, source = ft.build_boolq(tokenizer, boolq).heldout_items, "BoolQ held-out split (not trained on)"
    return Data(tokenizer, pad, data, items, source, time.perf_counter() - t0)


def load_base(p: FinetuneRun):
    """The base model this run's method starts from (fp32; QLoRA: 4-bit); returns (model, seconds)."""
    t0 = time.perf_counter()
    with ft.threads(p.num_threads):
        model = ft.load_base_model(p.model, p.method, p.method_settings(), p.device)
    return model, time.perf_counter() - t0


# --- phases 2 and 4: held-out accuracy -----------------------------------------------------------

@contextmanager
def merged_adapter(model):
    """A LoRA-family adapter merged into the float weights for a block (then unmerged): the same function in eval
    mode, without the adapter's extra matmuls per layer, nor DoRA's second pass through each base layer. QLoRA's
    adapter stays apart: merging into 4-bit weights would re-quantise them. Yields whether it merged."""
    from peft import PeftModel

    merge = isinstance(model, PeftModel) and not is_4bit(model)
    if merge:
        model.merge_adapter()
    try:
        yield merge
    finally:
        if merge:
            model.unmerge_adapter()


def evaluate(model, data: Data, p: FinetuneRun) -> dict:
    """Held-out accuracy with its standard error, the gold answer's log-probability, the probability mass on
    the two answers (does the model answer in the expected format?) and the share of "yes" predictions."""
    t0 = time.perf_counter()
    with merged_adapter(model) as merged:
        result = ft.evaluate_heldout(model, data.tokenizer, data.eval_items, num_threads=p.num_threads,
                                     max_batch_tokens=p.eval_batch_tokens)
    # the probability of answering within the answer set (BoolQ: exactly yes or no); of the exact answer for
    # exact-answer items (one "choice": the gold answer)
    result["answer_mass"] = sum(sum(math.exp(s) for s in scores) for scores in result["scores"]) / result["n"]
    result["merged_adapter"] = merged
    result["seconds"] = time.perf_counter() - t0
    return result


# what the held-out scores of a model depend on besides its weights and the items: this code and these packages
_SCORING_CODE = ("quality.py", "finetune/train.py", "studies/finetune.py")
_SCORING_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes")


def base_fingerprint(model, data: Data, p: FinetuneRun) -> str:
    """A hash of everything the base model's held-out scores depend on (``score_cache.fingerprint``): every
    tensor of its state, the items, the scoring settings, the scoring code and the package versions."""
    inputs = {"items": [astuple(i) for i in data.eval_items],  # choice items and answer items alike
              "settings": {k: getattr(p, k) for k in ("eval_batch_tokens", "num_threads", "device")}}
    return score_cache.fingerprint(model, inputs, _SCORING_CODE, _SCORING_PACKAGES)


def evaluate_base(model, data: Data, p: FinetuneRun, cache_dir: Path | None, run_label: str = "manual") -> dict:
    """Held-out scores of the base model BEFORE training. Every run of a profile but QLoRA starts from the same
    fp32 weights, so an earlier run's scores are reused when ``base_fingerprint`` (the very same weights, items,
    scoring settings, code and packages) matches: the same deterministic computation, not an assumption. The
    result says which run computed it (``computed_by``) and whether this run did (``reused``); ``cache_dir=None``
    always computes."""
    return score_cache.cached(base_fingerprint(model, data, p), lambda: evaluate(model, data, p), cache_dir,
                              run_label)


# --- phase 3: training -----------------------------------------------------------------------

def build(model, p: FinetuneRun) -> tuple[ft.BuiltMethod, dict]:
    """The method on the base model (seeded: LoRA's A init, PiSSA's randomised SVD); its parameter counts."""
    torch.manual_seed(p.seed)
    with ft.threads(p.num_threads):
        built = ft.build_method(p.method, model, p.method_settings())
    return built, ft.trainable_parameters(built.model)


def train(built: ft.BuiltMethod, data: Data,
          p: FinetuneRun) -> tuple[ft.TrainResult, ResourceTracker | distributed.GroupTracker]:
    """The shared loop under the resource tracker; returns the raw steps and the tracker.

    ``p.nproc > 1`` (full fine-tuning): the training spans ``nproc`` processes (``distributed``: each loads the same
    base and trains on its rows of every micro-batch under ``p.parallel``); ``built.model`` then receives rank 0's
    trained weights and the tracker is the group's (per-rank peak memory, the slowest rank's time, world size).
    Run models without ``ParallelSettings`` (the VLM's) train in one process."""
    if isinstance(p, distributed.ParallelSettings) and p.nproc > 1:
        return _train_group(built, p)
    with ResourceTracker(interval_s=p.sample_interval_s, use_gpu=p.device == "cuda") as tracker:
        result = ft.train_model(built.model, built.param_groups, data.data.train, p.train_settings(),
                                data.pad_token_id)
    return result, tracker


def _train_group(built: ft.BuiltMethod, p: FinetuneRun):
    device = next(built.model.parameters()).device
    built.model.to("cpu")  # the ranks' GPUs to themselves while they train
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "weights.pt")
        results = distributed.launch(_finetune_rank, (p, weights), p.nproc, run_name=p.method)
        built.model.load_state_dict(torch.load(weights))
    built.model.to(device)
    first = results[0].extra["result"]
    steps = distributed.merge_steps([r.steps for r in results], summed=("loss",))
    wall = max(r.train_s for r in results)
    return ft.TrainResult(steps, first.settings, wall, first.meta), distributed.GroupTracker(results, p.parallel)


def _finetune_rank(p: FinetuneRun, weights: str) -> distributed.RankResult:
    """One rank of a multi-process fine-tuning (run by ``distributed.launch`` in its own process)."""
    with distributed.rank_group(p.device) as rank:
        p = p.model_copy(update={"device": rank.device})
        data = load_data(p)
        model, _ = load_base(p)
        built, _ = build(model, p)
        names = {id(param): name for name, param in built.model.named_parameters()}
        groups = [[names[id(param)] for param in g["params"]] for g in built.param_groups]
        model = distributed.wrap(built.model, p.parallel, rank, bf16_compute=False)
        current = dict(distributed.unwrapped(model).named_parameters())  # FSDP replaced them by sharded ones
        param_groups = [{**g, "params": [current[n] for n in names_]} for g, names_ in zip(built.param_groups, groups)]
        with ResourceTracker(interval_s=p.sample_interval_s, use_gpu=p.device.startswith("cuda")) as tracker:
            result = ft.train_model(model, param_groups, data.data.train, p.train_settings(), data.pad_token_id,
                                    rank=rank)
        distributed.save_full_weights(model, weights, rank)
        return distributed.RankResult(rank.rank, result.steps, tracker.metrics(), tracker.samples,
                                      distributed.peak_memory_bytes(rank, tracker), result.seconds,
                                      extra={"result": result})


def training_metrics(steps: list[ft.StepRecord], total_params: int, timing_warmup_steps: int,
                     tracker: ResourceTracker | None = None) -> dict[str, MetricValue]:
    """The paper's training metrics from the raw steps, the first ``timing_warmup_steps`` left out:

    * AL: mean seconds per training iteration (forward + backward + clipping + optimizer step), with
      its median, p90 and coefficient of variation;
    * ST: training samples (sequences) / total parameters / seconds over the timed steps; the
      parameter count is the whole model's (base + adapter, tied embedding once, 4-bit weights by
      their logical count), the same base for every method;

    plus samples/s and tokens/s, and the tracker's AMU, peak memory, PCU, AEC and energy over the
    whole training phase (warm-up step included).
    """
    out, counter = step_latency_metrics([s.seconds for s in steps], timing_warmup_steps)
    timed = steps[timing_warmup_steps:]
    seconds = sum(s.seconds for s in timed)
    samples = sum(s.samples for s in timed)
    out |= {
        "st_samples_per_param_s": MetricValue.measured(samples / total_params / seconds, "samples/param/s",
                                                       f"{counter}/total-params"),
        "train_samples_per_s": MetricValue.measured(samples / seconds, "samples/s", counter),
        "train_tokens_per_s": MetricValue.measured(sum(s.tokens for s in timed) / seconds, "tokens/s", counter),
    }
    if tracker is not None:
        out |= tracker_metrics_per(tracker, "energy_per_sample_j", sum(s.samples for s in steps), "J/sample",
                                   "trained-samples")
    return out


def parameter_metrics(counts: dict) -> dict[str, MetricValue]:
    how = "counted-parameters(requires_grad;tied-once;4-bit-by-logical-count)"
    return {
        "params_total": MetricValue.measured(counts["total"], "params", how),
        "params_trainable": MetricValue.measured(counts["trainable"], "params", how),
        "trainable_share": MetricValue.measured(counts["share"], "fraction", how),
    }


# --- phase 4: the adapter --------------------------------------------------------------------

def save(built: ft.BuiltMethod, directory: Path) -> tuple[dict[str, MetricValue], dict]:
    """Save what the fine-tuning changed (PiSSA: converted to a plain LoRA adapter on the original base);
    returns its bytes on disk as a metric, and the files and seconds."""
    t0 = time.perf_counter()
    size = ft.save_adapter(built.model, directory, built.method)
    seconds = time.perf_counter() - t0
    cleanup(built)
    files = {str(f.relative_to(directory)): f.stat().st_size for f in sorted(directory.rglob("*")) if f.is_file()}
    return ({"adapter_bytes": MetricValue.measured(size, "bytes", "bytes-on-disk(save_adapter)")},
            {"adapter_dir": str(directory), "adapter_files": files, "save_s": seconds})


# --- the record ------------------------------------------------------------------------------

def quality(before: dict, after: dict, result: ft.TrainResult, data: Data, p: FinetuneRun) -> dict:
    """The paper's quality (final training loss) and the held-out accuracy before and after, with the data
    fingerprints that show every run of a profile trained on the same rows in the same order."""
    losses = result.losses
    k = min(p.final_loss_steps, len(losses))
    out = {
        "final_loss": sum(losses[-k:]) / k,
        "initial_loss": losses[0],
        "final_loss_steps": k,
        "eval_items": data.eval_source,
        "n_heldout": before["n"],
        "before_computed_by": before.get("computed_by", "this run"),  # an earlier run with the same base fingerprint
        "base_fingerprint": before.get("fingerprint"),
        "data_order_sha256": sha256_of([s.rows for s in result.steps]),
        "heldout_rows_sha256": sha256_of([(i.context, i.gold if hasattr(i, "gold") else i.answer)
                                          for i in data.eval_items]),  # a choice item's gold index, else its answer
    }
    for when, ev in (("before", before), ("after", after)):
        out.update({f"accuracy_{when}": ev["accuracy"], f"accuracy_{when}_stderr": ev["stderr"],
                    f"gold_logprob_{when}": ev["gold_logprob"], f"answer_mass_{when}": ev["answer_mass"],
                    f"yes_share_{when}": ev["first_choice_share"], f"predictions_{when}": ev["predictions"],
                    f"correct_{when}": ev["correct"]})  # per item: paired comparisons between runs
    out["accuracy_change"] = after["accuracy"] - before["accuracy"]
    return out


def param_dtypes(model) -> dict[str, int]:
    """Parameter count per (storage dtype, trainable or frozen)."""
    out: dict[str, int] = {}
    for q in model.parameters():
        key = f"{str(q.dtype).removeprefix('torch.')}-{'trainable' if q.requires_grad else 'frozen'}"
        out[key] = out.get(key, 0) + q.numel()
    return out


def raw(result: ft.TrainResult, tracker: ResourceTracker, built: ft.BuiltMethod, data: Data, before: dict,
        after: dict, counts: dict, timings: dict, adapter: dict) -> dict:
    return {
        "steps": result.to_records(),  # the whole loss curve, seconds, samples, tokens, example rows per step
        "tracker_samples": tracker.samples,
        "description": built.description,
        "param_dtypes": param_dtypes(built.model),  # frozen weights as loaded, trainable ones as masters
        "train_autocast": str(ft.train.autocast_dtype(built.model)).removeprefix("torch."),  # None: none
        "train_settings": result.settings,
        "data": data.data.meta,
        "param_counts": counts,
        "scores_before": before["scores"], "scores_after": after["scores"],
        "timings_s": {**timings, "data": data.seconds, "eval_before": before["seconds"],
                      "eval_after": after["seconds"], "train_loop": result.seconds},
        "eval_before_reused": bool(before.get("reused")),
        # CPU seconds this process (the run's kernel: imports, loading, scoring, training) used so far: about the
        # wall time the run needs at 1 thread on an idle machine, whatever the load was here
        "process_cpu_s": sum(psutil.Process().cpu_times()[:2]),
        **adapter,
    }



# --- against the machine's limits -------------------------------------------------------------

def _compute_dtype(model, p: FinetuneRun) -> str:
    """The dtype the training matmuls run in: QLoRA's ``qlora_compute_dtype``, else the base's float dtype."""
    if p.method == "qlora":
        return p.qlora_compute_dtype
    if ft.train.autocast_dtype(model) is not None:  # a GPU: bf16 autocast over fp32 masters
        return "bf16"
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(model.dtype, "fp32")


def measure_roofline(built: ft.BuiltMethod, p: FinetuneRun, steps: list[ft.StepRecord], trainable: int,
                     metrics: dict[str, MetricValue]) -> tuple[dict[str, MetricValue], dict]:
    """Each training step against the machine's limits: MFU (analytical FLOPs of the step's padded tokens over AL,
    against the probed matmul peak of the compute dtype), MBU and the roofline-bound time, and the cost model's
    memory (counted weights + gradients and AdamW's two moments of the trainable parameters) beside AMU.

    FLOPs per padded token: the forward (``model_costs.flops_per_token``, adapters' layers included, at the average
    causal context of the mean padded length), the backward's input gradients through the part of the model above
    its lowest trainable weight and the weight gradients of the trainable parameters only (``2 x trainable``):
    ``(1 + share) x forward + 2 x trainable``, ``share`` from ``model_costs.backward_share`` (1 for LoRA and full
    fine-tuning, the top layers' share for Freeze, whose backward stops there)."""
    from ..metrics import machine_probe, model_costs, roofline
    from ..precisions.counting import count_model_bytes

    model = built.model
    with ft.threads(p.num_threads):  # the peak at the thread count the run trained with
        probe = machine_probe.load_or_measure(p.device)
    timed = steps[p.timing_warmup_steps:] or steps
    tokens = sum(s.padded_tokens for s in timed) / len(timed)
    length = sum(s.padded_tokens / s.samples for s in timed) / len(timed)
    forward = model_costs.flops_per_token(model, (length + 1) / 2)
    weights = count_model_bytes(model)["total_bytes"]
    optimizer_parts = {k: v for k, v in roofline.training_memory_parts(trainable, 4).items() if k != "weights"}
    step = roofline.Phase("train-step", flops=tokens * ((1 + model_costs.backward_share(model)) * forward
                                                       + 2 * trainable),
                          bytes=weights + sum(optimizer_parts.values()), seconds=metrics["al_s"].value,
                          dtype=_compute_dtype(model, p), bytes_method="counted-weights+trainable-x(gradients+moments)",
                          seconds_method="al-mean")
    out = roofline.phase_metrics(step, probe, "train")
    out["predicted_memory_gb"] = roofline.predicted_memory({"weights": weights, **optimizer_parts},
                                                           "counted weights; float32 gradients and AdamW moments of "
                                                           "the trainable parameters; activations not counted")
    return out, {"phases": [roofline.point(step)], "probe": probe, "tokens_per_step": tokens,
                 "mean_padded_length": length}
