"""GLoRA (peft's tuner, built by ``finetune.methods.build_module_method``): the formula, merging, saving and
loading, and its counts, on a small module of plain ``nn.Linear`` layers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from efficientllm_utils.finetune.config import GloraSettings, MethodSettings
from efficientllm_utils.finetune.methods import build_module_method, trainable_parameters
from efficientllm_utils.finetune.train import load_adapter, save_adapter

IN, HIDDEN, OUT, RANK = 6, 5, 4, 2


class Small(nn.Module):
    """Two linear layers; ``first`` has a bias (C, D, E apply), ``second`` none (only A, B do)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(IN, HIDDEN)
        self.second = nn.Linear(HIDDEN, OUT, bias=False)

    def forward(self, x):  # (n, IN) -> (n, OUT)
        return self.second(torch.tanh(self.first(x)))


def base(seed: int = 0) -> Small:
    torch.manual_seed(seed)
    return Small()


SETTINGS = MethodSettings(rank=RANK, alpha=4, dropout=0.0, target_modules=["first", "second"])
SUPPORTS = [GloraSettings(),  # the default: A,B low-rank, C vector, D,E vector
            GloraSettings(glora_ab="vector", glora_c="lora", glora_de="constant"),
            GloraSettings(glora_ab="constant", glora_c="none", glora_de="none")]


def build(glora: GloraSettings, seed: int = 0):
    built = build_module_method("glora", base(seed), SETTINGS, glora)
    with torch.no_grad():  # away from the no-op initialisation, so that every path counts
        for p in built.model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return built


def path(layer, name: str) -> torch.Tensor:
    return getattr(layer, f"glora_{name}")["default"]()


def direct(layer, x: torch.Tensor) -> torch.Tensor:
    """The paper's formula, written out: W' = W0 + W0*A + B, b' = b0 + b0*D + E + W0 C, y = x W'^T + b'."""
    w0 = layer.get_base_layer().weight  # (out, in)
    b0 = layer.get_base_layer().bias  # (out,) or None
    w = w0 + w0 * path(layer, "A") + path(layer, "B")  # A, B: (out, in), (out, 1) or a scalar
    y = x @ w.T  # (n, out)
    if b0 is not None:
        c = path(layer, "C")  # (in, 1)
        y = y + b0 + b0 * path(layer, "D") + path(layer, "E") + (w0 @ c).squeeze(-1)
    return y


@pytest.mark.parametrize("glora", SUPPORTS, ids=lambda g: f"{g.glora_ab}-{g.glora_c}-{g.glora_de}")
def test_glora_layers_compute_the_papers_formula(glora):
    built = build(glora)
    first, second = built.model.base_model.model.first, built.model.base_model.model.second
    x = torch.randn(3, IN)
    with torch.no_grad():
        h = direct(first, x)
        assert torch.allclose(first(x), h, atol=1e-5)
        assert torch.allclose(second(torch.tanh(h)), direct(second, torch.tanh(h)), atol=1e-5)
        assert torch.allclose(built.model(x), direct(second, torch.tanh(h)), atol=1e-5)
        assert not torch.allclose(built.model(x), base()(x), atol=1e-3)  # the adapter changed something


def test_glora_starts_as_a_no_op_and_trains_only_its_paths():
    built = build_module_method("glora", base(), SETTINGS)
    x = torch.randn(3, IN)
    with torch.no_grad():
        assert torch.allclose(built.model(x), base()(x), atol=1e-6)
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert trainable and all(".glora_" in n for n in trainable)
    assert {n.split(".glora_")[1][0] for n in trainable if ".first." in n} == set("ABCDE")
    assert {n.split(".glora_")[1][0] for n in trainable if ".second." in n} == set("AB")  # no bias: no C, D, E
    loss = built.model(x).square().sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in built.model.named_parameters()
               if p.requires_grad and "Xd" in n)  # the zero-initialised factors get a gradient
    assert "A,B lora, C vector, D,E vector" in built.description


def test_glora_counts_its_parameters_as_the_supports_say():
    # first (6 -> 5, bias): A, B low-rank r(out+in) each, C vector (in), D, E vectors (out each);
    # second (5 -> 4, no bias): A, B low-rank only
    expected = 2 * RANK * (HIDDEN + IN) + IN + 2 * HIDDEN + 2 * RANK * (OUT + HIDDEN)
    built = build_module_method("glora", base(), SETTINGS)
    counts = trainable_parameters(built.model)
    assert counts["trainable"] == expected
    assert counts["total"] == expected + (IN * HIDDEN + HIDDEN) + HIDDEN * OUT
    lean = build_module_method("glora", base(), SETTINGS, GloraSettings(glora_ab="constant", glora_c="none",
                                                                         glora_de="constant"))
    assert trainable_parameters(lean.model)["trainable"] == 2 + 2 + 2  # one scalar per A, B (both), D, E (first)


@pytest.mark.parametrize("glora", SUPPORTS[:2], ids=["default", "vector-lora-constant"])
def test_merged_glora_gives_the_unmerged_outputs(glora):
    built = build(glora)
    x = torch.randn(4, IN)
    with torch.no_grad():
        unmerged = built.model(x)
        merged = built.model.merge_and_unload()
        assert isinstance(merged.first, nn.Linear) and isinstance(merged.second, nn.Linear)  # plain layers again
        assert torch.allclose(merged(x), unmerged, atol=1e-5)
        assert not torch.allclose(merged.first.weight, base().first.weight)


def test_glora_save_load_round_trip_and_adapter_bytes(tmp_path):
    from efficientllm_utils.studies.lvm_finetune import saved_bytes

    built = build(GloraSettings())
    x = torch.randn(4, IN)
    with torch.no_grad():
        before = built.model(x)
    written = save_adapter(built.model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    reloaded = load_adapter(base(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(reloaded(x), before, atol=1e-6)
    # the study's adapter bytes: the safetensors file of peft's save_pretrained, as for LoRA, LoHa and LoKr
    n = trainable_parameters(built.model)["trainable"]
    assert 4 * n <= saved_bytes(built) <= written
    assert saved_bytes(built) < 4 * n + 4096  # float32 tensors plus the safetensors header


def test_glora_supports_fail_early_with_the_allowed_values():
    with pytest.raises(ValueError, match="glora_de"):
        GloraSettings(glora_de="lora")  # D and E are bias-sized: no low-rank support
    with pytest.raises(ValueError, match="glora_ab"):
        GloraSettings(glora_ab="scalar")


def _denoiser_inputs(model: str):
    """A tiny denoiser of the family, the family's targets and a batch of 2 (latents, timesteps, conditioning)."""
    from efficientllm_utils.lvm import sd3, wan
    from efficientllm_utils.lvm.presets import PRESETS

    shape, g = PRESETS[model].shape, torch.Generator().manual_seed(0)
    if model.startswith("sd3"):
        n = shape.latent_size
        cond = {"encoder_hidden_states": torch.randn(2, 4, shape.t5_dim, generator=g),
                "pooled_projections": torch.randn(2, 2 * shape.text_dim, generator=g)}
        return (sd3, sd3.build_transformer(shape, seed=0), torch.randn(2, shape.latent_channels, n, n, generator=g),
                cond)
    cond = {"encoder_hidden_states": torch.randn(2, 4, shape.text_dim, generator=g)}
    return wan, wan.build_transformer(shape, seed=0), torch.randn(2, shape.latent_channels, 2, 4, 4, generator=g), cond


@pytest.mark.parametrize("model", ["sd3-tiny", "wan-tiny"])
def test_glora_on_each_denoiser_wraps_its_targets_and_merges_exactly(model):
    from peft.tuners.glora import GloraLayer

    fam, transformer, latents, cond = _denoiser_inputs(model)
    settings = SETTINGS.model_copy(update={"target_modules": list(fam.ADAPTER_TARGETS)})
    built = build_module_method("glora", transformer, settings)
    wrapped = [n for n, m in built.model.named_modules() if isinstance(m, GloraLayer)]
    assert wrapped and all(any(n.endswith(t) for t in fam.ADAPTER_TARGETS) for n in wrapped)
    assert all(m.get_base_layer().bias is not None for m in built.model.modules() if isinstance(m, GloraLayer))
    with torch.no_grad():
        for p in built.model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
        t = torch.tensor([250.0, 750.0])
        unmerged = fam.denoise(built.model, latents, t, cond)
        merged = fam.denoise(built.model.merge_and_unload(), latents, t, cond)
    assert torch.allclose(merged, unmerged, atol=1e-4, rtol=1e-4)
