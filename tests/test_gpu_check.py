import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from efficientllm_utils import cli, gpu_check


def test_without_a_gpu_it_says_so_and_exits_cleanly(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["gpu-check"]) == 0
    assert "no GPU here (torch sees no CUDA device)" in capsys.readouterr().out


def test_the_check_model_has_qwen25_1p5b_shapes():
    from transformers import Qwen2Config

    from efficientllm_utils.arch.analysis import param_counts
    from efficientllm_utils.arch.config import paper_config

    ours = param_counts(paper_config("1.5B", attention="gqa"))["total"]
    with torch.device("meta"):
        from transformers import Qwen2ForCausalLM

        reference = Qwen2ForCausalLM(Qwen2Config(**gpu_check.QWEN25_1P5B))
    assert sum(p.numel() for p in reference.parameters()) == ours == 1_543_714_304


@pytest.mark.gpu
def test_on_a_gpu_every_precision_is_measured_with_nvml(monkeypatch, tmp_path):
    out = tmp_path / "gpu-check.json"
    monkeypatch.setenv("GPU_CHECK_OUT", str(out))
    assert cli.main(["gpu-check"]) == 0
    rows = {r["precision"]: r for r in json.loads(out.read_text())}
    assert list(rows) == list(gpu_check.PRECISIONS) and rows["bf16"]["fidelity"] == 1.0
    for r in rows.values():
        assert r["pcu"]["method"] == "measured:nvml-utilization-gpu-sampler" and 0 <= r["pcu"]["value"] <= 1
        assert r["amu_gb"]["method"] == "measured:nvml-memory-used-sampler" and r["amu_gb"]["value"] > 0
        assert r["energy_j"]["method"].startswith("measured:nvml")
    counted = [rows[p]["model_bytes"]["value"] for p in ("bf16", "int8", "int4-nf4")]
    assert counted[0] > counted[1] > counted[2]  # 16, 8, 4 bits a linear weight


def test_gpu_marked_tests_are_skipped_with_a_reason_where_cuda_is_absent():
    """The conftest hook, through a pytest of its own in which torch sees no CUDA device (on any host)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           f"{__file__}::test_on_a_gpu_every_precision_is_measured_with_nvml"],
                          cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout and "needs a CUDA device (marked gpu): torch sees none here" in done.stdout
