"""The architecture-pretraining studies: params, the measurement procedure on a tiny model, the book's helpers
(the three smoke profiles end to end, on two backbones, are in test_two_models.py)."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from efficientllm_utils.arch.train import StepSample
from efficientllm_utils.params import ParamsError, expand, params_path
from efficientllm_utils.studies.architecture_run import PretrainRun
from efficientllm_utils.reports import architecture as ar
from efficientllm_utils.reports import verdicts
from efficientllm_utils.reports.display import methods_legend, pareto_front
from efficientllm_utils.reports.load import StudyResults, load_study
from efficientllm_utils.reports.paper import paper_ranks
from efficientllm_utils.reports.verdicts import within_group_spread
from efficientllm_utils.studies import architecture as arch

STUDIES = {"attention": "attention", "positional_encoding": "position", "moe": "variant"}
# what may differ between the runs of one study's profile: the part under study
SWAPPED = {"attention": {"attention"}, "positional_encoding": {"position"},
           "moe": {"variant", "ffn", "intermediate_size", "n_experts", "moe_top_k", "moe_intermediate_size", "size",
                   "seed"}}  # the cpu profile's seed runs of the reference model (the perplexity noise)


# --- params -----------------------------------------------------------------------------------

@pytest.mark.parametrize("study", STUDIES)
@pytest.mark.parametrize("profile", ["cpu", "smoke", "gpu", "paper"])
def test_profiles_expand_and_change_only_the_part_under_study(study, profile):
    specs = expand(params_path(study), profile)
    assert len(specs) >= 2
    for spec in specs:
        PretrainRun.model_validate(spec.params).decoder_config()  # every run's model can be built
    fields = set(specs[0].params)
    differing = {f for f in fields if len({repr(s.params[f]) for s in specs}) > 1}
    allowed = SWAPPED[study] | ({"size"} if profile == "paper" else set())
    assert differing <= allowed, f"{study}/{profile}: {differing - allowed} change between runs"


def test_gpu_profiles_use_the_papers_shape_offline_in_bf16_on_cuda():
    for study in STUDIES:
        for spec in expand(params_path(study), "gpu"):
            p = PretrainRun.model_validate(spec.params)
            assert (p.size, p.data, p.tokenizer, p.dtype, p.device) == ("0.5B", "offline", "offline-bpe", "bfloat16",
                                                                        "cuda")
            assert p.decoder_config().hidden_size == 896 and p.steps * p.batch_size * p.seq_len >= 2_000_000


def test_cpu_profiles_share_data_order_steps_and_shape():
    shared = ("seed", "seq_len", "batch_size", "steps", "lr", "vocab_size", "hidden_size", "n_layers", "n_heads",
              "decode_contexts", "new_tokens")
    values = {study: {k: expand(params_path(study), "cpu")[0].params[k] for k in shared} for study in STUDIES}
    assert values["attention"] == values["positional_encoding"] == values["moe"]


def test_bad_attention_names_the_field_and_the_allowed_values():
    with pytest.raises(ParamsError) as err:
        expand(params_path("attention"), overrides={"attention": "sparse"})
    message = str(err.value)
    assert "field 'attention'" in message and "sparse" in message
    assert all(f"'{kind}'" in message for kind in ("mha", "gqa", "mqa", "mla", "nsa"))


def test_architecture_rules_fail_before_any_work():
    with pytest.raises(ParamsError, match=r"position='relative' is not allowed for attention='nsa'.*'rope'"):
        expand(params_path("positional_encoding"), overrides={"attention": "nsa"})
    with pytest.raises(ParamsError, match="field 'position'"):
        expand(params_path("positional_encoding"), overrides={"position": "alibi"})
    with pytest.raises(ParamsError, match="give either size"):
        expand(params_path("attention"), overrides={"hidden_size": None})
    with pytest.raises(ParamsError, match="timing_warmup_steps"):
        expand(params_path("moe"), overrides={"steps": 5})


def test_unknown_variant_names_the_profile_variants(params_file):
    path = params_file("""
study: moe
default_profile: a
profiles:
  a:
    description: test
    hardware: any
    fixed: {hidden_size: 32, n_layers: 1, n_heads: 4, intermediate_size: 64}
    variants:
      dense: {ffn: dense}
      sparse: {ffn: moe, n_experts: 4}
    grid: {variant: [dense, sparse, huge]}
""")
    with pytest.raises(ParamsError, match=r"field 'variant': 'huge' is not one of \['dense', 'sparse'\]"):
        expand(path)


def test_variants_bundle_several_fields(params_file):
    path = params_file("""
study: moe
default_profile: a
profiles:
  a:
    description: test
    hardware: any
    fixed: {hidden_size: 32, n_layers: 1, n_heads: 4, intermediate_size: 64}
    variants:
      dense: {ffn: dense}
      sparse: {ffn: moe, n_experts: 4, moe_top_k: 1}
    grid: {variant: [dense, sparse]}
""")
    dense, sparse = expand(path)
    assert (dense.params["ffn"], sparse.params["ffn"]) == ("dense", "moe")
    assert sparse.params["n_experts"] == 4 and sparse.label == "variant=sparse"


def test_kv_heads_follow_the_attention_kind():
    base = dict(hidden_size=64, n_layers=1, n_heads=4, intermediate_size=128)
    heads = {kind: PretrainRun(attention=kind, **base).decoder_config().n_kv_heads
             for kind in ("mha", "gqa", "mqa", "mla", "nsa")}
    assert heads == {"mha": 4, "gqa": 2, "mqa": 1, "mla": 4, "nsa": 2}
    # the longest decode fits the learnable position table
    run = PretrainRun(position="learnable", decode_contexts=[16, 300], new_tokens=8, seq_len=64, **base)
    assert run.decoder_config().max_position_embeddings == 308


# --- the measurement procedure ------------------------------------------------------------------

def _sample(step, seconds, tokens=64, loss=5.0):
    return StepSample(step=step, loss=loss, lm_loss=loss, aux_loss=None, lr=1e-3, grad_norm=1.0, seconds=seconds,
                      tokens=tokens)


def test_al_and_tt_follow_their_definitions_from_the_raw_steps():
    samples = [_sample(0, 9.0), _sample(1, 5.0), _sample(2, 1.0), _sample(3, 2.0), _sample(4, 3.0, tokens=128)]
    metrics = arch.training_metrics(samples, total_params=1000, timing_warmup_steps=2)
    assert metrics["al_s"].value == pytest.approx(2.0)  # mean of 1, 2, 3: warm-up steps left out
    assert metrics["al_p50_s"].value == pytest.approx(2.0)
    assert metrics["al_cv"].value == pytest.approx(1.0 / 2.0)  # sample std 1 / mean 2
    assert metrics["tt_tokens_per_param_s"].value == pytest.approx((64 + 64 + 128) / 1000 / 6.0)
    assert metrics["train_tokens_per_s"].value == pytest.approx(256 / 6.0)
    assert metrics["al_s"].method.startswith("measured:perf-counter")
    with pytest.raises(ValueError, match="no timed step"):
        arch.training_metrics(samples, 1000, timing_warmup_steps=5)


@pytest.fixture(scope="module")
def tiny_run():
    """The attention smoke profile's MLA run, shortened: data, model, costs, 4 training steps, quality, decoding."""
    spec = next(s for s in expand(params_path("attention"), "smoke") if s.params["attention"] == "mla")
    p = PretrainRun.model_validate({**spec.params, "steps": 4, "timing_warmup_steps": 1, "sample_interval_s": 0.05})
    data = arch.load_data(p)
    model = arch.build_model(p, data.tokenizer)
    model_metrics, model_raw = arch.measure_model(model, p, data)
    samples, tracker = arch.train(model, p, data)
    train_metrics = arch.training_metrics(samples, model_metrics["params_total"].value, p.timing_warmup_steps, tracker)
    quality = arch.measure_quality(model, data, samples)
    decode_metrics, decode_raw = arch.measure_decode(model, p, data)
    return p, model, samples, model_metrics, train_metrics, quality, decode_metrics, decode_raw


def test_tiny_run_metrics_come_from_its_raw_samples(tiny_run):
    p, model, samples, model_metrics, train_metrics, quality, decode_metrics, decode_raw = tiny_run
    assert len(samples) == p.steps
    timed = samples[p.timing_warmup_steps:]
    seconds = [s.seconds for s in timed]
    assert train_metrics["al_s"].value == pytest.approx(sum(seconds) / len(seconds))
    total = sum(q.numel() for q in model.parameters())
    assert model_metrics["params_total"].value == total
    assert train_metrics["tt_tokens_per_param_s"].value == pytest.approx(
        sum(s.tokens for s in timed) / total / sum(seconds))
    assert all(s.tokens == p.batch_size * p.seq_len for s in samples)
    # the tracker's metrics, each saying how it was obtained; PCU is unavailable without a GPU
    for name in ("amu_gb", "pcu", "aec_w", "energy_j", "train_wall_s"):
        assert name in train_metrics
    if not torch.cuda.is_available():
        assert train_metrics["pcu"].value is None and train_metrics["pcu"].method.startswith("unavailable:")
    # the cache a real prefill leaves matches the formula, at the model's dtype
    assert model_metrics["kv_cache_bytes_per_token_measured"].value == model_metrics["kv_cache_bytes_per_token"].value
    assert model_metrics["params_active"].value == model_metrics["params_total"].value  # dense FFN


def test_tiny_run_quality_and_decoding(tiny_run):
    p, _, samples, _, _, quality, decode_metrics, decode_raw = tiny_run
    assert quality["perplexity"] == pytest.approx(math.exp(quality["heldout_loss"]))
    assert quality["heldout_tokens"] >= p.eval_tokens - p.batch_size * p.seq_len
    assert quality["initial_loss"] == samples[0].lm_loss
    assert set(decode_raw) == {str(c) for c in p.decode_contexts}
    for context in p.decode_contexts:
        requests = decode_raw[str(context)]
        assert len(requests) == p.decode_iterations
        assert decode_metrics[f"decode_ctx{context}_latency_s"].value == pytest.approx(
            sum(r["latency_s"] for r in requests) / len(requests))
        assert decode_metrics[f"decode_ctx{context}_tokens_per_s"].value > 0


def test_pack_documents_cuts_full_batches_across_documents():
    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": [int(c) for c in text]})()

    batches = list(arch.pack_documents(["123", "4567", "89"], Tok(), seq_len=3, batch_size=2))
    # documents joined by end-of-text (0), cut into batches of 2 x 3 across document boundaries
    assert [b.tolist() for b in batches] == [[[1, 2, 3], [0, 4, 5]], [[6, 7, 0], [8, 9, 0]]]
    assert len(list(arch.pack_documents(["1234567"] * 3, Tok(), 3, 2))) == 4


def test_hub_data_holds_out_the_first_documents_and_trains_on_the_rest(monkeypatch):
    """The paper profile's path (FineWeb-Edu streamed with `datasets`), with a fake hub."""
    import sys
    import types

    import transformers

    from efficientllm_utils import text_data

    documents = [d.text[:400] for d in text_data.split_documents()["heldout"][:40]]
    calls = []

    class Stream:
        def __init__(self, rows):
            self.rows = rows

        def skip(self, n):
            return Stream(self.rows[n:])

        def __iter__(self):
            return iter(self.rows)

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return Stream([{"text": t} for t in documents])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    tokenizer = text_data.load_tokenizer(2048)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name: tokenizer)
    spec = expand(params_path("attention"), "smoke")[0]
    p = PretrainRun.model_validate({**spec.params, "data": "hub", "tokenizer": "Qwen/Qwen2.5-0.5B",
                                    "eval_tokens": 128})
    data = arch.load_data(p)
    assert calls[0] == ("HuggingFaceFW/fineweb-edu", "sample-350BT", "train", True)
    assert sum(b.numel() for b in data.heldout) >= 128 and data.heldout[0].shape == (p.batch_size, p.seq_len)
    assert data.prompt.shape == (1, max(p.decode_contexts))
    held = int(data.source.split("first ")[1].split(" ")[0])
    first_train = next(data.train)
    expected = tokenizer(documents[held], add_special_tokens=False).input_ids[: p.seq_len]
    assert first_train[0, : len(expected)].tolist() == expected  # training starts after the held-out documents
    with pytest.raises(ValueError, match="vocab_size"):
        arch.load_data(p.model_copy(update={"vocab_size": 1000}))


# --- the book's helpers -----------------------------------------------------------------------

def _frame(rows):
    base = {"status": "ok", "quality_initial_loss": 7.0, "quality_final_loss": 5.0, "params_total": 1e6,
            "params_active": 1e6, "flops_per_token": 2e6, "kv_cache_bytes_per_token": 512.0,
            "kv_cache_bytes_per_token_measured": 512.0, "amu_gb": 0.5, "peak_memory_gb": 0.6, "pcu": None,
            "al_p90_s": 0.3, "al_cv": 0.1, "tt_tokens_per_param_s": 0.004, "train_tokens_per_s": 4000.0,
            "aec_w": 10.0, "energy_j": 100.0, "decode_ctx64_latency_s": 0.1, "decode_ctx64_tpot_s": 0.01,
            "decode_ctx64_ttft_s": 0.02, "decode_ctx64_tokens_per_s": 100.0, "param_hidden_size": 32,
            "param_n_layers": 1}
    return pd.DataFrame([{**base, "started": f"2026-01-01T00:00:0{i}", **r} for i, r in enumerate(rows)])


def test_leaderboard_ranks_perplexity_lower_first_and_maps_paper_names():
    frame = _frame([
        {"param_attention": "mha", "quality_perplexity": 100.0, "al_s": 0.2},
        {"param_attention": "gqa", "quality_perplexity": 110.0, "al_s": 0.3},
        {"param_attention": "mqa", "quality_perplexity": 120.0, "al_s": 0.1},
        {"param_attention": "mla", "quality_perplexity": 90.0, "al_s": 0.4},
    ])
    table = ar.pretraining_table(StudyResults("attention", "cpu", [], frame))
    assert list(table["variant"]) == ["mha", "gqa", "mqa", "mla"]  # the order the runs were made in
    assert set(table["model"]) == {"hidden 32, 1 layer"}
    board = ar.leaderboard("attention", table)
    ranks = board.set_index(["method", "metric"])["our_rank"]
    assert "mha" not in set(board["method"])  # not in the paper's leaderboard
    assert (ranks["MLA", "Perf"], ranks["GQA", "Perf"], ranks["MQA", "Perf"]) == (1, 2, 3)
    assert (ranks["MQA", "AL"], ranks["MLA", "AL"]) == (1, 3)
    paper = paper_ranks("architecture_pretraining", "attention", "0.5B-3B")
    assert not paper.duplicated().any() and set(paper["method"]) == {"MQA", "GQA", "MLA", "NSA"}
    (only,) = ar.leaderboards("attention", table)
    assert only.size_group == "0.5B-3B" and "fewer than every group" in only.why  # 1M parameters
    taus = only.taus.set_index("metric")
    assert taus.loc["Perf", "kendall_tau"] == pytest.approx(1.0)  # MLA < GQA < MQA, as the paper


def test_pareto_front_with_lower_is_better_quality():
    costs = pd.Series([1.0, 2.0, 3.0]).to_numpy()
    perplexity = pd.Series([10.0, 12.0, 8.0]).to_numpy()
    assert pareto_front(costs, perplexity, higher_is_better=False).tolist() == [True, False, True]


def test_pages_handle_a_study_without_results(tmp_path):
    res = load_study("moe", "cpu", root=tmp_path)
    assert ar.pretraining_table(res).empty and ar.decode_curves(res).empty
    assert ar.loss_curves(res).empty and methods_legend(res, {"al_s": "AL"}).empty
    assert ar.findings_text(res, ar.pretraining_table(res)) == "*No results yet.*"
    assert ar.leaderboards("moe", ar.pretraining_table(res)) == []


# --- end to end: tests/test_two_models.py runs every architecture study's smoke variants on two backbones ----------


def test_repeated_runs_of_the_reference_model_set_the_noise(tmp_path):
    from efficientllm_utils.metrics.values import MetricValue
    from efficientllm_utils.records import RunRecord, write_record

    base = PretrainRun(hidden_size=32, n_layers=1, n_heads=4, intermediate_size=64).model_dump(mode="json")
    runs = [("attention", "attention=gqa", {**base, "compress_block": 16}, 0.20),  # NSA field: ignored by gqa
            ("attention", "attention=mla", {**base, "attention": "mla"}, 0.90),  # another model
            ("moe", "variant=dense-small", {**base, "variant": "dense-small"}, 0.30),
            # a second group of identical runs, far from the first: its spread is 10%, not 0.9 / 0.2
            ("positional_encoding", "position=absolute", {**base, "position": "absolute"}, 0.99),
            ("attention", "attention=gqa-again", {**base, "position": "absolute", "seed": 0}, 0.90)]
    for i, (study, label, params, al) in enumerate(runs):
        metrics = {"al_s": MetricValue.measured(al, "s/iter", "perf-counter"),
                   "amu_gb": MetricValue.measured(0.5, "GB", "rss"), "aec_w": MetricValue.estimated(4.0, "W", "x"),
                   "tt_tokens_per_param_s": MetricValue.measured(0.01, "tokens/param/s", "perf-counter"),
                   "decode_ctx64_latency_s": MetricValue.measured(0.1, "s/request", "perf-counter")}
        write_record(RunRecord(run_id=f"r{i}", study=study, profile="cpu", label=label, status="ok", params=params,
                               metrics=metrics, quality={"perplexity": 100.0}), tmp_path / study / "cpu" / f"r{i}")
    repeats = ar.repeated_runs("cpu", tmp_path)
    assert sorted(repeats["run"]) == ["attention=gqa", "attention=gqa-again", "position=absolute",
                                      "variant=dense-small"]
    assert repeats["group"].nunique() == 2
    tolerances = ar.noise_tolerances("cpu", tmp_path)
    assert tolerances["AL_s"] == pytest.approx(0.5)  # within the first group: 0.30 / 0.20 - 1
    assert tolerances["AMU_GB"] == ar.TIE_TOLERANCE["AMU_GB"]  # no spread: the floor
    assert math.isnan(tolerances["perplexity"])  # no seed runs: the perplexity noise is unknown
    empty = ar.noise_tolerances("smoke", tmp_path)
    assert math.isnan(empty.pop("perplexity")) and empty == ar.TIE_TOLERANCE


def _pretrain_record(tmp_path, i, study, label, params, perplexity, seconds):
    from efficientllm_utils.metrics.values import MetricValue
    from efficientllm_utils.records import RunRecord, write_record

    metrics = {"al_s": MetricValue.measured(float(np.mean(seconds)), "s/iter", "perf-counter"),
               "amu_gb": MetricValue.measured(0.5, "GB", "rss"), "aec_w": MetricValue.estimated(4.0, "W", "x"),
               "params_total": MetricValue.measured(1e6, "params", "counted"),
               "tt_tokens_per_param_s": MetricValue.measured(0.01, "tokens/param/s", "perf-counter")}
    record = RunRecord(run_id=f"r{i}", study=study, profile="cpu", label=label, status="ok", params=params,
                       metrics=metrics, quality={"perplexity": perplexity},
                       raw={"steps": [{"seconds": s, "tokens": 1024} for s in seconds]})
    write_record(record, tmp_path / study / "cpu" / f"r{i}")
    return record


def test_seed_runs_set_the_perplexity_noise_and_a_profile_without_them_decides_no_perplexity_claim(tmp_path):
    base = PretrainRun(hidden_size=32, n_layers=1, n_heads=4, intermediate_size=64).model_dump(mode="json")
    steps = [0.1] * 10
    _pretrain_record(tmp_path, 0, "attention", "attention=gqa", base, 300.0, steps)
    _pretrain_record(tmp_path, 1, "moe", "variant=dense-small-seed1", {**base, "variant": "dense-small-seed1",
                                                                       "seed": 1}, 330.0, steps)
    _pretrain_record(tmp_path, 2, "attention", "attention=mla", {**base, "attention": "mla"}, 200.0, steps)
    seeds = ar.seed_runs("cpu", tmp_path)
    assert sorted(seeds["run"]) == ["attention=gqa", "variant=dense-small-seed1"]  # MLA has one seed only
    tolerances = ar.noise_tolerances("cpu", tmp_path)
    assert tolerances["perplexity"] == pytest.approx(0.1)  # 330 / 300 - 1
    res = load_study("attention", "cpu", root=tmp_path)
    found = {f.claim_id: f for f in ar.findings(res, tolerances)}
    assert found["a-mla-perplexity"].verdict == verdicts.AGREES  # 200 vs 300: -33%, beyond the 10% spread
    close = ar.compare(*[r for r in res.ok_records], "perplexity", 0.6)  # gqa vs mla inside a 60% noise
    assert verdicts.decide(close, "higher") == verdicts.INCONCLUSIVE
    unknown = ar.findings(res, {**tolerances, "perplexity": float("nan")})
    (mla,) = [f for f in unknown if f.claim_id == "a-mla-perplexity"]
    assert mla.verdict == verdicts.INCONCLUSIVE and ar.NO_SEED_RUNS in mla.sentence


def test_identical_runs_are_not_told_apart_once_the_run_to_run_spread_widens_the_interval(tmp_path):
    base = PretrainRun(hidden_size=32, n_layers=1, n_heads=4, intermediate_size=64).model_dump(mode="json")
    rng = np.random.default_rng(0)
    # two runs of one model: each run's steps are tight, but the second ran 8% slower (a busier machine)
    first = _pretrain_record(tmp_path, 0, "attention", "attention=gqa", base, 300.0, 0.100 + rng.normal(0, 1e-3, 40))
    second = _pretrain_record(tmp_path, 1, "moe", "variant=dense-small", {**base, "variant": "dense-small"}, 300.0,
                              0.108 + rng.normal(0, 1e-3, 40))
    within_run = verdicts.bootstrap_ratio([s["seconds"] for s in second.raw["steps"]],
                                        [s["seconds"] for s in first.raw["steps"]])
    assert verdicts.decide(within_run, "higher", verdicts.LATENCY_TOLERANCE) == verdicts.AGREES  # the old rule: "slower"
    spread = ar.noise_tolerances("cpu", tmp_path)["AL_s"]
    assert spread == pytest.approx(0.08, abs=0.01)
    for metric in ("AL_s", "TT"):
        diff = ar.compare(second, first, metric, spread)
        assert "widened by the run-to-run spread" in diff.how
        assert verdicts.decide(diff, "higher", verdicts.diff_margin(diff)) == verdicts.INCONCLUSIVE
        assert verdicts.decide(diff, "lower", verdicts.diff_margin(diff)) == verdicts.INCONCLUSIVE


def test_noise_is_the_spread_within_groups_not_across_them():
    frame = pd.DataFrame({"group": [1, 1, 2, 2], "AL_s": [1.0, 1.02, 2.0, 2.06]})
    assert within_group_spread(frame, "group", "AL_s") == pytest.approx(0.03)  # not 2.06 / 1.0 - 1
    assert within_group_spread(frame.iloc[[0, 2]], "group", "AL_s") is None  # no group of two


def test_module_timings_name_the_machine_their_own_record_names(tmp_path):
    run = {"finished": "2026-12-06T04:00:00+00:00", "device": "cpu", "threads": 2, "dtype": "float32",
           "torch": "2.x", "input_shape": [2, 128, 896], "reps": 3, "warmup": 1,
           "provenance": {"hardware": {"summary": "AMD EPYC (2 logical cores)"}, "load_average": {"5m": 3.0}},
           "rows": [{"module": "GQA", "reference": "Qwen2Attention", "pass": "fwd", "ours_s": [0.01, 0.02, 0.03],
                     "reference_s": [0.02, 0.02, 0.02]}]}
    path = tmp_path / "timings.json"
    path.write_text(json.dumps(run))
    text, table = ar.module_timings(path)
    assert "AMD EPYC (2 logical cores)" in text.data and "2026-12-06" in text.data and "3.0" in text.data
    assert "busier" not in text.data  # no logical core count recorded: no judgement of the load
    assert "ours/HF" in table.to_html() and "1.00" in table.to_html()  # median 0.02 / 0.02
    (missing,) = ar.module_timings(tmp_path / "none.json")
    assert "No committed run" in missing.data
