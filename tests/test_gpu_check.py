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
