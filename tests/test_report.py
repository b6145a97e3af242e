import numpy as np
import pandas as pd
import pytest

from efficientllm_utils import report


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
    res = report.StudyResults("quantization", "cpu", [], frame)
    table = report.quantization_table(res).set_index("precision")
    assert table.loc["int4-nf4", "compression"] == pytest.approx(4.0)
    assert table.loc["int4-nf4", "MCR"] == pytest.approx(4.0 * 0.9)
    assert table.loc["int4-nf4", "accuracy_drop_pct"] == pytest.approx(10.0)
    assert table.loc["fp32", "MCR"] == pytest.approx(1.0)


def test_pareto_front_keeps_only_undominated_points():
    costs = np.array([1.0, 2.0, 3.0, 2.5])
    quality = np.array([0.5, 0.7, 0.9, 0.6])
    assert report.pareto_front(costs, quality).tolist() == [True, True, True, False]


def test_kendall_tau_against_paper_ranks():
    ours = pd.DataFrame({"method": ["a", "b", "c"] * 2, "metric": ["AL"] * 3 + ["AMU"] * 3,
                         "our_rank": [1, 2, 3, 1, 2, 3]})
    paper = pd.DataFrame({"method": ["a", "b", "c"] * 2, "metric": ["AL"] * 3 + ["AMU"] * 3,
                          "paper_rank": [1, 2, 3, 3, 2, 1]})
    _, taus = report.compare_ranks(ours, paper)
    assert taus.set_index("metric")["kendall_tau"].to_dict() == pytest.approx({"AL": 1.0, "AMU": -1.0})


def test_paper_leaderboard_ships_with_the_book():
    ranks = report.paper_ranks("inference", "quantization", "1.5B-3.8B")
    assert set(ranks["method"]) == {"bfloat16", "float16", "int4"}
    assert set(ranks["metric"]) >= {"Perf", "AMU", "AL", "IT", "AEC", "MCR"}
