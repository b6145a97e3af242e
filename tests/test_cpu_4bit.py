"""bitsandbytes' two CPU 4-bit kernels (efficientllm_utils/cpu_4bit.py), each forced in turn on any machine.

Both kinds of CPU run on every machine: ``emulate_avx512bf16_cpu`` (bitsandbytes' own repack; on a CPU without
AVX512-BF16 our plain-torch reference of its kernel, on a CPU with it the native kernel, also held against the
reference) and ``emulate_cpu_without_avx512bf16`` (bitsandbytes' check answering no).
"""
import pytest
import torch

from efficientllm_utils import cpu_4bit, models

from .conftest import on_cpu

# in_features a whole number of 64-wide quantisation blocks, out_features of 32-row tiles: the repack takes every layer
WIDE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
            initializer_range=0.02)
NARROW = {**WIDE, "hidden_size": 32, "intermediate_size": 64, "head_dim": 8}  # 32 < one 64-wide block
NATIVE = cpu_4bit.cpu_has_avx512bf16()


def _checkpoint(tmp_path_factory, shape: dict, name: str) -> str:
    """A tiny random Llama with SmolLM2's tokenizer, saved so that ``models.load_causal_lm`` loads it in 4-bit."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(name)
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(path)
    AutoTokenizer.from_pretrained(models.resolve_source("smollm2-135m-instruct")).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    return _checkpoint(tmp_path_factory, WIDE, "wide")


@pytest.fixture(scope="module")
def narrow_dir(tmp_path_factory):
    return _checkpoint(tmp_path_factory, NARROW, "narrow")


def load_4bit(path: str, kernel: str | None = None):
    """int4-nf4 as the quantization study loads it (``kernel`` pinned; in fp32 on the CPU), or with bitsandbytes left
    alone (None) at the same dtypes."""
    from transformers import AutoModelForCausalLM

    if kernel is not None:
        return models.load_causal_lm(path, "int4-nf4", cpu_4bit_kernel=kernel)[0]
    config = models.quantization_config("int4-nf4")
    config.bnb_4bit_compute_dtype = torch.float32  # what the study sets on the CPU, here through the config
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32,
                                                device_map={"": "cpu"}).eval()


TOKENS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


def quantized_layer(out_features=64, in_features=128):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features) * 0.05, requires_grad=False,
                                     quant_type="nf4")
    return layer.to("cpu")  # quantises


# --- the fused kernel's layout and arithmetic ------------------------------------------------------

def test_reference_reads_the_codes_that_bitsandbytes_repacked():
    import copy

    import bitsandbytes.functional as F

    layer = quantized_layer()
    state = layer.weight.quant_state
    n, k = state.shape
    flat = layer.weight.data.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(n, k)  # two codes a byte, high nibble first
    packed, packed_state = F._convert_weight_packed_for_cpu(layer.weight.data.clone(), copy.deepcopy(state))
    assert torch.equal(cpu_4bit.unpacked_codes(packed, n, k), codes)
    x = torch.randn(3, k)
    dequantized = x.to(torch.bfloat16) @ F.dequantize_4bit(layer.weight.data, state).to(torch.bfloat16).T
    fused = cpu_4bit.reference_packed_matmul(x, packed, packed_state)
    # the only differences: scales rounded to bf16 (rel. 2^-8) and bf16 outputs
    torch.testing.assert_close(fused.float(), dequantized.float(), atol=2 ** -6 * dequantized.abs().max().item(),
                               rtol=0)


@pytest.mark.skipif(not NATIVE, reason="this CPU has no AVX512-BF16: bitsandbytes' native fused kernel is absent")
def test_native_fused_kernel_matches_the_reference():
    import copy

    import bitsandbytes.functional as F

    layer = quantized_layer()
    packed, state = F._convert_weight_packed_for_cpu(layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state))
    x = torch.randn(5, layer.in_features).to(torch.bfloat16)
    native = F.gemv_4bit(x, packed, state=state).float()
    reference = cpu_4bit.reference_packed_matmul(x, packed, state).float()
    torch.testing.assert_close(native, reference, atol=2 ** -6 * reference.abs().max().item(), rtol=0)


# --- what bitsandbytes does when left alone, and what pinning changes ----------------------------

def test_left_alone_the_first_eval_forward_repacks_every_layer(wide_dir):
    with cpu_4bit.emulate_avx512bf16_cpu():
        model = load_4bit(wide_dir)
        assert cpu_4bit.kernel_report(model)["layers_packed"] == 0
        logits(model)
        report = cpu_4bit.kernel_report(model)
    assert report["layers_packed"] == report["layers_4bit"] == 14
    with pytest.raises(ValueError, match="already repacked"):  # its weights can no longer be restored exactly
        cpu_4bit.pin_kernel(model, "dequantize")


def test_left_alone_on_a_cpu_without_avx512bf16_every_layer_dequantizes(wide_dir):
    with cpu_4bit.emulate_cpu_without_avx512bf16():
        model = load_4bit(wide_dir)
        left_alone = logits(model)
        report = cpu_4bit.kernel_report(model)
        pinned = logits(load_4bit(wide_dir, "dequantize"))
    assert report["layers_packed"] == 0 and report["layers_pinned"] == {"dequantize": 14}
    assert report["kernel"] == "dequantize" and not report["cpu_has_avx512bf16"]
    assert torch.equal(left_alone, pinned)  # the same kernel as pinning dequantize


def test_pinned_dequantize_runs_the_same_kernel_on_both_kinds_of_cpu(wide_dir):
    with cpu_4bit.emulate_cpu_without_avx512bf16():
        plain = load_4bit(wide_dir, "dequantize")
    with cpu_4bit.emulate_avx512bf16_cpu():
        emulated = load_4bit(wide_dir, "dequantize")
        assert torch.equal(logits(emulated), logits(plain))
        report = cpu_4bit.kernel_report(emulated)
    assert report["layers_packed"] == 0 and report["layers_pinned"] == {"dequantize": 14}
    assert report["kernel"] == "dequantize" and report["cpu_has_avx512bf16"]


def test_fused_and_dequantize_agree_within_bf16_rounding(wide_dir):
    with cpu_4bit.emulate_cpu_without_avx512bf16():
        dequantized = logits(load_4bit(wide_dir, "dequantize"))
    with cpu_4bit.emulate_avx512bf16_cpu():
        model = load_4bit(wide_dir, "fused-bf16")
        fused = logits(model)
        report = cpu_4bit.kernel_report(model)
    assert report["kernel"] == "fused-bf16" and report["layers_packed"] == 14  # packed: only the fused kernel runs
    # stated tolerance: 2 bf16 steps (2^-6 relative) of the largest logit; the scales are bf16 on the fused path
    atol = 2 ** -6 * dequantized.abs().max().item()
    torch.testing.assert_close(fused, dequantized, atol=atol, rtol=0)
    # a random model's logits are flat: the two argmaxes may differ, but only where the top logits are within the
    # two paths' tolerance of each other (which kernel wins such a near-tie depends on the CPU's bf16 arithmetic)
    chosen = dequantized.gather(-1, fused.argmax(-1, keepdim=True)).squeeze(-1)  # (batch, seq)
    assert (dequantized.amax(-1) - chosen <= 2 * atol).all()


def test_auto_takes_the_fused_kernel_only_where_the_cpu_has_it(wide_dir):
    assert cpu_4bit.resolve("auto") == ("fused-bf16" if NATIVE else "dequantize")
    with cpu_4bit.emulate_avx512bf16_cpu():
        assert cpu_4bit.resolve("auto") == "fused-bf16"
    with cpu_4bit.emulate_cpu_without_avx512bf16():
        assert cpu_4bit.resolve("auto") == "dequantize"
    assert cpu_4bit.resolve("auto") == ("fused-bf16" if NATIVE else "dequantize")  # restored on exit
    with pytest.raises(ValueError, match="not one of"):
        cpu_4bit.resolve("fast")


def test_fused_without_avx512bf16_is_a_clear_error(wide_dir):
    with cpu_4bit.emulate_cpu_without_avx512bf16(), \
            pytest.raises(RuntimeError, match="needs a CPU with AVX512-BF16.*'auto' or 'dequantize'"):
        load_4bit(wide_dir, "fused-bf16")


def test_layers_narrower_than_a_block_stay_4bit_and_dequantize(narrow_dir):
    with cpu_4bit.emulate_avx512bf16_cpu():
        left_alone = load_4bit(narrow_dir)
        with pytest.raises(RuntimeError, match="invalid for input of size"):  # bitsandbytes' repack fails on them
            logits(left_alone)
        model = load_4bit(narrow_dir, "fused-bf16")
        logits(model)  # no crash
        report = cpu_4bit.kernel_report(model)
    # hidden 32 < 64: q/k/v/o, gate and up read 32 features; down reads 64 but k/v write 16 rows (< a 32-row tile)
    assert report["layers_4bit"] == 14 and report["layers_too_narrow_for_repack"] == 12
    assert report["layers_pinned"] == {"dequantize": 12, "fused-bf16": 2} and report["layers_packed"] == 2


@pytest.mark.parametrize("cpu", ["avx512bf16", "no-avx512bf16"])
def test_a_records_provenance_says_which_kernel_ran(wide_dir, cpu):
    with on_cpu(cpu):
        model = load_4bit(wide_dir, "auto")
        logits(model)
        report = cpu_4bit.run_provenance(model)["cpu_4bit"]
    fused = cpu == "avx512bf16"
    assert report["kernel"] == ("fused-bf16" if fused else "dequantize") and report["cpu_has_avx512bf16"] == fused
    assert report["layers_packed"] == (14 if fused else 0)
    # this machine's flags from /proc/cpuinfo ({} where it has no x86 flags line): they agree with bitsandbytes
    assert report["cpu_flags"].get("avx512_bf16", NATIVE) == NATIVE
    assert cpu_4bit.run_provenance(torch.nn.Linear(2, 2)) == {}  # nothing 4-bit: nothing to say


# --- the dequantize path with its weights dequantised once ---------------------------------------

def test_weights_dequantized_once_give_the_dequantize_kernels_outputs_bit_for_bit(wide_dir):
    with cpu_4bit.emulate_cpu_without_avx512bf16():
        model = load_4bit(wide_dir, "dequantize")
        kernel = logits(model)
        with cpu_4bit.weights_dequantized_once(model) as patched:
            once = logits(model)
            again = logits(model)  # from the cached weights
            assert all("forward" in vars(layer) for _, layer in cpu_4bit.linear4bit_layers(model))
        after = logits(model)
    assert patched == 14
    assert torch.equal(once, kernel) and torch.equal(again, kernel)
    assert not any("forward" in vars(layer) for _, layer in cpu_4bit.linear4bit_layers(model))  # restored
    assert torch.equal(after, kernel)


def test_weights_dequantized_once_leave_the_fused_kernel_alone(wide_dir):
    with cpu_4bit.emulate_avx512bf16_cpu():
        model = load_4bit(wide_dir, "fused-bf16")
        fused = logits(model)
        with cpu_4bit.weights_dequantized_once(model) as patched:
            inside = logits(model)
    assert patched == 0 and torch.equal(inside, fused)


def test_on_the_cpu_4bit_loads_and_computes_in_fp32_and_on_a_gpu_in_bf16(wide_dir):
    from efficientllm_utils import precisions

    nf4 = precisions.get("int4-nf4")
    assert (nf4.load_dtype_for("cpu"), nf4.load_dtype_for("cuda")) == ("float32", "bfloat16")
    with cpu_4bit.emulate_cpu_without_avx512bf16():
        model = load_4bit(wide_dir, "dequantize")
    assert {p.dtype for n, p in model.named_parameters() if "norm" in n or "embed" in n} == {torch.float32}
    assert {layer.compute_dtype for _, layer in cpu_4bit.linear4bit_layers(model)} == {torch.float32}
