"""The report layer: tables, ranks per model and size group, and the verdict rules on each side of every rule."""
import numpy as np
import pandas as pd
import pytest

from efficientllm_utils.metrics.values import MetricValue
from efficientllm_utils.records import RunRecord
from efficientllm_utils.reports.display import pareto_front
from efficientllm_utils.reports import findings
from efficientllm_utils.reports.findings import common_caveats, findings_markdown
from efficientllm_utils.reports.leaderboard import kendall_taus, tau_table
from efficientllm_utils.reports.load import StudyResults
from efficientllm_utils.reports.paper import claims, paper_quote, paper_ranks, size_group
from efficientllm_utils.reports.verdicts import (AGREES, DISAGREES, INCONCLUSIVE, LATENCY_TOLERANCE, MIN_ITEMS,
                                                 MIN_SAMPLES, Difference, bootstrap_ratio, combine, decide,
                                                 estimated_difference, is_estimate, mean_interval, paired_accuracy,
                                                 paired_ratio, point_difference)
from efficientllm_utils.reports import quantization as qr


def _frame(rows):
    base = {"status": "ok", "param_model": "m", "param_reference_precision": "fp32", "quality_perplexity": 10.0,
            "linear_weight_bytes": 1.0, "amu_gb": 1.0, "pcu": None, "al_s": 1.0, "latency_p90_s": 1.0,
            "ttft_p50_s": 0.1, "tpot_p50_s": 0.01, "it_tokens_per_s": 1.0, "aec_w": 1.0, "energy_per_token_j": 1.0}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_mcr_is_size_ratio_times_quality_ratio():
    frame = _frame([
        {"param_precision": "fp32", "model_bytes": 400.0, "quality_mean_accuracy": 0.50},
        {"param_precision": "int4-nf4", "model_bytes": 100.0, "quality_mean_accuracy": 0.45},
    ])
    table = qr.quantization_table(StudyResults("quantization", "cpu", [], frame)).set_index("precision")
    assert table.loc["int4-nf4", "compression"] == pytest.approx(4.0)
    assert table.loc["int4-nf4", "MCR"] == pytest.approx(4.0 * 0.9)
    assert table.loc["int4-nf4", "accuracy_change_pct"] == pytest.approx(-10.0)
    assert table.loc["fp32", "MCR"] == pytest.approx(1.0)


def test_two_models_get_their_own_reference_ranks_and_size_group():
    frame = _frame([
        {"param_model": "small", "param_precision": p, "model_bytes": b, "quality_mean_accuracy": a, "al_s": al}
        for p, b, a, al in [("fp32", 4e9, 0.5, 1.0), ("bf16", 2e9, 0.5, 2.0), ("fp16", 2e9, 0.4, 3.0)]
    ] + [
        {"param_model": "big", "param_precision": p, "model_bytes": b, "quality_mean_accuracy": a, "al_s": al}
        for p, b, a, al in [("fp32", 32e9, 0.7, 1.0), ("bf16", 16e9, 0.6, 3.0), ("fp16", 16e9, 0.7, 2.0)]
    ])
    table = qr.quantization_table(StudyResults("quantization", "cpu", [], frame))
    assert table.groupby("model")["MCR"].apply(lambda s: s.notna().all()).all()  # each against its own fp32
    assert qr.parameter_counts(table) == pytest.approx({"small": 1e9, "big": 8e9})
    boards = {b.model: b for b in qr.leaderboards(table)}
    assert boards["small"].size_group == "1.5B-3.8B" and "fewer than every group" in boards["small"].why
    assert boards["big"].size_group == "7B-8B" and "lie in" in boards["big"].why
    side = boards["big"].side.set_index("method")
    assert side.loc["float16", "AL"].startswith("1 /") and side.loc["bfloat16", "AL"].startswith("2 /")
    assert boards["small"].side.set_index("method").loc["bfloat16", "AL"].startswith("1 /")
    assert set(tau_table(list(boards.values()))["model"]) == {"small", "big"}


def test_a_model_without_quality_keeps_its_costs_and_ranks_and_says_why():
    """A ``shape:`` model (random weights of a paper shape) has no quality columns: its sizes, MCR-free costs and
    non-quality ranks still show, next to a real model whose quality was measured."""
    rows = [{"param_model": "shape:qwen2.5-7b", "param_precision": p, "model_bytes": b, "al_s": al,
             "param_reference_precision": "bf16"}
            for p, b, al in [("bf16", 15e9, 1.0), ("fp16", 15e9, 1.1), ("int4-nf4", 5e9, 2.0)]]
    alone = qr.quantization_table(StudyResults("quantization", "gpu", [], _frame(rows)))
    assert alone["accuracy"].isna().all() and alone["MCR"].isna().all()
    assert alone.set_index("precision").loc["int4-nf4", "compression"] == pytest.approx(3.0)
    board = qr.leaderboards(alone)[0]
    assert board.model == "shape:qwen2.5-7b" and board.size_group == "7B-8B" and "Perf" not in board.side.columns
    assert "AL" in board.side.columns

    real = [{"param_precision": p, "model_bytes": b, "quality_mean_accuracy": a, "param_reference_precision": "bf16"}
            for p, b, a in [("bf16", 2.7e8, 0.5), ("int4-nf4", 1e8, 0.45)]]
    both = qr.quantization_table(StudyResults("quantization", "gpu", [], _frame(rows + real)))
    assert both.set_index(["model", "precision"]).loc[("m", "int4-nf4"), "accuracy_change_pct"] == pytest.approx(-10)
    text = qr.summary(StudyResults("quantization", "gpu", [], _frame(rows + real)), both)
    assert "no quality was measured (random weights" in text and "accuracy changed by -10.0%" in text


@pytest.mark.parametrize("count, group, why", [(2e9, "1.5B-3.8B", "lie in"), (135e6, "1.5B-3.8B", "fewer"),
                                               (6.5e9, "7B-8B", "between"), (70e9, "14B-34B", "more")])
def test_size_group_holds_the_count_or_says_which_was_used(count, group, why):
    chosen, reason = size_group("inference", "quantization", count)
    assert chosen == group and why in reason


def test_pareto_front_keeps_only_undominated_points():
    costs = np.array([1.0, 2.0, 3.0, 2.5])
    quality = np.array([0.5, 0.7, 0.9, 0.6])
    assert pareto_front(costs, quality).tolist() == [True, True, True, False]


def test_kendall_tau_against_paper_ranks():
    ours = pd.DataFrame({"method": ["a", "b", "c"] * 2, "metric": ["AL"] * 3 + ["AMU"] * 3,
                         "our_rank": [1, 2, 3, 1, 2, 3]})
    paper = pd.DataFrame({"method": ["a", "b", "c"] * 2, "metric": ["AL"] * 3 + ["AMU"] * 3,
                          "paper_rank": [1, 2, 3, 3, 2, 1]})
    side, taus = kendall_taus(ours, paper)
    assert taus.set_index("metric")["kendall_tau"].to_dict() == pytest.approx({"AL": 1.0, "AMU": -1.0})
    assert side.set_index("method").loc["a", "AMU"] == "1 / 3"


def test_paper_leaderboard_and_claims_ship_with_the_book():
    ranks = paper_ranks("inference", "quantization", "1.5B-3.8B")
    assert set(ranks["method"]) == {"bfloat16", "float16", "int4"}
    assert set(ranks["metric"]) >= {"Perf", "AMU", "AL", "IT", "AEC", "MCR"}
    for chapter in ("quantization", "attention", "positional_encoding", "moe", "peft"):
        assert len(claims(chapter)) >= 2
    assert "71.33 GB" in paper_quote("Qwen2.5-32B/bfloat16/AMU;Qwen2.5-32B/int4/AMU", "inference")


# --- the verdict rules, on each side -------------------------------------------------------------

def test_paired_accuracy_verdict_changes_with_the_flips():
    base = [1] * 50 + [0] * 50
    same = paired_accuracy(base, base)
    assert same.estimate == 0 and decide(same, "lower") == INCONCLUSIVE
    one_flip = paired_accuracy([0] + base[1:], base)  # one item of 100: noise
    assert decide(one_flip, "lower") == INCONCLUSIVE
    many = paired_accuracy([0] * 30 + base[30:], base)  # 30 items lost, none gained
    assert many.high < 0 and decide(many, "lower") == AGREES
    assert decide(many, "higher") == DISAGREES
    # non-inferiority: a drop within the margin agrees, a drop clearly beyond it disagrees
    assert decide(same, "not_lower", 0.10) == AGREES
    assert decide(many, "not_lower", 0.10) == DISAGREES
    assert decide(one_flip, "not_lower", 0.01) == INCONCLUSIVE
    with pytest.raises(ValueError, match="same items"):
        paired_accuracy([1, 0], [1])
    few = paired_accuracy([0] * 10, [1] * 10)  # every answer lost, but 10 items are too few
    assert decide(few, "lower") == INCONCLUSIVE and "too few items" in str(few)


def test_latency_interval_verdict_changes_with_the_gap_and_the_noise():
    rng = np.random.default_rng(0)
    base = list(1.0 + 0.01 * rng.standard_normal(30))
    faster = [x * 0.8 for x in base]
    close = [x * 0.99 for x in base]  # 1% faster: within the 3% tolerance
    noisy = [0.3, 1.5, 0.4, 1.4, 0.5]  # 18% faster on average, but the interval is wide
    assert decide(bootstrap_ratio(faster, base), "lower", LATENCY_TOLERANCE) == AGREES
    assert decide(bootstrap_ratio(base, faster), "lower", LATENCY_TOLERANCE) == DISAGREES
    assert decide(bootstrap_ratio(close, base), "lower", LATENCY_TOLERANCE) == INCONCLUSIVE
    assert decide(bootstrap_ratio(noisy, base), "lower", LATENCY_TOLERANCE) == INCONCLUSIVE
    two = bootstrap_ratio(faster[:2], base[:2])  # 20% faster, but two samples are no interval
    assert decide(two, "lower", LATENCY_TOLERANCE) == INCONCLUSIVE and "too few" in str(two)


def test_single_values_count_only_beyond_their_noise():
    assert decide(point_difference(90, 100, 0.05, "noise"), "lower") == AGREES
    assert decide(point_difference(97, 100, 0.05, "noise"), "lower") == INCONCLUSIVE
    assert decide(point_difference(110, 100, 0.05, "noise"), "lower") == DISAGREES


def test_no_verdict_from_a_zero_baseline_or_a_nan_or_infinite_sample():
    fine = [1.0, 1.1, 0.9, 1.0, 1.2]
    nan, inf = float("nan"), float("inf")
    cases = {
        "zero baseline": [bootstrap_ratio(fine, [0.0] * 5), paired_ratio(fine, [0.0] * 5),
                          point_difference(1.0, 0.0, 0.05, "noise")],
        "NaN": [bootstrap_ratio(fine[:4] + [nan], fine), paired_ratio(fine, fine[:4] + [nan]),
                point_difference(nan, 1.0, 0.05, "noise")],
        "inf": [bootstrap_ratio(fine[:4] + [inf], fine), paired_ratio([inf] + fine[1:], fine),
                point_difference(1.0, -inf, 0.05, "noise"), bootstrap_ratio([inf, -inf] * 3, fine)],
    }
    for case, diffs in cases.items():
        for diff in diffs:
            for expect in ("lower", "higher", "not_lower"):
                assert decide(diff, expect, 0.05) == INCONCLUSIVE, (case, diff)
            why = "the baseline is zero" if case == "zero baseline" else "a value is NaN or infinite"
            assert str(diff) == f"no relative difference ({why})", case
    # accuracy: a baseline that got nothing right is compared in absolute shares (1 / 0 has no meaning)
    gained = paired_accuracy([1] * 30, [0] * 30)
    assert gained.estimate == 1.0 and decide(gained, "higher") == AGREES
    with pytest.raises(ValueError, match="scored 0 .* or 1 .*nan"):  # an answer that is neither right nor wrong
        paired_accuracy([1] * 29 + [nan], [0] * 30)


def test_a_verdict_exactly_at_its_margin():
    """An interval bound exactly on the margin: "lower"/"higher" need the whole interval beyond it; "not_lower"
    (at most ``tolerance`` lower) is met by a bound exactly ``tolerance`` lower. 0.25 is exact in binary."""
    def at(low, high):
        return Difference((low + high) / 2, low, high, "test")

    assert decide(at(-0.5, -0.25), "lower", 0.25) == INCONCLUSIVE
    assert decide(at(-0.5, np.nextafter(-0.25, -1)), "lower", 0.25) == AGREES
    assert decide(at(0.25, 0.5), "lower", 0.25) == INCONCLUSIVE
    assert decide(at(np.nextafter(0.25, 1), 0.5), "lower", 0.25) == DISAGREES
    assert decide(at(0.25, 0.5), "higher", 0.25) == INCONCLUSIVE
    assert decide(at(np.nextafter(0.25, 1), 0.5), "higher", 0.25) == AGREES
    assert decide(at(-0.5, -0.25), "higher", 0.25) == INCONCLUSIVE
    assert decide(at(-0.5, np.nextafter(-0.25, -1)), "higher", 0.25) == DISAGREES
    assert decide(at(-0.25, 0.0), "not_lower", 0.25) == AGREES
    assert decide(at(np.nextafter(-0.25, -1), 0.0), "not_lower", 0.25) == INCONCLUSIVE
    assert decide(at(-0.5, -0.25), "not_lower", 0.25) == INCONCLUSIVE
    assert decide(at(-0.5, np.nextafter(-0.25, -1)), "not_lower", 0.25) == DISAGREES
    assert decide(at(-0.1, 0.1), "lower", 0.0) == INCONCLUSIVE  # zero margin: 0 inside the interval
    with pytest.raises(ValueError, match="lower, higher or not_lower"):
        decide(at(-0.1, 0.1), "smaller")


def test_intervals_start_exactly_at_the_minimum_samples_and_items():
    n, rng = MIN_SAMPLES, np.random.default_rng(0)
    slow, fast = list(2.0 + 0.01 * rng.random(n)), list(1.0 + 0.01 * rng.random(n))
    for rule in (bootstrap_ratio, paired_ratio):
        enough, short = rule(fast, slow), rule(fast[:-1], slow[:-1])
        assert np.isfinite([enough.low, enough.high]).all() and decide(enough, "lower") == AGREES
        assert (short.low, short.high) == (-np.inf, np.inf) and f"fewer than {n}" in str(short)
        assert decide(short, "lower") == INCONCLUSIVE
        assert short.estimate == pytest.approx(np.mean(fast[:-1]) / np.mean(slow[:-1]) - 1)  # still reported
    m = MIN_ITEMS
    enough = paired_accuracy([0] * m, [1] * m)  # every answer lost
    short = paired_accuracy([0] * (m - 1), [1] * (m - 1))
    assert (enough.low, enough.high) == (-1.0, -1.0) and decide(enough, "lower") == AGREES
    assert (short.low, short.high) == (-np.inf, np.inf) and f"fewer than {m}" in str(short)
    assert short.estimate == -1.0 and decide(short, "lower") == INCONCLUSIVE


def test_two_estimates_are_never_evidence():
    diff = estimated_difference(50.0, 100.0)  # half, but both estimated
    assert decide(diff, "lower") == decide(diff, "higher") == INCONCLUSIVE
    assert is_estimate("estimated:cpu-time-x-watts") and not is_estimate("measured:rapl")


def test_a_claim_of_several_parts():
    assert combine([AGREES, AGREES]) == AGREES
    assert combine([AGREES, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([AGREES, DISAGREES]) == DISAGREES
    assert combine([]) == INCONCLUSIVE


# --- findings generated from records --------------------------------------------------------------

def _quant_record(precision, correct, latencies, energy=1.0, energy_method="estimated:cpu-time-x-watts",
                  model="tiny", size=4e6):
    metric = lambda v, unit, how: MetricValue(value=v, unit=unit, method=how)  # noqa: E731
    return RunRecord(
        run_id=precision, study="quantization", profile="t", label=f"precision={precision}", status="ok",
        params={"model": model, "precision": precision, "reference_precision": "fp32", "tasks": ["boolq"],
                "n_per_task": len(correct), "batch_size": 1, "new_tokens": 8, "device": "cpu"},
        metrics={"model_bytes": metric(size, "bytes", "measured:counted-tensor-bytes"), "aec_w": metric(energy, "W", energy_method),
                 "energy_per_token_j": metric(energy, "J/token", energy_method)},
        quality={"correct": {"boolq": correct}}, raw={"requests": [{"latency_s": x} for x in latencies]})


def test_fidelity_comes_with_intervals_over_windows_and_items():
    """KL and top-1 agreement resample whole text windows (their positions are not independent draws), the flip
    rate resamples items; the reference itself has no row; too few windows give no interval."""
    kl = [0.1] * 127 * 4 + [0.3] * 127 * 4  # 8 windows of 127 positions: 4 close to the reference, 4 far
    agree = [1] * 127 * 4 + [0] * 127 * 4
    flipped = [1] * 100 + [0] * 900
    records = [_quant_record(p, [1] * 1000, [1.0] * 6) for p in ("fp32", "int4-nf4")]
    for r in records:
        r.params["ppl_seq_len"] = 128
        r.raw["fidelity"] = dict(kl_per_token=kl, top1_agree=agree, flipped={"boolq": flipped})  # as the notebook
    res = StudyResults("quantization", "t", records, pd.DataFrame([r.flat() for r in records]))
    (row,) = qr.fidelity_table(res).to_dict("records")
    assert row["precision"] == "int4-nf4" and row["windows"] == 8 and row["items"] == 1000
    assert row["kl"] == pytest.approx(0.2) and 0.1 <= row["kl_low"] < 0.2 < row["kl_high"] <= 0.3
    assert row["top1"] == pytest.approx(0.5) and row["top1_low"] < 0.5 < row["top1_high"]
    assert row["flip_rate"] == pytest.approx(0.1) and 0.07 < row["flip_rate_low"] < 0.1 < row["flip_rate_high"] < 0.13
    # the windows' spread, not the positions': resampling 1016 single positions would give a far narrower interval
    assert row["kl_high"] - row["kl_low"] > 0.05
    assert all(np.isnan(mean_interval(kl[: 127 * 4], 127)[1:]))  # 4 windows: fewer than MIN_SAMPLES


def _findings(records):
    res = StudyResults("quantization", "t", records, pd.DataFrame([r.flat() for r in records]))
    return {(f.model, f.claim_id): f for f in qr.findings(res)}


def test_quantization_findings_follow_the_numbers():
    base = [1] * 100 + [0] * 100
    fast = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98]
    found = _findings([_quant_record("fp32", base, fast), _quant_record("int4-nf4", base, fast, energy=0.5, size=1e6),
                       _quant_record("bf16", base, [x * 0.5 for x in fast], size=2e6),
                       _quant_record("fp16", base, fast, size=2e6)])
    assert found["tiny", "q-int4-size"].verdict == AGREES  # counted bytes: exact
    assert found["tiny", "q-int4-accuracy"].verdict == AGREES  # the very same answers
    energy = found["tiny", "q-int4-energy"]
    assert energy.verdict == INCONCLUSIVE and "no evidence" in energy.sentence  # two estimates
    assert found["tiny", "q-bf16-speed"].verdict == AGREES  # twice the tokens/s, tight interval
    assert ("paper Table 9 as quoted by an AI-written summary of the paper, second-hand: DeepSeek-R1-Distill-Qwen-1.5B "
            "bfloat16 IT 39.68 tokens/s") in found["tiny", "q-bf16-speed"].sentence

    worse = [0] * 60 + base[60:]  # int4 loses 60 of 100 correct answers
    measured = "measured:rapl-counter"
    found = _findings([_quant_record("fp32", base, fast, energy_method=measured),
                       _quant_record("int4-nf4", worse, fast, energy=0.5, energy_method=measured, size=1e6),
                       _quant_record("bf16", base, [x * 2 for x in fast], size=2e6),
                       _quant_record("fp16", base, fast, size=2e6)])
    assert found["tiny", "q-int4-accuracy"].verdict == DISAGREES
    assert found["tiny", "q-int4-energy"].verdict == AGREES  # measured, half
    assert found["tiny", "q-bf16-speed"].verdict == DISAGREES
    found = _findings([_quant_record("fp32", base, fast), _quant_record("int4-nf4", base, fast, energy=0.5,
                                                                          energy_method=measured, size=1e6)])
    assert found["tiny", "q-int4-energy"].verdict == INCONCLUSIVE  # one of the two is an estimate


def test_findings_are_per_model():
    base = [1] * 20 + [0] * 20
    records = [_quant_record(p, base, [1.0, 1.0], model=m, size=s * k)
               for m, s in (("a", 4e6), ("b", 8e6)) for p, k in (("fp32", 1.0), ("int4-nf4", 0.25))]
    found = _findings(records)
    assert {m for m, _ in found} == {"a", "b"}
    text = findings_markdown(list(found.values()))
    assert "**a**" in text and "**b**" in text


def _peft_record(model, method, correct_after, seconds):
    return RunRecord(run_id=f"{model}-{method}", study="peft", profile="t", label=f"method={method}", status="ok",
                     params={"model": model, "method": method, "timing_warmup_steps": 1, "device": "cpu"},
                     quality={"final_loss": 1.0, "final_loss_steps": 3, "correct_before": [0] * len(correct_after),
                              "correct_after": correct_after, "heldout_rows_sha256": "same"},
                     raw={"steps": [{"seconds": s} for s in seconds]})


def test_a_claim_read_from_the_paper_ranks_follows_the_models_size_group():
    from efficientllm_utils.reports import finetune as fr

    steps = [1.0, 1.0, 1.01, 0.99, 1.0, 1.02, 0.98]
    lora, rslora = [1] * 50 + [0] * 150, [1] * 100 + [0] * 100  # RSLoRA right on 50 more of 200 items
    records = [_peft_record(m, method, correct, steps) for m in ("small", "mid")
               for method, correct in (("lora", lora), ("rslora", rslora))]
    res = StudyResults("peft", "t", records, pd.DataFrame([r.flat() for r in records]))
    table = pd.DataFrame({"model": ["small", "mid"], "total_params": [2e9, 7.5e9]})
    found = {f.model: f for f in fr.findings(res, table) if f.claim_id == "f-rslora-quality"}
    # at 1B-3B the paper ranks RSLoRA ahead of LoRA on quality (5 vs 7), at 7B-8B behind (3 vs 2)
    assert found["small"].verdict == AGREES and "1B-3B" in found["small"].sentence
    assert found["mid"].verdict == DISAGREES and "7B-8B" in found["mid"].sentence
    close = [_peft_record("small", method, correct, steps)
             for method, correct in (("lora", lora), ("rslora", [1] * 52 + [0] * 148))]
    res = StudyResults("peft", "t", close, pd.DataFrame([r.flat() for r in close]))
    (within,) = [f for f in fr.findings(res, table) if f.claim_id == "f-rslora-quality"]
    assert within.verdict == INCONCLUSIVE  # 2 items apart of 200: inside the paired interval
    changes = fr.accuracy_changes(res)  # against the base (all wrong): both improve, by their share right
    assert list(changes["verdict"]) == [fr.IMPROVES, fr.IMPROVES]
    assert changes["change"].tolist() == pytest.approx([0.25, 0.26]) and (changes["low"] > 0).all()


def _arch_record(attention, seconds, perplexity, hidden=32):
    metric = lambda v, unit: MetricValue(value=v, unit=unit, method="measured:test")  # noqa: E731
    return RunRecord(run_id=f"{attention}-{hidden}", study="attention", profile="t", label=f"attention={attention}",
                     status="ok", params={"attention": attention, "hidden_size": hidden, "n_layers": 1,
                                          "timing_warmup_steps": 0, "device": "cpu"},
                     metrics={"amu_gb": metric(1.0, "GB"), "aec_w": metric(1.0, "W"),
                              "params_total": metric(1e5, "params")},
                     quality={"perplexity": perplexity}, raw={"steps": [{"seconds": s, "tokens": 64} for s in seconds]})


def test_lowest_of_several_needs_every_other_variant_clearly_behind():
    from efficientllm_utils.reports import architecture as ar

    steps = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98]

    def verdicts(mqa_speed, mla_ppl):
        records = [_arch_record("mqa", [s * mqa_speed for s in steps], 100.0), _arch_record("gqa", steps, 100.0),
                   _arch_record("mla", [s * 1.5 for s in steps], mla_ppl)]
        res = StudyResults("attention", "t", records, pd.DataFrame([r.flat() for r in records]))
        return {f.claim_id: f.verdict for f in ar.findings(res, {"perplexity": 0.05})}

    assert verdicts(0.8, 80.0)["a-mqa-latency"] == AGREES  # 20% faster than gqa, 47% than mla
    assert verdicts(1.2, 80.0)["a-mqa-latency"] == DISAGREES  # gqa is clearly faster
    assert verdicts(1.01, 80.0)["a-mqa-latency"] == INCONCLUSIVE  # level with gqa
    assert verdicts(0.8, 80.0)["a-mla-perplexity"] == AGREES  # 20% lower, beyond the 5% noise
    assert verdicts(0.8, 98.0)["a-mla-perplexity"] == INCONCLUSIVE  # 2%: within the noise
    assert verdicts(0.8, 120.0)["a-mla-perplexity"] == DISAGREES


def test_caveats_appear_only_when_the_records_show_them():
    cpu = pd.DataFrame({"status": ["ok"], "param_device": ["cpu"], "aec_w_method": ["estimated:cpu-time-x-watts"]})
    gpu = pd.DataFrame({"status": ["ok"], "param_device": ["cuda"], "aec_w_method": ["measured:nvml-total-energy"]})
    small = common_caveats(StudyResults("s", "p", [], cpu), {"m": 135e6}, 1.5e9, 200, 32)
    assert len(small) == 4 and "CPU" in small[0] and "135M" in small[1] and "estimated" in small[2] and "32" in small[3]
    assert common_caveats(StudyResults("s", "p", [], gpu), {"m": 7e9}, 1.5e9, 200, 1000) == []


# --- "no single method is best on every metric" ---------------------------------------------------------------------

def _none_best_findings(monkeypatch, values: dict[str, dict[str, float]], noise: float = 0.05):
    """The ``none_best`` rule on methods whose single values per metric are ``values`` (method -> metric -> value),
    each held to ``noise``."""
    claim = pd.DataFrame([{"claim_id": "x-none-best", "chapter": "x", "statement": "No single method is best",
                           "metric": "AL_s+TT", "subject": "", "baseline": "", "among": "|".join(values),
                           "direction": "none_best", "tolerance": "0", "paper_figures": "", "source": "a test"}])
    monkeypatch.setattr(findings, "claims", lambda chapter: claim)

    def compare(claim, model, subject, baseline):
        metric = claim["metric"]
        return point_difference(values[subject][metric], values[baseline][metric], noise, "noise")

    (found,) = findings.decide_claims("x", "x", {"": list(values)}, compare, {})
    return found


def test_none_best_agrees_when_every_method_is_beaten_somewhere(monkeypatch):
    # a is faster (AL lower), b has the higher throughput: each is beaten on one metric
    found = _none_best_findings(monkeypatch, {"a": {"AL_s": 1.0, "TT": 1.0}, "b": {"AL_s": 2.0, "TT": 2.0}})
    assert found.verdict == AGREES
    assert "a by b on TT" in found.figure and "b by a on AL_s" in found.figure


def test_none_best_disagrees_when_one_method_wins_every_metric_beyond_the_noise(monkeypatch):
    found = _none_best_findings(monkeypatch, {"a": {"AL_s": 1.0, "TT": 2.0}, "b": {"AL_s": 2.0, "TT": 1.0}})
    assert found.verdict == DISAGREES and "best on every metric: a" in found.figure


def test_none_best_is_inconclusive_inside_the_noise(monkeypatch):
    values = {"a": {"AL_s": 1.0, "TT": 1.0}, "b": {"AL_s": 1.02, "TT": 1.01}}
    assert _none_best_findings(monkeypatch, values).verdict == INCONCLUSIVE


def test_each_finding_carries_an_anchor_its_page_shows_and_the_figure_behind_it(monkeypatch):
    found = _none_best_findings(monkeypatch, {"a": {"AL_s": 1.0, "TT": 1.0}, "b": {"AL_s": 2.0, "TT": 2.0}})
    assert f'<span id="{found.anchor}"></span>' in found.markdown()
    assert findings.anchor_id("a-mqa-latency", "hidden 128, 2 layers") == "a-mqa-latency--hidden-128-2-layers"
    assert findings.anchor_id("a-mqa-latency", "") == "a-mqa-latency"


def test_every_quoted_paper_figure_says_it_comes_from_a_summary_of_the_paper():
    quote = paper_quote("Qwen2.5-32B/bfloat16/AMU;Qwen2.5-32B/int4/AMU", "inference")
    assert quote.startswith("paper Table 9 as quoted by an AI-written summary of the paper, second-hand: ")
    assert paper_quote("", "inference") == ""


# --- the study at a glance -------------------------------------------------------------------------------------------

def test_the_glance_table_keeps_the_projects_checks_apart_and_links_each_finding():
    from efficientllm_utils.reports import glance

    claims = glance.all_claims().set_index("claim_id")
    assert claims.loc["lf-lora-adapts", "group"] == glance.PROJECT  # a sanity row of the vision chapter
    assert claims.loc["lq-base-learned", "group"] == glance.PROJECT
    assert claims.loc["a-mqa-latency", "group"] == glance.PAPER
    found = [findings.Finding("lf-lora-adapts", "SD3.5: sd3-small", AGREES, "s", "heldout_loss of lora: -5%"),
             findings.Finding("a-mqa-latency", "", DISAGREES, "s", "AL_s of mqa: +19%"),
             findings.Finding("a-mla-perplexity", "", INCONCLUSIVE, "s", "perplexity of mla: -16%")]
    chapters = [glance.Chapter("lvm", "Generation", lambda: found[:1]),
                glance.Chapter("attention", "Attention", lambda: found[1:])]
    table = glance.rows(chapters)
    counts = glance.counts(table).set_index("group")
    assert counts.loc[glance.PAPER, [AGREES, DISAGREES, INCONCLUSIVE]].tolist() == [0, 1, 1]
    assert counts.loc[glance.PROJECT, AGREES] == 1 and counts.loc["all", "all"] == 3
    cells = glance.linked(table)
    assert 'href="lvm.html#lf-lora-adapts--sd3-5-sd3-small"' in cells["claim"].iloc[0]
    assert 'href="attention.html#a-mqa-latency"' in cells["claim"].iloc[1]
    assert cells["the figure behind it"].iloc[1] == "AL_s of mqa: +19%"


def test_every_chapter_that_decides_claims_is_on_the_front_page():
    from efficientllm_utils.reports import glance

    deciding = set(glance.all_claims()["chapter"])  # the studies whose chapters decide claims
    assert deciding <= set(glance.FINDINGS)
    pages = [c.page for c in glance.chapters()]
    assert pages[0] == "attention" and {"dit", "lvm", "vlm", "peft", "quantization"} <= set(pages)
    assert glance.page_title("attention") == "Architecture pretraining: attention"
