"""The runner through papermill and a real local Dask cluster, with the self-test study's notebook."""
import os
import signal
import subprocess
import sys
import time

import pytest

from efficientllm_utils import runner
from efficientllm_utils.params import PARAMS_DIR, expand
from efficientllm_utils.records import read_record, run_dir

pytestmark = pytest.mark.slow


def test_failures_are_recorded_and_the_other_runs_go_on(results_root, capsys):
    specs = expand(PARAMS_DIR / "selftest.yaml", "failures", {"value": 21})
    summary = runner.execute(specs, results_root)
    status = {o.label: o.status for o in summary.outcomes}  # value=21 is not the profile's: an explored run
    assert status == {"mode=ok,value=21": "ok", "mode=raise,value=21": "failed", "mode=kill,value=21": "failed"}
    by_label = {s.label.split(",")[0]: read_record(run_dir(s.study, s.profile, s.run_id, results_root)) for s in specs}
    assert by_label["mode=ok"].metrics["doubled"].value == 42
    assert by_label["mode=ok"].provenance["packages"]["papermill"]
    assert "selftest failure on purpose (value=21)" in by_label["mode=raise"].error
    assert "DeadKernelError" in by_label["mode=kill"].error or "died" in by_label["mode=kill"].error
    assert all(r.explored.changed == {"value": 21} and r.profile == "failures+explore" for r in by_label.values())
    for spec in specs:  # every run keeps its executed notebook, failed ones too
        assert (run_dir(spec.study, spec.profile, spec.run_id, results_root) / "notebook.ipynb").exists()
    assert "progress: 3/3 runs done" in capsys.readouterr().err

    again = runner.execute(specs, results_root)  # nothing changed: nothing runs
    assert {o.status for o in again.outcomes} == {"skipped", "failed"}
    retried = runner.execute(specs, results_root, retry_failed=True)
    assert sorted(o.status for o in retried.outcomes) == ["failed", "failed", "skipped"]


def test_force_reruns(results_root):
    specs = expand(PARAMS_DIR / "selftest.yaml", "cpu")[:1]
    first = runner.execute(specs, results_root).outcomes[0]
    record_path = run_dir(specs[0].study, specs[0].profile, specs[0].run_id, results_root) / "record.json"
    stamp = record_path.read_text()
    assert runner.execute(specs, results_root).outcomes[0].status == "skipped"
    forced = runner.execute(specs, results_root, force=True).outcomes[0]
    assert first.status == forced.status == "ok" and record_path.read_text() != stamp


def test_interrupted_profile_resumes(results_root):
    cmd = [sys.executable, "-m", "efficientllm_utils", "run", "selftest", "--results", str(results_root),
           "--set", "sleep_s=4"]
    # no GPU visible: the local cluster has one worker, so the runs go one at a time (a GPU host starts one per GPU)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env)
    specs = expand(PARAMS_DIR / "selftest.yaml", "cpu", {"sleep_s": 4})
    dirs = [run_dir(s.study, s.profile, s.run_id, results_root) for s in specs]
    deadline = time.time() + 120
    while time.time() < deadline and read_record(dirs[0]) is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner, its Dask workers and kernels, halfway
    proc.wait()
    assert read_record(dirs[0]) is not None and read_record(dirs[2]) is None
    summary = runner.execute(specs, results_root)
    status = {o.run_id: o.status for o in summary.outcomes}
    assert status[specs[0].run_id] == "skipped"
    assert status[specs[2].run_id] == "ok"
    assert all(read_record(d).status == "ok" for d in dirs)


def test_a_run_past_its_timeout_is_recorded_as_failed(results_root):
    specs = expand(PARAMS_DIR / "selftest.yaml", "cpu", {"sleep_s": 600})[:1]  # its cell sleeps far past the limit
    (outcome,) = runner.execute(specs, results_root, timeout_s=20).outcomes
    record = read_record(run_dir(specs[0].study, specs[0].profile, specs[0].run_id, results_root))
    assert outcome.status == record.status == "failed"
    assert "CellTimeoutError" in record.error and "20 seconds" in record.error
    assert record.metrics == {}  # the notebook never reached its result


def test_gpu_runs_without_gpu_workers_fail_fast():
    specs = expand(PARAMS_DIR / "selftest.yaml", "cpu", {"device": "cuda"})
    with pytest.raises(runner.ResourceError, match="no Dask worker offers a GPU"):
        runner.check_resources(specs, [{}])
    with pytest.raises(runner.ResourceError, match="no workers"):
        runner.check_resources(specs, [])
    runner.check_resources(specs, [{"GPU": 1}])


def test_run_kernels_drop_the_malloc_trim_threshold_and_one_thread_limit_dask_sets_for_its_workers(monkeypatch):
    """Dask's nanny gives its workers MALLOC_TRIM_THRESHOLD_=65536, which slows torch on a CPU about 2x, and thread
    pools of one thread; the kernels a worker launches must inherit neither: they get the C library's default and
    the worker's share of the cores."""
    import dask
    import distributed  # noqa: F401 - registers the distributed config

    spawned = {k: str(v) for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()}
    assert "MALLOC_TRIM_THRESHOLD_" in spawned and spawned["OMP_NUM_THREADS"] == "1"  # else this tests nothing
    monkeypatch.setenv(runner.WORKER_CORES_ENV, "3")
    env = runner.kernel_environment({**os.environ, **spawned}, {"TQDM_DISABLE": "1", **runner.kernel_thread_environment()})
    assert "MALLOC_TRIM_THRESHOLD_" not in env
    assert env["TQDM_DISABLE"] == "1" and env["PATH"] == os.environ["PATH"]
    assert [env[name] for name in runner.THREAD_ENV_NAMES] == ["3", "3", "3"]
    monkeypatch.delenv(runner.WORKER_CORES_ENV)  # outside a local cluster (a Slurm job): the cores it may run on
    assert runner.kernel_thread_environment()["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))


def test_a_run_computes_on_every_core_of_the_local_workers_share(results_root):
    """A run that sets no thread count of its own computes on the cores of its worker: all of them for the one
    worker of a machine without GPUs, not the one thread Dask's nanny sets; its record says so."""
    from efficientllm_utils.records import load_records

    cores = len(os.sched_getaffinity(0))
    if cores < 2:  # one core: the nanny's 1 and the worker's share are the same, so the test could not fail
        pytest.skip("needs 2 or more cores to tell the worker's share from Dask's 1 thread")
    (spec,) = expand(PARAMS_DIR / "selftest.yaml", "cpu", {"value": 1})
    assert runner.execute([spec], results_root).outcomes[0].status == "ok"
    (record,) = load_records("selftest", "cpu", results_root)
    assert record.provenance["hardware"]["omp_num_threads"] == str(cores)


def test_explored_and_hand_run_records_say_so_and_stay_out_of_the_book_unless_asked(results_root, tmp_path,
                                                                                   monkeypatch):
    import papermill

    from efficientllm_utils.published import book_view
    from efficientllm_utils.records import load_records

    (spec,) = expand(PARAMS_DIR / "selftest.yaml", "cpu", {"value": 7})  # outside the grid [1, 2, 3]
    assert runner.execute([spec], results_root).outcomes[0].status == "ok"
    (record,) = load_records("selftest", "cpu+explore", results_root)
    assert (record.label, record.params["value"], record.explored.outside_grid) == ("value=7", 7, ["value"])
    # a notebook run by hand (papermill -p, as JupyterLab would): labelled from its parameters, in manual/
    monkeypatch.setenv("EFFICIENTLLM_RESULTS", str(results_root))
    papermill.execute_notebook("notebooks/selftest.ipynb", str(tmp_path / "by_hand.ipynb"), parameters={"value": 9},
                               kernel_name="python3", progress_bar=False)
    (by_hand,) = load_records("selftest", "manual", results_root)
    assert (by_hand.label, by_hand.params["value"], by_hand.explored.how) == ("value=9", 9, "notebook")
    assert by_hand.metrics["doubled"].value == 18
    assert "selftest" not in book_view(results_root, tmp_path / "view")  # the book leaves them out by default
    assert book_view(results_root, tmp_path / "view", explored=True)["selftest"] == {"cpu+explore": "local",
                                                                                     "manual": "local"}


def test_study_progress_across_axes_resumes_and_estimates_from_published_durations(results_root):
    """make reproduce AXIS=all: axis k of n, run i of m across every study, the remaining time from the published
    durations scaled by this machine's pace; runs with a record count as done (the profile resumes)."""
    import io

    from efficientllm_utils.cli import studies_of
    from efficientllm_utils.study_registry import axes

    assert studies_of("all") == [study for studies in axes().values() for study in studies]
    specs = expand(PARAMS_DIR / "selftest.yaml", "cpu")
    runner.execute(specs[:1], results_root)  # a first, interrupted attempt finished one run
    published = {specs[1].run_id: 4.0, specs[2].run_id: 8.0}
    progress = runner.StudyProgress(total=len(specs), expected_s=published, n_axes=2,
                                    remaining_ids={s.run_id for s in specs})
    progress.start_axis("selftest", 2)
    assert progress.remaining_s() == pytest.approx(4.0 + 8.0 + 6.0)  # no published record: the mean of those known
    stream = io.StringIO()
    runner.execute(specs, results_root, stream=stream, progress=progress)
    lines = [line for line in stream.getvalue().splitlines() if line.startswith("== study progress")]
    assert lines[0].startswith("== study progress: axis 2 of 2 (selftest) | run 1 of 3")  # the resumed run
    assert "run 3 of 3" in lines[-1] and progress.remaining_s() == 0
    assert all("remaining ~" in line for line in lines)
    assert len(progress.paces) == 2  # both runs it executed had a published duration


def test_one_run_much_slower_here_does_not_scale_the_whole_estimate():
    """The pace is the median of the executed runs' time against their published time: one run whose kernel is
    9x slower on this CPU leaves the estimate of the others at the pace of the rest."""
    published = {run: 10.0 for run in "abcde"}
    progress = runner.StudyProgress(total=5, expected_s=published, n_axes=1, remaining_ids=set(published))
    for run, seconds in (("a", 12.0), ("b", 90.0), ("c", 12.0)):
        progress.finished(runner.RunOutcome(run, run, "ok", seconds), executed=True)
    assert progress.remaining_s() == pytest.approx(2 * 10.0 * 1.2)  # a total-time pace would say 2 x 38 s
    progress.finished(runner.RunOutcome("d", "d", "skipped"), executed=False)
    assert progress.paces == [1.2, 9.0, 1.2] and progress.remaining_s() == pytest.approx(12.0)
