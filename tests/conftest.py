import contextlib
import os
import shutil
import tempfile
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, saying why, where torch sees no CUDA device (``make test`` on a CPU)."""
    marked = [item for item in items if item.get_closest_marker("gpu")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu): torch sees none here")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture
def results_root(tmp_path) -> Path:
    root = tmp_path / "results"
    root.mkdir()
    return root


@pytest.fixture
def params_file(tmp_path):
    """Write a params YAML in tmp_path and return its path."""
    def write(text: str, name: str = "study.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


@pytest.fixture(scope="session")
def tiny_llama():
    """A tiny random Llama with SmolLM2's real tokenizer (fast, seeded)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from efficientllm_utils import models

    tokenizer = AutoTokenizer.from_pretrained(models.resolve_source("smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture
def adamw_group_lrs(monkeypatch) -> list[list[float]]:
    """Every AdamW step's group lrs, in group order, as the step used them (filled while the test runs)."""
    import torch

    seen: list[list[float]] = []
    adamw_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append([group["lr"] for group in self.param_groups])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def assert_valued(metrics: dict, names) -> None:
    """Each named metric of a record has a positive value, measured, counted or labelled estimated: none quietly
    became ``unavailable:``. PCU, which only a GPU has, must be unavailable exactly where torch sees no CUDA."""
    import torch

    for name in names:
        metric = metrics[name]
        if name == "pcu" and not torch.cuda.is_available():
            assert metric.value is None and metric.method.startswith("unavailable:"), (name, metric)
        else:
            assert metric.value is not None and metric.value > 0, (name, metric)


def on_cpu(kind: str):
    """``this`` CPU as it is; bitsandbytes as on a CPU with AVX512-BF16 (``avx512bf16``: its fused 4-bit path) or
    without it (``no-avx512bf16``), whatever this CPU has."""
    from efficientllm_utils import cpu_4bit

    return {"avx512bf16": cpu_4bit.emulate_avx512bf16_cpu, "no-avx512bf16": cpu_4bit.emulate_cpu_without_avx512bf16,
            "this": contextlib.nullcontext}[kind]()


def book_copy(tmp_path: Path) -> Path:
    """A copy of the book's sources, so a test build never touches the user's book."""
    target = tmp_path / "book"
    shutil.copytree(REPO / "book", target, ignore=shutil.ignore_patterns("_build", "runs"))
    return target


@contextlib.contextmanager
def captured_fd2():
    """Everything written to file descriptor 2 in the block, child processes (Dask workers, kernels) included."""
    captured: dict[str, str] = {}
    with tempfile.TemporaryFile() as sink, open(sink.fileno(), "w", closefd=False) as text:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stderr(text):  # this process's sys.stderr, which pytest may have replaced
                yield captured
        finally:
            text.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured["text"] = sink.read().decode(errors="replace")


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory):
    """The README's main command on the smoke profile, once per session: its exit code, what the runner printed,
    the results folder and the built book's index.html (the end-to-end and the browser tests share it)."""
    from efficientllm_utils import cli
    from efficientllm_utils.book import build_book

    tmp = tmp_path_factory.mktemp("smoke")
    results_root = tmp / "results"
    with captured_fd2() as output:
        code = cli.main(["run", "quantization", "--profile", "smoke", "--results", str(results_root)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EFFICIENTLLM_BOOK_PROFILE", "smoke")
        index = build_book(results_root, book_copy(tmp), published_root=None)  # the smoke runs only
    return types.SimpleNamespace(code=code, runner_output=output["text"], results_root=results_root, index=index)
