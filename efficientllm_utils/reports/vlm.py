"""The vision-language chapter's report (``book/vlm.md``): fine-tuning and quantization of a Qwen2.5-VL.

Computed from the records without importing torch: the LLM chapters' tables, leaderboards and verdict rules are
reused on the vision-language records (``reports/finetune.py`` for ``vlm_peft``, ``reports/quantization.py`` for
``vlm_quantization``), so "do the LLM findings transfer?" is answered by the very same rules; this module adds the
per-task accuracy against the majority-class baseline, the examples with each method's answer and the paper's
Table 12 losses.
"""
from __future__ import annotations

import base64

import pandas as pd

from .display import show
from .findings import findings_markdown, verdict_counts
from .load import load_study
from .paper import published_figures
from .verdicts import AGREES, CONFIDENCE, DISAGREES, INCONCLUSIVE, decide, paired_accuracy
from . import finetune as fr
from . import quantization as qr

PEFT, QUANT = "vlm_peft", "vlm_quantization"
TASK_NAMES = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "easy_vqa": "easy-VQA"}


def _tasks(table: pd.DataFrame) -> list[str]:
    """The tasks a results table has columns for (``<task>_after`` or ``<task>``), in TASK_NAMES' order."""
    return [t for t in TASK_NAMES if f"{t}_after" in table.columns or t in table.columns]


def load():
    """(fine-tuning results, quantization results)."""
    return load_study(PEFT), load_study(QUANT)


# --- fine-tuning ----------------------------------------------------------------------------------

def finetune_table(res) -> pd.DataFrame:
    """The LLM fine-tuning table, plus held-out accuracy per task before/after and each task's majority baseline."""
    table = fr.results_table(res)
    if table.empty:
        return table
    by_label = {r.label: r for r in res.ok_records}
    for task in TASK_NAMES:
        for column, key in ((f"{task}_before", f"acc_{task}_before"), (f"{task}_after", f"acc_{task}_after"),
                            (f"{task}_majority", f"majority_{task}")):
            table[column] = [by_label[label].quality.get(key, float("nan")) for label in table["label"]]
    return table


def majority_correct(quality: dict, task: str) -> tuple[list[int], list[int]] | None:
    """A fine-tuning record's per-item correctness after training on ``task``'s held-out items, and the majority-class
    baseline's on the same items (1 where the gold answer is the task's most frequent one); None for a record that
    does not hold them."""
    needed = ("correct_after", "heldout_tasks", "heldout_answers", f"majority_answer_{task}")
    if any(k not in quality for k in needed):
        return None
    rows = [n for n, t in enumerate(quality["heldout_tasks"]) if t == task]
    majority = quality[f"majority_answer_{task}"]
    return ([int(quality["correct_after"][n]) for n in rows],
            [int(quality["heldout_answers"][n] == majority) for n in rows])


def above_majority(table: pd.DataFrame, res=None) -> pd.DataFrame:
    """Per method and task: accuracy after training, the majority-class baseline, and the verdict on "above it",
    decided by the claims rule on the paired bootstrap interval over the held-out items (``verdicts.paired_accuracy``:
    the method's answers against always answering the majority class, item by item); without per-item records
    (``res`` None) the verdict is inconclusive."""
    by_label = {r.label: r for r in res.ok_records} if res is not None else {}
    rows = []
    for _, r in table.iterrows():
        for task, name in TASK_NAMES.items():
            if pd.isna(r.get(f"{task}_after")):
                continue
            pair = majority_correct(by_label[r["label"]].quality, task) if r["label"] in by_label else None
            diff = paired_accuracy(*pair) if pair else None
            rows.append({"method": r["method"], "task": name, "before": r[f"{task}_before"],
                         "after": r[f"{task}_after"], "majority": r[f"{task}_majority"],
                         "n": len(pair[0]) if pair else float("nan"),
                         "difference": str(diff) if diff else "no per-item record",
                         "verdict": decide(diff, "higher") if diff else INCONCLUSIVE})
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["above"] = frame["verdict"] == AGREES
    return frame


def majority_text(verdicts: pd.DataFrame) -> str:
    """The "above the majority class" outcome the issue asks for, over every (method, task) pair."""
    if verdicts.empty:
        return ""
    counts = verdicts["verdict"].value_counts()
    required = verdicts[verdicts["method"].isin(["full", "lora"])]
    met = bool(len(required) == 4 and (required["verdict"] == AGREES).all())
    return (f"**Above the majority-class baseline after training** (the outcome this axis requires of full fine-tuning "
            f"and LoRA on both tasks: **{'met' if met else 'not met'}**): of {len(verdicts)} (method, task) pairs, "
            + ", ".join(f"{counts.get(v, 0)} {v}" for v in (AGREES, INCONCLUSIVE, DISAGREES))
            + ". Each is decided on a paired bootstrap interval (95%) over the held-out items of the accuracy "
              "difference against always answering the most frequent answer of those same items (relative to that "
              "baseline's accuracy): agrees when the whole interval is above zero, disagrees when it is below.")


def majority_columns(verdicts: pd.DataFrame) -> pd.DataFrame:
    return show(verdicts, {"method": "method", "task": "task", "before": "before", "after": "after",
                             "majority": "majority class", "n": "items", "difference": "difference vs majority",
                             "verdict": "above majority?"})


def paper_table12(table: pd.DataFrame) -> pd.DataFrame:
    """Our final loss per method beside the paper's Table 12 losses that ``book/paper/published_figures.csv`` holds
    (vision-language models on ChatQA; only a few figures are known, second-hand)."""
    figures = published_figures()
    figures = figures[(figures["axis"] == "vision") & (figures["table"].astype(str) == "12")]
    ours = {fr.PAPER_METHOD_NAMES.get(m, m): v for m, v in zip(table.get("method", []), table.get("final_loss", []))}
    tasks = " + ".join(TASK_NAMES.get(t, t) for t in _tasks(table))
    rows = [{"paper model": f["model"], "method": f["method"], "paper's loss (ChatQA)": f["value"],
             f"this run's loss ({tasks})": ours.get(f["method"], float("nan")),
             "source": f"{f['source']} ({f['confidence']})"} for _, f in figures.iterrows()]
    return pd.DataFrame(rows)


def examples(res, per_task: int = 4) -> tuple[list[dict], pd.DataFrame]:
    """The held-out examples a record holds (image as PNG) and each method's answer after training."""
    records = res.ok_records
    if not records or not records[0].raw.get("examples"):
        return [], pd.DataFrame()
    shown = records[0].raw["examples"]
    rows = []
    for ex in shown:
        row = {"task": TASK_NAMES.get(ex["task"], ex["task"]), "question": ex["question"], "gold": ex["answer"],
               "before": ex["choices"][records[0].quality["predictions_before"][ex["item"]]]}
        for r in records:
            row[r.params["method"]] = ex["choices"][r.quality["predictions_after"][ex["item"]]]
        rows.append(row)
    return shown, pd.DataFrame(rows)


def example_figure(shown: list[dict], answers: pd.DataFrame):
    """The example images in a row, each titled with its question's gold answer."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(1, len(shown), figsize=(1.4 * len(shown), 1.9))
    for n, (ax, ex) in enumerate(zip(axes, shown)):
        ax.imshow(Image.open(io.BytesIO(base64.b64decode(ex["png_base64"]))), interpolation="nearest")
        ax.set_title(f"#{n + 1}: {ex['answer']}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def transplant_line(res) -> str:
    """How the small model was made, from the records' provenance (transplant and alignment stages)."""
    records = [r for r in res.ok_records if "vlm_transplant" in r.provenance]
    if not records:
        return ""
    t, a = records[0].provenance["vlm_transplant"], records[0].provenance["vlm_alignment"]
    loss, align, vision = a["loss_summary"], a["align"], a["vision"]
    last = loss.get("last_3_mean", loss["last"])
    embed = (f"first {align['embed_steps']} steps of {align['embed_batch_size']} train images regressing its image "
             "tokens onto the language model's embeddings of their caption's words, then " if align.get("embed_steps")
             else "")
    merger = " training the merger only" if a.get("cpu_seconds") is not None else ""  # the procedure since v3
    cpu = f" ({a['cpu_seconds'] / 60:.1f} min of CPU)" if a.get("cpu_seconds") else ""
    return (f"The base is a small `Qwen2_5_VLForConditionalGeneration`: {t['tensors_copied']} tensors of "
            f"{t['language_model']} copied into its language model, {t['biases_zeroed']} q/k/v biases set to zero; "
            f"the vision tower ({vision['depth']} blocks, width {vision['hidden_size']}, {vision['image_size']} px "
            f"images in {vision['patch_size']} px patches) and merger were aligned with the language model frozen, "
            f"{embed}{align['steps']} steps of {align['batch_size']} captioned train images through the language "
            f"model{merger} (caption loss {loss['first']:.2f} at the first of these steps, {last:.2f} at the last); "
            f"{a['seconds'] / 60:.1f} min when it was built{cpu}, cached since.")


def finetune_summary(res, table) -> str:
    if table.empty:
        return "*No fine-tuning results yet: run `make reproduce AXIS=vlm`.*"
    lines = [transplant_line(res)]
    verdicts = above_majority(table, res)
    for method in ("full", "lora"):
        g = verdicts[verdicts["method"] == method]
        if len(g):
            lines.append(f"- **{method}**: held-out accuracy after training " + "; ".join(
                f"{r['task']} {r['after']:.2f} (before {r['before']:.2f}, majority class {r['majority']:.2f} on "
                f"the same {r['n']:.0f} items; above it: **{r['verdict']}**, {r['difference']})"
                for _, r in g.iterrows()) + ".")
    best = table.loc[table["final_loss"].idxmin()]
    lines.append(f"- The lowest final training loss is {best['method']}'s ({best['final_loss']:.3f}); the fastest "
                 f"step {table.loc[table['AL_s'].idxmin(), 'method']}'s ({table['AL_s'].min():.3g} s/step). "
                 f"The LLM chapter's claims on these runs: {verdict_counts(fr.findings(res, table))}.")
    return "\n".join(line for line in lines if line)


def accuracy_columns(table: pd.DataFrame) -> pd.DataFrame:
    cols = {"method": "method", "final_loss": "final loss (nats/token)"}
    for task, name in TASK_NAMES.items():
        cols |= {f"{task}_before": f"{name} before", f"{task}_after": f"{name} after",
                 f"{task}_majority": f"{name} majority class"}
    return show(table, cols | {"answer_mass_after": "answer-set mass after"})


# --- quantization ------------------------------------------------------------------------------------

def quantization_table(res) -> pd.DataFrame:
    """The LLM quantization table (counted size, MCR, accuracy, KL, flips, costs) on the VLM records, plus per-task
    accuracy and the image prompt's time to first token."""
    table = qr.quantization_table(res)
    if table.empty:
        return table
    by_precision = {r.params["precision"]: r for r in res.ok_records}
    for task in TASK_NAMES:
        table[task] = [by_precision[p].quality.get(f"acc_{task}", float("nan")) for p in table["precision"]]
    return table


def quantization_summary(res, table) -> str:
    if table.empty:
        return "*No quantization results yet: run `make reproduce AXIS=vlm`.*"
    return qr.summary(res, table).replace("next-token KL", "answer-distribution KL").replace(" nats/token", " nats")


def quantization_columns(table: pd.DataFrame):
    cols = {"precision": "language model", "model_MB": "model (MB, counted)", "compression": "compression (x)",
            "accuracy": "accuracy", **TASK_NAMES, "kl": "KL to reference (nats)",
            "flip_rate": "flip rate", "MCR": "MCR", "TTFT_s": "TTFT with image (s)", "TPOT_s": "decode (s/token)",
            "AMU_GB": "AMU (GB)", "AEC_W": "AEC (W)"}
    return show(table, cols, qr.FORMATS)


def _reference_record(res):
    records = {r.params["precision"]: r for r in res.ok_records}
    return next((r for r in records.values() if r.params["precision"] == r.params["reference_precision"]), None), records


def quantized_model_line(res) -> str:
    """Which model the quantization study quantizes, from the reference run's provenance: a fine-tuning run with its
    adapter merged (``vlm_finetune``), else the untuned base."""
    reference, _ = _reference_record(res)
    if reference is None:
        return ""
    tuned = reference.provenance.get("vlm_finetune")
    if not tuned:
        return (f"**The quantized model is the untuned base** ({reference.provenance.get('vlm_base', 'as released')}):"
                " its flips and KL are measured on a model whose answers may carry no skill (see the reference's "
                "check against the majority class below).")
    s, loss = tuned["settings"], tuned["loss_summary"]
    how = "its adapter merged into the weights" if tuned["merged"] else "its trained weights"
    return (f"**The quantized model is the fine-tuning study's {tuned['method']} run**, {how}: {s['steps']} steps of "
            f"{s['batch_size']} questions ({', '.join(TASK_NAMES.get(t, t) for t in s['tasks'])}), lr {s['lr']:g}, "
            f"the settings of `params/vlm_peft.yaml`'s profile `{reference.params.get('finetune_profile')}`; trained "
            f"once ({tuned['cpu_seconds'] / 60:.1f} min of CPU, training loss {loss['first']:.2f} -> "
            f"{loss.get('last_3_mean', loss['last']):.2f}) and cached by those settings, so the quantization study "
            "does not read the fine-tuning study's results.")


def reference_above_majority(res) -> pd.DataFrame:
    """Per task: the reference precision's held-out accuracy against always answering the task's most frequent
    answer on the same items, decided on the paired bootstrap interval (``common.paired_accuracy``, as
    ``above_majority``); empty where the records lack the per-item answers."""
    reference, _ = _reference_record(res)
    q = reference.quality if reference is not None else {}
    if not all(k in q for k in ("correct", "answers", "majority_answer")):
        return pd.DataFrame()
    rows = []
    for task, correct in q["correct"].items():
        majority = [int(a == q["majority_answer"][task]) for a in q["answers"][task]]
        diff = paired_accuracy([int(x) for x in correct], majority)
        rows.append({"task": TASK_NAMES.get(task, task), "precision": reference.params["precision"],
                     "accuracy": sum(correct) / len(correct), "majority": sum(majority) / len(majority),
                     "n": len(correct), "difference": str(diff), "verdict": decide(diff, "higher")})
    return pd.DataFrame(rows)


def reference_majority_text(frame: pd.DataFrame) -> str:
    if frame.empty:
        return ("*The quantization records hold no per-item answers to check the reference against the majority "
                "class (recorded before they were kept).*")
    met = bool((frame["verdict"] == AGREES).all())
    return (f"**The reference is above the majority class on every task** (required, so that flips and KL are "
            f"measured on a model with skill): **{'met' if met else 'not met'}**. "
            + "; ".join(f"{r['task']}: {r['precision']} {r['accuracy']:.2f} against {r['majority']:.2f} on the same "
                        f"{r['n']} items, above it: **{r['verdict']}** ({r['difference']})" for _, r in frame.iterrows())
            + ".")


def flip_interval(flips: int, n: int) -> tuple[float, float]:
    """The 95% Wilson interval of a flip rate (``flips`` of ``n`` answers differ from the reference's)."""
    from scipy.stats import binomtest

    ci = binomtest(flips, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return float(ci.low), float(ci.high)


def against_reference(res) -> pd.DataFrame:
    """Per precision: the accuracy change against the reference on the same items (paired bootstrap interval,
    relative to the reference's accuracy) and the flip rate with its 95% Wilson interval."""
    reference, records = _reference_record(res)
    if reference is None:
        return pd.DataFrame()
    tasks = reference.params["tasks"]
    ref_correct = [int(x) for t in tasks for x in reference.quality.get("correct", {}).get(t, [])]
    rows = []
    for precision, r in records.items():
        if r is reference:
            continue
        correct = [int(x) for t in tasks for x in r.quality.get("correct", {}).get(t, [])]
        flipped = [f for t in tasks for f in r.raw.get("flipped", {}).get(t, [])]
        n, k = len(flipped), int(sum(bool(f) for f in flipped))
        low, high = flip_interval(k, n) if n else (float("nan"), float("nan"))
        change = (str(paired_accuracy(correct, ref_correct)) if correct and len(correct) == len(ref_correct)
                  else "no per-item record")
        rows.append({"precision": precision, "accuracy": r.quality.get("accuracy"),
                     "change": change, "flips": f"{k} of {n}",
                     "flip_rate": k / n if n else float("nan"),
                     "flip_interval": f"{low:.3f} to {high:.3f}" if n else "no per-item record"})
    return pd.DataFrame(rows)


def against_reference_columns(frame: pd.DataFrame):
    return show(frame, {"precision": "language model", "accuracy": "accuracy", "change":
                          "accuracy change against the reference (95% paired interval)", "flips": "answers flipped",
                          "flip_rate": "flip rate", "flip_interval": "flip rate, 95% interval (Wilson)"})


# --- what the profile costs ------------------------------------------------------------------------------

def _threads_text(threads: set) -> str:
    """"2 torch threads", "1 torch thread", "1 or 2 torch threads", "torch's default threads" from the runs' params."""
    if None in threads:
        return "torch's default threads" if threads == {None} else "differing threads"
    ordered = sorted(threads)
    return (" or ".join(str(t) for t in ordered) + " torch thread" + ("s" if ordered[-1] > 1 else "")
            + (" per run" if len(ordered) > 1 else ""))


def cpu_budget_text(peft_res, quant_res) -> str:
    """The profile's cost from the records, per study: the torch threads each run used (its params'
    ``num_threads``), the CPU seconds of each run's kernel (``process_cpu_s``; the alignment stage runs inside the
    first run that needs it, so it is part of that run's) and the wall time each run took (``duration_s``). CPU
    seconds over a run's threads are the least wall time it can take (every thread busy all the time); the recorded
    wall time is what it took on the machine and at the load the records were made at (the chapter's source note)."""
    parts, missing = [], []
    cpu_total = least_wall = wall = 0.0
    for name, res in (("fine-tuning", peft_res), ("quantization", quant_res)):
        runs = res.ok_records
        if not runs:
            continue
        cpu = {r.label: r.raw.get("process_cpu_s") for r in runs}
        missing += [f"{name} {label}" for label, v in cpu.items() if v is None]
        threads = {r.params.get("num_threads") for r in runs}
        known = [(r.raw["process_cpu_s"], r.params.get("num_threads") or 1) for r in runs
                 if r.raw.get("process_cpu_s") is not None]
        seconds = sum(r.duration_s or 0 for r in runs)
        wall += seconds
        text = f"{len(runs)} {name} runs at {_threads_text(threads)}: {seconds / 60:.1f} min of wall time"
        if known:
            cpu_total += sum(c for c, _ in known)
            least_wall += sum(c / t for c, t in known)
            text += (f", {sum(c for c, _ in known) / 60:.1f} min of CPU (the longest run {max(c for c, _ in known):.0f} "
                     f"CPU-s)")
        parts.append(text)
    if not parts:
        return ""
    align = [r.provenance.get("vlm_alignment", {}).get("cpu_seconds") for r in peft_res.ok_records]
    align = [a for a in align if a]
    text = ("**Cost of this profile** (from the records: each run's threads, its wall time and its process's CPU "
            "seconds): " + "; ".join(parts)
            + (f"; the alignment stage's {align[0] / 60:.1f} min of CPU is part of the first run's" if align else "")
            + f". In all {wall / 60:.1f} min of wall time for the runs as recorded (process start-up, Dask and the "
              f"book build come on top). The CPU time, {'at least ' if missing else ''}{cpu_total / 60:.1f} min, "
              f"over each run's threads is {'at least ' if missing else ''}{least_wall / 60:.1f} min: the least "
              "wall time on an idle machine, reached only when every thread is busy all the time.")
    if missing:
        text += f" Runs without a CPU figure (recorded before it was kept): {', '.join(missing)}."
    return text


# --- findings: do the LLM findings transfer? -----------------------------------------------------------

def transfer_text(peft_res, peft_table, quant_res, quant_table) -> str:
    """The LLM chapters' claims decided on the vision-language records by the same rules, with the majority-class
    check the issue asks for."""
    parts = []
    if len(peft_table):
        found = fr.findings(peft_res, peft_table)
        parts.append("**Fine-tuning** (the PEFT chapter's claims, on the Qwen2.5-VL runs): "
                     + verdict_counts(found) + ".")
        parts.append(findings_markdown(found, caveats=fr.caveats(peft_res, peft_table)))
        verdicts = above_majority(peft_table, peft_res)
        parts.append(majority_text(verdicts))
    if len(quant_table):
        found = qr.findings(quant_res)
        parts.append("**Quantization** (the quantization chapter's claims, on the Qwen2.5-VL's language model): "
                     + verdict_counts(found) + ".")
        parts.append(findings_markdown(found, caveats=qr.caveats(quant_res, quant_table)))
    return "\n\n".join(parts) if parts else "*No results yet.*"
