"""The precision registry: one place that validation, loading, byte counting, the plan and the claims read."""
import pytest
import torch

from efficientllm_utils import models, plan, precisions
from efficientllm_utils.params import ParamsError, expand, params_path
from efficientllm_utils.studies.quantization_run import QuantizationRun
from efficientllm_utils.studies.vlm_run import VLMQuantizationRun
from efficientllm_utils.precisions.counting import count_model_bytes, linear_layer_kinds

NEW_METHODS = ("int8-torchao", "int4-quanto")  # the CPU-capable methods of field libraries beside bitsandbytes


class PackedLinear(torch.nn.Module):
    """A quantized layer that is no ``nn.Linear``: a packed uint8 weight buffer, its scales kept in a plain dict
    (neither parameter nor buffer), as some libraries keep them."""

    def __init__(self, rows: int, cols: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(rows, cols // 2, dtype=torch.uint8))
        self.meta = {"scale": torch.ones(rows, dtype=torch.float16)}


@pytest.fixture
def packed_method():
    method = precisions.register(precisions.Precision(
        name="int4-test", stands_for="int4", library="test", description="a test method",
        studies=frozenset({"llm"}), devices=("cpu",), load_dtype="bfloat16", compute_dtype="bf16",
        transformers_config=lambda skip: None, module_tensors=lambda m: list(getattr(m, "meta", {}).values()),
        layer_types=lambda: (PackedLinear,)))
    yield method
    precisions.unregister(method.name)


def test_a_registered_method_is_validated_counted_and_stands_for_its_paper_name(packed_method):
    assert QuantizationRun(model="smollm2-135m-instruct", precision="int4-test").precision == "int4-test"
    with pytest.raises(ValueError, match="'int4-test'"):  # offered to the llm study only; the error lists the others
        VLMQuantizationRun(model="smollm2-135m-instruct", precision="int4-test")
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), PackedLinear(16, 8), torch.nn.Linear(8, 4))
    counted = count_model_bytes(model)
    packed = 16 * 4 + 16 * 2  # the uint8 buffer and the fp16 scales outside any parameter or buffer
    assert counted["bytes_by_dtype"] == {"float32": (10 * 8 + 8 * 4 + 4) * 4, "uint8": 16 * 4, "float16": 16 * 2}
    assert counted["linear_weight_bytes"] == 8 * 4 * 4 + packed
    assert linear_layer_kinds(model) == {"PackedLinear": 1, "Linear": 1}
    assert precisions.resolve_claim_name("int4").split("|")[0] == "int4-nf4"  # the first registered decides
    assert "int4-test" in precisions.resolve_claim_name("int4").split("|")
    assert precisions.resolve_claim_name("reference") == "reference"


def test_a_wrong_precision_fails_naming_the_allowed_values_of_its_study():
    with pytest.raises(ParamsError) as err:
        expand(params_path("quantization"), "cpu", {"precision": "int3"})
    message = str(err.value)
    assert "field 'precision'" in message and "int3" in message
    assert all(f"'{name}'" in message for name in precisions.names("llm"))
    assert set(precisions.names("lvm")) == {"fp32", "bf16", "fp16", "int8", "int4-nf4"}  # those with diffusers' too
    with pytest.raises(ValueError, match="without a diffusers config"):
        precisions.register(precisions.Precision(
            name="x", stands_for="x", library="x", description="", studies=frozenset({"lvm"}), devices=(),
            load_dtype="float32", compute_dtype="fp32", transformers_config=lambda skip: None))


def test_a_tensor_subclass_weight_of_a_non_linear_layer_is_counted_at_its_stored_bytes():
    """torchao's int8 weight-only on an embedding: its weight presents as float32, holds int8 data and a scale."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    embedding = torch.nn.Sequential(torch.nn.Embedding(64, 32))
    quantize_(embedding, Int8WeightOnlyConfig(), filter_fn=lambda m, name: isinstance(m, torch.nn.Embedding))
    weight = embedding[0].weight
    assert type(weight).__name__ == "Int8Tensor" and weight.dtype == torch.float32  # what it presents
    counted = count_model_bytes(embedding)["bytes_by_dtype"]
    assert counted == {"int8": 64 * 32 + 64, "float32": 64 * 4}  # data, a zero point and a scale per row; no fp32 copy
    out = embedding(torch.arange(64))
    assert out.shape == (64, 32)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A small Llama with SmolLM2's tokenizer, saved as a local checkpoint, and its fp32 logits on fixed ids."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(models.resolve_source("smollm2-135m-instruct")).save_pretrained(path)
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    reference, _ = models.load_causal_lm(str(path), "fp32")
    with torch.no_grad():
        return path, ids, reference(ids).logits, count_model_bytes(reference)


@pytest.mark.parametrize("precision,kind,tolerance", [("int8-torchao", "Linear[Int8Tensor]", 0.03),
                                                      ("int4-quanto", "QLinear", 0.3)])
# int4 of this tiny random model's Gaussian weights moves its logits by about 20% (fp32 compute: 0.201); unrelated
# weights of the same scale would move them by more than 100%
def test_each_new_method_loads_on_the_cpu_close_to_fp32_in_fewer_bytes(tiny_llama, precision, kind, tolerance):
    path, ids, reference_logits, reference_bytes = tiny_llama
    model, _ = models.load_causal_lm(str(path), precision)
    assert linear_layer_kinds(model) == {kind: 7 * 2, "Linear": 1}  # every linear layer but the (tied) head
    with torch.no_grad():
        logits = model(ids).logits.float()
    error = ((logits - reference_logits).abs().mean() / reference_logits.abs().mean()).item()
    assert 0 < error < tolerance, error  # changed by quantization, yet close to fp32
    counted = count_model_bytes(model)["linear_weight_bytes"]
    bits = 8 if precision.startswith("int8") else 4
    assert counted < reference_bytes["linear_weight_bytes"] * (bits + 1) / 32  # 32 -> `bits` bits, plus scales
    linears = [m for m in model.modules() if m is not model.get_output_embeddings() and hasattr(m, "in_features")]
    numel = sum(m.in_features * m.out_features for m in linears)
    planned = precisions.get(precision).planned_linear_bytes(numel, sum(m.out_features for m in linears))
    assert planned == pytest.approx(counted, rel=0.01)  # the plan's formula is the counted layout


def test_the_plan_the_roofline_and_gpu_check_read_the_registry():
    from efficientllm_utils import gpu_check
    from efficientllm_utils.studies.quantization import compute_dtype

    assert gpu_check.PRECISIONS == ("bf16", "fp16", "int8", "int4-nf4")  # one of each kind that has run on CUDA

    assert compute_dtype("int4-quanto", "cpu") == compute_dtype("int8-torchao", "cpu") == "fp32"
    meta = plan.meta_model(plan.hub_config("Qwen/Qwen2.5-7B-Instruct"))
    sizes = {p: plan.weight_bytes(meta, p)[0] for p in ("bf16", "int8", "int8-torchao", "int4-nf4", "int4-quanto")}
    assert sizes["int4-nf4"] < sizes["int4-quanto"] < sizes["int8"] < sizes["int8-torchao"] < sizes["bf16"]
