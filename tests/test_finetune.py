"""The fine-tuning axis: methods through peft, the shared loop, BoolQ instruction data, adapters."""
from __future__ import annotations

import pytest
import torch

from efficientllm_utils import cpu_4bit
from efficientllm_utils import finetune as ft
from efficientllm_utils.finetune import data as fdata
from efficientllm_utils.finetune import methods as fm
from efficientllm_utils.finetune import train as ftrain

from .conftest import on_cpu

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.25)
LORA_FAMILY = ("lora", "loraplus", "rslora", "dora", "pissa", "qlora")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU two threads stall each other (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from efficientllm_utils.models import converted_checkpoint

    return AutoTokenizer.from_pretrained(converted_checkpoint("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def boolq(tokenizer):
    return ft.build_boolq(tokenizer, ft.DataSettings(max_length=112, n_train=16, n_heldout=8))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny randomly initialised Llama saved to disk, so every method (qlora too) loads it fresh."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return str(path)


def settings_for(method: str) -> ft.MethodSettings:
    lr = {"full": 5e-3, "freeze": 1e-2, "pissa": 1e-2}.get(method, 3e-2)
    return ft.MethodSettings(rank=4, alpha=8, dropout=0.0, lr=lr, freeze_trainable_layers=1, pissa_niter=2,
                             qlora_compute_dtype="fp32")


TRAIN = ft.TrainSettings(steps=8, batch_size=4, warmup_steps=0, schedule="constant", seed=3)


def build(tiny_dir, method, settings=None):
    settings = settings or settings_for(method)
    model = ft.load_base_model(tiny_dir, method, settings)
    return ft.build_method(method, model, settings)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


# --- methods ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ft.METHOD_NAMES)
def test_every_method_trains_and_its_loss_falls(tiny_dir, boolq, tokenizer, method):
    built = build(tiny_dir, method)
    model, groups, description = built  # unpacks as the brief's triple
    assert description and all(g["params"] for g in groups)
    result = ft.train_model(model, groups, boolq.train, TRAIN, tokenizer.pad_token_id)
    losses = result.losses
    assert len(losses) == TRAIN.steps and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], f"{method}: loss did not fall: {losses}"
    rec = result.steps[0]
    assert rec.samples == TRAIN.batch_size and rec.tokens > rec.loss_tokens == 2 * TRAIN.batch_size
    assert rec.seconds > 0 and len(rec.indices) == len(rec.rows) == TRAIN.batch_size
    fm.cleanup(built)


def test_same_data_order_steps_and_seed_across_methods(tiny_dir, boolq, tokenizer):
    runs = {}
    for method in ("lora", "full"):
        built = build(tiny_dir, method)
        runs[method] = ft.train_model(built.model, built.param_groups, boolq.train, TRAIN, tokenizer.pad_token_id)
    a, b = runs["lora"], runs["full"]
    assert [s.indices for s in a.steps] == [s.indices for s in b.steps]
    assert [s.rows for s in a.steps] == [s.rows for s in b.steps]
    assert a.settings == b.settings and len(a.steps) == TRAIN.steps
    assert [s.lr for s in a.steps] != [] and a.losses != b.losses  # different methods, same data
    # the order depends on the seed and the data size only
    expected = ft.batch_schedule(len(boolq.train), TRAIN.steps, TRAIN.batch_size, 1, TRAIN.seed)
    assert [s.indices for s in a.steps] == [sum(step, []) for step in expected]
    assert ft.batch_schedule(16, 8, 4, 1, seed=4) != expected
    # every example is seen once per epoch: 8 steps x 4 = 2 epochs of 16
    flat = [i for s in a.steps for i in s.indices]
    assert sorted(flat[:16]) == list(range(16)) and sorted(flat[16:]) == list(range(16))


def test_unshuffled_batches_keep_the_examples_order_so_boolq_batches_are_balanced(boolq):
    assert ft.batch_schedule(5, 4, 2, 1, seed=0, shuffle=False) == [[[0, 1]], [[2, 3]], [[4, 0]], [[1, 2]]]
    for (step,) in ft.batch_schedule(len(boolq.train), 8, 2, 1, seed=0, shuffle=False):
        assert sorted(boolq.train[i].answer for i in step) == ["no", "yes"]


def test_grad_accumulation_matches_the_step_shape(tiny_dir, boolq, tokenizer):
    built = build(tiny_dir, "lora")
    settings = TRAIN.model_copy(update={"steps": 2, "batch_size": 2, "grad_accum": 2})
    result = ft.train_model(built.model, built.param_groups, boolq.train, settings, tokenizer.pad_token_id)
    assert [s.samples for s in result.steps] == [4, 4]
    assert result.steps[0].indices == [i for mb in ft.batch_schedule(16, 2, 2, 2, TRAIN.seed)[0] for i in mb]


def _analytic_lora_count(rank: int) -> int:
    c = TINY
    h, i, q, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"] * c["head_dim"], \
        c["num_key_value_heads"] * c["head_dim"]
    per_layer = (h + q) + (h + kv) + (h + kv) + (q + h) + (h + i) + (h + i) + (i + h)  # q k v o gate up down
    return rank * per_layer * c["num_hidden_layers"]


def test_trainable_parameter_counts(tiny_dir):
    counts = {m: ft.trainable_parameters(build(tiny_dir, m).model) for m in ft.METHOD_NAMES}
    rank = settings_for("lora").rank
    analytic = _analytic_lora_count(rank)
    for m in ("lora", "loraplus", "rslora", "pissa", "qlora"):
        assert counts[m]["trainable"] == analytic, m
    lora = build(tiny_dir, "lora").model
    assert ft.expected_lora_parameters(lora, rank) == analytic
    assert len(fm.linear_targets(lora)) == 7 * TINY["num_hidden_layers"]  # all linear layers, not lm_head
    c = TINY
    outs = (c["num_attention_heads"] * c["head_dim"] + 2 * c["num_key_value_heads"] * c["head_dim"]
            + c["hidden_size"] + 2 * c["intermediate_size"] + c["hidden_size"])
    assert counts["dora"]["trainable"] == analytic + outs * c["num_hidden_layers"]  # + magnitude vectors
    full = counts["full"]
    assert full["trainable"] == full["total"] and full["share"] == 1.0
    # freeze: exactly the parameters of the last decoder layer
    freeze_model = build(tiny_dir, "freeze").model
    last = freeze_model.model.layers[-1]
    assert counts["freeze"]["trainable"] == sum(p.numel() for p in last.parameters())
    assert all(p.requires_grad == n.startswith(f"model.layers.{c['num_hidden_layers'] - 1}.")
               for n, p in freeze_model.named_parameters())
    assert 0 < counts["lora"]["trainable"] < counts["freeze"]["trainable"] < full["trainable"]
    # the 4-bit base counts its weights by logical size, so totals agree with the float base
    assert counts["qlora"]["total"] == counts["lora"]["total"]


def test_freeze_layer_choice_follows_llama_factory():
    assert fm.freeze_layer_ids(30, 2) == [28, 29]
    assert fm.freeze_layer_ids(30, -3) == [0, 1, 2]
    assert fm.freeze_layer_ids(4, 10) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        fm.freeze_layer_ids(30, 0)


def test_loraplus_gives_b_the_ratio_lr(tiny_dir, boolq, tokenizer, adamw_group_lrs):
    settings = settings_for("loraplus").model_copy(update={"lr": 1e-4, "loraplus_lr_ratio": 16.0})
    built = build(tiny_dir, "loraplus", settings)
    names = {id(p): n for n, p in built.model.named_parameters()}
    kinds = []
    for group in built.param_groups:
        kind = {"B" if "lora_B" in names[id(p)] else "A" for p in group["params"]}
        assert len(kind) == 1
        assert group["lr"] == pytest.approx(1.6e-3 if kind == {"B"} else 1e-4)
        kinds += kind
    # and through the training loop's optimizer, at every step of the warm-up and the decay
    ft.train_model(built.model, built.param_groups, boolq.train, TRAIN.model_copy(update={"steps": 3,
                   "warmup_steps": 1}), tokenizer.pad_token_id)
    assert len(adamw_group_lrs) == 3 and adamw_group_lrs[0][0] < adamw_group_lrs[1][0]
    for lrs in adamw_group_lrs:
        a = [lr for lr, kind in zip(lrs, kinds) if kind == "A"]
        b = [lr for lr, kind in zip(lrs, kinds) if kind == "B"]
        assert a and b and all(x == pytest.approx(16 * a[0]) for x in b) and all(x == a[0] for x in a)


def test_rslora_and_dora_and_pissa_configure_peft(tiny_dir):
    rs = build(tiny_dir, "rslora").model
    layer = rs.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)
    dora = build(tiny_dir, "dora").model
    assert dora.peft_config["default"].use_dora
    pissa = build(tiny_dir, "pissa")
    assert pissa.model.peft_config["default"].init_lora_weights == "pissa_niter_2"
    q = pissa.model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_B["default"].weight.abs().sum() > 0  # PiSSA starts from singular vectors, not B = 0
    fm.cleanup(pissa)


def test_unknown_method_raises_a_clear_error(tiny_dir):
    with pytest.raises(ValueError, match="allowed: lora, loraplus, rslora, dora, pissa, freeze, full, qlora"):
        ft.build_method("adapter-x", None, ft.MethodSettings())
    with pytest.raises(ValueError, match="unknown fine-tuning method"):
        ft.load_base_model(tiny_dir, "prefix", ft.MethodSettings())
    with pytest.raises(ValueError, match="4-bit"):
        fm.build_qlora(ft.load_base_model(tiny_dir, "lora", ft.MethodSettings()), ft.MethodSettings())


# --- adapters --------------------------------------------------------------------------

@pytest.mark.parametrize("method, cpu", [(m, "this") for m in ("lora", "dora", "pissa", "freeze", "full")]
                         + [("qlora", "no-avx512bf16"), ("qlora", "avx512bf16")])
def test_saved_adapter_loads_back_with_the_same_logits(tiny_dir, boolq, tokenizer, tmp_path, method, cpu):
    with on_cpu(cpu):
        _saved_adapter_loads_back(tiny_dir, boolq, tokenizer, tmp_path, method)


def _saved_adapter_loads_back(tiny_dir, boolq, tokenizer, tmp_path, method):
    built = build(tiny_dir, method)
    settings = TRAIN.model_copy(update={"steps": 3})
    ft.train_model(built.model, built.param_groups, boolq.train, settings, tokenizer.pad_token_id)
    batch = ftrain.collate(boolq.heldout[:3], tokenizer.pad_token_id)
    trained = logits(built.model, batch)
    size = ft.save_adapter(built.model, tmp_path / method, method)
    assert size > 0
    fresh = ft.load_base_model(tiny_dir, method, built.settings)
    before = logits(fresh, batch)
    assert (before - trained).abs().max() > 1e-3, "training changed nothing"
    loaded = ft.load_adapter(fresh, tmp_path / method)
    tol = 1e-3 if method in ("pissa", "qlora") else 1e-5
    torch.testing.assert_close(logits(loaded, batch), trained, atol=tol, rtol=0)
    if method in ("freeze", "full"):
        n_saved = ft.trainable_parameters(built.model)["trainable"]
        assert size > 4 * n_saved  # fp32 tensors on disk
    fm.cleanup(built)


def test_qlora_scored_then_trained_runs_one_kernel_on_both_kinds_of_cpu(tiny_dir, boolq, tokenizer):
    """The study scores the 4-bit base before training. Left to bitsandbytes, on a CPU with AVX512-BF16 that scoring
    repacks every layer for its fused kernel, which has no backward, and training then runs it (the peft profile's
    QLoRA loss was 1.91 there against 0.46-0.97 for the other methods). Pinned, both CPUs train alike."""
    def scored_then_trained():
        torch.manual_seed(0)  # LoRA's A init
        built = build(tiny_dir, "qlora")
        ft.evaluate_heldout(built.model, tokenizer, boolq.heldout_items[:2])
        steps = ft.train_model(built.model, built.param_groups, boolq.train, TRAIN.model_copy(update={"steps": 4}),
                               tokenizer.pad_token_id)
        assert cpu_4bit.kernel_report(built.model)["layers_packed"] == 0
        return steps.losses

    plain = scored_then_trained()
    with on_cpu("avx512bf16"):
        emulated = scored_then_trained()
    torch.testing.assert_close(emulated, plain, atol=1e-6, rtol=0)


# --- data ------------------------------------------------------------------------------

def test_split_is_disjoint_and_stable(tokenizer):
    train_pool, held_pool = ft.split_indices(3270, 0.25, seed=0)
    assert not set(train_pool) & set(held_pool) and len(train_pool) + len(held_pool) == 3270
    assert (train_pool, held_pool) == ft.split_indices(3270, 0.25, seed=0)
    assert held_pool != ft.split_indices(3270, 0.25, seed=1)[1]
    rows = fdata.boolq_rows()[:400]
    a = ft.build_boolq(tokenizer, ft.DataSettings(max_length=160, n_heldout=8), rows=rows)
    b = ft.build_boolq(tokenizer, ft.DataSettings(max_length=160, n_heldout=8), rows=rows)
    assert a.train_rows == b.train_rows and a.heldout_rows == b.heldout_rows
    assert not set(a.train_rows) & set(a.heldout_rows)
    # a different length limit picks other rows, but never moves one across the split
    small_train, small_held = ft.split_indices(400, 0.25, seed=0)
    loose = ft.DataSettings(max_length=200, n_heldout=8, balance=False)
    c = ft.build_boolq(tokenizer, loose, rows=rows)
    d = ft.build_boolq(tokenizer, loose.model_copy(update={"max_length": 160}), rows=rows)
    for x in (a, c, d):
        assert set(x.train_rows) <= set(small_train) and set(x.heldout_rows) <= set(small_held)
    assert set(d.train_rows) < set(c.train_rows)  # longer limit: the same rows and more


def test_a_bounded_scan_picks_the_rows_of_a_full_scan(tokenizer):
    """build_boolq stops tokenising once it has n rows (per class with balance): the same rows as scanning all
    (whose balanced order is yes, no, yes, no, ... in pool order, so its first n rows are the answer)."""
    rows = fdata.boolq_rows()[:600]
    for balance in (True, False):
        settings = ft.DataSettings(max_length=128, n_train=12, n_heldout=6, balance=balance)
        bounded = ft.build_boolq(tokenizer, settings, rows=rows)
        full = ft.build_boolq(tokenizer, settings.model_copy(update={"n_train": None}), rows=rows)
        assert bounded.meta["train_scanned"] < full.meta["train_scanned"] == full.meta["train_pool"]
        assert bounded.train_rows == full.train_rows[:12] and bounded.heldout_rows == full.heldout_rows


def test_boolq_examples_are_chat_formatted_with_masked_prompts(boolq, tokenizer):
    assert len(boolq.train) == 16 and len(boolq.heldout) == len(boolq.heldout_items) == 8
    assert boolq.meta["heldout_yes_share"] == 0.5 and boolq.meta["train_yes_share"] == 0.5
    rows = fdata.boolq_rows()
    for ex in boolq.train + boolq.heldout:
        assert ex.n_tokens <= 112
        answer = tokenizer(ex.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        n_prompt = ex.n_tokens - len(answer)
        assert list(ex.labels[:n_prompt]) == [-100] * n_prompt
        assert list(ex.labels[n_prompt:]) == list(ex.input_ids[n_prompt:]) == answer
        assert tokenizer.decode(ex.input_ids[:n_prompt]) == ex.prompt
        assert ex.prompt.endswith("<|im_start|>assistant\n") and "Answer yes or no." in ex.prompt
        assert rows[ex.row]["question"].strip().rstrip("?") in ex.prompt
        assert ex.answer == ("yes" if rows[ex.row]["answer"] == "True" else "no")
    for ex, item in zip(boolq.heldout, boolq.heldout_items):
        assert item.context == ex.prompt and item.choices == ["yes", "no"]
        assert item.choices[item.gold] == ex.answer


def test_collate_pads_right_and_masks_pad():
    ex = [fdata.Example(0, (5, 6, 7), (-100, 6, 7), "p", "a"), fdata.Example(1, (5, 6), (-100, 6), "p", "a")]
    batch = ftrain.collate(ex, pad_token_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 6, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 6, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_heldout_evaluation_uses_the_mc_interface(tiny_dir, boolq, tokenizer):
    model = ft.load_base_model(tiny_dir, "lora", ft.MethodSettings())
    from efficientllm_utils.quality import mc_accuracy

    result = ft.evaluate_heldout(model, tokenizer, boolq.heldout_items, num_threads=1)
    assert result["n"] == 8 and 0 <= result["accuracy"] <= 1 and len(result["predictions"]) == 8
    reference = mc_accuracy(model, tokenizer, boolq.heldout_items)
    for key in ("accuracy", "n", "stderr", "predictions", "correct"):
        assert result[key] == reference[key], key
    assert result["gold_logprob"] < 0 and 0 <= result["first_choice_share"] <= 1
    # through a peft wrapper too (DoRA: the heaviest forward), after a little training
    built = build(tiny_dir, "dora")
    ft.train_model(built.model, built.param_groups, boolq.train, TRAIN.model_copy(update={"steps": 2}),
                   tokenizer.pad_token_id)
    wrapped = ft.evaluate_heldout(built.model, tokenizer, boolq.heldout_items)
    assert wrapped["predictions"] == mc_accuracy(built.model, tokenizer, boolq.heldout_items)["predictions"]
    assert wrapped["gold_logprob"] != result["gold_logprob"]
    loss = ft.mean_answer_loss(model, boolq.heldout, tokenizer.pad_token_id)
    assert 5 < loss < 15  # a random model: about ln(49152) = 10.8 nats


def test_paper_datasets_are_named_by_hub_id():
    assert tuple(fdata.PAPER_DATASETS) == ft.PAPER_DATASET_IDS
    assert ft.DATASETS == ("boolq", "asdiv", "O1-OPEN/OpenO1-SFT", "FreedomIntelligence/medical-o1-reasoning-SFT")
    with pytest.raises(ValueError, match="boolq"):
        ft.DataSettings(dataset="openo1-sft")


def test_real_smollm2_lora_count_is_analytic():
    """On the real SmolLM2-135M-Instruct: r*(in+out) over the 7 linear layers of 30 decoder layers."""
    settings = ft.MethodSettings(rank=8, alpha=16)
    built = ft.build_method("lora", ft.load_base_model("smollm2-135m-instruct", "lora", settings), settings)
    h, kv, inter = 576, 192, 1536  # hidden, 3 kv heads x 64, MLP
    per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + inter) + (inter + h)
    counts = ft.trainable_parameters(built.model)
    assert counts["trainable"] == 8 * per_layer * 30 == 2_442_240
    assert counts["total"] == 134_515_008 + 2_442_240  # tied embedding/head counted once
    assert "lm_head" not in " ".join(fm.linear_targets(built.model))


def test_asdiv_examples_answer_with_the_number_and_their_items_with_the_same_tokens(tokenizer):
    """ASDiv rows become chat examples whose answer is the gold number; rows whose answer is not one number (a
    time, a ratio, two numbers, a name) are skipped; held-out items ask for the number and the end of turn, tokenised
    exactly as the training sequence continues; train and held-out rows never mix."""
    assert [fdata.asdiv_number({"answer": a}) for a in ("9 apples", "2.5 (liters)", "12", "3:30 p.m.", "5; 7",
                                                        "1/2", "Sara")] == ["9", "2.5", "12", None, None, None, None]
    data = ft.build_dataset(tokenizer, ft.DataSettings(dataset="asdiv", max_length=96, n_train=12, n_heldout=10))
    assert len(data.train) == 12 and len(data.heldout) == len(data.heldout_items) == 10
    assert not set(data.train_rows) & set(data.heldout_rows)
    train_pool, held_pool = ft.split_indices(data.meta["rows"], 0.25, seed=0)
    assert set(data.train_rows) <= set(train_pool) and set(data.heldout_rows) <= set(held_pool)
    rows = fdata.asdiv_rows()
    for ex, item in zip(data.heldout, data.heldout_items):
        assert ex.answer == fdata.asdiv_number(rows[ex.row]) and rows[ex.row]["answer"].startswith(ex.answer)
        assert item.context == ex.prompt and fdata.ASDIV_SYSTEM in ex.prompt and item.answer.endswith("<|im_end|>")
        ids = tokenizer(item.context).input_ids + tokenizer(item.answer, add_special_tokens=False).input_ids
        assert tuple(ids) == ex.input_ids and ids[-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="held-out ASDiv rows"):
        ft.build_dataset(tokenizer, ft.DataSettings(dataset="asdiv", max_length=16, n_heldout=10))
