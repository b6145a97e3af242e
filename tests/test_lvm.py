"""Vision generation (SD3.5, Wan 2.1): paper loading without network, quantized layers, adapters, params."""
from __future__ import annotations

import pytest
import torch

from efficientllm_utils import cli
from efficientllm_utils.lvm import pipelines, quantize, sd3, wan
from efficientllm_utils.lvm.presets import PRESETS
from efficientllm_utils.precisions.counting import count_model_bytes, linear_layer_kinds
from efficientllm_utils.params import ParamsError, expand, params_path
from efficientllm_utils.records import load_records

TINY_SD3 = PRESETS["sd3-tiny"].shape


class Requested(Exception):
    """Raised by the stand-in ``from_pretrained``: what would have been fetched, and with which settings."""


def test_paper_profile_requests_the_right_repositories_and_classes(monkeypatch):
    import diffusers

    calls = []

    def recorder(cls_name):
        def from_pretrained(source, **kwargs):
            calls.append((cls_name, source, kwargs))
            raise Requested()
        return from_pretrained

    for name in ("StableDiffusion3Pipeline", "WanPipeline", "SD3Transformer2DModel", "WanTransformer3DModel"):
        monkeypatch.setattr(getattr(diffusers, name), "from_pretrained", recorder(name))
    models = {s.params["model"] for study in cli.studies_of("lvm") for s in expand(params_path(study), "paper")}
    assert models == {"stabilityai/stable-diffusion-3.5-medium", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}
    for model, pipe_cls, transformer_cls in (
            ("stabilityai/stable-diffusion-3.5-medium", "StableDiffusion3Pipeline", "SD3Transformer2DModel"),
            ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "WanPipeline", "WanTransformer3DModel")):
        calls.clear()
        with pytest.raises(Requested):
            pipelines.load_pipeline(model, "cuda")
        with pytest.raises(Requested):
            pipelines.load_transformer(model, "int4-nf4", "cuda")
        (c1, s1, k1), (c2, s2, k2) = calls
        assert (c1, s1, k1["torch_dtype"]) == (pipe_cls, model, torch.bfloat16)
        assert (c2, s2, k2["subfolder"]) == (transformer_cls, model, "transformer")
        config = k2["quantization_config"]
        assert isinstance(config, diffusers.BitsAndBytesConfig) and config.load_in_4bit
        assert config.bnb_4bit_quant_type == "nf4"


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3") / "transformer"
    sd3.build_transformer(TINY_SD3, seed=0).save_pretrained(path)
    return path


def _velocity(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = {"encoder_hidden_states": torch.randn(2, 2 * TINY_SD3.max_tokens, TINY_SD3.t5_dim, generator=g),
            "pooled_projections": torch.randn(2, 2 * TINY_SD3.text_dim, generator=g)}
    latents = torch.randn(2, TINY_SD3.latent_channels, TINY_SD3.latent_size, TINY_SD3.latent_size, generator=g)
    with torch.no_grad():
        return sd3.denoise(model, latents, torch.tensor([100.0, 700.0]), cond)


@pytest.mark.parametrize("precision,layer,stored", [("int8", "Linear8bitLt", "int8"), ("int4-nf4", "Linear4bit", "uint8")])
def test_integer_precisions_hold_quantized_weights(tiny_sd3_dir, precision, layer, stored):
    from diffusers import SD3Transformer2DModel

    reference = quantize.load_transformer(SD3Transformer2DModel, str(tiny_sd3_dir), "fp32")
    model = quantize.load_transformer(SD3Transformer2DModel, str(tiny_sd3_dir), precision)
    kinds = linear_layer_kinds(model)
    assert set(kinds) == {layer}, kinds  # every linear layer of the denoiser is bitsandbytes'
    counted, ref_counted = count_model_bytes(model), count_model_bytes(reference)
    assert counted["bytes_by_dtype"][stored] > 0
    assert counted["linear_weight_bytes"] < ref_counted["linear_weight_bytes"] / 2
    out, ref = _velocity(model), _velocity(reference)
    assert out.dtype == torch.float32  # the pipeline's latents stay fp32
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9


def test_bf16_denoiser_takes_fp32_inputs_and_returns_fp32(tiny_sd3_dir):
    from diffusers import SD3Transformer2DModel

    model = quantize.load_transformer(SD3Transformer2DModel, str(tiny_sd3_dir), "bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert _velocity(model).dtype == torch.float32


def test_fidelity_metrics_rank_closer_images_higher():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    near, far = ref + 0.01 * torch.randn(ref.shape, generator=g), ref + 0.3 * torch.randn(ref.shape, generator=g)
    assert (quantize.psnr(near, ref) > quantize.psnr(far, ref)).all()
    assert (quantize.ssim(near, ref) > quantize.ssim(far, ref)).all()
    assert quantize.ssim(ref, ref).min() == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["loha", "lokr", "dora", "glora"])
def test_adapters_on_a_denoiser_train_only_their_parameters(method):
    from efficientllm_utils.finetune.config import MethodSettings
    from efficientllm_utils.finetune.methods import build_module_method, trainable_parameters

    settings = MethodSettings(rank=2, alpha=4, dropout=0.0, target_modules=list(wan.ADAPTER_TARGETS))
    shape = PRESETS["wan-tiny"].shape
    built = build_module_method(method, wan.build_transformer(shape, seed=0), settings)
    counts = trainable_parameters(built.model)
    assert 0 < counts["trainable"] < counts["total"] / 2
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    # peft's names of each adapter's tensors
    marker = {"loha": "hada_", "lokr": "lokr_", "dora": "lora_", "glora": "glora_"}[method]
    assert trainable and all(marker in n for n in trainable)
    # one flow-matching step through the optimizer on the built parameter groups: only the adapter's tensors move
    from efficientllm_utils.lvm.flow import velocity_loss

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, shape.latent_channels, 3, 16, 16, generator=g)  # (b, c, f, h, w)
    cond = {"encoder_hidden_states": torch.randn(2, shape.max_tokens, shape.text_dim, generator=g)}
    before = {n: p.detach().clone() for n, p in built.model.named_parameters()}
    optimizer = torch.optim.AdamW(built.param_groups, lr=1e-2)
    velocity_loss(built.model, wan.denoise, latents, cond, g).backward()
    optimizer.step()
    moved = {n for n, p in built.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable
    assert {n for n, p in built.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0} <= moved


def test_lvm_params_fail_early_with_the_allowed_values():
    with pytest.raises(ParamsError) as err:
        expand(params_path("lvm_quantization"), "smoke", {"precision": "int3"})
    assert "int4-nf4" in str(err.value) and "precision" in str(err.value)
    with pytest.raises(ParamsError) as err:
        expand(params_path("lvm_finetune"), "smoke", {"method": "vera"})
    assert "glora" in str(err.value)
    with pytest.raises(ParamsError) as err:
        expand(params_path("lvm_finetune"), "smoke", {"method": "glora", "glora_de": "lora"})
    assert "glora_de" in str(err.value) and "constant" in str(err.value)
    with pytest.raises(ParamsError) as err:
        expand(params_path("lvm_finetune"), "smoke", {"model": "sd4"})
    assert "sd3-small" in str(err.value) and "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in str(err.value)


@pytest.mark.parametrize("n_a,n_b,dim", [(60, 25, 80), (300, 200, 16)])
def test_frechet_distance_matches_the_matrix_square_root(n_a, n_b, dim):
    """The exact trace without ``sqrtm`` (fewer samples than dimensions: singular values; more: eigenvalues)."""
    import numpy as np
    from scipy import linalg

    from efficientllm_utils.vision.fd import frechet_distance

    rng = np.random.default_rng(0)
    a, b = np.abs(rng.normal(size=(n_a, dim))) ** 1.5, 1.2 * np.abs(rng.normal(size=(n_b, dim)))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b) - 2 * np.trace(root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-5)
    assert abs(frechet_distance(a, a)) < 1e-8


def _finetune_results(shift: float, n_items: int = 40):
    """Two methods' records on the same held-out items: LoRA ``shift`` below the base per item, full 1% below,
    with item-to-item spread far larger than either shift (the pairing is what separates them)."""
    import pandas as pd

    from efficientllm_utils.metrics.values import MetricValue
    from efficientllm_utils.records import RunRecord
    from efficientllm_utils.reports.load import StudyResults

    base = (0.5 + torch.rand(n_items, generator=torch.Generator().manual_seed(0))).tolist()
    records = []
    for method, drop, params in (("lora", shift, 900), ("full", 0.01, 9000)):
        records.append(RunRecord(
            run_id=method, study="lvm_finetune", profile="cpu", label=method, status="ok",
            params={"model": "sd3-small", "method": method, "timing_warmup_steps": 1},
            metrics={"trainable_params": MetricValue.measured(params, "params", "counted-requires-grad")},
            quality={"heldout_loss_base": sum(base) / n_items},
            raw={"heldout_item_losses_base": base, "heldout_item_losses": [b * (1 - drop) for b in base],
                 "steps": [{"seconds": 0.1 + 0.001 * (i % 3)} for i in range(12)]}))
    return StudyResults("lvm_finetune", "cpu", records, pd.DataFrame([r.flat() for r in records]))


def test_finetune_verdicts_pair_held_out_items():
    """A 1% drop of every item's loss is a verdict despite a spread of 0.5-1.5 between items; no drop is not."""
    from efficientllm_utils.reports import lvm

    verdicts = {f.claim_id: f.verdict for f in lvm.finetune_findings(_finetune_results(0.01))}
    assert verdicts["lf-lora-adapts"] == verdicts["lf-full-adapts"] == "agrees"
    assert verdicts["lf-lora-params"] == "agrees"  # counted exactly
    assert verdicts["lf-full-best"] == "inconclusive"  # the same 1% drop: a tie is no evidence either way
    verdicts = {f.claim_id: f.verdict for f in lvm.finetune_findings(_finetune_results(0.0))}
    assert verdicts["lf-lora-adapts"] == "inconclusive" and verdicts["lf-full-best"] == "agrees"
    verdicts = {f.claim_id: f.verdict for f in lvm.finetune_findings(_finetune_results(-0.02))}
    assert verdicts["lf-lora-adapts"] == "disagrees"


@pytest.mark.parametrize("fd_lora, verdict", [(40.0, "agrees"), (47.0, "inconclusive"), (60.0, "disagrees")])
def test_fine_tuning_fd_is_decided_against_the_noise_floor(fd_lora, verdict):
    """FD, one sample set per run: lower than the base's by more than the noise floor (5 here) agrees, within it is
    inconclusive, higher by more than it disagrees; a record without the floor gets no verdict."""
    from efficientllm_utils.reports import lvm

    res = _finetune_results(0.01)
    for record in res.records:
        record.quality.update({"fd_base": 50.0, "fd": fd_lora if record.params["method"] == "lora" else 50.0,
                               "fd_noise_floor": 5.0})
    found = {f.claim_id: f for f in lvm.finetune_findings(res)}
    assert found["lf-lora-fd"].verdict == verdict and "the noise floor, FD 5.0" in str(found["lf-lora-fd"])
    assert found["lf-full-fd"].verdict == "inconclusive"  # FD unchanged
    for record in res.records:
        del record.quality["fd_noise_floor"]
    assert {f.claim_id: f.verdict for f in lvm.finetune_findings(res)}["lf-lora-fd"] == "inconclusive"


def test_a_noise_floor_as_large_as_fd_is_said_to_decide_nothing():
    import pandas as pd

    from efficientllm_utils.reports import lvm

    ft = pd.DataFrame({"family": ["wan", "wan"], "method": ["lora", "full"], "FD_base": [61.0, 61.0],
                       "FD": [65.9, 63.4], "FD_noise_floor": [55.6, 55.6]})
    assert "FD decides nothing here" in lvm.observations(pd.DataFrame(), ft)[0]
    assert "decides nothing" not in lvm.observations(pd.DataFrame(), ft.assign(FD_noise_floor=3.3))[0]
    assert "predate the noise floor" in lvm.observations(pd.DataFrame(), ft.drop(columns="FD_noise_floor"))[0]


@pytest.mark.parametrize("fd_int4, verdict", [(49.0, "agrees"), (53.0, "inconclusive"), (61.0, "disagrees")])
def test_quantization_fd_keeps_the_reference_within_the_noise_floor(fd_int4, verdict):
    """int4 keeps the reference's FD (50, floor 5): no higher agrees; higher by more than twice the floor (the
    floor as margin and as noise) disagrees; in between is inconclusive."""
    import pandas as pd

    from efficientllm_utils.records import RunRecord
    from efficientllm_utils.reports import lvm
    from efficientllm_utils.reports.load import StudyResults

    records = [RunRecord(run_id=p, study="lvm_quantization", profile="cpu", label=p, status="ok",
                         params={"model": "sd3-small", "precision": p, "reference_precision": "fp32"},
                         quality={"fd": fd, "fd_noise_floor": 5.0})
               for p, fd in (("fp32", 50.0), ("int4-nf4", fd_int4))]
    res = StudyResults("lvm_quantization", "cpu", records, pd.DataFrame([r.flat() for r in records]))
    assert {f.claim_id: f.verdict for f in lvm.quant_findings(res)}["lq-int4-fd"] == verdict


def test_the_noise_floor_is_real_images_against_the_reference_at_the_samples_count(tmp_path):
    """Real images of the reference's distribution score far below unrelated ones; a pool smaller than the samples
    gives all it has."""
    import numpy as np

    from efficientllm_utils.vision import fd

    gen = torch.Generator().manual_seed(0)
    pool, reference = (torch.rand(n, 3, 32, 32, generator=gen) * 2 - 1 for n in (80, 60))
    features = fd.cached_features(reference, 32, tmp_path)
    floor, used = fd.noise_floor(pool, features, 40, 32, cache_dir=tmp_path)
    assert used == 40 and np.isfinite(floor)
    other = fd.cached_frechet_distance(fd.cached_features(torch.zeros(40, 3, 32, 32) - 0.9, 32, tmp_path), features,
                                       tmp_path)
    assert floor < other
    assert fd.noise_floor(pool, features, 500, 32, cache_dir=tmp_path)[1] == 80


def _tradeoff_results(methods: dict[str, tuple[float, float, float]], n_items: int = 40):
    """Records of several methods on the same held-out items: per method (relative loss drop per item, seconds per
    training step, AMU in GB)."""
    import pandas as pd

    from efficientllm_utils.metrics.values import MetricValue
    from efficientllm_utils.records import RunRecord
    from efficientllm_utils.reports.load import StudyResults

    base = (0.5 + torch.rand(n_items, generator=torch.Generator().manual_seed(0))).tolist()
    records = [RunRecord(
        run_id=method, study="lvm_finetune", profile="cpu", label=method, status="ok",
        params={"model": "sd3-small", "method": method, "timing_warmup_steps": 1},
        metrics={"amu_gb": MetricValue.measured(amu, "GB", "measured:psutil-process-rss-sampler")},
        quality={"heldout_loss_base": sum(base) / n_items},
        raw={"heldout_item_losses_base": base, "heldout_item_losses": [b * (1 - drop) for b in base],
             "steps": [{"seconds": seconds * (1 + 0.01 * (i % 3))} for i in range(12)]})
        for method, (drop, seconds, amu) in methods.items()]
    return StudyResults("lvm_finetune", "cpu", records, pd.DataFrame([r.flat() for r in records]))


def test_glora_loha_tradeoff_claim_needs_lower_costs_than_full_and_no_method_beating_them():
    from efficientllm_utils.reports import lvm

    def verdict(methods):
        found = [f for f in lvm.finetune_findings(_tradeoff_results(methods)) if f.claim_id == "lf-glora-loha-tradeoff"]
        return found[0].verdict if found else None

    # full: the lowest loss, but the slowest and largest; GLoRA beats LoRA and LoHa on loss, LoHa is the fastest
    cheap = {"full": (0.03, 0.2, 2.0), "glora": (0.02, 0.12, 1.0), "loha": (0.01, 0.10, 1.0),
             "lora": (0.005, 0.12, 1.0)}
    assert verdict(cheap) == "agrees"
    assert verdict({**cheap, "full": (0.03, 0.05, 2.0)}) == "disagrees"  # full steps faster: not "lower latency"
    assert verdict({**cheap, "full": (0.03, 0.2, 1.05)}) == "inconclusive"  # memory within AMU's noise
    assert verdict({**cheap, "lora": (0.03, 0.08, 0.5)}) == "disagrees"  # LoRA beats both on every metric
    assert verdict({k: v for k, v in cheap.items() if k != "glora"}) is None  # no GLoRA run: no finding


@pytest.mark.slow
def test_lvm_smoke_profile_end_to_end(results_root):
    assert cli.main(["run", "lvm", "--profile", "smoke", "--results", str(results_root)]) == 0
    quant = {(r.params["model"], r.params["precision"]): r for r in load_records("lvm_quantization", "smoke", results_root)}
    assert set(quant) == {(m, p) for m in ("sd3-tiny", "wan-tiny") for p in ("fp32", "int4-nf4")}
    for model in ("sd3-tiny", "wan-tiny"):
        assert quant[(model, "fp32")].quality["identical_to_reference"]
        assert quant[(model, "int4-nf4")].quality["ssim"] < 1.0
        assert quant[(model, "int4-nf4")].metrics["mcr"].value > 1.5
        layers = quant[(model, "int4-nf4")].raw["linear_layers"]  # all but the modules diffusers keeps in float
        assert sum(layers.values()) == sum(quant[(model, "fp32")].raw["linear_layers"].values())
        assert layers["Linear4bit"] > 4 * layers.get("Linear", 0)
    clip = results_root / "lvm_quantization" / "smoke"
    assert list(clip.glob("model=wan-tiny*/sample.mp4")) and list(clip.glob("model=sd3-tiny*/samples.png"))
    for record in load_records("lvm_finetune", "smoke", results_root):
        assert record.status == "ok"
        assert "not-inception-FID" in record.quality["fd_metric"]
        assert record.quality["fd_noise_floor"] > 0 and record.quality["fd_noise_floor_images"] > 0
        assert record.metrics["adapter_bytes"].value > 0
        assert record.quality["heldout_loss_base"] > 0
        held = record.raw["heldout_item_losses"]  # per item, paired with the base's for the verdicts
        assert len(held) == len(record.raw["heldout_item_losses_base"]) > 0
    reused = [r.quality["base_reused"] for r in load_records("lvm_finetune", "smoke", results_root)]
    n_runs = len(expand(params_path("lvm_finetune"), "smoke"))  # two families x the smoke grid's methods
    assert reused.count(False) == 2 and len(reused) == n_runs  # the base measured once per family, then reused
    quant_reused = [r.quality["reference_reused"] for r in quant.values()]
    assert quant_reused.count(False) == 2  # the fp32 reference's samples: once per family
    for record in quant.values():
        assert record.quality["fd_noise_floor"] > 0  # real frames of the base's data against the held-out ones
        assert len(record.raw["ssim_per_frame"]) == len(record.raw["psnr_db_per_frame"]) > 0
        assert len(record.raw["base_heldout_item_losses"]) == len(record.raw["base_heldout_item_losses_init"])
