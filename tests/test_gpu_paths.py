"""The CUDA paths' defects of issue 27, reproduced on a CPU stand-in of the same code (mocks where only CUDA has the
behaviour); tests that need CUDA itself carry the ``gpu`` marker."""
import os
import pytest
import torch

from efficientllm_utils.metrics import inference


def tiny_llama(vocab: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_generation_timing_accepts_a_list_of_eos_ids():
    model = tiny_llama()
    model.generation_config.eos_token_id = [1, 2]  # as Qwen2.5-*-Instruct, Phi-3.5 and Qwen2.5-VL ship it
    model.generation_config.pad_token_id = None
    assert inference.pad_token_id(model) == 1
    with torch.no_grad():
        timings = inference.time_one_request(model, torch.tensor([[3, 4, 5]]), new_tokens=4)
    assert timings["latency_s"] > 0


# --- 2: vision generation's device and dtype paths (bf16 on the CPU stands in for a bf16 GPU pipeline) ----------

def tiny_sd3_pipeline(dtype=torch.float32):
    from efficientllm_utils.lvm import sd3
    from efficientllm_utils.lvm.presets import PRESETS, assemble_pipeline

    shape = PRESETS["sd3-tiny"].shape
    comps = sd3.build_components(shape, ["a cat", "a truck"], seed=0)
    return assemble_pipeline(sd3, comps).to(dtype=dtype), shape


def test_latents_are_encoded_in_the_vaes_dtype_and_kept_as_fp32_on_the_cpu():
    from efficientllm_utils.lvm import sd3

    pipe, shape = tiny_sd3_pipeline(torch.bfloat16)
    pixels = torch.rand(3, 3, shape.image_size, shape.image_size) * 2 - 1  # fp32, as the data loaders give them
    latents = sd3.to_latents(pipe.vae, pixels, batch_size=2)
    assert latents.dtype == torch.float32 and latents.device.type == "cpu"
    latents.numpy()  # the fine-tuning study hashes them


def test_flow_loss_runs_where_the_transformer_is():
    """A transformer on another device than the CPU-made noise and latents (the meta device stands in for CUDA)."""
    from efficientllm_utils.lvm import sd3
    from efficientllm_utils.lvm.flow import velocity_loss
    from efficientllm_utils.lvm.presets import PRESETS

    shape = PRESETS["sd3-tiny"].shape
    transformer = sd3.build_transformer(shape, seed=0).to("meta")
    latents = torch.randn(2, shape.latent_channels, shape.latent_size, shape.latent_size)
    cond = {"encoder_hidden_states": torch.randn(2, 2 * shape.max_tokens, shape.t5_dim),
            "pooled_projections": torch.randn(2, 2 * shape.text_dim)}
    loss = velocity_loss(transformer, sd3.denoise, latents, cond, torch.Generator().manual_seed(0))
    assert loss.device.type == "meta"


def test_full_finetuning_upcast_samples_inside_a_bf16_pipeline():
    from types import SimpleNamespace

    from efficientllm_utils.lvm import sd3
    from efficientllm_utils.studies.lvm_run import LVMFinetuneRun
    from efficientllm_utils.studies import lvm_finetune

    pipe, _ = tiny_sd3_pipeline(torch.bfloat16)
    p = LVMFinetuneRun(model="sd3-tiny", method="full", steps=2, batch_size=2, n_samples=2, grid_samples=1)
    built = lvm_finetune.build(SimpleNamespace(pipe=pipe, fam=sd3), p)
    assert next(built.model.parameters()).dtype == torch.float32  # fp32 masters of every trained weight
    cond = sd3.encode_captions(pipe, ["a cat", "a truck"])
    built.model.eval()  # as the training loop leaves it
    images = sd3.generate(pipe, cond, steps=1, seed=0)  # a bf16 pipeline feeding an fp32 transformer
    assert images.shape[0] == 2 and torch.isfinite(images).all()


def test_sampling_in_batches_draws_the_noise_one_call_draws():
    from efficientllm_utils.lvm import sd3
    from efficientllm_utils.lvm.presets import PAPER_MODELS, sampling

    pipe, _ = tiny_sd3_pipeline()
    cond = sd3.encode_captions(pipe, ["a cat", "a truck", "a cat", "a truck", "a cat"])
    whole = sd3.generate(pipe, cond, steps=2, seed=3)
    batched = sd3.generate(pipe, cond, steps=2, seed=3, batch_size=2)
    torch.testing.assert_close(batched, whole, atol=1e-5, rtol=0)
    assert sampling("sd3-small") == {}  # a preset samples as before: its own size, one call
    assert all(sampling(m)["batch_size"] < 1000 and sampling(m)["size"] for m in PAPER_MODELS)


def test_paper_checkpoints_train_at_the_size_they_sample():
    from efficientllm_utils.lvm import data
    from efficientllm_utils.lvm.presets import PAPER_SAMPLING, upsampled

    small = data.Examples(torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([0, 1]), ["a", "b"], "cifar")
    size = PAPER_SAMPLING["stabilityai/stable-diffusion-3.5-medium"].size
    big = upsampled(small, size)
    assert big.pixels.shape == (2, 3, size, size) and big.pixels.abs().max() <= 1 and "resized" in big.source


# --- 4: float models loaded straight onto their device ------------------------------------------------------------

class LoadedWith(Exception):
    """Raised by the stand-in ``from_pretrained`` with the keyword arguments it was called with."""


def _spy_from_pretrained(*args, **kwargs):
    raise LoadedWith(kwargs)


def test_float_models_load_with_a_device_map(monkeypatch, tmp_path):
    import transformers

    from efficientllm_utils import models
    from efficientllm_utils.finetune.config import MethodSettings
    from efficientllm_utils.finetune.methods import load_base_model

    model = tiny_llama()
    model.save_pretrained(tmp_path)
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText):
        monkeypatch.setattr(cls, "from_pretrained", _spy_from_pretrained)
    with pytest.raises(LoadedWith) as loaded:
        models.load_causal_lm(str(tmp_path), "bf16", "cpu")
    assert loaded.value.args[0]["device_map"] == {"": "cpu"} and loaded.value.args[0]["dtype"] == torch.bfloat16
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):  # CPU fine-tuning stays fp32
        with pytest.raises(LoadedWith) as loaded:
            load_base_model(str(tmp_path), "lora", MethodSettings(), device)
        assert loaded.value.args[0]["device_map"] == {"": device} and loaded.value.args[0]["dtype"] == dtype


def test_diffusers_float_denoiser_loads_at_its_dtype_on_its_device(monkeypatch):
    import diffusers

    from efficientllm_utils.lvm import quantize

    monkeypatch.setattr(diffusers.SD3Transformer2DModel, "from_pretrained", _spy_from_pretrained)
    with pytest.raises(LoadedWith) as loaded:
        quantize.load_transformer(diffusers.SD3Transformer2DModel, "somewhere", "bf16", "cuda", "transformer")
    assert loaded.value.args[0]["device_map"] == {"": "cuda"}
    assert loaded.value.args[0]["torch_dtype"] == torch.bfloat16


# --- 5: perplexity's cross-entropy in chunks ----------------------------------------------------------------------

def test_chunked_cross_entropy_equals_the_whole(tiny_llama, monkeypatch):
    from efficientllm_utils import quality

    torch.manual_seed(0)
    logits, targets = torch.randn(37, 50).bfloat16(), torch.randint(0, 50, (37,))
    whole = float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
    assert quality.summed_nll(logits, targets, chunk=50 * 4) == pytest.approx(whole, rel=1e-6)  # 10 chunks
    model, tokenizer = tiny_llama
    text = "The quick brown fox jumps over the lazy dog. " * 40
    expected = quality.perplexity(model, tokenizer, text, seq_len=32, max_tokens=128, keep_distributions=8)
    monkeypatch.setattr(quality, "LOGITS_CHUNK", 3 * len(tokenizer))  # 3 positions a chunk
    chunked = quality.perplexity(model, tokenizer, text, seq_len=32, max_tokens=128, keep_distributions=8)
    assert chunked["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    torch.testing.assert_close(chunked["logprobs"], expected["logprobs"])


# --- 6: masked attention over shared KV heads ---------------------------------------------------------------------

def _qkv_and_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    return q, k, v, (torch.rand(2, 4, 6, 6) > 0.3) | torch.eye(6, dtype=torch.bool)  # (b, heads, t, T)


def test_masked_grouped_attention_repeats_kv_heads_with_the_same_result():
    from efficientllm_utils.arch.attention import grouped_sdpa

    q, k, v, mask = _qkv_and_mask()
    torch.testing.assert_close(grouped_sdpa(q, k, v, mask, repeat_kv=True), grouped_sdpa(q, k, v, mask, repeat_kv=False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masked_grouped_attention_runs_on_the_memory_efficient_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from efficientllm_utils.arch.attention import grouped_sdpa

    q, k, v, mask = (t.cuda() for t in _qkv_and_mask())
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):  # no math fallback
        out = grouped_sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    reference = grouped_sdpa(q.float(), k.float(), v.float(), mask, repeat_kv=True)  # any kernel, fp32
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=2e-2)


# --- 7: the user's CUDA_VISIBLE_DEVICES -------------------------------------------------------------------------

class FakeNVML:
    """pynvml with four GPUs; MIG-a is a slice of GPU 1."""

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 4

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return {"GPU-c": ("gpu", 2), "MIG-a": ("mig", 1)}[uuid]

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle):
        return ("gpu", handle[1])

    def nvmlDeviceGetIndex(self, handle):
        assert handle[0] == "gpu"
        return handle[1]


@pytest.mark.parametrize("visible, expected", [
    (None, [("0", 0), ("1", 1), ("2", 2), ("3", 3)]),
    ("2,3", [("2", 2), ("3", 3)]),
    ("GPU-c,MIG-a", [("GPU-c", 2), ("MIG-a", 1)]),
    ("1,bogus,3", [("1", 1)]),  # CUDA stops at the first entry it cannot resolve
    ("-1", []),
])
def test_visible_gpus_follow_the_users_list(monkeypatch, visible, expected):
    import sys

    from efficientllm_utils.metrics import tracker

    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML())
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert tracker.visible_gpus() == expected


def test_local_workers_are_pinned_to_the_users_gpus_in_pci_order(monkeypatch):
    import distributed

    from efficientllm_utils import runner

    seen = {}
    monkeypatch.setattr(distributed, "SpecCluster", lambda workers, **kw: seen.update(workers))
    runner.local_cluster(["2", "GPU-c"])
    envs = [w["options"]["env"] for w in seen.values()]
    share = max(1, len(os.sched_getaffinity(0)) // 2)  # each of the two workers' kernels: half the cores
    assert envs == [{"CUDA_VISIBLE_DEVICES": "2", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", runner.WORKER_CORES_ENV: share},
                    {"CUDA_VISIBLE_DEVICES": "GPU-c", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", runner.WORKER_CORES_ENV: share}]


# --- 8: one build of a cached checkpoint at a time -------------------------------------------------------------

def test_concurrent_first_builds_stage_one_at_a_time(tmp_path):
    import threading
    import time

    from efficientllm_utils.models import build_once

    builds, inside, overlaps, errors = [], [], [], []

    def build(staging):
        inside.append(1)
        overlaps.append(len(inside) > 1)  # two builders sharing the staging folder
        staging.mkdir()
        time.sleep(0.2)
        (staging / "config.json").write_text("{}")
        builds.append(staging)
        inside.pop()

    def first_run():
        try:
            build_once(target, build)
        except Exception as err:  # noqa: BLE001 - a thread's error would otherwise vanish
            errors.append(err)

    target = tmp_path / "models" / "m"
    threads = [threading.Thread(target=first_run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not any(overlaps)
    assert len(builds) == 1 and (target / "config.json").exists() and not (tmp_path / "models" / "m.partial").exists()


# --- 9: bf16 training keeps fp32 master weights -----------------------------------------------------------------

def test_bf16_weights_accumulate_updates_below_their_spacing_through_fp32_masters():
    from efficientllm_utils.training import MasterWeights

    gain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))  # a norm gain; bf16's spacing at 1 is 2^-7
    model = torch.nn.Module()
    model.gain = gain
    naive = torch.optim.SGD([gain], lr=1e-3)
    for _ in range(20):  # each update (1e-3) rounds away in bf16
        gain.grad = torch.ones(4, dtype=torch.bfloat16)
        naive.step()
    assert torch.equal(gain, torch.ones(4, dtype=torch.bfloat16))
    masters = MasterWeights(model)
    optimizer = torch.optim.SGD(masters.module.parameters(), lr=1e-3)
    for _ in range(20):
        gain.grad = torch.ones(4, dtype=torch.bfloat16)
        masters.gradients_to_masters()
        optimizer.step()
        masters.masters_to_model()
    assert gain.dtype == torch.bfloat16 and float(gain[0].detach()) == pytest.approx(0.98, abs=4e-3)
    fp32 = torch.nn.Linear(2, 2)
    assert MasterWeights(fp32).module is fp32  # an fp32 model steps itself, as before


def test_dit_ema_of_a_bf16_model_is_kept_in_fp32():
    from efficientllm_utils.dit.train import weight_average

    model = torch.nn.Linear(3, 3).bfloat16()
    ema = weight_average(model, decay=0.9999)
    assert {q.dtype for q in ema.module.parameters()} == {torch.float32}
    ema.update_parameters(model.float())  # the first update copies
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model.float())
    moved = ema.module.weight - model.weight.float().sub(1.0)
    assert torch.allclose(moved, torch.full_like(moved, 1e-4), atol=1e-6)  # 0.0001 of the step, not rounded away


# --- 10: device memory per phase ----------------------------------------------------------------------------------

class FakeGPU:
    """pynvml and torch.cuda stand-ins for one GPU whose power reading is not supported (a MIG slice)."""

    def __init__(self):
        self.calls: list[str] = []

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetMemoryInfo(self, h):
        from types import SimpleNamespace
        return SimpleNamespace(used=30e9, total=80e9)

    def nvmlDeviceGetUtilizationRates(self, h):
        from types import SimpleNamespace
        return SimpleNamespace(gpu=50)

    def nvmlDeviceGetPowerUsage(self, h):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")


def test_each_tracked_phase_starts_from_an_empty_cache_and_reports_allocated_memory(monkeypatch):
    from efficientllm_utils.metrics import tracker

    gpu = FakeGPU()
    monkeypatch.setattr(tracker, "visible_gpu_indices", lambda: [0])
    monkeypatch.setattr(tracker.ResourceTracker, "_nvml", lambda self: gpu)
    for name, result in (("is_available", True), ("synchronize", None), ("empty_cache", None),
                         ("reset_peak_memory_stats", None), ("memory_allocated", 4e9), ("device_count", 1),
                         ("max_memory_allocated", 6e9)):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name, _r=result: gpu.calls.append(_n) or _r)
    with tracker.ResourceTracker(interval_s=0.01, use_gpu=True) as t:
        entered = list(gpu.calls)
        import time
        time.sleep(0.05)
    assert entered.index("empty_cache") < entered.index("reset_peak_memory_stats")
    assert t._thread is not None and not t._thread.is_alive() and len(t.samples) >= 3  # the sampler survived
    m = t.metrics()
    assert m["amu_gb"].value == pytest.approx(30) and "allocator-cache-included" in m["amu_gb"].method
    assert m["amu_allocated_gb"].value == pytest.approx(4) and m["peak_memory_gb"].value == pytest.approx(6)
    assert m["energy_j"].value is None and m["energy_j"].method.startswith("unavailable:")  # not the CPU's
    assert m["aec_w"].value is None and m["pcu"].value == pytest.approx(0.5)


# --- 11: the GPU matmul probe's clock ---------------------------------------------------------------------------

def test_probe_times_a_batch_of_calls_per_sync():
    from efficientllm_utils.metrics import machine_probe

    calls, syncs = [], []
    best, repeats = machine_probe._best_time(lambda: calls.append(1), lambda: syncs.append(1), seconds=0.0,
                                             min_repeats=3, calls=20)
    assert repeats == 3 and len(syncs) == 1 + 3 and len(calls) == 1 + 3 * 20
    assert machine_probe.MAX_N["cuda"] >= 16384 and machine_probe.CALLS_PER_SYNC["cpu"] == 1  # the CPU as before


def test_published_peaks_tell_nvl_and_grace_hopper_parts_apart():
    from efficientllm_utils.metrics.machine_probe import published_peaks

    assert published_peaks("NVIDIA H100 NVL")["matched"] == "H100 NVL"
    assert published_peaks("NVIDIA H200 NVL")["bf16"] == 835e12
    assert published_peaks("NVIDIA GH200 480GB")["matched"] == "GH200"
    assert published_peaks("NVIDIA H100 80GB HBM3")["bf16"] == 989e12


# --- 12: clocks read after the device's queued work -------------------------------------------------------------

def test_finetuning_step_clock_waits_for_the_optimizer(monkeypatch, tiny_llama):
    from efficientllm_utils import training
    from efficientllm_utils.finetune import train as ft_train
    from efficientllm_utils.finetune.config import TrainSettings
    from efficientllm_utils.finetune.data import Example

    events = []
    monkeypatch.setattr(training, "synchronize", lambda device: events.append("sync"))
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: events.append("step") or step(self, *a, **k))
    model, _ = tiny_llama
    model = __import__("copy").deepcopy(model)
    ids = [5, 6, 7, 8, 9]
    examples = [Example(row=i, input_ids=tuple(ids), labels=(-100, -100, 7, 8, 9), prompt="p", answer="a")
                for i in range(2)]
    ft_train.train_model(model, [{"params": list(model.parameters()), "lr": 1e-3}], examples,
                         TrainSettings(steps=2, batch_size=1), pad_token_id=0)
    assert events == ["sync", "step", "sync", "sync", "step", "sync"]  # the clock starts and stops after a sync


def test_denoiser_step_hooks_sync_around_each_forward(monkeypatch):
    from efficientllm_utils.lvm import pipelines, sd3

    pipe, _ = tiny_sd3_pipeline()
    cond = sd3.encode_captions(pipe, ["a cat", "a truck"])
    syncs = []
    monkeypatch.setattr(pipelines, "synchronize", lambda device: syncs.append(device))
    timed = pipelines.timed_generate(pipe, sd3, cond, steps=2, seed=0)
    assert len(timed.step_seconds) == 2 and len(syncs) == 2 * 2 + 1  # before and after each step, and at the end


# --- 13: the smaller ones -----------------------------------------------------------------------------------------

def test_cpu_use_is_divided_by_the_cores_this_process_may_use():
    import os

    from efficientllm_utils.metrics.tracker import job_cores

    assert job_cores() == len(os.sched_getaffinity(0))


def test_gpu_check_fails_when_a_gpu_is_present_but_torch_has_no_cuda(monkeypatch, capsys):
    from efficientllm_utils import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "visible_gpu_indices", lambda: [0])
    assert gpu_check.main() == 1
    assert "FAILED" in capsys.readouterr().out
