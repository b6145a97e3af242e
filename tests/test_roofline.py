"""The machine probe (cached once per machine), FLOPs and bytes counts, MFU/MBU and the cost model."""
import json
import time

import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from efficientllm_utils.metrics import machine_probe, model_costs, roofline
from efficientllm_utils.metrics.values import MetricValue

# A decoder small enough to count by hand: hidden 16, 4 heads of 4 (2 KV heads), FFN 24, 2 layers, vocab 32
SMALL = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def small_llama(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tied)).eval()


def fake_probe(fp32: float = 100e9, bandwidth: float = 10e9, int8: float | None = None) -> dict:
    return {"device": "cpu", "matmul": {
        "fp32": {"value": fp32, "unit": "FLOP/s", "method": machine_probe.MATMUL_METHOD},
        "int8": {"value": int8, "unit": "OP/s", "method": "unavailable:no int8 matmul kernel on cpu (test)"}},
        "bandwidth": {"value": bandwidth, "unit": "bytes/s", "method": machine_probe.BANDWIDTH_METHOD}}


# --- counts against hand-computed values ------------------------------------------------------------------------

def test_flops_per_token_of_a_small_config_by_hand():
    model = small_llama()
    # per layer: q 16x16, k 16x8, v 16x8, o 16x16, gate/up/down 16x24 -> 256+128+128+256+3*384 = 1920 weights;
    # 2 layers + the head (16x32 = 512): 4352 weights -> 8704 FLOPs
    assert model_costs.linear_flops_per_token(model) == 2 * (2 * 1920 + 512) == 8704
    # attention over 10 keys: 4 x 2 layers x 4 heads x head_dim 4 x 10 = 1280
    assert model_costs.flops_per_token(model, 10) == 8704 + 1280


def test_prefill_counts_the_head_at_each_sequences_last_position_only():
    model = small_llama()
    head = 2 * 16 * 32  # the 16 -> 32 head
    assert model_costs.head_flops_per_token(model) == head
    per_token = model_costs.flops_per_token(model, 5.5)
    # 2 sequences of 10 tokens: 20 tokens through the body, the head twice (generate's logits_to_keep=1)
    assert model_costs.prefill_flops(model, per_token, 20, 2) == 20 * (per_token - head) + 2 * head
    # and that is what generate runs: the prefill's forward returns the last position's logits only
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    model.generate(input_ids=torch.randint(0, 32, (2, 10)), max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert seen == [1]


def test_int8_mfu_is_held_against_the_arithmetic_bitsandbytes_runs():
    """bitsandbytes multiplies int8 operands with torch._int_mm only on AVX-512 CPUs; elsewhere in float32."""
    from efficientllm_utils.precisions.with_bitsandbytes import int8_matmul_dtype
    from efficientllm_utils.studies.quantization import compute_dtype

    expected = "int8" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "fp32"
    assert int8_matmul_dtype("cpu") == expected == compute_dtype("int8", "cpu")
    assert compute_dtype("int8", "cuda") == "int8" and compute_dtype("int4-nf4", "cuda") == "bf16"
    # on the CPU, nf4 computes what cpu_4bit_kernel=auto runs: the fused bf16 kernel, else the dequantize path in fp32
    from efficientllm_utils.cpu_4bit import cpu_has_avx512bf16

    assert compute_dtype("int4-nf4", "cpu") == ("bf16" if cpu_has_avx512bf16() else "fp32")


def test_pythia_has_a_flops_model_and_mamba_none():
    from efficientllm_utils.arch.attention_free import build, hf_config
    from efficientllm_utils.studies.architecture import forward_flops_per_token

    sizes = dict(vocab_size=32, hidden_size=16, n_layers=2, max_context=64)
    pythia = build(hf_config("pythia", n_heads=4, intermediate_size=24, **sizes), seed=0)
    # per layer: query_key_value 16x48, dense 16x16, dense_h_to_4h and dense_4h_to_h 16x24 -> 1792 weights;
    # 2 layers + the head (16x32): 4096 weights -> 8192 FLOPs; attention over 10 keys: 4 x 2 x 4 x 4 x 10 = 1280
    assert forward_flops_per_token(pythia, 10) == 8192 + 1280
    assert forward_flops_per_token(build(hf_config("mamba", **sizes), seed=0), 10) is None


def test_backward_share_is_the_part_above_the_lowest_trainable_weight():
    model = small_llama()
    assert model_costs.backward_share(model) == 1.0  # everything trains, the embedding first
    model.requires_grad_(False)
    assert model_costs.backward_share(model) == 0.0  # nothing trains: no backward
    model.model.layers[1].requires_grad_(True)  # Freeze's top layer: its 1920 weights and the head's 512 of 4352
    assert model_costs.backward_share(model) == pytest.approx((1920 + 512) / 4352)


def test_kv_bytes_per_token_by_hand_and_from_a_real_prefill():
    model = small_llama()
    # keys and values x 2 layers x 2 KV heads x head_dim 4 x 4 bytes (float32) = 128 bytes per token
    assert model_costs.kv_bytes_per_token(model.config, 4) == 128
    ids = torch.randint(0, 32, (2, 7))
    assert model_costs.measured_kv_bytes_per_token(model, ids) == 128


def test_weight_bytes_read_per_token_leaves_out_an_untied_embedding_only():
    from efficientllm_utils.precisions.counting import count_model_bytes

    tied, untied = small_llama(True), small_llama(False)
    tied_total, untied_total = count_model_bytes(tied)["total_bytes"], count_model_bytes(untied)["total_bytes"]
    assert untied_total - tied_total == 32 * 16 * 4  # the separate head
    assert model_costs.weight_bytes_read_per_token(tied, tied_total) == tied_total  # the head reads the matrix
    assert model_costs.weight_bytes_read_per_token(untied, untied_total) == untied_total - 32 * 16 * 4


def test_roofline_bound_and_attainable_by_hand():
    # 1 GFLOP and 1 GB on a 100 GFLOP/s, 10 GB/s machine: memory-bound, 0.1 s
    assert roofline.roofline_seconds(1e9, 1e9, 100e9, 10e9) == pytest.approx(0.1)
    assert roofline.roofline_seconds(100e9, 1e9, 100e9, 10e9) == pytest.approx(1.0)  # compute-bound
    assert roofline.attainable_flops_per_s(1.0, 100e9, 10e9) == 10e9  # below the ridge point (10 FLOP/byte)
    assert roofline.attainable_flops_per_s(50.0, 100e9, 10e9) == 100e9


def test_training_memory_is_weights_gradients_and_two_adamw_moments():
    parts = roofline.training_memory_parts(1000, 4)
    assert parts == {"weights": 4000, "gradients": 4000, "adamw-moments": 8000}
    predicted = roofline.predicted_memory(parts, "test")
    assert predicted.value == pytest.approx(16000 / 1e9) and predicted.method.startswith("estimated:cost-model")


# --- MFU and MBU with known answers -------------------------------------------------------------------------------

def test_mbu_of_a_matrix_vector_loop_whose_bytes_and_time_are_known():
    """A decode step is a matrix-vector product per weight matrix: 100 products of a 1024 x 1024 float32 matrix read
    4 MiB each. Timed as they run, on a 8 GB/s machine they used 100 x 4 MiB / seconds / 8 GB/s of its bandwidth."""
    weight = torch.randn(1024, 1024)
    x = torch.randn(1024)
    steps = 100
    start = time.perf_counter()
    for _ in range(steps):
        x = torch.tanh(weight @ x)  # the loop whose bytes are counted below
    seconds = time.perf_counter() - start
    phase = roofline.Phase("matvec-loop", flops=steps * 2 * weight.numel(),
                           bytes=steps * weight.numel() * weight.element_size(), seconds=seconds, dtype="fp32")
    mbu = roofline.mbu(phase, fake_probe(bandwidth=8e9))
    assert mbu.value == pytest.approx(100 * 4 * 2 ** 20 / seconds / 8e9)
    assert mbu.method.startswith("measured:counted-bytes(matvec-loop)") and "bandwidth" in mbu.method
    mfu = roofline.mfu(phase, fake_probe(fp32=100e9))
    assert mfu.value == pytest.approx(100 * 2 * 2 ** 20 / seconds / 100e9)
    assert phase.intensity == pytest.approx(0.5)  # 2 FLOPs per 4-byte weight: far below any ridge point


def test_quantization_decode_mbu_and_prefill_mfu_from_counted_bytes(monkeypatch, tiny_llama):
    """The study's own function on a real (tiny) model: decode MBU is (weights + batch x mean context x KV bytes
    per token) / TPOT / bandwidth, prefill MFU the analytical FLOPs of the prompt / TTFT / peak."""
    from efficientllm_utils.precisions.counting import count_model_bytes
    from efficientllm_utils.studies.quantization_run import QuantizationRun
    from efficientllm_utils.studies import quantization as q

    model, tokenizer = tiny_llama
    probe = fake_probe(fp32=50e9, bandwidth=5e9)
    monkeypatch.setattr(machine_probe, "load_or_measure", lambda device, refresh=False: probe)
    p = QuantizationRun(model="smollm2-135m-instruct", precision="fp32", prompt_tokens=16, new_tokens=8,
                        batch_size=2)
    counted = count_model_bytes(model)["total_bytes"]
    metrics = {"model_bytes": MetricValue.measured(counted, "bytes", "counted"),
               "ttft_p50_s": MetricValue.measured(0.02, "s", "t"), "tpot_p50_s": MetricValue.measured(0.01, "s", "t"),
               "amu_gb": MetricValue.measured(1.0, "GB", "t")}
    out, raw = q.measure_roofline(model, tokenizer, p, metrics)
    kv = model_costs.kv_bytes_per_token(model.config, 4)  # float32
    assert raw["kv_bytes_per_token"] == kv
    decode_bytes = counted + 2 * (16 + 8 / 2) * kv
    assert out["decode_mbu"].value == pytest.approx(decode_bytes / 0.01 / 5e9)
    head = model_costs.head_flops_per_token(model)  # at each sequence's last prompt position only
    prefill_flops = 2 * 16 * (model_costs.flops_per_token(model, (16 + 1) / 2) - head) + 2 * head
    assert out["prefill_mfu"].value == pytest.approx(prefill_flops / 0.02 / 50e9)
    assert out["decode_bound_s"].value == pytest.approx(decode_bytes / 5e9)  # memory-bound
    assert out["predicted_memory_gb"].value == pytest.approx((counted + 2 * 24 * kv) / 1e9)
    assert [ph["name"] for ph in raw["phases"]] == ["prefill", "decode"]


def test_mfu_is_missing_with_the_reason_where_the_probe_lacks_a_dtype_or_a_flops_model():
    phase = roofline.Phase("decode", flops=1e6, bytes=1e6, seconds=1.0, dtype="int8")
    missing = roofline.mfu(phase, fake_probe())
    assert missing.value is None and "no int8 matmul peak" in missing.method and "(test)" in missing.method
    assert roofline.mfu(phase, None).method.startswith("unavailable:no machine probe")
    no_model = roofline.Phase("decode", flops=None, bytes=1e6, seconds=1.0, dtype="fp32", flops_method="no model")
    assert roofline.mfu(no_model, fake_probe()).value is None
    assert roofline.mbu(no_model, fake_probe(bandwidth=1e6)).value == pytest.approx(1.0)
    assert roofline.bound_seconds(no_model, fake_probe(bandwidth=1e6)).value == pytest.approx(1.0)


def test_architecture_roofline_counts_training_steps_and_decode_per_context(monkeypatch):
    from efficientllm_utils.arch.analysis import flops_per_token, kv_cache_bytes_per_token
    from efficientllm_utils.params import expand, params_path
    from efficientllm_utils.studies.architecture_run import PretrainRun
    from efficientllm_utils.studies import architecture as arch

    p = PretrainRun.model_validate(expand(params_path("attention"), "smoke")[0].params)
    model = arch.EfficientDecoderForCausalLM(p.decoder_config())
    probe = fake_probe(fp32=40e9, bandwidth=4e9)
    monkeypatch.setattr(machine_probe, "load_or_measure", lambda device, refresh=False: probe)
    params = sum(t.numel() for t in model.parameters())
    kv = kv_cache_bytes_per_token(model.config, 4)
    metrics = {"params_total": MetricValue.measured(params, "params", "c"),
               "kv_cache_bytes_per_token": MetricValue.estimated(kv, "bytes/token", "f"),
               "al_s": MetricValue.measured(0.5, "s/iter", "t")}
    for c in p.decode_contexts:
        metrics[f"decode_ctx{c}_ttft_s"] = MetricValue.measured(0.05, "s", "t")
        metrics[f"decode_ctx{c}_tpot_s"] = MetricValue.measured(0.01, "s", "t")
    out, raw = arch.measure_roofline(model, p, metrics)
    train_flops = 3 * p.batch_size * p.seq_len * flops_per_token(model.config, (p.seq_len + 1) / 2)
    assert out["train_mfu"].value == pytest.approx(train_flops / 0.5 / 40e9)
    c = p.decode_contexts[-1]
    assert out[f"decode_ctx{c}_mbu"].value == pytest.approx((params * 4 + kv * (c + p.new_tokens / 2)) / 0.01 / 4e9)
    head = 2 * model.config.hidden_size * model.config.vocab_size  # our decoder's head, at the last position only
    prefill = c * (flops_per_token(model.config, (c + 1) / 2) - head) + head
    assert out[f"decode_ctx{c}_prefill_mfu"].value == pytest.approx(prefill / 0.05 / 40e9)
    assert out["predicted_memory_gb"].value == pytest.approx(16 * params / 1e9)


# --- the probe: measured once per machine ---------------------------------------------------------------------

def test_probe_is_measured_once_per_machine_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFICIENTLLM_PROBE_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(machine_probe, "measure", lambda device: calls.append(device) or {**fake_probe()})
    threads = torch.get_num_threads()
    assert machine_probe.cached("cpu") is None and machine_probe.cached_all() == {}
    first = machine_probe.load_or_measure("cpu")
    second = machine_probe.load_or_measure("cpu")
    assert calls == ["cpu"] and first == second and first["key"]["torch_threads"] == threads
    assert json.loads(machine_probe.cache_path("cpu").read_text()) == first
    from efficientllm_utils.records import provenance

    assert provenance()["machine_probe"] == {f"cpu-{threads}t": first}  # every record carries it, from the cache
    machine_probe.load_or_measure("cpu", refresh=True)
    assert calls == ["cpu", "cpu"]
    # another thread count is probed once more, and both stay cached
    torch.set_num_threads(threads + 1)
    try:
        machine_probe.load_or_measure("cpu")
        machine_probe.load_or_measure("cpu")
    finally:
        torch.set_num_threads(threads)
    assert calls == ["cpu", "cpu", "cpu"] and len(machine_probe.cached_all()) == 2
    # another torch (or CPU, or GPU) is another machine: its own probe
    key = machine_probe.machine_key
    monkeypatch.setattr(machine_probe, "machine_key", lambda device, t: {**key(device, t), "torch": "0.0-other"})
    machine_probe.load_or_measure("cpu")
    assert calls == ["cpu", "cpu", "cpu", "cpu"]
    with pytest.raises(ValueError, match="device must be one of"):
        machine_probe.load_or_measure("tpu")


def _torch_multiplies(dtype_name: str) -> bool:
    """Whether torch runs a small matmul of this dtype on the CPU (the ops a model's layers use)."""
    try:
        if dtype_name == "int8":
            torch._int_mm(torch.ones(32, 32, dtype=torch.int8), torch.ones(32, 32, dtype=torch.int8))
        else:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
            torch.nn.functional.linear(torch.ones(32, 32, dtype=dtype), torch.ones(32, 32, dtype=dtype))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def test_probe_measures_every_dtype_or_says_why_not(monkeypatch):
    monkeypatch.setattr(machine_probe, "MAX_N", {"cpu": 256})
    monkeypatch.setattr(machine_probe, "BANDWIDTH_BYTES", {"cpu": 8 * 2 ** 20})
    probe = machine_probe.measure("cpu", seconds_per_dtype=0.05)
    for name in machine_probe.DTYPES:
        peak = probe["matmul"][name]
        if _torch_multiplies(name):  # unavailable only where torch itself has no such matmul on this CPU
            assert peak["value"] > 0 and peak["n"] == 256, (name, peak)
        else:
            assert peak["value"] is None and peak["method"].startswith(f"unavailable:no {name} matmul kernel on cpu")
    assert probe["matmul"]["fp32"]["op"].endswith(("(256x256x256)", "(64x256x256)", "(64x1024x256)"))
    assert probe["matmul"]["fp32"]["value"] > 0 and probe["bandwidth"]["value"] > 0
    assert probe["published"] is None  # no GPU: nothing published to set beside it
    assert "matmul fp32" in machine_probe.describe({**probe, "key": machine_probe.machine_key("cpu", 1)})


def test_published_gpu_peaks_are_matched_by_model_and_labelled():
    h200 = machine_probe.published_peaks("NVIDIA H200")
    assert h200["bandwidth"] == 4.8e12 and "published by the vendor" in h200["source"]
    assert machine_probe.published_peaks("NVIDIA H100 PCIe")["bandwidth"] == 2.0e12
    assert machine_probe.published_peaks("NVIDIA H100 80GB HBM3")["bandwidth"] == 3.35e12
    assert machine_probe.published_peaks("NVIDIA A100 80GB PCIe")["bandwidth"] == 1.935e12
    assert machine_probe.published_peaks("NVIDIA GeForce RTX 4090") is None


# --- the report: runs with and without the probe -------------------------------------------------------------------

def _record(run_id: str, precision: str, with_probe: bool):
    from efficientllm_utils.records import RunRecord

    metrics = {"model_bytes": MetricValue.measured(1e8, "bytes", "counted"),
               "amu_gb": MetricValue.measured(0.5, "GB", "psutil-process-rss-sampler"),
               "pcu": MetricValue.unavailable("fraction", "no-gpu(PCU is NVML utilization.gpu)")}
    raw, provenance = {}, {}
    if with_probe:
        probe = {**fake_probe(fp32=100e9, bandwidth=10e9), "published": None, "torch_threads": 2, "probe_s": 9.0,
                 "measured_at": "2026-11-30T00:00:00Z", "key": {"cpu": "test CPU", "torch": "2.x"}}
        probe["matmul"]["fp32"] |= {"n": 512, "repeats": 9, "op": "linear(64x512x512)"}
        probe["bandwidth"] |= {"copy_bytes_per_s": 8e9, "read_bytes_per_s": 10e9, "tensor_bytes": 2 ** 28}
        decode = roofline.Phase("decode", flops=2e8, bytes=1e8, seconds=0.05, dtype="fp32")  # bound 0.01 s
        prefill = roofline.Phase("prefill", flops=2e10, bytes=1e8, seconds=0.5, dtype="fp32")
        metrics |= roofline.phase_metrics(decode, probe, "decode") | roofline.phase_metrics(prefill, probe, "prefill")
        metrics["predicted_memory_gb"] = roofline.predicted_memory({"weights": 1e8}, "test")
        raw = {"roofline": {"phases": [roofline.point(prefill), roofline.point(decode)], "probe": probe}}
        provenance = {"machine_probe": {"cpu-2t": probe}}
    return RunRecord(run_id=run_id, study="quantization", profile="cpu", label=precision, status="ok",
                     params={"model": "m", "precision": precision, "device": "cpu"}, metrics=metrics, raw=raw,
                     provenance=provenance, finished="2026-11-30T00:00:00")


def test_report_shows_mfu_mbu_and_says_why_a_record_has_none(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from efficientllm_utils.records import write_record
    from efficientllm_utils.reports.load import load_study
    from efficientllm_utils.reports import quantization as qr
    from efficientllm_utils.reports import roofline as rl

    for run_id, precision, probed in (("a", "fp32", True), ("b", "bf16", False)):
        write_record(_record(run_id, precision, probed), tmp_path / "quantization" / "cpu" / run_id)
    res = load_study("quantization", "cpu", root=tmp_path)
    label = qr.run_label(res)
    table = rl.utilisation_table(res, label, qr.ROOFLINE_METRICS).set_index("run")
    assert table.loc["fp32", "decode MBU"] == "20%"  # 1e8 bytes / 0.05 s / 10 GB/s
    assert table.loc["fp32", "prefill MFU"] == "40%"  # 2e10 FLOPs / 0.5 s / 100 GFLOP/s
    assert table.loc["bf16", "decode MBU"].startswith("missing: record made before the machine probe")
    assert table.loc["fp32", "MFU against the matmul peak of"] == "fp32"  # the dtype its phases computed in
    assert pd.isna(table.loc["bf16", "MFU against the matmul peak of"])
    assert table.loc["fp32", "PCU (NVML utilization.gpu)"].startswith("missing: no-gpu")
    costs = rl.cost_model_table(res, label, lambda name: name == "decode").set_index("run")
    assert costs.loc["fp32", "time_ratio"] == pytest.approx(5.0)  # 0.05 s measured against a 0.01 s bound
    assert costs.loc["fp32", "time_gap"].startswith("80% of each step")
    assert costs.loc["fp32", "memory_ratio"] == pytest.approx(5.0) and "framework overhead" in costs.loc["fp32", "memory_gap"]
    assert rl.points(res, label)["run"].tolist() == ["fp32", "fp32"]
    fig = rl.roofline_plot(rl.points(res, label), rl.probe_of(res))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "FLOP/byte" in ax.get_xlabel() and "FLOP/s" in ax.get_ylabel()
    assert "fp32 20%" in rl.decode_mbu_summary(res, label)
    assert rl.probe_table(rl.probe_of(res))["measured"].iloc[0] == pytest.approx(100.0)  # GFLOP/s
    qr.show_roofline(res)  # the chapter's cell runs on a mix of old and new records


def test_report_of_records_without_any_probe_never_crashes(tmp_path):
    from efficientllm_utils.records import write_record
    from efficientllm_utils.reports.load import load_study
    from efficientllm_utils.reports import quantization as qr
    from efficientllm_utils.reports import roofline as rl

    write_record(_record("b", "bf16", False), tmp_path / "quantization" / "cpu" / "b")
    res = load_study("quantization", "cpu", root=tmp_path)
    assert rl.probe_of(res) is None and "no machine probe" in rl.probe_note(None)
    assert rl.points(res, qr.run_label(res)).empty
    qr.show_roofline(res)
    qr.show_roofline(load_study("quantization", "cpu", root=tmp_path / "none"))


def test_lora_training_step_mfu_counts_the_adapters_and_their_weight_gradients_only(monkeypatch):
    from efficientllm_utils import finetune as ft
    from efficientllm_utils.studies.finetune_run import FinetuneRun
    from efficientllm_utils.studies import finetune as fts

    model = small_llama()
    base_linear = model_costs.linear_flops_per_token(model)  # 8704, as counted by hand above
    p = FinetuneRun(model="smollm2-135m-instruct", method="lora", rank=2, target_modules="all-linear",
                    timing_warmup_steps=1, steps=3, batch_size=2)
    built, counts = fts.build(model, p)
    # LoRA rank 2 on every linear layer but the head adds (in + out) x 2 weights: q (16+16), k (16+8), v (16+8),
    # o (16+16), gate (16+24), up (16+24), down (24+16) -> 232 x 2 = 464 per layer, 928 over the 2 layers
    assert counts["trainable"] == 2 * 2 * (32 + 24 + 24 + 32 + 40 + 40 + 40) == 928
    assert model_costs.linear_flops_per_token(built.model) == base_linear + 2 * 928
    probe = fake_probe(fp32=10e9, bandwidth=1e9)
    monkeypatch.setattr(machine_probe, "load_or_measure", lambda device, refresh=False: probe)
    steps = [ft.StepRecord(step=i, loss=1.0, seconds=0.2, lr=1e-3, grad_norm=1.0, samples=2, tokens=20,
                           padded_tokens=20, loss_tokens=4, indices=[0, 1], rows=[0, 1]) for i in (1, 2, 3)]
    out, raw = fts.measure_roofline(built, p, steps, counts["trainable"],
                                    {"al_s": MetricValue.measured(0.2, "s/iter", "t")})
    forward = model_costs.flops_per_token(built.model, (10 + 1) / 2)  # sequences of 20 / 2 = 10 padded tokens
    # the backward sends input gradients from the first trainable module on: all but layer 0's frozen q_proj (16x16),
    # which is registered before its adapter
    share = (4352 + 928 - 256) / (4352 + 928)
    assert model_costs.backward_share(built.model) == pytest.approx(share)
    assert out["train_mfu"].value == pytest.approx(20 * ((1 + share) * forward + 2 * 928) / 0.2 / 10e9)
    assert raw["phases"][0]["dtype"] == "fp32" and out["predicted_memory_gb"].method.startswith("estimated:")
