"""The book's GPU-hour estimate: measured durations first, then their median, then the labelled FLOPs model."""
import pytest

from efficientllm_utils.cost import ASSUMED_SUSTAINED_FLOPS, params_in_model_id, run_costs, training_flops
from efficientllm_utils.params import expand, params_path
from efficientllm_utils.records import RunRecord, run_dir, write_record


@pytest.mark.parametrize("model, params", [("Qwen/Qwen2.5-7B-Instruct", 7e9), ("meta-llama/Llama-3.2-1B-Instruct", 1e9),
                                           ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1.5e9),
                                           ("mistralai/Mistral-7B-Instruct-v0.3", 7e9), ("microsoft/phi-4", 14.7e9),
                                           ("smollm2-135m-instruct", None)])
def test_parameters_from_the_model_id(model, params):
    assert params_in_model_id(model) == params


def test_measured_durations_win_over_the_flops_model(results_root):
    specs = expand(params_path("positional_encoding"), "paper")
    modelled = run_costs("positional_encoding", "paper", results_root)
    assert {r["how"] for r in modelled} == {"FLOPs model"}
    first = modelled[0]
    # by hand, for Qwen2.5-1.5B's shape (hidden 1536, 28 layers, 12 query and 2 KV heads of 128, FFN 8960, vocab
    # 151936; positions add no matmul): the weights a token passes through, twice (multiply-add), plus attention's
    # scores and weighted sum over the average causal context, three times (forward + backward), for every token
    p = specs[0].params
    assert (p["size"], p["attention"], p["seq_len"], p["batch_size"], p["steps"]) == ("1.5B", "gqa", 8192, 4, 1000)
    linear = 28 * (2 * 1536 ** 2 + 2 * 1536 * 256 + 3 * 1536 * 8960) + 151936 * 1536  # q, o; k, v; FFN; lm_head
    attention = 28 * 2 * 12 * (128 + 128) * (8192 + 1) / 2
    flops = 3 * (2 * linear + attention) * 1000 * 4 * 8192  # 1000 steps of 4 sequences (one per GPU of 4)
    assert training_flops(specs[0]) == pytest.approx(flops)
    assert first["hours"] == pytest.approx(flops / ASSUMED_SUSTAINED_FLOPS / 3600)
    assert 0.01 < first["hours"] < 10  # 1.5B, 33M tokens: a fraction of an hour at 40% of an H200

    spec = specs[0]
    write_record(RunRecord(run_id=spec.run_id, study=spec.study, profile=spec.profile, label=spec.label,
                           status="ok", params=spec.params, duration_s=7200.0),
                 run_dir(spec.study, spec.profile, spec.run_id, results_root))
    measured = run_costs("positional_encoding", "paper", results_root)
    # 2 hours of a run spanning 4 GPUs (nproc: 4) are 8 GPU-hours; the runs not measured take that median
    assert p["nproc"] == 4
    assert measured[0]["how"] == "measured" and measured[0]["gpu_hours"] == 8.0
    assert all(r["how"] == "median of 1 measured" and r["gpu_hours"] == 8.0 for r in measured[1:])
    assert {r["how"] for r in run_costs("quantization", "paper", results_root)} == {"not estimated"}
