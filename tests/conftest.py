import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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


def book_copy(tmp_path: Path) -> Path:
    """A copy of the book's sources, so a test build never touches the user's book."""
    target = tmp_path / "book"
    shutil.copytree(REPO / "book", target, ignore=shutil.ignore_patterns("_build", "runs"))
    return target
