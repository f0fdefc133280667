"""Submitting: run (the whole pipeline), submit (one step), sweep (trials as job arrays).

Submitting returns at once on SLURM, printing the run id and job ids; a later
shell reattaches with `slurmtune status RUN`. The local executor runs in the
foreground (streaming the job's log) unless --detach is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from slurmtune.cli.status import Follower, add_root_flag
from slurmtune.cluster.profiles import ClusterProfile, load_profile
from slurmtune.config import RunConfig, load_manifest
from slurmtune.errors import UsageError
from slurmtune.runs.folder import Run, discarded_if_unsubmitted


def add_commands(sub, argv: list[str]) -> None:
    _add_run(sub)
    _add_submit(sub)
    _add_sweep(sub)
    _add_estimate(sub)


def _where_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", metavar="NAME", help="cluster profile in slurm/ (or a YAML path)")
    p.add_argument("--executor", choices=["auto", "slurm", "local", "debug"],
                   help="default: slurm when sbatch is here and a cluster is chosen, else local")
    p.add_argument("--dry-run", action="store_true", help="write and print the sbatch scripts, submit nothing")
    p.add_argument("--detach", action="store_true", help="local executor: return at once, do not wait")
    p.add_argument("--hold", action="store_true", help="submit held: nothing starts until `scontrol release`")


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="submit the whole pipeline: convert -> validate -> train -> eval -> report")
    p.add_argument("manifest")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    _where_flags(p)
    p.set_defaults(func=_run)


def _add_submit(sub) -> None:
    p = sub.add_parser("submit", help="submit one job of a manifest, or of an existing run (e.g. to resume)")
    p.add_argument("job", metavar="JOB", help="convert, validate, train, train_deepspeed, eval or report")
    p.add_argument("target", metavar="MANIFEST|RUN")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    _where_flags(p)
    p.set_defaults(func=_submit)


def _run(args) -> int:
    cfg = _manifest(args.manifest, args.overrides, args)
    return _launch(cfg, None, args)


def _submit(args) -> int:
    from slurmtune.jobs.pipeline import JOBS
    if args.job not in JOBS:
        raise UsageError(f"unknown job {args.job!r}; expected one of {', '.join(JOBS)}")
    target = Path(args.target)
    if (target / "run.json").is_file() or not target.suffix:
        run = Run.open(args.target)
        if args.overrides:
            raise UsageError("an existing run keeps its manifest; start a new run to change settings")
        return _launch(run.config(), args.job, args, existing=run)
    return _launch(_manifest(args.target, args.overrides, args), args.job, args)


def _manifest(path: str, overrides: list[str], args) -> RunConfig:
    extra = []
    if args.cluster:
        extra.append(f"slurm.cluster={args.cluster}")
    if args.executor:
        extra.append(f"slurm.executor={args.executor}")
    return load_manifest(path, [*overrides, *extra])


def _launch(cfg: RunConfig, only: str | None, args, existing: Run | None = None) -> int:
    from slurmtune.jobs.pipeline import plan_run, submit_run
    executor, profile = _where(cfg, args)
    plan = plan_run(cfg, only)
    for step in plan:
        step.request.hold = args.hold
    _check(cfg, plan, profile, executor, only=only, existing=existing)
    if existing is not None and not args.dry_run:
        existing.record.dry_run = False  # a dry run submitted for real is a run like any other
    run = existing or Run.create(cfg, executor, profile.name if executor == "slurm" else None, args.dry_run,
                                 group=profile.run_group)
    print(f"run {run.run_id}\n  {run.dir}")
    with discarded_if_unsubmitted(run, existing is None):
        submit_run(run, plan, executor, profile, dry_run=args.dry_run)
    return _after_submit(run, executor, args, f"slurmtune status {run.run_id}")


def _where(cfg: RunConfig, args) -> tuple[str, ClusterProfile]:
    """(executor, cluster profile) a command submits with; says so when it falls back to local."""
    from slurmtune.cluster.slurm import choose_executor
    executor, notice = choose_executor(args.executor or cfg.slurm.executor, args.cluster or cfg.slurm.cluster)
    if notice:
        print(notice, file=sys.stderr)
    return executor, _profile(cfg, args)


def _check(cfg: RunConfig, plan, profile: ClusterProfile, executor: str, **submission) -> None:
    """Every check of every job about to be submitted (slurmtune.checks), before any folder
    is created: all problems at once, exit 1."""
    from slurmtune.checks import ClusterFacts, StepNeeds, Submission, raise_problems, submission_problems
    needs = [StepNeeds(s.name, s.kind, s.request.gpus_per_node, s.request.nodes, s.request.time_min,
                       s.request.partition or (profile.partition if s.request.gpus_per_node
                                               else profile.cpu_partition or profile.partition),
                       s.shards) for s in plan]
    facts = None
    if executor == "slurm":
        from slurmtune.cluster import slurm
        facts = ClusterFacts(slurm.partitions(), profile.max_array_size or slurm.max_array_size())
    raise_problems(submission_problems(Submission(cfg, needs, profile, executor, **submission), facts))


def _after_submit(run: Run, executor: str, args, follow: str) -> int:
    if args.dry_run:
        print("dry run: nothing was submitted")
        return 0
    if executor == "slurm" or args.detach:
        print(f"follow it with: {follow}")
        return 0
    return _wait_local(run)


def _wait_local(run: Run) -> int:
    from slurmtune.runs.status import format_table, overall, run_status
    jobs = getattr(run, "local_jobs", [])
    logs = Follower(run)
    for job in jobs:
        while not job.done():
            logs.print_new()
            time.sleep(0.5)
    logs.print_new()
    for job in jobs:
        try:
            job.result()
        except Exception:  # the failure is reported by status below, with its log
            pass
    if (run.dir / "sweep.json").is_file():
        from slurmtune.runs import sweep
        data, _ = sweep.load_trials(run.dir)
        rows = sweep.sweep_status(run)
        print(sweep.format_sweep_table(run, rows, data["metric"]))
        print(f"results: {run.dir / 'sweep_results.csv'}")
        return 0 if all(r["state"] == "COMPLETED" for r in rows) else 1
    rows = run_status(run)
    print(format_table(run, rows))
    report = run.dir / "report.html"
    if report.is_file():
        print(f"report: {report}")
    return 0 if overall(rows) == "COMPLETED" else 1


SWEEP_ACTIONS = ("status", "resubmit", "results")


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="a sweep as throttled job arrays; also: sweep status|resubmit|results RUN",
                       description="slurmtune sweep MANIFEST [k=v ...] | sweep status RUN [--json] | "
                                   "sweep resubmit RUN | sweep results RUN")
    p.add_argument("target", metavar="MANIFEST|ACTION")
    p.add_argument("rest", nargs="*", metavar="key.sub=value | RUN")
    p.add_argument("--json", action="store_true", help="sweep status: print JSON")
    _where_flags(p)
    add_root_flag(p)
    p.set_defaults(func=_sweep)


def _sweep(args) -> int:
    from slurmtune.jobs.pipeline import submit_trials
    from slurmtune.runs import sweep
    if args.target not in SWEEP_ACTIONS:
        return _sweep_submit(args)
    if len(args.rest) != 1:
        raise UsageError(f"usage: slurmtune sweep {args.target} RUN")
    run = Run.open(args.rest[0], args.root)
    data, _ = sweep.load_trials(run.dir)
    if args.target == "results":
        paths = sweep.write_sweep_results(run)
        for kind in ("csv", "json", "png"):
            print(f"{kind}: {paths[kind]}")
        return 0
    rows = sweep.sweep_status(run)
    if args.target == "status":
        print(json.dumps({"run_id": run.run_id, "metric": data["metric"], "trials": rows}, indent=2)
              if args.json else sweep.format_sweep_table(run, rows, data["metric"]))
        return 0
    indices = sweep.to_rerun(rows)
    if not indices:
        print("nothing to resubmit: every trial is complete, running or queued")
        return 0
    print(f"resubmitting {len(indices)} trial(s): {', '.join(rows[i]['trial'] for i in indices)}")
    profile = _profile_of(run)
    run.record.dry_run = False  # a dry sweep resubmitted is submitted for real
    submit_trials(run, indices, run.record.executor, profile, _max_array(run.record.executor, profile),
                  hold=args.hold)
    return 0 if run.record.executor == "slurm" else _wait_local(run)


def _sweep_submit(args) -> int:
    from slurmtune.jobs.pipeline import create_sweep, plan_sweep, submit_trials
    cfg = _manifest(args.target, args.rest, args)
    executor, profile = _where(cfg, args)
    trials, plan = plan_sweep(cfg, Path(args.target).resolve().parent)
    _check(cfg, plan, profile, executor, trials=trials)
    run = create_sweep(cfg, trials, executor, profile.name if executor == "slurm" else None, args.dry_run,
                       group=profile.run_group)
    print(f"sweep {run.run_id}: {len(trials)} trials\n  {run.dir}")
    with discarded_if_unsubmitted(run):
        submit_trials(run, list(range(len(trials))), executor, profile, _max_array(executor, profile),
                      dry_run=args.dry_run, hold=args.hold)
    return _after_submit(run, executor, args, f"slurmtune sweep status {run.run_id}")


def _add_estimate(sub) -> None:
    p = sub.add_parser("estimate", help="GPU memory and time of a manifest's train job (or each sweep "
                                        "trial's), against its cluster's GPUs; submits nothing",
                       description="Exits 1 when the estimate does not fit the partition's GPUs, "
                                   "printing the settings that would.")
    p.add_argument("manifest")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--cluster", metavar="NAME", help="cluster profile in slurm/ (or a YAML path)")
    p.set_defaults(func=_estimate, executor=None)


def _estimate(args) -> int:
    """The train job's estimate as `run` prints it before submitting, for the GPU of the
    manifest's cluster profile (or this machine's), also when no memory is known."""
    from slurmtune.checks import Submission, estimate_problems, job_problems, preview_training, raise_problems
    from slurmtune.jobs.pipeline import plan_sweep

    cfg = _manifest(args.manifest, args.overrides, args)
    profile = _profile(cfg, args)
    executor = "slurm" if (args.cluster or cfg.slurm.cluster) else "local"
    sw = cfg.sweep
    trials = plan_sweep(cfg, Path(args.manifest).resolve().parent)[0] \
        if sw.trials or sw.grid or sw.paired or sw.random else []
    raise_problems(job_problems(cfg, "train"), "cannot estimate")
    preview = preview_training(cfg, None)
    if preview is None:
        raise UsageError("nothing to estimate from: the training data is written by an earlier step")
    raise_problems(estimate_problems(Submission(cfg, [], profile, executor, trials=trials), preview, always=True),
                   "does not fit")
    print("fits: nothing was submitted")
    return 0


def _profile(cfg: RunConfig, args) -> ClusterProfile:
    return _profile_by_name(getattr(args, "cluster", None) or cfg.slurm.cluster)


def _profile_by_name(name: str | None) -> ClusterProfile:
    return load_profile(name) if name else ClusterProfile(name="local")


def _profile_of(run: Run) -> ClusterProfile:
    return load_profile(run.record.cluster) if run.record.cluster else ClusterProfile(name="local")


def _max_array(executor: str, profile: ClusterProfile) -> int:
    if executor != "slurm":
        return 10**9
    from slurmtune.cluster import slurm
    return profile.max_array_size or slurm.max_array_size()
