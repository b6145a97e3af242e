"""The fine-tuning study: params, the measurement procedure on a tiny model, the book's helpers, and (slow) the
smoke profile end to end with one saved adapter loaded back."""
import math

import pandas as pd
import pytest
import torch

from efficientllm_utils import cli, cpu_4bit, models
from efficientllm_utils import finetune as ft
from efficientllm_utils.params import ParamsError, expand, params_path
from efficientllm_utils.studies.finetune_run import FinetuneRun
from efficientllm_utils.records import RunContext, load_records
from efficientllm_utils.reports.load import load_study
from efficientllm_utils.reports.verdicts import INCONCLUSIVE, LATENCY_TOLERANCE, bootstrap_ratio, decide
from efficientllm_utils.reports import finetune as fr
from efficientllm_utils.studies import finetune as fts

from .conftest import assert_valued, on_cpu

TINY = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.25)
# the fields whose value may differ between the runs of one profile: the method and what method_overrides sets
PER_METHOD = {"method", "lr", "dropout"}


# --- params -----------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["cpu", "smoke", "gpu", "paper"])
def test_profiles_expand_and_change_only_the_method(profile):
    specs = expand(params_path("peft"), profile)
    methods = {s.params["method"] for s in specs}
    if profile == "cpu":
        assert methods == set(ft.METHOD_NAMES) and len(specs) == 8
    if profile == "smoke":
        assert {"lora", "qlora"} <= methods and methods - {"lora", "loraplus", "rslora", "dora", "pissa", "qlora"}
    for spec in specs:
        p = FinetuneRun.model_validate(spec.params)  # the record's params validate again (notebook, e2e check)
        assert p.method_settings().lr == p.lr and p.train_settings().steps == p.steps
        assert p.data_settings().n_heldout == p.n_heldout and p.train_settings().seed == p.data_settings().seed
    by_data = {}
    for spec in specs:
        key = (spec.params.get("model"), spec.params["dataset"])
        by_data.setdefault(key, []).append(spec.params)
    for group in by_data.values():
        differing = {f for f in group[0] if len({repr(g[f]) for g in group}) > 1}
        # a multi-process run splits its step differently (micro-batch, accumulation, processes), never its size
        per_step = {g["batch_size"] * g.get("grad_accum", 1) for g in group}
        assert len(per_step) == 1, f"{profile}: sequences per step differ between methods: {per_step}"
        allowed = PER_METHOD | {"batch_size", "grad_accum", "nproc", "parallel"}
        assert differing <= allowed, f"{profile}: {differing - allowed} change between methods"


def test_method_overrides_resolve_into_each_run():
    runs = {s.params["method"]: s.params for s in expand(params_path("peft"), "cpu")}
    assert runs["lora"]["lr"] == 1e-3 and runs["full"]["lr"] == 5e-5 and runs["loraplus"]["lr"] == 1.5e-4
    assert runs["pissa"]["dropout"] == 0.0 and runs["lora"]["dropout"] == 0.05
    assert "method_overrides" not in runs["lora"]  # the record holds the values a run used, not the mapping
    base = dict(model="smollm2-135m-instruct", steps=4, batch_size=2)
    p = FinetuneRun(**base, method="dora", method_overrides={"full": {"lr": 1.0}})
    assert p.lr == ft.MethodSettings().lr


def test_paper_profile_has_the_paper_settings():
    specs = expand(params_path("peft"), "paper")
    p = FinetuneRun.model_validate(specs[0].params)
    assert (p.rank, p.alpha, p.dropout, p.target_modules, p.loraplus_lr_ratio) == (64, 128, 0.1, "all-linear", 16)
    assert {s.params["lr"] for s in specs if s.params["method"] in ("lora", "rslora", "dora", "pissa")} == {1e-4}
    assert {s.params["model"] for s in specs} == {
        "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
        "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-14B-Instruct", "mistralai/Mistral-7B-Instruct-v0.3",
        "mistralai/Mistral-Small-24B-Instruct-2501"}
    assert {s.params["dataset"] for s in specs} == set(ft.PAPER_DATASET_IDS)
    assert {s.params["device"] for s in specs} == {"cuda"}


def test_unknown_method_names_the_field_and_the_allowed_values():
    with pytest.raises(ParamsError) as err:
        expand(params_path("peft"), overrides={"method": "adapter-x"})
    message = str(err.value)
    assert "field 'method'" in message and "adapter-x" in message
    assert all(f"'{m}'" in message for m in ft.METHOD_NAMES)


def test_bad_settings_fail_before_any_work():
    with pytest.raises(ParamsError, match=r"field 'qlora_compute_dtype'.*'bf16' or 'fp32'"):
        expand(params_path("peft"), overrides={"qlora_compute_dtype": "fp8"})
    with pytest.raises(ParamsError, match=r"field 'dataset'.*'boolq'"):
        expand(params_path("peft"), overrides={"dataset": "alpaca"})
    with pytest.raises(ParamsError, match="timing_warmup_steps"):
        expand(params_path("peft"), overrides={"steps": 1})
    with pytest.raises(ParamsError, match="field 'model'"):
        expand(params_path("peft"), overrides={"model": "no such model"})
    with pytest.raises(ParamsError, match=r"method_overrides: \['ia3'\] are not methods; allowed: lora, loraplus"):
        expand(params_path("peft"), overrides={"method_overrides": {"ia3": {"lr": 1.0}}})
    with pytest.raises(ParamsError, match=r"method_overrides.full: \['rnak'\] are not settings"):
        expand(params_path("peft"), overrides={"method_overrides": {"full": {"rnak": 4}}})


def test_cli_exits_2_on_a_bad_method(capsys):
    assert cli.main(["list", "peft", "--set", "method=prefix"]) == 2
    err = capsys.readouterr().err
    assert "field 'method'" in err and "'prefix'" in err and "'qlora'" in err


# --- the metrics from raw steps ----------------------------------------------------------------

def _step(i: int, seconds: float, samples: int = 4, tokens: int = 400) -> ft.StepRecord:
    return ft.StepRecord(step=i, loss=1.0 / i, seconds=seconds, lr=1e-3, grad_norm=1.0, samples=samples,
                         tokens=tokens, padded_tokens=tokens, loss_tokens=8, indices=[0] * samples,
                         rows=[0] * samples)


def test_al_and_st_follow_their_definitions():
    steps = [_step(1, 10.0), _step(2, 1.0), _step(3, 2.0, samples=2, tokens=100), _step(4, 3.0)]
    m = fts.training_metrics(steps, total_params=1000, timing_warmup_steps=1)
    assert m["al_s"].value == pytest.approx(2.0)  # mean of 1, 2, 3: the 10 s warm-up step left out
    assert m["al_p50_s"].value == pytest.approx(2.0) and m["al_p90_s"].value == pytest.approx(2.8)
    assert m["al_cv"].value == pytest.approx(1.0 / 2.0)  # sample std 1 / mean 2
    assert m["st_samples_per_param_s"].value == pytest.approx(10 / 1000 / 6.0)  # 4 + 2 + 4 samples in 6 s
    assert m["train_tokens_per_s"].value == pytest.approx(900 / 6.0)
    assert m["al_s"].method.startswith("measured:perf-counter") and "3-steps-after-1" in m["al_s"].method
    assert "total-params" in m["st_samples_per_param_s"].method
    with pytest.raises(ValueError, match="no timed step"):
        fts.training_metrics(steps[:1], total_params=1000, timing_warmup_steps=1)


# --- the procedure on a tiny model --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, saved: every method (qlora too) loads it fresh."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path)
    AutoTokenizer.from_pretrained(models.resolve_source("smollm2-135m-instruct")).save_pretrained(path)
    return str(path)


def tiny_params(tiny_dir, method: str) -> FinetuneRun:
    return FinetuneRun(model=tiny_dir, method=method, rank=4, alpha=8, dropout=0.0, lr=1e-2,
                       freeze_trainable_layers=1, qlora_compute_dtype="fp32", steps=4, batch_size=2,
                       schedule="constant", num_threads=1, timing_warmup_steps=1, final_loss_steps=2,
                       max_length=96, n_train=8, n_heldout=4, sample_interval_s=0.05)


@pytest.fixture(scope="module")
def tiny_runs(tiny_dir, tmp_path_factory):
    """lora and freeze through the study's phases, each written as a record of a fake profile."""
    root = tmp_path_factory.mktemp("results")
    runs = {}
    for method in ("lora", "freeze"):
        p = tiny_params(tiny_dir, method)
        data = fts.load_data(p)
        model, load_s = fts.load_base(p)
        before = fts.evaluate_base(model, data, p, root / "peft" / "tiny" / fts.BASE_EVAL_DIR, f"method={method}")
        built, counts = fts.build(model, p)
        independent = {"total": sum(x.numel() for x in {id(q): q for q in built.model.parameters()}.values()),
                       "trainable": sum(x.numel() for x in {id(q): q for q in built.model.parameters()
                                                            if q.requires_grad}.values())}
        result, tracker = fts.train(built, data, p)
        metrics = {**fts.parameter_metrics(counts),
                   **fts.training_metrics(result.steps, counts["total"], p.timing_warmup_steps, tracker)}
        after = fts.evaluate(built.model, data, p)
        ctx = RunContext(run_id=f"method={method}", study="peft", profile="tiny", label=f"method={method}",
                         result_dir=root / "peft" / "tiny" / f"method={method}", params=p.model_dump(mode="json"))
        adapter_metrics, adapter_raw = fts.save(built, ctx.result_dir / fts.ADAPTER_DIR)
        record = ctx.write({**metrics, **adapter_metrics}, fts.quality(before, after, result, data, p),
                           fts.raw(result, tracker, built, data, before, after, counts, {"load": load_s}, adapter_raw))
        runs[method] = dict(p=p, result=result, record=record, independent=independent)
    return root, runs


def test_tiny_run_metrics_come_from_its_raw_samples(tiny_runs):
    _, runs = tiny_runs
    for method, run in runs.items():
        record, steps = run["record"], run["result"].steps
        m = record.metrics
        timed = steps[1:]
        assert m["al_s"].value == pytest.approx(sum(s.seconds for s in timed) / len(timed))
        assert m["st_samples_per_param_s"].value == pytest.approx(
            sum(s.samples for s in timed) / m["params_total"].value / sum(s.seconds for s in timed))
        assert m["params_total"].value == run["independent"]["total"]
        assert m["params_trainable"].value == run["independent"]["trainable"]
        assert m["trainable_share"].value == pytest.approx(run["independent"]["trainable"] / run["independent"]["total"])
        files = record.raw["adapter_files"]
        assert m["adapter_bytes"].value == sum(files.values()) > 0
        assert m["pcu"].value is None and m["pcu"].method.startswith("unavailable:")
        assert m["aec_w"].method.split(":")[0] in ("measured", "estimated") and m["energy_j"].value > 0
        assert len(record.raw["steps"]) == 4 and record.raw["tracker_samples"]
        q = record.quality
        assert q["final_loss"] == pytest.approx(sum(s.loss for s in steps[-2:]) / 2)
        assert q["initial_loss"] == steps[0].loss and q["final_loss"] < q["initial_loss"], method
        for when in ("before", "after"):
            assert 0 <= q[f"accuracy_{when}"] <= 1 and q[f"gold_logprob_{when}"] < 0
            assert 0 < q[f"answer_mass_{when}"] <= 1 and len(q[f"predictions_{when}"]) == 4
        assert q["accuracy_change"] == q["accuracy_after"] - q["accuracy_before"]
    lora, freeze = runs["lora"]["record"], runs["freeze"]["record"]
    assert lora.quality["data_order_sha256"] == freeze.quality["data_order_sha256"]  # same rows, same order
    assert lora.quality["data_order_sha256"] == fts.sha256_of([s.rows for s in runs["lora"]["result"].steps])
    assert lora.quality["heldout_rows_sha256"] == freeze.quality["heldout_rows_sha256"]
    assert lora.quality["final_loss"] != freeze.quality["final_loss"]
    assert lora.quality["accuracy_before"] == freeze.quality["accuracy_before"]  # the same fp32 base:
    assert lora.quality["before_computed_by"] == freeze.quality["before_computed_by"] == "method=lora"  # reused
    assert not lora.raw["eval_before_reused"] and freeze.raw["eval_before_reused"]
    assert lora.raw["process_cpu_s"] > 0
    assert lora.metrics["params_trainable"].value < freeze.metrics["params_trainable"].value


def test_base_scores_are_reused_only_for_the_very_same_base(tiny_dir, tmp_path):
    p = tiny_params(tiny_dir, "lora")
    data = fts.load_data(p)
    model, _ = fts.load_base(p)
    first = fts.evaluate_base(model, data, p, tmp_path, "a")
    again = fts.evaluate_base(model, data, p, tmp_path, "b")
    assert again["reused"] and again["computed_by"] == "a" and again["scores"] == first["scores"]
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # one weight of 100k
    changed = fts.evaluate_base(model, data, p, tmp_path, "c")
    assert not changed["reused"] and changed["fingerprint"] != first["fingerprint"]
    fewer = fts.evaluate_base(model, data, p.model_copy(update={"eval_batch_tokens": 64}), tmp_path, "d")
    assert not fewer["reused"] and fewer["computed_by"] == "d"
    qlora = tiny_params(tiny_dir, "qlora")
    base4, _ = fts.load_base(qlora)
    assert not fts.evaluate_base(base4, data, qlora, tmp_path, "e")["reused"]  # the 4-bit base is another model


def test_an_answer_task_goes_through_every_phase(tiny_dir, tmp_path):
    """The cpu profile's ASDiv (items answered by a number, not chosen among choices): the base scores are cached and
    reused, training runs, and the quality record has the accuracy before and after on the same held-out items."""
    p = tiny_params(tiny_dir, "lora").model_copy(update={"dataset": "asdiv", "n_train": 4, "n_heldout": 3})
    data = fts.load_data(p)
    model, _ = fts.load_base(p)
    before = fts.evaluate_base(model, data, p, tmp_path, "a")
    assert fts.evaluate_base(model, data, p, tmp_path, "b")["reused"]
    boolq = tiny_params(tiny_dir, "lora")
    assert fts.base_fingerprint(model, fts.load_data(boolq), boolq) != before["fingerprint"]
    built, _ = fts.build(model, p)
    result, _ = fts.train(built, data, p)
    quality = fts.quality(before, fts.evaluate(built.model, data, p), result, data, p)
    assert len(quality["correct_before"]) == len(quality["correct_after"]) == 3
    assert 0.0 <= quality["accuracy_after"] <= 1.0


def test_the_4bit_base_scores_alike_on_both_kinds_of_cpu(tiny_dir, tmp_path):
    """This tiny model's layers are narrower than a 4-bit block: left alone on a CPU with AVX512-BF16, bitsandbytes
    crashed repacking them when the base was scored. QLoRA pins the dequantising kernel on every CPU."""
    p = tiny_params(tiny_dir, "qlora")
    data = fts.load_data(p)
    with cpu_4bit.emulate_cpu_without_avx512bf16():
        plain = fts.evaluate_base(fts.load_base(p)[0], data, p, None)
    with cpu_4bit.emulate_avx512bf16_cpu():
        model, _ = fts.load_base(p)
        emulated = fts.evaluate_base(model, data, p, None)
    assert emulated["scores"] == plain["scores"] and emulated["fingerprint"] == plain["fingerprint"]
    assert cpu_4bit.run_provenance(model)["cpu_4bit"]["layers_pinned"] == {"dequantize": 14}


@pytest.mark.parametrize("method, cpu", [("dora", "this"), ("qlora", "no-avx512bf16"), ("qlora", "avx512bf16")])
def test_scoring_a_merged_adapter_gives_the_unmerged_scores(tiny_dir, method, cpu):
    with on_cpu(cpu):
        _merged_scores_equal_unmerged(tiny_dir, method)


def _merged_scores_equal_unmerged(tiny_dir, method):
    p = tiny_params(tiny_dir, method)
    data = fts.load_data(p)
    model, _ = fts.load_base(p)
    built, _ = fts.build(model, p)
    ft.train_model(built.model, built.param_groups, data.data.train, p.train_settings().model_copy(
        update={"steps": 2}), data.pad_token_id)
    weights = {n: w.detach().clone() for n, w in built.model.named_parameters()}
    unmerged = ft.evaluate_heldout(built.model, data.tokenizer, data.eval_items)["scores"]
    result = fts.evaluate(built.model, data, p)
    assert result["merged_adapter"] == (method != "qlora")  # never merged into 4-bit weights
    torch.testing.assert_close(torch.tensor(result["scores"]), torch.tensor(unmerged), atol=1e-4, rtol=0)
    for name, w in built.model.named_parameters():  # unmerged again afterwards
        torch.testing.assert_close(w, weights[name], atol=1e-5, rtol=0)


def test_book_helpers_read_the_records(tiny_runs):
    root, runs = tiny_runs
    res = load_study("peft", "tiny", root)
    table = fr.results_table(res)
    assert list(table["method"]) == ["lora", "freeze"]  # the params file's order
    assert table.loc[0, "AL_s"] == runs["lora"]["record"].metrics["al_s"].value
    assert table["PCU"].isna().all() and (table["adapter_MB"] > 0).all()
    assert "same rows in the same order" in fr.data_order_line(table)
    curves = fr.loss_curves(res)
    assert len(curves) == 8 and set(curves["method"]) == {"lora", "freeze"}
    ranks = fr.leaderboard(table)
    assert set(ranks["method"]) == {"LoRA", "Freeze"} and "PCU" not in set(ranks["metric"])
    perf = ranks[ranks["metric"] == "Perf"].set_index("method")["our_rank"]
    best = table["acc_after"].max()  # our quality is held-out accuracy after training: the highest ranks first
    assert {fr.PAPER_METHOD_NAMES[m] for m, a in zip(table["method"], table["acc_after"]) if a == best} == \
        set(perf[perf == 1].index)
    changes = fr.accuracy_changes(res)  # each method against its base, paired over the same 4 items
    assert set(changes["method"]) == {"lora", "freeze"} and (changes["items"] == 4).all()
    assert set(changes["verdict"]) == {INCONCLUSIVE}  # 4 items: too few for an interval
    (board,) = fr.leaderboards(table)
    assert board.size_group == "1B-3B" and "fewer than every group" in board.why  # a tiny model: the smallest
    assert set(board.taus["metric"]) == {"Perf", "AMU", "AL", "ST", "AEC"}
    text = fr.findings_text(res, table)
    assert "Freeze has the lowest training latency" in text and "held-out accuracy on 4 items" in text
    (freeze,) = [f for f in fr.findings(res, table) if f.claim_id == "f-freeze-latency"]
    # the verdict the rule gives on the two runs' timed steps, taken from the training loop (not the records)
    timed = {m: [s.seconds for s in runs[m]["result"].steps[runs[m]["p"].timing_warmup_steps:]] for m in runs}
    lower = decide(bootstrap_ratio(timed["freeze"], timed["lora"]), "lower", LATENCY_TOLERANCE)
    assert freeze.verdict == lower and "interval" in freeze.sentence
    mixed = table.assign(data_order=["a", "b"])
    assert "did not all see the same data" in fr.data_order_line(mixed)


def test_pages_handle_a_study_without_results(tmp_path):
    res = load_study("peft", "cpu", tmp_path)
    table = fr.results_table(res)
    assert table.empty and fr.loss_curves(res).empty and fr.leaderboards(table) == []
    assert fr.findings_text(res, table) == fr.data_order_line(table) == "*No results yet.*"


# --- end to end ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_peft_smoke_profile_end_to_end(results_root):
    assert cli.main(["run", "peft", "--profile", "smoke", "--results", str(results_root)]) == 0
    records = {r.params["method"]: r for r in load_records("peft", "smoke", results_root)}
    assert set(records) == {s.params["method"] for s in expand(params_path("peft"), "smoke")}
    for method, r in records.items():
        assert r.status == "ok", r.error
        assert_valued(r.metrics, ("al_s", "al_p90_s", "st_samples_per_param_s", "amu_gb", "pcu", "aec_w", "energy_j",
                                  "peak_memory_gb", "params_trainable", "trainable_share", "adapter_bytes"))
        for name in ("final_loss", "initial_loss", "accuracy_before", "accuracy_after"):
            assert math.isfinite(r.quality[name])
        assert len(r.raw["steps"]) == r.params["steps"]
        assert (results_root / "peft" / "smoke" / r.run_id / fts.ADAPTER_DIR).is_dir()
    assert len({r.quality["data_order_sha256"] for r in records.values()}) == 1
    frame = pd.read_parquet(results_root / "peft" / "smoke" / "runs.parquet")
    assert len(frame) == len(records) and frame["al_s"].gt(0).all()
    # one run's saved adapter, applied to a fresh base, scores the held-out items as the trained model did
    lora = records["lora"]
    p = FinetuneRun.model_validate(lora.params)
    data = fts.load_data(p)
    base, _ = fts.load_base(p)
    loaded = ft.load_adapter(base, results_root / "peft" / "smoke" / lora.run_id / fts.ADAPTER_DIR)
    scores = fts.evaluate(loaded, data, p)["scores"]
    assert torch.allclose(torch.tensor(scores), torch.tensor(lora.raw["scores_after"]), atol=1e-4)
    assert not torch.allclose(torch.tensor(scores), torch.tensor(lora.raw["scores_before"]), atol=1e-2)
