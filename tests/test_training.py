"""The one training loop (``efficientllm_utils.training``): its schedule, its optimizer groups and its step."""
from __future__ import annotations

import math

import pytest
import torch

from efficientllm_utils import training
from efficientllm_utils.training import lr_multiplier


def test_warmup_is_linear_to_the_peak_at_step_w_then_cosine_decays_to_the_floor():
    steps, w = 100, 10
    assert lr_multiplier(0, steps, w, "cosine", 0.1) == pytest.approx(1 / 11)  # never a zero-lr step
    assert lr_multiplier(w - 1, steps, w, "cosine", 0.1) == pytest.approx(10 / 11)  # not yet the peak
    assert lr_multiplier(w, steps, w, "cosine", 0.1) == 1.0  # the peak, once, where the decay starts
    assert lr_multiplier(steps, steps, w, "cosine", 0.1) == pytest.approx(0.1)  # the floor at the end
    values = [lr_multiplier(s, steps, w, "cosine", 0.1) for s in range(steps + 1)]
    assert all(a < b for a, b in zip(values[:w], values[1:w + 1]))
    assert all(a > b for a, b in zip(values[w:], values[w + 1:]))
    assert lr_multiplier(55, steps, w, "cosine", 0.0) == pytest.approx(0.5)  # half-way through the decay


def test_linear_and_constant_schedules_and_no_warmup():
    assert lr_multiplier(0, 10, 0, "linear", 0.0) == 1.0
    assert lr_multiplier(5, 10, 0, "linear", 0.2) == pytest.approx(0.6)
    assert lr_multiplier(10, 10, 0, "linear", 0.2) == pytest.approx(0.2)
    assert lr_multiplier(0, 10, 2, "constant") == pytest.approx(1 / 3)
    assert [lr_multiplier(s, 10, 2, "constant") for s in (2, 7, 10)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="cosine, linear, constant"):
        lr_multiplier(0, 10, 0, "exponential")


def test_decay_groups_decay_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    matrices, vectors = training.decay_groups(model, lr=1e-3, weight_decay=0.1)
    assert [p.shape for p in matrices["params"]] == [torch.Size([4, 3])] and matrices["weight_decay"] == 0.1
    assert len(vectors["params"]) == 3 and vectors["weight_decay"] == 0.0
    assert matrices["lr"] == vectors["lr"] == 1e-3


def regression(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    return x, y


def test_the_loop_lowers_the_loss_and_records_each_step():
    x, y = regression()
    model = torch.nn.Linear(4, 1)

    def step(batch):
        loss = torch.nn.functional.mse_loss(model(x[batch]).squeeze(-1), y[batch])
        loss.backward()
        return {"loss": loss.detach(), "samples": len(batch)}

    batches = [torch.arange(i % 4 * 16, i % 4 * 16 + 16) for i in range(40)]
    records = training.train(batches, step, [{"params": list(model.parameters()), "lr": 0.3}], steps=40,
                             record=dict, warmup_steps=4, min_lr_ratio=0.1, max_grad_norm=1.0)
    assert len(records) == 40 and [r["step"] for r in records[:2]] == [0, 1]
    assert records[-1]["loss"] < 0.05 * records[0]["loss"]
    assert all(isinstance(r["loss"], float) and r["grad_norm"] > 0 for r in records)
    lrs = [r["lr"] for r in records]  # the lr each step used: the schedule, from step 0
    assert lrs == pytest.approx([0.3 * lr_multiplier(s, 40, 4, "cosine", 0.1) for s in range(40)])


def test_every_group_keeps_its_own_peak_lr_through_the_schedule(adamw_group_lrs):
    """LoRA+'s case: two groups at lr and 16 x lr; the schedule scales both alike, every step."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    seen = adamw_group_lrs

    def step(_):
        loss = (a * b).sum()
        loss.backward()
        return {"loss": loss.detach()}

    training.train(range(6), step, [{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 1.6e-3}], steps=6,
                   record=dict, warmup_steps=2)
    assert len(seen) == 6 and seen[0][0] == pytest.approx(1e-4 / 3)
    assert all(lr_b == pytest.approx(16 * lr_a) for lr_a, lr_b in seen)


def test_clipping_bounds_the_update_and_reports_the_norm_before_it():
    weight = torch.nn.Parameter(torch.zeros(3))

    def step(_):
        loss = (weight * torch.tensor([300.0, 400.0, 0.0])).sum()
        loss.backward()
        return {"loss": loss.detach()}

    records = training.train(range(1), step, [{"params": [weight], "lr": 1.0}], steps=1, record=dict,
                             max_grad_norm=1.0)
    assert records[0]["grad_norm"] == pytest.approx(500.0)
    assert training.train(range(1), step, [{"params": [weight], "lr": 1.0}], steps=1, record=dict,
                          max_grad_norm=None)[0]["grad_norm"] is None


def test_the_loop_refuses_a_short_data_stream_a_nan_loss_and_an_average_without_masters():
    weight = torch.nn.Parameter(torch.ones(1))

    def step(value):
        (weight * value).sum().backward()
        return {"loss": float(value)}

    groups = [{"params": [weight], "lr": 1e-3}]
    with pytest.raises(ValueError, match="ran out after 2 steps; 3 steps"):
        training.train([1.0, 2.0], step, groups, steps=3, record=dict)
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        training.train([1.0, math.nan], step, groups, steps=2, record=dict, first_step=0)
    ema = torch.optim.swa_utils.AveragedModel(torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="pass masters"):
        training.train([1.0], step, groups, steps=1, record=dict, ema=ema)


def test_fp32_masters_of_a_bf16_model_are_what_the_loop_steps_and_averages():
    model = torch.nn.Linear(4, 1).bfloat16()
    masters = training.MasterWeights(model)
    ema = torch.optim.swa_utils.AveragedModel(masters.module)
    x, y = regression()

    def step(batch):
        loss = torch.nn.functional.mse_loss(model(x[batch].bfloat16()).squeeze(-1).float(), y[batch])
        loss.backward()
        return {"loss": loss.detach()}

    records = training.train([torch.arange(64)] * 30, step, training.decay_groups(masters.module, 0.3, 0.0),
                             steps=30, record=dict, masters=masters, ema=ema)
    assert records[-1]["loss"] < 0.2 * records[0]["loss"]
    assert model.weight.dtype == torch.bfloat16 and masters.module.weight.dtype == torch.float32
    assert torch.equal(model.weight, masters.module.weight.bfloat16())  # the model holds the masters' values
    assert int(ema.n_averaged) == 30 and not torch.equal(ema.module.weight, masters.module.weight)
