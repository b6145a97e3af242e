"""The attention-free study: its params, the models from transformers and their caches against the formulas, the
report's helpers, and the smoke profile end to end."""
import pandas as pd
import pytest
import torch

from efficientllm_utils.arch import EfficientDecoderForCausalLM
from efficientllm_utils.arch import attention_free as af
from efficientllm_utils.arch.analysis import kv_cache_bytes_per_token, param_counts
from efficientllm_utils.params import ParamsError, expand, params_path
from efficientllm_utils.studies.attention_free_run import AttentionFreeRun
from efficientllm_utils.studies.architecture_run import PretrainRun
from efficientllm_utils.reports import architecture as ar
from efficientllm_utils.reports import attention_free as afr
from efficientllm_utils.reports.load import load_study
from efficientllm_utils.studies import attention_free as study

PATH = params_path("attention_free")
# the shapes the issue gives for the paper's Table 6 (d_model, layers)
TABLE6 = {"mamba": {"0.5B": (768, 24), "1.5B": (1536, 48), "3B": (2560, 64)},
          "pythia": {"0.5B": (1024, 24), "1.5B": (2048, 32), "3B": (2560, 32)},
          "rwkv": {"0.5B": (1024, 24), "1.5B": (2048, 32), "3B": (2560, 40)}}


def _params_of(p: AttentionFreeRun) -> int:
    if p.architecture == "transformer":
        return param_counts(p.decoder_config())["total"]
    return sum(t.numel() for t in af.build(p.hf_config(), seed=0).parameters())


# --- params -----------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["cpu", "smoke", "paper"])
def test_profiles_expand_and_share_data_steps_and_schedule(profile):
    specs = expand(PATH, profile)
    runs = [AttentionFreeRun.model_validate(s.params) for s in specs]
    assert {p.architecture for p in runs} >= {"transformer", "mamba", "rwkv"}
    shared = ("seed", "data", "tokenizer", "vocab_size", "seq_len", "batch_size", "steps", "lr", "min_lr",
              "warmup_steps", "decode_contexts", "new_tokens", "dtype", "num_threads")
    for field in shared:
        assert len({repr(getattr(p, field)) for p in runs}) == 1, field


def test_cpu_models_match_the_transformers_parameters_within_5_percent():
    runs = [AttentionFreeRun.model_validate(s.params) for s in expand(PATH, "cpu")]
    counts = {p.architecture: _params_of(p) for p in runs}
    assert set(counts) == {"transformer", "mamba", "rwkv", "pythia"}
    for kind, n in counts.items():
        assert abs(n / counts["transformer"] - 1) <= 0.05, (kind, n, counts["transformer"])


def test_cpu_transformer_is_the_architecture_studies_model():
    ours = next(AttentionFreeRun.model_validate(s.params) for s in expand(PATH, "cpu")
                if s.params["architecture"] == "transformer")
    theirs = PretrainRun.model_validate(expand(params_path("attention"), "cpu")[1].params)  # gqa
    assert theirs.attention == "gqa"
    assert param_counts(ours.decoder_config()) == param_counts(theirs.decoder_config())
    for field in ("seq_len", "vocab_size", "steps", "lr", "min_lr", "warmup_steps", "seed"):
        assert getattr(ours, field) == getattr(theirs, field), field


def test_paper_profile_builds_table_6_shapes():
    for spec in expand(PATH, "paper"):
        p = AttentionFreeRun.model_validate(spec.params)
        if p.architecture == "transformer":
            assert p.decoder_config().hidden_size in (896, 1536, 2048)
            continue
        config = p.hf_config()
        assert (config.hidden_size, config.num_hidden_layers) == TABLE6[p.architecture][p.size]
        assert config.vocab_size == 151936 and config.tie_word_embeddings


def test_bad_architecture_fails_naming_the_field_and_the_allowed_values():
    with pytest.raises(ParamsError) as err:
        expand(PATH, "smoke", overrides={"architecture": "rwkv7"})
    message = str(err.value)
    assert "field 'architecture'" in message and all(f"'{k}'" in message for k in af.ARCHITECTURES)


@pytest.mark.parametrize("settings, words", [
    ({"architecture": "rwkv", "hidden_size": 32, "n_layers": 1}, "rwkv needs n_layers >= 2"),
    ({"architecture": "pythia", "hidden_size": 32, "n_layers": 2}, "n_heads"),
    ({"architecture": "pythia", "hidden_size": 30, "n_layers": 2, "n_heads": 4}, "n_heads dividing"),
    ({"architecture": "mamba", "n_layers": 2}, "hidden_size"),
])
def test_impossible_models_fail_before_any_work(settings, words):
    with pytest.raises(ValueError, match=words):
        AttentionFreeRun.model_validate(settings)


# --- models and their caches ---------------------------------------------------------------------

TINY = {"mamba": dict(hidden_size=32, n_layers=2), "rwkv": dict(hidden_size=32, n_layers=2, intermediate_size=48),
        "pythia": dict(hidden_size=32, n_layers=2, n_heads=4)}
CONTEXTS = [1, 7, 40, 96]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(TINY))
def test_measured_state_equals_the_formula_at_every_context(kind, dtype):
    config = af.hf_config(kind, vocab_size=128, max_context=128, **TINY[kind])
    model = af.build(config, seed=0, dtype=dtype).eval()
    size = dtype.itemsize
    measured = [af.measure_state_bytes(model, torch.randint(0, 128, (1, c))) for c in CONTEXTS]
    assert measured == [af.state_bytes(config, c, size) for c in CONTEXTS]
    if kind in af.ATTENTION_FREE:
        assert len(set(measured)) == 1 and measured[0] > 0  # a fixed-size state
    else:
        assert [m / c for m, c in zip(measured, CONTEXTS)] == [2 * 2 * 32 * size] * len(CONTEXTS)  # linear


def test_our_transformers_cache_grows_linearly_as_the_formula_says():
    p = AttentionFreeRun(architecture="transformer", hidden_size=32, n_layers=2, n_heads=4, intermediate_size=64,
                         vocab_size=256, decode_contexts=[96])
    config = p.decoder_config()
    model = EfficientDecoderForCausalLM(config).eval()
    measured = [af.measure_state_bytes(model, torch.randint(0, 256, (1, c))) for c in CONTEXTS]
    assert measured == [kv_cache_bytes_per_token(config, 4) * c for c in CONTEXTS]


def test_cache_bytes_counts_a_shared_tensor_once_and_finds_no_cache_in_a_plain_output():
    t = torch.zeros(3, 4)
    assert af.cache_bytes([t, t, {"a": t}]) == 48
    with pytest.raises(ValueError, match="holds no cache"):
        af.returned_cache(type("Out", (), {})())


def test_mambapys_parallel_scan_gives_the_sequential_loops_logits():
    ids = torch.randint(0, 128, (2, 24))
    logits = {}
    for scan in (True, False):
        config = af.hf_config("mamba", vocab_size=128, max_context=64, use_mambapy=scan, **TINY["mamba"])
        logits[scan] = af.build(config, seed=0).train()(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)


def test_every_model_trains_and_decodes_through_the_shared_loop():
    from efficientllm_utils.arch.train import pretrain
    from efficientllm_utils.metrics.inference import time_one_request

    block = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    for kind, shape in TINY.items():
        model = af.build(af.hf_config(kind, vocab_size=128, max_context=64, **shape), seed=0, eos_token_id=0)
        start = {name: w.detach().clone() for name, w in model.named_parameters()}
        samples = pretrain(model, [block] * 3, steps=3, lr=1e-2, warmup=1, min_lr=1e-3)  # one block, three times
        losses = [s.lm_loss for s in samples]
        assert [s.aux_loss for s in samples] == [None] * 3
        assert losses[0] > losses[1] > losses[2], (kind, losses)  # it learns the block it sees again (~0.1-1 nats)
        assert all(not torch.equal(start[name], w) for name, w in model.named_parameters()), kind  # every weight
        model.eval()
        assert time_one_request(model, block[:1], 3)["latency_s"] > 0


# --- report --------------------------------------------------------------------------------------

def test_pages_handle_the_study_without_results(tmp_path):
    res = load_study("attention_free", "cpu", root=tmp_path)
    table = ar.pretraining_table(res)
    curves = afr.state_curves(res)
    assert table.empty and curves.empty and afr.params_table(table).empty and afr.state_table(curves).empty
    assert afr.findings_text(res, table, curves) == "*No results yet.*"
    assert "No results yet" in afr.summary(res, table, curves)


def test_params_and_state_tables_compare_with_the_transformer():
    table = pd.DataFrame({"model": ["m"] * 3, "variant": ["transformer", "mamba", "pythia"],
                          "params_M": [1.0, 0.97, 1.06]})
    params = afr.params_table(table).set_index("variant")
    assert params.loc["mamba", "difference_pct"] == pytest.approx(-3.0)
    assert params["within_tolerance"].tolist() == [True, True, False]
    curves = pd.DataFrame({"model": ["m"] * 4, "variant": ["transformer"] * 2 + ["mamba"] * 2,
                           "context": [64, 2048] * 2, "analytical_bytes": [100, 3200, 50, 50],
                           "measured_bytes": [100, 3200, 50, 51], "latency_s": [1.0, 2.0, 1.0, 1.1]})
    state = afr.state_table(curves).set_index("variant")
    assert state["equals_formula"].to_dict() == {"transformer": True, "mamba": False}
    notes = afr.observations(table, curves)
    assert "transformer 100 B -> 3,200 B (32x)" in notes[0] and "mamba 50 B -> 51 B (1.02x)" in notes[0]
    assert "transformer 1 s -> 2 s (2.00x)" in notes[1] and "mamba 1 s -> 1.1 s (1.10x)" in notes[1]
    assert notes[-1] == "3 of 4 measured cache sizes equal their formula exactly."


# --- end to end ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_profile_end_to_end(tmp_path):
    from efficientllm_utils import cli

    assert cli.main(["run", "attention_free", "--profile", "smoke", "--results", str(tmp_path)]) == 0
    res = load_study("attention_free", "smoke", root=tmp_path)
    assert len(res.ok_records) == len(expand(PATH, "smoke"))
    for record in res.ok_records:
        m = record.metrics
        contexts = record.params["decode_contexts"]
        for c in contexts:  # the real caches hold what the formulas say
            assert m[f"state_ctx{c}_bytes_measured"].value == m[f"state_ctx{c}_bytes"].value > 0
        growing = m[f"state_ctx{contexts[-1]}_bytes_measured"].value > m[f"state_ctx{contexts[0]}_bytes_measured"].value
        assert growing == (record.params["architecture"] not in af.ATTENTION_FREE)
        assert record.provenance["model"]["torch_threads"] == 1
        assert m["al_s"].value > 0 and record.quality["perplexity"] > 1
    mamba = next(r for r in res.ok_records if r.params["architecture"] == "mamba")
    assert mamba.provenance["model"]["mamba_scan"].startswith("mambapy")
    table = ar.pretraining_table(res)
    curves = afr.state_curves(res)
    assert set(curves["variant"]) == set(table["variant"]) and curves["latency_s"].notna().all()
    assert afr.state_table(curves)["equals_formula"].all()
    text = afr.findings_text(res, table, curves)
    assert "measured cache sizes equal their formula exactly" in text
    board = ar.leaderboards("attention_free", table)
    assert board and set(board[0].side["method"]) >= {"Transformer", "Mamba", "RWKV"}


def test_every_paper_run_has_a_cost_estimate(tmp_path):
    from efficientllm_utils.cost import run_costs

    rows = run_costs("attention_free", "paper", root=tmp_path)  # no records: every run by the FLOPs model
    assert len(rows) == 12 and all(r["how"] == "FLOPs model" and r["hours"] > 0 for r in rows)
