"""The vision-language axis: the SmolLM2 transplant into Qwen2.5-VL, the processor without torchvision, the
released model's loading code (offline), the data and the answer scorer, params, and (slow) both smoke profiles."""
import functools
import math

import numpy as np
import pytest
import torch

from efficientllm_utils import cli, models
from efficientllm_utils.finetune.data import IGNORE_INDEX, Example
from efficientllm_utils.finetune.train import collate
from efficientllm_utils.params import ParamsError, expand, params_path
from efficientllm_utils.studies.vlm_run import VLMFinetuneRun, VLMQuantizationRun
from efficientllm_utils.records import load_records
from efficientllm_utils.vlm import data as vdata
from efficientllm_utils.vlm import scoring
from efficientllm_utils.vlm.config import VisionSettings
from efficientllm_utils.vlm.model import (add_vision_tokens, build_small_vlm, language_model, mrope_section,
                                          small_vlm_config)
from efficientllm_utils.vlm.processor import ImageOnlyProcessor, build_processor

from .conftest import assert_valued

TINY_VISION = VisionSettings(depth=1, hidden_size=32, intermediate_size=64, num_heads=2)


@pytest.fixture(scope="module")
def small_vlm():
    """The small Qwen2.5-VL around SmolLM2-135M-Instruct's real weights (tiny random vision tower)."""
    return build_small_vlm("smollm2-135m-instruct", TINY_VISION)


@functools.lru_cache(maxsize=1)
def smollm2_model():
    from transformers import AutoModelForCausalLM

    path = models.resolve_source("smollm2-135m-instruct")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def smollm2():
    """SmolLM2-135M-Instruct (loaded once) and a fresh tokenizer."""
    from transformers import AutoTokenizer

    return smollm2_model(), AutoTokenizer.from_pretrained(models.resolve_source("smollm2-135m-instruct"))


# --- the transplant --------------------------------------------------------------------------------

def test_language_model_logits_on_text_equal_smollm2s(small_vlm):
    model, processor = small_vlm
    lm, tokenizer = smollm2()
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert processor.tokenizer(text, return_tensors="pt").input_ids.equal(ids)  # text ids unchanged by the new tokens
    with torch.no_grad():
        expected = lm(input_ids=ids).logits  # (1, n, 49152)
        got = model(input_ids=ids).logits  # (1, n, 49152 + 4 vision tokens)
    assert got.shape[-1] == expected.shape[-1] + 4
    torch.testing.assert_close(got[..., :expected.shape[-1]], expected, rtol=1e-5, atol=1e-5)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    attention = language_model(model).layers[0].self_attn
    assert attention.q_proj.bias.abs().max() == 0 and attention.k_proj.bias.abs().max() == 0  # Llama has none
    assert model.config.text_config.rope_parameters["rope_theta"] == lm.config.rope_parameters["rope_theta"]


def test_mrope_section_fills_the_rotary_half_in_qwens_ratio():
    assert mrope_section(128) == [16, 24, 24]  # Qwen2.5-VL-7B's own
    assert sum(mrope_section(64)) == 32


def test_the_vision_tokens_append_to_the_tokenizer_and_the_config_uses_them():
    _, tokenizer = smollm2()
    n = len(tokenizer)
    ids = add_vision_tokens(tokenizer)
    assert sorted(ids.values()) == list(range(n, n + 4))
    assert add_vision_tokens(tokenizer) == ids  # idempotent
    lm_config = smollm2()[0].config
    config = small_vlm_config(lm_config, TINY_VISION, n + 4, ids)
    assert config.image_token_id == ids["<|image_pad|>"] and config.vision_config.out_hidden_size == 576
    with pytest.raises(ValueError, match="multiple of patch_size"):
        small_vlm_config(lm_config, VisionSettings(image_size=40), n + 4, ids)


# --- the processor without torchvision ---------------------------------------------------------------

def test_processor_expands_the_image_pad_to_the_merged_grid(small_vlm):
    from PIL import Image

    _, processor = small_vlm
    assert isinstance(processor, ImageOnlyProcessor) and processor.video_processor is None
    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    out = processor(images=[image], text=["<|vision_start|><|image_pad|><|vision_end|>hi"], return_tensors="pt")
    grid = out["image_grid_thw"][0]
    assert grid.tolist() == [1, 4, 4]  # 32 px / 8 px patches
    n_pad = int((out["input_ids"] == processor.image_token_id).sum())
    assert n_pad == int(grid.prod()) // 2 ** 2 == TINY_VISION.image_tokens
    assert out["pixel_values"].shape == (16, 3 * 2 * 8 * 8)  # patches, C * T * P * P


def test_the_stock_processor_fails_without_torchvision_and_ours_does_not():
    import importlib.util

    from transformers import Qwen2_5_VLProcessor

    _, tokenizer = smollm2()
    add_vision_tokens(tokenizer)
    built = build_processor(tokenizer, TINY_VISION)
    assert built.image_processor.merge_size == 2
    if importlib.util.find_spec("torchvision") is None:  # the failure the workaround exists for
        with pytest.raises(AttributeError, match="_extra_content"):
            Qwen2_5_VLProcessor(image_processor=built.image_processor, tokenizer=tokenizer, video_processor=None)


# --- the paper profile's loading code, offline ------------------------------------------------------

def test_a_released_qwen25vl_loads_from_a_directory_without_network(tmp_path, small_vlm, monkeypatch):
    """``load_pretrained_vlm`` on a saved checkpoint with its own preprocessor config, the hub disabled: the same
    code path as the paper profile's hub id (from_pretrained of the class and of the image processor)."""
    from efficientllm_utils.vlm.model import load_pretrained_vlm

    model, processor = small_vlm
    model.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded, loaded_processor = load_pretrained_vlm(str(tmp_path), dtype=torch.float32)
    assert type(loaded).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert loaded_processor.image_processor.patch_size == 8
    item = vdata.load_items("fashion_mnist", "test", 2)
    torch.testing.assert_close(torch.tensor(scoring.answer_logprobs(loaded, loaded_processor, item)),
                               torch.tensor(scoring.answer_logprobs(model, processor, item)), rtol=0, atol=1e-4)
    assert models.auto_model_class(str(tmp_path)).__name__ == "AutoModelForImageTextToText"
    # the language model quantised, the vision tower left in floating point
    int4, _ = models.load_causal_lm(str(tmp_path), "int4-nf4")
    kinds = {type(m).__name__ for m in int4.model.visual.modules()}
    assert "Linear4bit" not in kinds and "Linear4bit" in {type(m).__name__ for m in int4.model.language_model.modules()}


def test_paper_profiles_name_the_released_model_by_hub_id():
    for study in ("vlm_peft", "vlm_quantization"):
        specs = expand(params_path(study), "paper")
        assert {s.params["model"] for s in specs} == {"Qwen/Qwen2.5-VL-7B-Instruct"}
        assert all(s.params["device"] == "cuda" for s in specs)
    peft = expand(params_path("vlm_peft"), "paper")[0].params
    assert (peft["rank"], peft["alpha"], peft["dropout"], peft["lr"], peft["loraplus_lr_ratio"]) == (
        64, 128, 0.1, 1e-4, 16)


# --- data, batches and scoring ------------------------------------------------------------------------

def test_tasks_have_fixed_disjoint_splits_and_closed_answer_sets():
    test = vdata.load_items("fashion_mnist", "test", 20)
    assert [i.row for i in test] == [i.row for i in vdata.load_items("fashion_mnist", "test", 20, seed=0)]
    train_images = {i.image.tobytes() for i in vdata.load_items("fashion_mnist", "train", 400)}
    assert not any(i.image.tobytes() in train_images for i in test)
    vqa = vdata.load_items("easy_vqa", "test", 30)
    assert len(vdata.easy_vqa_answers()) == 13 and all(i.answer in i.choices for i in vqa)
    answer, share = vdata.majority_share(vqa)
    assert share == max(sum(i.answer == a for i in vqa) for a in vdata.easy_vqa_answers()) / 30
    with pytest.raises(ValueError, match="allowed: fashion_mnist, cifar10, easy_vqa"):
        vdata.load_items("mnist", "test", 1)
    captions = [c for _, c, _ in vdata.captions(3)]
    assert captions[0].startswith("a photo of") and len(captions) == 6


def test_collate_concatenates_image_inputs_and_pads_token_types():
    a = Example(0, (5, 6, 7), (IGNORE_INDEX, 6, 7), "", "", {"pixel_values": torch.ones(4, 3),
                                                              "image_grid_thw": torch.tensor([[1, 2, 2]]),
                                                              "mm_token_type_ids": (1, 0, 0)})
    b = Example(1, (5, 6), (IGNORE_INDEX, 6), "", "", {"pixel_values": torch.zeros(4, 3),
                                                       "image_grid_thw": torch.tensor([[1, 2, 2]]),
                                                       "mm_token_type_ids": (1, 0)})
    batch = collate([a, b], pad_token_id=0)
    assert batch["pixel_values"].shape == (8, 3) and batch["image_grid_thw"].shape == (2, 3)
    assert batch["mm_token_type_ids"].tolist() == [[1, 0, 0], [1, 0, 0]]
    with pytest.raises(ValueError, match="mixes"):
        collate([a, Example(2, (1,), (1,), "", "")], 0)


def test_answer_scores_are_the_answer_tokens_log_probabilities(small_vlm):
    """A one-token answer is read at the prompt's last position; a two-token one (" teal") is the sum over both,
    as a plain forward pass of prompt + answer gives them."""
    model, processor = small_vlm
    item = vdata.load_items("easy_vqa", "test", 1)[0]
    scores = scoring.answer_logprobs(model, processor, [item])[0]
    prompt = vdata.encode(processor, item.image, item.question, None, item.row)
    teal = item.choices.index("teal")
    ids = vdata.answer_token_ids(processor, item.choices)
    assert len(ids[teal]) == 2
    full = vdata.extend(prompt, ids[teal])
    batch = collate([full], 0)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    logprobs = torch.log_softmax(logits.float(), -1)
    n = prompt.n_tokens
    assert scores[teal] == pytest.approx(float(logprobs[n - 1, ids[teal][0]] + logprobs[n, ids[teal][1]]), abs=1e-4)
    blue = item.choices.index("blue")
    assert scores[blue] == pytest.approx(float(logprobs[n - 1, ids[blue][0]]), abs=1e-4)
    result = scoring.accuracy([item], [scores])
    assert result["predictions"][0] == int(np.argmax(scores)) and 0 < result["answer_mass"] <= 1


# --- params ---------------------------------------------------------------------------------------------

def test_vlm_params_fail_early_naming_the_field():
    base = dict(model="smollm2-135m-instruct", method="lora", steps=4, batch_size=2)
    assert VLMFinetuneRun(**base).small
    with pytest.raises(ValueError, match="tasks"):
        VLMFinetuneRun(**base, tasks=["mnist"])
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VLMFinetuneRun(**base, image_size=36)
    with pytest.raises(ValueError, match="precision"):
        VLMQuantizationRun(model="smollm2-135m-instruct", precision="int4-fp4")
    for study in ("vlm_peft", "vlm_quantization"):
        cpu, smoke = (expand(params_path(study), p) for p in ("cpu", "smoke"))
        assert len(cpu) > len(smoke) >= 2
    assert cli.studies_of("vlm") == ["vlm_peft", "vlm_quantization"]
    with pytest.raises(ParamsError):
        expand(params_path("vlm_peft"), "smoke", {"method": "lorax"})


def test_both_studies_share_one_aligned_checkpoint():
    for profile in ("cpu", "smoke"):
        peft = VLMFinetuneRun.model_validate(expand(params_path("vlm_peft"), profile)[0].params)
        quant = VLMQuantizationRun.model_validate(expand(params_path("vlm_quantization"), profile)[0].params)
        assert (peft.vision_settings(), peft.align_settings().model_dump(exclude={"num_threads"})) == (
            quant.vision_settings(), quant.align_settings().model_dump(exclude={"num_threads"}))


def test_the_quantized_model_is_a_fine_tuning_run_named_by_profile_and_method(tmp_path, monkeypatch):
    from efficientllm_utils.studies import vlm_finetune as vft

    quant = VLMQuantizationRun.model_validate(expand(params_path("vlm_quantization"), "cpu")[0].params)
    tuned = quant.finetune_run()
    peft_lora = next(s for s in expand(params_path("vlm_peft"), "cpu") if s.params["method"] == "lora")
    assert tuned == VLMFinetuneRun.model_validate(peft_lora.params)  # vlm_peft's cpu LoRA run, as its file has it
    base = dict(model="smollm2-135m-instruct", precision="fp32", finetune_profile="cpu")
    assert VLMQuantizationRun(model="smollm2-135m-instruct", precision="fp32").finetune_run() is None
    with pytest.raises(ValueError, match="given together"):
        VLMQuantizationRun(**base)
    with pytest.raises(ValueError, match="allowed: lora, full"):  # QLoRA's 4-bit base cannot be merged
        VLMQuantizationRun(**base, finetune_method="qlora")
    with pytest.raises(ValueError, match="vision_depth"):  # another base than this run's
        VLMQuantizationRun(**base, finetune_method="lora", vision_depth=1)
    with pytest.raises(ValueError, match="profile .gpu. is not one of"):
        VLMQuantizationRun(**base | {"finetune_profile": "gpu"}, finetune_method="lora")
    # the cached model is keyed by what its weights depend on: not the scoring settings, but every training one
    monkeypatch.setenv("EFFICIENTLLM_CACHE", str(tmp_path / "assets"))
    assert vft.tuned_dir(tuned) == vft.tuned_dir(tuned.model_copy(update={"n_heldout_per_task": 7, "num_threads": 1}))
    assert vft.tuned_dir(tuned) != vft.tuned_dir(tuned.model_copy(update={"steps": tuned.steps + 1}))
    assert vft.tuned_dir(tuned).parent == tmp_path / "models"


def test_the_first_alignment_stage_trains_the_vision_tower_only():
    from efficientllm_utils.vlm import align
    from efficientllm_utils.vlm.config import AlignSettings

    model, processor = build_small_vlm("smollm2-135m-instruct", TINY_VISION)
    vision = {n: p.detach().clone() for n, p in model.model.visual.named_parameters()}
    text = {n: p.detach().clone() for n, p in language_model(model).named_parameters()}
    losses = align.embed_align(model, processor, AlignSettings(embed_captions_per_task=4, embed_steps=3,
                                                               embed_batch_size=4))
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert any(not p.equal(vision[n]) for n, p in model.model.visual.named_parameters())
    assert all(p.equal(text[n]) for n, p in language_model(model).named_parameters())


def test_the_aligned_checkpoint_is_keyed_by_its_settings_and_reused(tmp_path, monkeypatch):
    from efficientllm_utils.vlm import align
    from efficientllm_utils.vlm.config import AlignSettings

    settings = AlignSettings(steps=2)
    key = align.cache_key("smollm2-135m-instruct", TINY_VISION, settings)
    assert key == align.cache_key("smollm2-135m-instruct", TINY_VISION, settings.model_copy(update={"num_threads": 1}))
    assert key != align.cache_key("smollm2-135m-instruct", TINY_VISION, settings.model_copy(update={"lr": 1e-4}))
    assert key != align.cache_key("smollm2-135m-instruct", VisionSettings(), settings)
    monkeypatch.setenv("EFFICIENTLLM_CACHE", str(tmp_path / "assets"))
    target = align.checkpoint_dir("smollm2-135m-instruct", TINY_VISION, settings)
    target.mkdir(parents=True)
    (target / align.SETTINGS_FILE).write_text("{}")

    def rebuild(*args):
        raise AssertionError("an existing checkpoint was rebuilt")

    monkeypatch.setattr(align, "build_small_vlm", rebuild)
    assert align.aligned_checkpoint("smollm2-135m-instruct", TINY_VISION, settings) == target


# --- the report: above the majority class --------------------------------------------------------------------

def _majority_record(correct_cifar: list[int]):
    """A fine-tuning record's quality (100 CIFAR-10 items, "cat" the gold answer of the first 15) and its table row."""
    from types import SimpleNamespace

    import pandas as pd

    answers = ["cat"] * 15 + ["dog"] * 12 + ["ship"] * 73
    quality = {"correct_after": correct_cifar, "heldout_tasks": ["cifar10"] * 100, "heldout_answers": answers,
               "majority_answer_cifar10": "cat"}
    res = SimpleNamespace(ok_records=[SimpleNamespace(label="method=full", quality=quality)])
    table = pd.DataFrame([{"label": "method=full", "method": "full", "cifar10_before": 0.1,
                           "cifar10_after": sum(correct_cifar) / 100, "cifar10_majority": 0.15}])
    return table, res


@pytest.mark.parametrize("correct, verdict", [
    ([0] * 15 + [1] * 40 + [0] * 45, "agrees"),  # 0.40 against 0.15 on the same 100 items
    ([1] * 15 + [0] * 85, "inconclusive"),  # exactly the majority class's answers
    ([0] * 100, "disagrees"),  # 0.00 against 0.15
])
def test_above_majority_is_a_verdict_on_a_paired_interval(correct, verdict):
    from efficientllm_utils.reports import vlm as report

    table, res = _majority_record(correct)
    row = report.above_majority(table, res).iloc[0]
    assert (row["verdict"], row["n"], row["above"]) == (verdict, 100, verdict == "agrees")
    assert "paired bootstrap over 100 items" in row["difference"]
    assert ("**met**" in report.majority_text(report.above_majority(table, res))) is False  # lora is missing
    assert report.above_majority(table, None).iloc[0]["verdict"] == "inconclusive"  # no per-item record


def test_the_quantization_reference_is_checked_against_the_majority_class_on_each_task():
    from types import SimpleNamespace

    from efficientllm_utils.reports import vlm as report

    answers = {"fashion_mnist": ["bag"] * 20 + ["coat"] * 80, "easy_vqa": ["yes"] * 60 + ["no"] * 40}
    correct = {"fashion_mnist": [1] * 20 + [1] * 50 + [0] * 30,  # 0.70 against 0.20
               "easy_vqa": [1] * 60 + [0] * 40}  # exactly the majority class's answers
    quality = {"correct": correct, "answers": answers, "majority_answer": {"fashion_mnist": "bag", "easy_vqa": "yes"},
               "accuracy": 0.65}
    flipped = {"fashion_mnist": [False] * 100, "easy_vqa": [True] * 10 + [False] * 90}
    params = {"tasks": ["fashion_mnist", "easy_vqa"], "reference_precision": "fp32"}
    res = SimpleNamespace(ok_records=[
        SimpleNamespace(params=params | {"precision": "fp32"}, quality=quality, raw={}, provenance={}),
        SimpleNamespace(params=params | {"precision": "int4-nf4"}, quality=quality, raw={"flipped": flipped},
                        provenance={})])
    frame = report.reference_above_majority(res)
    assert dict(zip(frame["task"], frame["verdict"])) == {"Fashion-MNIST": "agrees", "easy-VQA": "inconclusive"}
    assert "**not met**" in report.reference_majority_text(frame)
    row = report.against_reference(res).iloc[0]
    assert (row["flips"], row["flip_rate"]) == ("10 of 200", 0.05)
    low, high = (float(x) for x in row["flip_interval"].split(" to "))
    assert low < 0.05 < high and high - low < 0.1
    assert "untuned base" in report.quantized_model_line(res)


# --- the report: what the profile costs -----------------------------------------------------------------------

def _cost_records(threads: int | None, cpu_s: list[float], wall_s: list[float]):
    from types import SimpleNamespace

    return SimpleNamespace(ok_records=[
        SimpleNamespace(label=f"run{n}", params={"num_threads": threads}, raw={"process_cpu_s": c}, duration_s=w,
                        provenance={}) for n, (c, w) in enumerate(zip(cpu_s, wall_s))])


@pytest.mark.parametrize("peft_threads, quant_threads", [(2, 1), (1, 4)])
def test_the_budget_text_follows_the_records_threads_and_wall_time(peft_threads, quant_threads):
    from efficientllm_utils.reports import vlm as report

    peft = _cost_records(peft_threads, [240.0, 240.0], [150.0, 150.0])  # 8 CPU-min, 5 min of wall time
    quant = _cost_records(quant_threads, [120.0], [60.0])
    text = report.cpu_budget_text(peft, quant)
    plural = {1: "1 torch thread:", 2: "2 torch threads:", 4: "4 torch threads:"}
    assert f"2 fine-tuning runs at {plural[peft_threads]} 5.0 min of wall time, 8.0 min of CPU" in text
    assert f"1 quantization runs at {plural[quant_threads]} 1.0 min of wall time, 2.0 min of CPU" in text
    assert "In all 6.0 min of wall time" in text
    least = (480 / peft_threads + 120 / quant_threads) / 60  # CPU time over each run's threads
    assert f"10.0 min, over each run's threads is {least:.1f} min" in text
    assert "torch's default threads" in report.cpu_budget_text(_cost_records(None, [60.0], [60.0]), quant)


# --- end to end -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_vlm_smoke_profiles_end_to_end(results_root):
    assert cli.main(["run", "vlm", "--profile", "smoke", "--results", str(results_root)]) == 0
    peft = {r.params["method"]: r for r in load_records("vlm_peft", "smoke", results_root)}
    assert set(peft) == {s.params["method"] for s in expand(params_path("vlm_peft"), "smoke")}
    for r in peft.values():
        assert r.status == "ok", r.error
        assert_valued(r.metrics, ("al_s", "st_samples_per_param_s", "amu_gb", "aec_w", "params_trainable",
                                  "adapter_bytes"))
        for name in ("final_loss", "accuracy_before", "accuracy_after", "acc_fashion_mnist_after", "majority_easy_vqa"):
            assert math.isfinite(r.quality[name]), name
        assert r.provenance["vlm_transplant"]["biases_zeroed"] > 0
        assert r.provenance["vlm_alignment"]["cpu_seconds"] > 0
    assert len({r.quality["data_order_sha256"] for r in peft.values()}) == 1
    quant = {r.params["precision"]: r for r in load_records("vlm_quantization", "smoke", results_root)}
    assert quant["fp32"].quality["flip_rate"] == 0 and quant["fp32"].quality["kl_to_reference"] == 0
    assert quant["int4-nf4"].metrics["model_bytes"].value < quant["fp32"].metrics["model_bytes"].value
    for r in quant.values():
        assert r.metrics["ttft_p50_s"].value > 0 and r.raw["image_tokens"] > 0
        assert r.raw["process_cpu_s"] > 0
        # the model quantized is the smoke fine-tuning study's freeze run, trained once and cached
        assert r.provenance["vlm_finetune"]["method"] == "freeze"
        assert r.provenance["vlm_base"].startswith("vlm-tuned-")
