"""The DiT axis: the offline image sets and their split, the FD feature network, params validation, and the smoke profile of
both studies end to end through papermill and Dask, with the chapter's report on its records."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from efficientllm_utils import cli
from efficientllm_utils.dit import data as dit_data
from efficientllm_utils.params import ParamsError, expand, params_path
from efficientllm_utils.studies.dit_run import DiTRun
from efficientllm_utils.records import load_records
from efficientllm_utils.vision import images as image_sets

from .conftest import assert_valued


def test_idx_reader_and_cifar10_decoder_read_their_formats(tmp_path):
    """Both readers on small files written here in each source's format (CIFAR-10's source is refused on some
    machines, so its decoder is tested on a BIG-bench task file of two images)."""
    import base64
    import io
    import json

    from PIL import Image

    grey = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "x-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in grey.shape)
                                           + grey.tobytes())
    assert np.array_equal(image_sets.read_idx(tmp_path / "x-idx3-ubyte"), grey)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")
    with pytest.raises(ValueError, match="not an idx file"):
        image_sets.read_idx(tmp_path / "bad")
    pictures = [np.full((32, 32, 3), v, dtype=np.uint8) for v in (10, 200)]
    examples = []
    for picture, label in zip(pictures, ("truck", "cat")):
        png = io.BytesIO()
        Image.fromarray(picture).save(png, format="PNG")
        examples.append({"input": base64.b64encode(png.getvalue()).decode(),
                         "target_scores": {c: int(c == label) for c in image_sets.CIFAR10_CLASSES}})
    (tmp_path / "task.json").write_text(json.dumps({"examples": examples}))
    images, labels = image_sets.decode_bigbench_task(tmp_path / "task.json")
    assert np.array_equal(images, np.stack(pictures)) and labels.tolist() == [9, 3]


def test_fashion_mnist_split_is_fixed_shuffled_and_disjoint():
    images, labels = image_sets.image_set("fashion_mnist").load()
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    assert (images[:, :2] == 0).all() and (images[:, :, -2:] == 0).all()  # the 2-pixel black padding
    assert (images[..., 0] == images[..., 2]).all()  # grey repeated over the channels
    assert 60 < images[:, 2:30, 2:30].mean() < 90  # real photos: Fashion-MNIST's mean grey level is about 73
    a, b = dit_data.splits(512, "fashion_mnist"), dit_data.splits(512, "fashion_mnist")
    assert a.classes[8] == "bag" and "Fashion-MNIST" in a.source
    assert torch.equal(a.heldout_images, b.heldout_images)  # fixed whatever the run's seed
    assert len(set(a.heldout_labels.tolist())) == 10  # shuffled: every class is held out
    assert len(a.train_images) == 9488 and a.train_images.min() >= -1 and a.train_images.max() <= 1
    first = next(dit_data.train_batches(a, 16, seed=3))
    again = next(dit_data.train_batches(a, 16, seed=3))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_efficientnet_lite0_recognises_a_cat():
    """The FD network carries real ImageNet weights: skimage's cat photo is classed as a cat (281-285)."""
    skimage_data = pytest.importorskip("skimage.data")
    from efficientllm_utils.vision import fd

    cat = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float()[None] / 127.5 - 1
    probs = fd.classify(cat)[0]
    assert 281 <= int(probs.argmax()) <= 285 and float(probs[281:286].sum()) > 0.5


def test_fd_separates_real_images_from_noise(tmp_path):
    from efficientllm_utils.vision import fd

    real = dit_data.splits(512, "fashion_mnist").heldout_images
    a, b = fd.cached_features(real[:256], 32, tmp_path), fd.cached_features(real[256:], 32, tmp_path)
    noise = fd.cached_features(torch.rand(256, 3, 32, 32) * 2 - 1, 32, tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 3
    assert np.array_equal(fd.cached_features(real[:256], 32, tmp_path), a)  # read back from the cache
    floor = fd.frechet_distance(a, b)
    assert 0 < floor < fd.frechet_distance(noise, b) / 2


def test_frechet_distance_is_cached_on_disk(tmp_path, monkeypatch):
    from efficientllm_utils.vision import fd

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(64, 8)), rng.normal(size=(64, 8)) + 1
    first = fd.cached_frechet_distance(a, b, tmp_path)
    assert first == pytest.approx(fd.frechet_distance(a, b))
    monkeypatch.setattr(fd, "frechet_distance", lambda *_: pytest.fail("recomputed a cached distance"))
    assert fd.cached_frechet_distance(a, b, tmp_path) == first
    with pytest.raises(pytest.fail.Exception):
        fd.cached_frechet_distance(b, a, tmp_path)  # another pair: its own entry


def test_dit_params_fail_early_with_the_allowed_values():
    base = dict(hidden_size=16, n_layers=1, n_heads=2, patch_size=8)
    with pytest.raises(ValueError, match="n_samples"):
        DiTRun(**base, n_samples=100)
    with pytest.raises(ValueError, match="heldout_size=512 must be >= 2 \\* n_samples"):
        DiTRun(**base, n_samples=300)
    with pytest.raises(ValueError, match="DiT-B/4, DiT-L/8, DiT-XL/2"):
        DiTRun(model="DiT-S/4")
    with pytest.raises(ValueError, match="patch_size=5 must divide"):
        DiTRun(**{**base, "patch_size": 5})
    with pytest.raises(ValueError, match="'mha', 'gqa', 'mqa', 'mla' or 'nsa'"):
        DiTRun(**base, attention="linear")
    assert DiTRun(model="DiT-XL/2", attention="gqa").dit_config().n_tokens == 256
    for study, runs in (("dit_attention", 5), ("dit_moe", 2)):
        assert len(expand(params_path(study), "cpu")) == runs
        assert all(s.params["n_samples"] >= 256 for s in expand(params_path(study), "paper"))
    with pytest.raises(ParamsError, match="n_samples"):
        expand(params_path("dit_moe"), "smoke", {"n_samples": 8})


@pytest.mark.slow
def test_dit_smoke_profile_end_to_end(results_root):
    assert cli.main(["run", "dit", "--profile", "smoke", "--results", str(results_root)]) == 0
    from efficientllm_utils.reports import dit as dit_report
    from efficientllm_utils.reports.load import load_study

    for study, variant in (("dit_attention", "nsa"), ("dit_moe", "moe-8x2")):
        records = load_records(study, "smoke", results_root)
        assert len(records) == 1 and records[0].status == "ok"
        record = records[0]
        assert_valued(record.metrics, ("params_total", "params_active", "flops_per_step", "al_s",
                                       "tt_tokens_per_param_s", "amu_gb", "aec_w", "sample_latency_s_per_image"))
        assert record.quality["n_samples"] >= 256 and record.quality["fd_noise_floor"] > 0
        assert "not-inception-FID" in record.quality["fd_metric"]
        res = load_study(study, "smoke", results_root)
        table = dit_report.dit_table(res)
        assert table["variant"].tolist() == [variant]
        assert [v for v, path in dit_report.sample_grids(res, results_root) if path.stat().st_size > 0] == [variant]
        assert "Every variant learned" in dit_report.findings(res, table)
        assert f"{record.params['steps']} steps of {record.params['batch_size']} images" in dit_report.scale_note(res)
    assert "(8.93 and 8.71 against 19.47)" in dit_report.paper_claims()  # from book/paper/published_figures.csv
    moe = load_records("dit_moe", "smoke", results_root)[0]
    assert moe.metrics["params_active"].value < moe.metrics["params_total"].value
    assert moe.quality["final_aux_loss"] is not None


def test_learned_verdict_is_per_variant_against_the_noise_floor():
    import pandas as pd

    from efficientllm_utils.reports import dit as dit_report

    table = pd.DataFrame({"variant": ["mha", "nsa"], "FD": [25.0, 33.0], "FD_untrained": [38.0, 38.0],
                          "FD_noise_floor": [6.3, 6.3], "heldout_loss": [0.25, 0.26],
                          "heldout_loss_init": [2.0, 2.0], "AL_s": [0.1, 0.2]})
    table["FD_gain"] = table["FD_untrained"] - table["FD"]
    text = "\n".join(dit_report.learned_lines(table))
    assert "**Every variant learned** (FD below its untrained initialisation's by more than the noise floor, 6.3): " \
           "**does not hold**" in text
    assert "mha 25.0 vs 38.0 untrained, gain 13.0: learned" in text
    assert "nsa 33.0 vs 38.0 untrained, gain 5.0: not beyond the floor" in text
    table.loc[1, ["FD", "FD_gain"]] = [30.0, 8.0]
    assert "6.3): **holds**" in dit_report.learned_lines(table)[0]


def test_dit_claims_use_the_shared_rules_with_the_noise_floor():
    from types import SimpleNamespace

    from efficientllm_utils.reports import paper, verdicts
    from efficientllm_utils.reports import dit as dit_report

    def run(fd, seconds=(0.1,) * 8):
        return SimpleNamespace(quality={"fd": fd, "fd_noise_floor": 6.0}, params={"timing_warmup_steps": 2},
                               raw={"steps": [{"seconds": s} for s in seconds]}, metrics={})

    def verdict(a, b, metric="FD", expect="lower"):
        return verdicts.decide(dit_report.compare(a, b, metric, 0.0), expect)

    assert verdict(run(20.0), run(30.0)) == verdicts.AGREES  # 10 better: beyond the floor of 6
    assert verdict(run(26.0), run(30.0)) == verdicts.INCONCLUSIVE  # 4 better: within it
    assert verdict(run(37.0), run(30.0)) == verdicts.DISAGREES
    slow = run(30.0, (1.0, 1.0) + (0.2, 0.21, 0.19, 0.2, 0.2, 0.21))  # the warm-up steps are not timed
    assert verdict(slow, run(30.0), "AL_s", "higher") == verdicts.AGREES
    assert {"d-mqa-fd", "d-gqa-fd"} <= set(paper.claims("dit_attention")["claim_id"])
    assert {"d-moe-fd", "d-moe-memory"} <= set(paper.claims("dit_moe")["claim_id"])
    # a model name with a slash: the selector splits from the right
    assert paper.paper_quote("DiT-XL/2/MHA/FID;DiT-XL/2/MQA/FID", "vision") == (
        "paper Table 10 as quoted by an AI-written summary of the paper, second-hand: "
        "DiT-XL/2 MHA FID 19.47, MQA FID 8.93")
