"""`make plan`: every gpu and paper profile planned without a GPU (models from the shipped configs on the meta device,
the study's forward traced), the refusal of a run that will not fit, and the plan's bytes against a CPU stand-in's."""
import pytest
import torch

from efficientllm_utils import cli, plan
from efficientllm_utils.params import expand, params_path

# published parameter counts (model cards / safetensors index), tied embeddings once
PUBLISHED_PARAMS = {
    "meta-llama/Llama-3.2-1B-Instruct": 1.24e9, "meta-llama/Llama-3.2-3B-Instruct": 3.21e9,
    "meta-llama/Llama-3.1-8B-Instruct": 8.03e9, "Qwen/Qwen2.5-7B-Instruct": 7.62e9,
    "Qwen/Qwen2.5-14B-Instruct": 14.77e9, "Qwen/Qwen2.5-32B-Instruct": 32.76e9, "microsoft/phi-4": 14.66e9,
    "microsoft/Phi-3.5-mini-instruct": 3.82e9, "01-ai/Yi-34B-Chat": 34.39e9,
    "mistralai/Mistral-7B-Instruct-v0.3": 7.25e9, "mistralai/Mistral-Small-24B-Instruct-2501": 23.57e9,
    "Qwen/Qwen2.5-VL-7B-Instruct": 8.29e9, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": 1.78e9,
    "smollm2-135m-instruct": 134.5e6,
}
# the "done": these exit 0 and print every run's memory in GB
MUST_FIT = [("architecture", "gpu"), ("peft", "gpu"), ("quantization", "gpu"), ("dit_attention", "paper"),
            ("vlm_peft", "paper")]
# the other paper profiles (lvm's have no cost model yet): every run is planned; those named here are refused on one
# H100 (the paper trained on several GPUs), the rest fit
REFUSED = {
    ("quantization", "paper"): ["model=01-ai/Yi-34B-Chat,precision=bf16"],
    ("peft", "paper"): ["model=Qwen/Qwen2.5-14B-Instruct,dataset=O1-OPEN/OpenO1-SFT,method=lora"],  # full: FSDP x8
    ("attention", "paper"): ["size=3B,attention=nsa"], ("positional_encoding", "paper"): [],
    ("moe", "paper"): [],  # FSDP over 4 GPUs: dense-3B plans to 71.5 GB a GPU, moe-1.5Bx8 to 59.8
    ("attention_free", "paper"): ["size=1.5B,variant=mamba", "size=3B,variant=transformer"],
    ("vlm_quantization", "paper"): [], ("dit_moe", "paper"): [],
}


@pytest.mark.parametrize("model_id", sorted(PUBLISHED_PARAMS))
def test_shipped_configs_build_the_published_sizes(model_id):
    model = plan.meta_model(plan.hub_config(model_id))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(PUBLISHED_PARAMS[model_id], rel=0.01)
    assert next(model.parameters()).device.type == "meta"


def test_a_model_without_a_shipped_config_is_named():
    with pytest.raises(plan.PlanError, match="no shipped config for 'org/none'.*hub_configs"):
        plan.hub_config("org/none")


@pytest.mark.parametrize("axis,profile", MUST_FIT)
def test_plan_of_a_gpu_profile_fits_an_h100(axis, profile, capsys):
    assert cli.main(["plan", axis, "--profile", profile]) == 0
    out = capsys.readouterr().out
    runs = sum(len(expand(params_path(study), profile)) for study in cli.studies_of(axis))
    lines = [line for line in out.splitlines() if "GB/GPU" in line]
    assert len(lines) == runs and all("fits" in line and " min on H100" in line for line in lines)


@pytest.mark.parametrize("study,profile", sorted(REFUSED))
def test_plan_of_a_paper_profile_names_what_does_not_fit(study, profile):
    plans, failures = plan.plan_profile(study, profile)
    assert not failures and len(plans) == len(expand(params_path(study), profile))
    refused = {p.label for p in plan.too_big(plans, "h100")}
    assert set(REFUSED[(study, profile)]) <= refused
    assert bool(refused) == bool(REFUSED[(study, profile)])
    assert set(p.label for p in plan.too_big(plans, "h200")) < refused or not refused  # an H200 takes some


def test_plan_refuses_a_profile_over_80_gb_and_says_what_to_change(capsys):
    # 512 sequences of 160 tokens per micro-batch: the activations alone exceed an H100
    assert cli.main(["plan", "peft", "--profile", "gpu", "--set", "batch_size=512"]) == 2
    err = capsys.readouterr().err
    assert "will not fit one H100 (80 GB" in err and "peft method=lora,batch_size=512: predicted" in err
    assert "largest part activations" in err and "change: lower batch_size" in err


def test_run_plan_flag_prints_the_plan(capsys):
    assert cli.main(["run", "quantization", "--profile", "gpu", "--plan", "--device-target", "h200"]) == 0
    assert "on H200" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["lora", "full"])
def test_plan_bytes_against_a_cpu_stand_in(method):
    """The study's code path on a 2-layer stand-in on the CPU: the states (weights, gradients, AdamW moments) are
    what the plan counts, byte for byte; the activations the meta trace predicts are what the CPU saves for backward
    or up to 50% more (the meta device's attention keeps its probabilities; the CPU's fused kernel does not)."""
    spec = next(s for s in expand(params_path("peft"), "gpu") if s.params["method"] == method)
    torch.manual_seed(0)
    r = plan.standin_check(spec)
    assert r["predicted_states_bytes"] == r["measured_states_bytes"]
    assert r["measured_activation_bytes"] <= r["predicted_activation_bytes"] <= 1.5 * r["measured_activation_bytes"]


def test_traced_profile_separates_tokens_from_layers():
    """A toy block saving 3 floats per token and a fixed 10-float tensor per forward: the fit recovers both."""

    class Block(torch.nn.Module):
        def forward(self, x):
            return (x * x.detach().clone()).sum() + (torch.ones(10, requires_grad=True) * torch.ones(10)).sum()

    class Net(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(n))

        def forward(self, x):
            return sum(block(x) for block in self.blocks)

    def forward_with(n, tokens):
        net, x = Net(n), torch.ones(tokens, 3, requires_grad=True)
        return net, lambda: net(x)

    profile = plan.trace_activations(forward_with, 8)
    assert profile.per_layer == pytest.approx(3 * 4) and profile.layer_const == pytest.approx(10 * 4)


def test_gpu_suite_names_runs_of_the_gpu_profiles_and_skips_without_a_gpu(tmp_path, capsys, monkeypatch):
    from efficientllm_utils import gpu_check, gpu_suite

    assert [len(specs) for _, specs in gpu_suite.suite_specs()] == [2, 1]
    monkeypatch.setattr(gpu_check, "_gpu_available", lambda: "torch sees no CUDA device")
    assert cli.main(["gpu-suite", "--results", str(tmp_path)]) == 0
    assert "no GPU here" in capsys.readouterr().out and not any(tmp_path.iterdir())
