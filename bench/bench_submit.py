"""Time ``slurmtune submit`` of one job and ``slurmtune run`` of the 5-step pipeline against raw ``sbatch``.

::

    eval "$(env/test-cluster/start.sh | tail -n 1)"      # a SLURM cluster, SLURM_CONF exported
    python bench/bench_submit.py                          # 5 repeats of every measurement
    python bench/bench_submit.py --repeat 20 --profile    # + cProfile of one in-process `run`
    python bench/bench_submit.py --keep /tmp/bench        # keep the run folders and scripts

Two cases, each with the manifest's run folders in a temporary directory (``output_dir=``):

- one job:  ``slurmtune submit convert MANIFEST output_dir=TMP --cluster local-test``
- pipeline: ``slurmtune run MANIFEST output_dir=TMP --cluster local-test``
  (convert -> validate -> train -> eval array -> report)

and three ways to submit them, interleaved in every repeat (with the start-up costs printed
below the table) so load from other users of the machine falls on all alike; median and min
of ``--repeat``:

1. fresh: the CLI as a user runs it, a new process (Python start-up, imports, submission);
2. in-process: ``slurmtune.cli.main.main([...])`` in this process, after one untimed
   warm-up call that pays the lazy imports (submitit, the job modules), so only the
   submission is timed;
3. raw: ``sbatch --parsable`` of the very ``*_submission.sh`` files slurmtune wrote in the
   warm-up, chained like slurmtune chains them (``--dependency=afterok:ID
   --kill-on-invalid-dep=yes``), from one bash script run as a fresh process.

Nothing runs. An ``sbatch`` wrapper first on PATH appends each call to a log (the sbatch
counts) and adds ``--hold``; slurmtune and raw sbatch both go through it. ``SBATCH_HOLD=1``
in the environment would be simpler, but sbatch 22.05 has no such input variable (a job
submitted with it runs). Outside the timing every job is checked to be pending with priority
0 (held), then cancelled with scancel.

Exit 1 when slurmtune made more sbatch calls than raw sbatch, when the pipeline did not make
exactly one per step, or when a job was not held; exit 2 when no SLURM cluster answers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import harness
from harness import REPO, Column, SbatchLog, folder_from, job_ids_of, run_steps

CASES = {"one job": ["submit", "convert"], "pipeline": ["run"]}
PIPELINE_STEPS = 5  # convert, validate, train, eval (one array job), report
METHODS = ("fresh", "in-process", "raw")
# Above this in-process/raw ratio the submission itself, not Python, is worth a profile.
PROFILE_RATIO = 3.0
# Fresh processes that submit nothing: what the fresh and raw times hold besides submitting.
OVERHEADS = {
    "python start-up (python -c pass)": [sys.executable, "-c", "pass"],
    "python start-up + every module the CLI imports": [
        sys.executable, "-c", "import slurmtune.cli.main, slurmtune.jobs.pipeline, slurmtune.checks, submitit"],
    "bash start-up, in every raw time (bash -c true)": ["bash", "-c", "true"],
    "sh start-up, the wrapper's cost per sbatch call (sh -c true)": ["sh", "-c", "true"],
}


@dataclass
class Sample:
    seconds: float
    job_ids: list[str]
    sbatch_calls: int


@dataclass
class Case:
    name: str
    scripts: list[Path] = field(default_factory=list)  # from the warm-up run, for raw sbatch
    warmup_s: float = 0.0
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {m: [] for m in METHODS})


# --- the three ways to submit -----------------------------------------------------------

def slurmtune_argv(case: str, args: argparse.Namespace, out_dir: Path) -> list[str]:
    return [*CASES[case], str(args.manifest), f"output_dir={out_dir}", "--cluster", args.cluster]


def submit_fresh(case: str, args: argparse.Namespace, out_dir: Path, log: SbatchLog) -> Sample:
    log.reset()
    done, seconds = harness.timed_slurmtune(*slurmtune_argv(case, args, out_dir))
    return Sample(seconds, job_ids_of(folder_from(done.stdout)), len(log.calls()))


def submit_in_process(case: str, args: argparse.Namespace, out_dir: Path, log: SbatchLog,
                      profiler=None) -> tuple[Sample, Path]:
    from slurmtune.cli.main import main
    argv = slurmtune_argv(case, args, out_dir)
    printed = io.StringIO()
    log.reset()
    start = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        rc = profiler.runcall(main, argv) if profiler else main(argv)
    seconds = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"slurmtune {shlex.join(argv)} returned {rc}:\n{printed.getvalue()}")
    run_dir = folder_from(printed.getvalue())
    return Sample(seconds, job_ids_of(run_dir), len(log.calls())), run_dir


def write_chain(scripts: list[Path], path: Path) -> None:
    """A bash script submitting ``scripts`` in order, each afterok on the one before, as slurmtune does.
    Flags on the command line override the ``#SBATCH --dependency`` the scripts carry."""
    lines = ["#!/bin/bash", "set -euo pipefail"]
    for i, script in enumerate(scripts):
        after = f" --dependency=afterok:$id{i - 1} --kill-on-invalid-dep=yes" if i else ""
        lines.append(f"id{i}=$(sbatch --parsable{after} {shlex.quote(str(script))})")
        lines.append(f"id{i}=${{id{i}%%;*}}")  # --parsable prints "id;cluster" on multi-cluster setups
    lines.append("echo " + " ".join(f"$id{i}" for i in range(len(scripts))))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def submit_raw(chain: Path, log: SbatchLog) -> Sample:
    log.reset()
    start = time.perf_counter()
    done = subprocess.run(["bash", str(chain)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"raw sbatch chain {chain} failed (exit {done.returncode}):\n{done.stderr}")
    return Sample(seconds, done.stdout.split(), len(log.calls()))


# --- held, then cancelled ---------------------------------------------------------------

def check_held_and_cancel(ids: list[str], what: str) -> list[str]:
    """Problems, if any job of ``ids`` is not pending with priority 0; cancels them all either way."""
    problems = harness.held_problems(ids, what)
    subprocess.run(["scancel", *ids], capture_output=True)
    return problems


def cancel_leftovers(work: Path) -> None:
    """After a failure between a submission and its cancel: our jobs are the ones whose script is in ``work``."""
    shown = subprocess.run(["squeue", "-h", "-o", "%F|%o"], capture_output=True, text=True)
    ours = {line.split("|", 1)[0] for line in shown.stdout.splitlines()
            if line.partition("|")[2].startswith(str(work) + os.sep)}
    if ours:
        subprocess.run(["scancel", *sorted(ours)], capture_output=True)


# --- measuring --------------------------------------------------------------------------

def warm_up(case: Case, args: argparse.Namespace, work: Path, log: SbatchLog) -> list[str]:
    """One untimed in-process submission: pays the lazy imports, writes the scripts raw sbatch reuses."""
    start = time.perf_counter()
    sample, run_dir = submit_in_process(case.name, args, work / "warm-up", log)
    case.warmup_s = time.perf_counter() - start
    case.scripts = [Path(step["script"]) for step in run_steps(run_dir)]
    write_chain(case.scripts, chain_path(work, case))
    return check_held_and_cancel(sample.job_ids, f"{case.name} warm-up")


def measure(cases: list[Case], args: argparse.Namespace, work: Path, log: SbatchLog,
            overheads: dict[str, list[float]]) -> list[str]:
    """Every case and method once per repeat, then the start-up costs, so load from other
    users of the machine falls on all of them alike."""
    problems = []
    for case in cases:
        problems += warm_up(case, args, work, log)
    for _ in range(args.repeat):
        for case in cases:
            for method in METHODS:
                sample = submit_once(case, method, args, work, log)
                case.samples[method].append(sample)
                problems += check_held_and_cancel(sample.job_ids, f"{case.name} {method}")
        for what, argv in OVERHEADS.items():
            overheads.setdefault(what, []).append(time_command(argv))
    return problems


def submit_once(case: Case, method: str, args: argparse.Namespace, work: Path, log: SbatchLog) -> Sample:
    if method == "fresh":
        return submit_fresh(case.name, args, work / method, log)
    if method == "in-process":
        return submit_in_process(case.name, args, work / method, log)[0]
    return submit_raw(chain_path(work, case), log)


def chain_path(work: Path, case: Case) -> Path:
    return work / f"raw-{case.name.replace(' ', '-')}.sh"


def time_command(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=REPO, check=True)
    return time.perf_counter() - start


# --- reporting --------------------------------------------------------------------------

def median_min(samples: list[Sample]) -> tuple[float, float]:
    seconds = [s.seconds for s in samples]
    return statistics.median(seconds), min(seconds)


def calls(samples: list[Sample]) -> int:
    """sbatch calls of one submission; the most seen, so a retried sbatch is not hidden."""
    return max(s.sbatch_calls for s in samples)


TABLE = [Column("case", "<9"),
         Column("slurmtune fresh s", ">9.3f", under="median", span=2), Column("", ">8.3f", under="min"),
         Column("slurmtune in-process s", ">11.3f", under="median", span=2), Column("", ">11.3f", under="min"),
         Column("raw sbatch s", ">7.3f", under="median", span=2), Column("", ">6.3f", under="min"),
         Column("fresh/raw", ">9.1f", suffix="x", under="(median)"),
         Column("in-proc/raw", ">11.1f", suffix="x", under="(median)"),
         Column("sbatch calls", ">13", under="fresh/in/raw")]


def print_table(cases: list[Case]) -> None:
    rows = []
    for case in cases:
        (f_med, f_min), (i_med, i_min), (r_med, r_min) = (median_min(case.samples[m]) for m in METHODS)
        counts = "/".join(str(calls(case.samples[m])) for m in METHODS)
        rows.append((case.name, f_med, f_min, i_med, i_min, r_med, r_min, f_med / r_med, i_med / r_med, counts))
    harness.print_table(TABLE, rows)


def print_breakdown(cases: list[Case], overheads: dict[str, list[float]]) -> None:
    print()
    for what, times in overheads.items():
        print(f"{what + ', median:':<70} {statistics.median(times):.3f} s")
    for case in cases:
        n_jobs = len(case.scripts)
        i_med, r_med = median_min(case.samples["in-process"])[0], median_min(case.samples["raw"])[0]
        print(f"{case.name}: {n_jobs} job(s); per job in-process {i_med / n_jobs * 1000:.1f} ms, "
              f"raw sbatch {r_med / n_jobs * 1000:.1f} ms; untimed first in-process call {case.warmup_s:.3f} s")


def check_counts(cases: list[Case]) -> list[tuple[str, bool]]:
    checks = []
    for case in cases:
        raw = calls(case.samples["raw"])
        for method in ("fresh", "in-process"):
            made = calls(case.samples[method])
            steps = f", steps {PIPELINE_STEPS}" if case.name == "pipeline" else ""
            checks.append((f"{case.name} {method}: {made} sbatch call(s), raw {raw}{steps}",
                           made <= raw and (case.name != "pipeline" or made == PIPELINE_STEPS)))
    return checks


def profile_run(args: argparse.Namespace, work: Path, log: SbatchLog) -> list[str]:
    """One in-process `slurmtune run` under cProfile: where the submission's own time goes."""
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    sample, _ = submit_in_process("pipeline", args, work / "profile", log, profiler)
    print(f"\ncProfile of one in-process `slurmtune run` ({sample.seconds:.3f} s with the profiler on):")
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("cumulative").print_stats(f"^{REPO}/(jobs|lib)/", 25)  # slurmtune's own functions
    stats.sort_stats("tottime").print_stats(12)
    stats.print_callers(r"yaml/__init__.py:\d+\(safe_load\)|subprocess.py:\d+\(run\)|posix.fsync")
    return check_held_and_cancel(sample.job_ids, "profile")


# --- main -------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = harness.parser(__doc__)
    ap.add_argument("--repeat", type=int, default=5, help="submissions per case and method (default 5)")
    ap.add_argument("--manifest", type=Path, default=REPO / "manifests" / "quickstart.yaml",
                    help="manifest to submit; its pipeline must have 5 steps (default manifests/quickstart.yaml)")
    ap.add_argument("--cluster", default="local-test", help="cluster profile (default local-test)")
    harness.add_keep(ap, help="write run folders, scripts and the sbatch log into DIR and keep them")
    ap.add_argument("--profile", action="store_true",
                    help=f"profile one in-process `run` even when in-process/raw <= {PROFILE_RATIO:g}x")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("expected --repeat >= 1")
    args.manifest = args.manifest.resolve()
    if not harness.SLURMTUNE.is_file():
        ap.error(f"no slurmtune console script beside {sys.executable}: run it with the venv's python")
    return args


def bench(args: argparse.Namespace, work: Path) -> int:
    if not harness.cluster_answers():
        print(harness.NO_CLUSTER, file=sys.stderr)
        return 2
    log = SbatchLog(work)
    os.chdir(REPO)  # as the fresh processes run
    print(f"{harness.machine()}, {args.repeat} repeats, "
          f"manifest {args.manifest.relative_to(REPO) if args.manifest.is_relative_to(REPO) else args.manifest}, "
          f"cluster {args.cluster}, run folders in {work}\n")
    try:
        problems = report(args, work, log)
    except (RuntimeError, harness.ChildFailed) as e:
        print(f"submission failed: {e}", file=sys.stderr)
        return 1
    finally:
        cancel_leftovers(work)
    return harness.finish(problems)


def report(args: argparse.Namespace, work: Path, log: SbatchLog) -> list[str]:
    """Measure, print the table and the checks, profile when the submission is slow; returns problems."""
    cases = [Case(name) for name in CASES]
    overheads: dict[str, list[float]] = {}
    problems = measure(cases, args, work, log, overheads)
    print_table(cases)
    print_breakdown(cases, overheads)
    problems += harness.report_checks(check_counts(cases), heading="\nsbatch calls:")
    worst = max(median_min(c.samples["in-process"])[0] / median_min(c.samples["raw"])[0] for c in cases)
    if args.profile or worst > PROFILE_RATIO:
        problems += profile_run(args, work, log)
    return problems


def main(argv: list[str] | None = None) -> int:
    return harness.run_bench(parse_args(argv), bench, "bench-submit-")


if __name__ == "__main__":
    sys.exit(main())
