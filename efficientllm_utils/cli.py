"""Command line: ``python -m efficientllm_utils <command>`` (the Makefile calls it).

Exit codes: 0 all runs ok; 1 some run failed (recorded, the others went on);
2 bad parameters or resources (nothing was run or written).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import records, study_registry
from .clusters import ClusterError
from .params import ParamsError, expand, label_value, params_path, registry_lookup
from .paths import REPO_ROOT
from .published import PUBLISHED_PROFILES, publish
from .runner import EXECUTORS, ResourceError, StudyProgress, Summary, execute

ALL_AXES = "all"  # make reproduce AXIS=all: every axis, one after the other, then one book


def axes_of(axis: str) -> list[str]:
    """The axes ``axis`` names: every axis of the study registry in its order for ``all``, else itself (an axis or
    a study)."""
    return list(study_registry.axes()) if axis == ALL_AXES else [axis]


def studies_of(axis: str) -> list[str]:
    """The studies of an axis (``study_registry``), of every axis (``all``), or the one study of that name."""
    if axis == ALL_AXES:
        return [study for name in axes_of(axis) for study in studies_of(name)]
    return registry_lookup(study_registry.axis_studies, axis, f"{{}}; or {ALL_AXES!r}: every axis")


def _key_values(pairs: list[str], option: str, form: str = "key=value"):
    """Each ``key=value`` given to a repeated ``option``, split at its first '='; one without '=' fails naming it."""
    for pair in pairs:
        if "=" not in pair:
            raise ParamsError(f"{option} takes {form}, got {pair!r}")
        yield tuple(pair.split("=", 1))


def _overrides(pairs: list[str], option: str = "--set") -> dict:
    import yaml

    return {key: yaml.safe_load(value) for key, value in _key_values(pairs, option)}


def _grid(pairs: list[str]) -> dict:
    """``--grid key=v1,v2``: the values as a YAML flow list (``tasks=[boolq],[piqa]`` gives two lists)."""
    import yaml

    out = {}
    for key, values in _key_values(pairs, "--grid", "key=value1,value2,..."):
        try:
            out[key] = yaml.safe_load(f"[{values}]")
        except yaml.YAMLError as err:
            raise ParamsError(f"--grid {key}: {values!r} is not a comma-separated list of values: {err}") from None
    return out


def _plan(study: str, args) -> list:
    """The study's runs with the command line's --set and --grid, and a note on stderr for explored runs."""
    specs = expand(params_path(study), args.profile, _overrides(args.set), _grid(args.grid))
    explored = [s for s in specs if s.explored]
    if explored:
        base = explored[0].explored.profile
        off = {kind: sorted({f"{k}={label_value(v)}" for s in explored for k, v in s.explored.changed.items()
                             if (k in s.explored.outside_grid) == (kind == "grid")}) for kind in ("grid", "fixed")}
        titles = {"grid": "grid values it does not have", "fixed": "settings that are not its"}
        what = "; ".join(f"{titles[kind]}: {', '.join(values)}" for kind, values in off.items() if values)
        where = Path(args.results if "results" in args else records.RESULTS_DIR) / study / explored[0].profile
        print(f"note: {len(explored)} of {len(specs)} {study} run(s) are outside profile '{base}' ({what}): explored "
              f"runs, recorded apart in {where}; the book shows them only when asked (make book EXPLORED=1)",
              file=sys.stderr)
    return specs


def _executor_settings(args) -> dict:
    """The executor and its settings, validated before any work (a bad Slurm field fails like a bad parameter)."""
    executor = "dask" if args.scheduler and args.executor == "local" else args.executor
    if executor == "dask" and not args.scheduler:
        raise ParamsError("--executor dask needs --scheduler tcp://HOST:PORT (SCHEDULER= in make)")
    slurm = None
    if executor == "slurm":
        from .clusters import load_slurm_profile

        slurm = load_slurm_profile(args.cluster_profile, _overrides(args.slurm))
    elif args.slurm or args.cluster_profile:
        raise ParamsError("--slurm and --cluster-profile apply to --executor slurm only")
    return {"executor": executor, "scheduler_address": args.scheduler, "slurm": slurm,
            "max_retries": args.max_retries}


def cmd_plan(args) -> int:
    """Every run of the profile against a target GPU, without one (plan.py); 2 when a run will not fit."""
    from .plan import PlanError, main as plan_main

    try:
        return plan_main(studies_of(args.axis), args.profile, args.device_target, _overrides(args.set),
                         check=getattr(args, "check", False))
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def cmd_run(args) -> int:
    if args.plan:
        return cmd_plan(args)
    studies = studies_of(args.axis)
    plans = [(s, _plan(s, args)) for s in studies]  # validate all first
    executor = _executor_settings(args)
    results_root = Path(args.results)
    total = Summary()
    tables = []
    progress = study_progress(args.axis, plans) if args.axis == ALL_AXES else None
    for study, specs in plans:
        if progress is not None:
            axis = next(a for a in axes_of(args.axis) if study in studies_of(a))
            progress.start_axis(axis, axes_of(args.axis).index(axis) + 1)
        profiles = list(dict.fromkeys(s.profile for s in specs))  # the profile's, and/or <profile>+explore
        print(f"== {study}: profile {', '.join(profiles)}, {len(specs)} runs -> "
              f"{', '.join(str(results_root / study / p) for p in profiles)}", file=sys.stderr)
        summary = execute(specs, results_root, force=args.force, retry_failed=args.retry_failed,
                          timeout_s=args.run_timeout, progress=progress, **executor)
        total.outcomes += summary.outcomes
        tables += [(study, p, records.aggregate(study, p, results_root)) for p in profiles]
        if args.publish and (args.set or args.grid):  # a narrowed grid would replace the copy with a part of it
            print("not published: the published copy is made from a profile's whole grid, without --set or --grid",
                  file=sys.stderr)
        elif args.publish and specs[0].profile in PUBLISHED_PROFILES:
            target = publish(study, specs[0].profile, results_root, run_ids={s.run_id for s in specs})
            print(f"published: {target.relative_to(REPO_ROOT) if target.is_relative_to(REPO_ROOT) else target}"
                  f" (commit it to share these results)", file=sys.stderr)
    index = None
    if args.book:
        from .book import build_book

        index = build_book(results_root)
    for study, profile, frame in tables:  # the summary comes last, where the user looks
        print(f"\n{study} ({profile}): {results_root / study / profile / 'runs.parquet'}\n{_short_table(frame)}")
    if index is not None:
        print(f"\nbook: {index}")
    if total.failed:
        print(f"{len(total.failed)} run(s) failed; their records and executed notebooks hold the tracebacks",
              file=sys.stderr)
        return 1
    return 0


def study_progress(axis: str, plans: list[tuple[str, list]]) -> StudyProgress:
    """Progress across every run of ``axis``'s axes, its remaining time estimated from the published copy's
    durations of the same runs (``published.published_durations``)."""
    from .published import published_durations

    expected: dict[str, float] = {}
    for study, specs in plans:
        for profile in {s.profile for s in specs}:
            expected |= published_durations(study, profile)
    ids = {s.run_id for _, specs in plans for s in specs}
    return StudyProgress(total=len(ids), expected_s={k: v for k, v in expected.items() if k in ids},
                         n_axes=len(axes_of(axis)), remaining_ids=set(ids))


def _short_table(frame) -> str:
    cols = [c for c in ("label", "status", "duration_s", "quality_mean_accuracy", "quality_perplexity",
                        "quality_final_loss", "al_s", "tt_tokens_per_param_s", "it_tokens_per_s", "amu_gb", "aec_w",
                        "model_bytes", "kv_cache_bytes_per_token") if c in frame.columns]
    return frame[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}") if len(frame) else "(no runs)"


def cmd_list(args) -> int:
    for study in studies_of(args.axis):
        for spec in _plan(study, args):
            print(f"{study}\t{spec.profile}\t{spec.run_id}\t{spec.label}")
    return 0


def cmd_book(args) -> int:
    from .book import build_book

    print(f"book: {build_book(Path(args.results), explored=args.explored)}")
    return 0


def cmd_publish(args) -> int:
    """Copy existing results of the current grid into the published copy (what ``run --publish`` does)."""
    if args.set or args.grid:
        raise ParamsError("publish copies a profile's own runs: --set and --grid do not apply")
    for study in studies_of(args.axis):
        profile = args.profile or expand(params_path(study))[0].profile
        try:
            print(f"published: {publish(study, profile, Path(args.results))}")
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


def cmd_gpu_check(args) -> int:
    from .gpu_check import main as gpu_main

    return gpu_main()


def cmd_gpu_suite(args) -> int:
    from .gpu_suite import main as suite_main

    return suite_main(Path(args.results))


def assets_needed(axis: str, profile: str | None = None) -> list[str]:
    """The assets every run of ``axis``'s profile reads (each study's run model declares them)."""
    names: set[str] = set()
    for study in studies_of(axis):
        for spec in expand(params_path(study), profile):
            names |= set(spec.run_params().required_assets())
    return sorted(names)


def cmd_assets(args) -> int:
    from . import assets

    if args.all:
        names = sorted(assets.ASSETS)
    elif args.tests:
        names = list(assets.TEST_ASSETS)
    elif args.axis:
        names = assets_needed(args.axis, args.profile)
    else:
        raise ParamsError("assets: name an AXIS, or --tests, or --all")
    return assets.fetch_each(names)


def cmd_probe(args) -> int:
    from .metrics import machine_probe

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(machine_probe.describe(machine_probe.load_or_measure(args.device, refresh=args.refresh)))
    print(f"cached in {machine_probe.cache_path(args.device)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="efficientllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_selection(p):
        p.add_argument("axis", help=f"an axis ({', '.join(study_registry.axes())}), {ALL_AXES} (every axis) or a "
                                    "study name")
        p.add_argument("--profile", default=None, help="profile in the params file (default: its default_profile)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="set a parameter in every run (validated like the params file); on a field the grid "
                            "varies, run that value alone; runs that depart from the profile are recorded apart, "
                            "in <profile>+explore")
        p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="replace the grid's values of a field (or add a grid field) with these")

    def command(name: str, func, help: str, selection: bool = False, results: bool = False):
        """A subcommand that runs ``func``: with the run selection (axis, --profile, --set, --grid) and
        ``--results`` where it reads or writes records."""
        p = sub.add_parser(name, help=help)
        if selection:
            add_selection(p)
        if results:
            p.add_argument("--results", default=str(records.RESULTS_DIR))
        p.set_defaults(func=func)
        return p

    run = command("run", cmd_run, "execute a profile's runs (skipping those with a record)", selection=True,
                  results=True)
    run.add_argument("--force", action="store_true", help="re-run runs whose record exists")
    run.add_argument("--retry-failed", action="store_true", help="re-run runs recorded as failed")
    run.add_argument("--executor", choices=EXECUTORS, default="local",
                     help="local: a Dask cluster on this machine; dask: an existing scheduler (--scheduler); "
                          "slurm: Dask workers as Slurm jobs (params/cluster/slurm.yaml)")
    run.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler (implies dask)")
    run.add_argument("--cluster-profile", default=None, help="a profile of params/cluster/slurm.yaml (slurm)")
    run.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                     help="override a cluster profile field: partition, account, gpus_per_job, cpus_per_job, memory, "
                          "walltime, max_jobs, gpu_directive, extra_directives, setup, scheduler_host")
    run.add_argument("--max-retries", type=int, default=2,
                     help="times a run whose worker is lost (killed, out of memory, job ended) is re-run")
    run.add_argument("--run-timeout", type=float, default=None, help="seconds a cell may run before the run fails")
    run.add_argument("--book", action="store_true", help="build the book afterwards")
    run.add_argument("--publish", action="store_true",
                     help=f"replace the published copy (published/) with this profile's runs when it is one of "
                          f"{', '.join(PUBLISHED_PROFILES)} (make reproduce does)")
    run.add_argument("--plan", action="store_true", help="print the plan (make plan) instead of running")
    run.add_argument("--device-target", choices=("h100", "h200"), default="h100", help="the GPU --plan plans for")

    plan = command("plan", cmd_plan, "predicted memory (GB), time and FLOPs of every run on a target GPU, from the "
                                     "models' configs on the meta device; exits 2 if a run will not fit", selection=True)
    plan.add_argument("--device-target", choices=("h100", "h200"), default="h100",
                      help="H100 (80 GB) or H200 (141 GB)")
    plan.add_argument("--check", action="store_true",
                      help="also run the fine-tuning study's code path on a small stand-in on the CPU and compare "
                           "the formula's bytes with the measured ones")

    command("list", cmd_list, "validate a profile and list its runs without running them", selection=True)

    book = command("book", cmd_book, "build the Jupyter Book from existing results", results=True)
    book.add_argument("--explored", action="store_true",
                      help="include explored runs (--set/--grid runs off the profile, notebooks run by hand): their "
                           "run pages, named as such; the chapters' tables and findings keep to the profiles' runs")

    command("publish", cmd_publish, "copy a profile's results of the current grid into published/ (the copy the "
                                    "book falls back to)", selection=True, results=True)
    command("gpu-check", cmd_gpu_check, "NVML sampling, energy counter and int4 on CUDA (skips without a GPU)")
    command("gpu-suite", cmd_gpu_suite, "gpu-check, plan against this GPU, then the gpu profiles' most valuable runs "
                                        "(make gpu-suite; says so and exits 0 without a GPU)", results=True)

    fetch = command("assets", cmd_assets, "fetch and verify the offline assets an axis's runs read (or --tests, "
                                          "--all); each from its first source that works")
    fetch.add_argument("axis", nargs="?", help=f"an axis ({', '.join(study_registry.axes())}) or a study name")
    fetch.add_argument("--profile", default=None)
    fetch.add_argument("--tests", action="store_true", help="what the test suite reads")
    fetch.add_argument("--all", action="store_true", help="every asset")

    probe = command("probe", cmd_probe, "show this machine's measured peaks (matmul FLOP/s per dtype, memory "
                                        "bandwidth) behind MFU/MBU; measured once per machine, then cached")
    probe.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    probe.add_argument("--refresh", action="store_true", help="measure again and replace the cached probe")
    probe.add_argument("--threads", type=int, default=None,
                       help="torch threads to probe with (default: torch's; runs under the Dask runner use 1)")

    args = parser.parse_args(argv)
    # Dask's INFO logs would drown the progress lines; set before distributed is imported, so workers inherit it.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    try:
        return args.func(args)
    except (ParamsError, ResourceError, ClusterError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the cluster was closed on the way out (EXECUTOR=slurm: its jobs cancelled)
        print("interrupted; finished runs keep their records, the next run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
