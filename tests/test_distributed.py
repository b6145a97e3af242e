"""Runs that span several processes (efficientllm_utils/distributed.py): two gloo processes on the CPU."""
import os

import pytest

from efficientllm_utils import distributed, runner
from efficientllm_utils.cli import main as cli_main
from efficientllm_utils.params import PARAMS_DIR, ParamsError, expand
from efficientllm_utils.studies.architecture_run import PretrainRun
from efficientllm_utils.studies.finetune_run import FinetuneRun
from efficientllm_utils.records import read_record, run_dir

# The group's loss is the mean of the ranks' losses over equal row shards of the same batches, and the gradients
# are averaged: the same steps as one process, up to the order of float32 sums (measured: equal to 5 decimals).
LOSS_TOLERANCE = 1e-4  # relative


def _run(spec, results_root):
    (outcome,) = runner.execute([spec], results_root).outcomes
    record = read_record(run_dir(spec.study, spec.profile, spec.run_id, results_root))
    assert outcome.status == "ok", outcome.error
    return record


@pytest.mark.slow
def test_distributed_pretraining_through_the_runner_matches_one_process_and_records_the_group(results_root):
    """Two gloo processes (DDP) through the runner and papermill: one record with the group's metrics, whose losses
    equal the single-process run's within LOSS_TOLERANCE."""
    settings = {"attention": "mla", "steps": 4, "timing_warmup_steps": 1}
    (single,) = expand(PARAMS_DIR / "attention.yaml", "smoke", settings)
    (group,) = expand(PARAMS_DIR / "attention.yaml", "smoke", {**settings, "nproc": 2})
    one, two = _run(single, results_root), _run(group, results_root)

    for key in ("initial_loss", "final_loss", "heldout_loss"):
        assert two.quality[key] == pytest.approx(one.quality[key], rel=LOSS_TOLERANCE), key
    steps_one, steps_two = one.raw["steps"], two.raw["steps"]
    assert [s["loss"] for s in steps_two] == pytest.approx([s["loss"] for s in steps_one], rel=LOSS_TOLERANCE)
    assert [s["tokens"] for s in steps_two] == [s["tokens"] for s in steps_one]  # the whole batch, over both ranks

    metrics = two.metrics
    assert metrics["world_size"].value == 2 and "world_size" not in one.metrics
    per_rank = [metrics[f"rank{r}_peak_memory_gb"].value for r in (0, 1)]
    assert all(m > 0 for m in per_rank) and metrics["peak_memory_gb"].value == max(per_rank)
    assert metrics["train_wall_s"].value == max(metrics[f"rank{r}_train_s"].value for r in (0, 1))  # the slowest
    assert metrics["train_wall_s"].method.endswith("(slowest-rank)")
    assert two.params["nproc"] == 2 and two.status == "ok"


def _dies_on_rank_one():
    if int(os.environ["RANK"]) == 1:
        os._exit(3)  # a rank that dies (killed, out of memory) rather than raising
    import time

    time.sleep(60)  # rank 0 would go on: the launcher must stop it
    return "rank 0 finished"


def test_distributed_launch_fails_the_whole_group_when_a_rank_dies():
    with pytest.raises(distributed.RankFailed, match=r"rank 1 \(exit 3"):
        distributed.launch(_dies_on_rank_one, (), nproc=2)


def test_distributed_settings_refuse_what_cannot_split_or_spread():
    (spec,) = expand(PARAMS_DIR / "attention.yaml", "smoke", {"attention": "mla"})
    with pytest.raises(ValueError, match="batch_size=2 does not split into nproc=4"):
        PretrainRun.model_validate({**spec.params, "nproc": 4})
    with pytest.raises(ValueError, match="parallel"):
        PretrainRun.model_validate({**spec.params, "nproc": 2, "parallel": "tensor"})
    lora = expand(PARAMS_DIR / "peft.yaml", "smoke", {"method": "lora"})[0]
    with pytest.raises(ValueError, match="only \\['full'\\] trains across processes"):
        FinetuneRun.model_validate({**lora.params, "nproc": 2})
    with pytest.raises(ParamsError, match="nproc"):
        expand(PARAMS_DIR / "attention.yaml", "smoke", {"nproc": 0})


def test_distributed_runs_ask_for_one_gpu_per_process_as_one_job():
    (spec,) = expand(PARAMS_DIR / "selftest.yaml", "cpu", {"device": "cuda"})[:1]
    assert runner.gpus_of(spec) == 1
    (cpu_group,) = expand(PARAMS_DIR / "attention.yaml", "smoke", {"attention": "mla", "nproc": 2})
    assert runner.gpus_of(cpu_group) == 0  # gloo processes on the CPU need no GPU
    (gpu_group,) = expand(PARAMS_DIR / "attention.yaml", "smoke", {"attention": "mla", "nproc": 2, "device": "cuda"})
    assert runner.gpus_of(gpu_group) == 2
    runner.check_resources([gpu_group], [{"GPU": 2}])
    with pytest.raises(runner.ResourceError, match=r"up to 2 GPU\(s\) \(nproc"):
        runner.check_resources([gpu_group], [{"GPU": 1}, {"GPU": 1}])


def test_distributed_nproc_beyond_the_gpus_a_job_can_get_exits_2_before_any_work(tmp_path, capsys):
    code = cli_main(["run", "attention", "--profile", "smoke", "--set", "attention=mla", "--set", "nproc=2",
                     "--set", "device=cuda", "--results", str(tmp_path)])
    assert code == 2
    assert "nproc" in capsys.readouterr().err
    assert not any(tmp_path.rglob("record.json"))


def test_distributed_local_workers_hold_as_many_gpus_as_the_largest_run_asks_for():
    pins = ["0", "1", "2", "GPU-abc"]
    assert runner.gpu_groups(pins, 1) == [["0"], ["1"], ["2"], ["GPU-abc"]]
    assert runner.gpu_groups(pins, 2) == [["0", "1"], ["2", "GPU-abc"]]
    assert runner.gpu_groups(pins, 3) == [["0", "1", "2"]]  # the fourth is left unused
    assert runner.gpu_groups(pins, 8) == []  # refused before any work: more than the machine has


def test_distributed_plan_shows_one_gpus_memory():
    """make plan's memory is per GPU: FSDP divides weights, gradients and moments by nproc and adds the gathered
    blocks; DDP keeps them whole and adds its gradient buckets; both split the batch's activations."""
    from efficientllm_utils.plan import plan_run

    settings = {"attention": "mla", "batch_size": 4}
    one, ddp, fsdp = (plan_run(expand(PARAMS_DIR / "attention.yaml", "smoke", {**settings, **extra})[0])
                      for extra in ({}, {"nproc": 2}, {"nproc": 2, "parallel": "fsdp"}))
    assert ddp.gpus == fsdp.gpus == 0 and one.gpus == 0  # smoke runs on the CPU: gloo processes, no GPU asked
    assert ddp.memory_parts["weights"] == one.memory_parts["weights"]
    assert ddp.memory_parts["ddp-gradient-buckets"] == one.memory_parts["gradients"]
    assert fsdp.memory_parts["adamw-moments"] == pytest.approx(one.memory_parts["adamw-moments"] / 2)
    assert fsdp.memory_parts["fsdp-gathered-blocks"] > 0
    assert ddp.memory_parts["activations"] < one.memory_parts["activations"]
    assert any("FSDP over 2 GPUs" in a for a in fsdp.assumptions)
