"""Submit a 1000-trial sweep with ``slurmtune sweep`` against one raw ``sbatch`` per trial.

::

    eval "$(env/test-cluster/start.sh | tail -n 1)"   # a SLURM cluster, SLURM_CONF exported
    python bench/bench_sweep.py                        # 1000 trials, 2 repeats (~8 min)
    python bench/bench_sweep.py --trials 200 --repeat 5 --split-repeat 5
    python bench/bench_sweep.py --keep /tmp/bench-sweep   # keep the sweep folders and the sbatch log

A trivial sweep: a manifest with an 8-row chat training file, the tiny model (not even built:
nothing runs), ``train.max_steps: 1`` and a grid of ``--trials`` points over ``train.seed``
(0 .. N-1). Three ways to submit it, interleaved in every repeat so load from other users
of the machine falls on all alike; median and min of ``--repeat`` (the in-process, timed
submission only in the first ``--split-repeat`` repeats: it is there for the split, and a
1000-trial sweep takes minutes):

1. fresh: ``slurmtune sweep MANIFEST --cluster local-test --hold`` as a user runs it (a new
   process: start-up, imports, one run folder per trial, the array);
2. in-process: the same command through ``slurmtune.cli.main.main`` in a fresh child process
   after its imports, with timers around the phases (preflight scheduler queries, expanding
   and checking the trials, writing the trial folders, submitit's per-task pickles, sbatch),
   to show where the time goes;
3. raw: a bash loop of N ``sbatch --hold --parsable --wrap true`` (the real sbatch, one job per
   trial), the way a sweep is submitted without arrays.

An ``sbatch`` wrapper first on PATH logs every call slurmtune makes (and adds ``--hold`` as a
second safety); the raw loop calls the real sbatch by its path, so the wrapper's own start-up
(~1 ms) is not added N times, and its calls are counted from the job ids it prints. Outside
the timing every job is checked to be pending and held (priority 0), then cancelled:
``slurmtune cancel RUN`` for the sweeps, ``scancel`` for the raw jobs; at the end no job of this
bench may be left in squeue.

Exit 1 when slurmtune made more than one array submission for <= MaxArraySize trials (or
more sbatch calls than arrays), when a job was not held, or when a job of
this bench is left in the queue; exit 2 when no SLURM cluster answers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness
from harness import REPO, Column, SbatchLog, job_ids_of

METHODS = ("fresh", "in-process", "raw")
PHASES = ("preflight queries", "expand (the override sets)", "trial configs (apply_values)",
          "trial folders (Run.create_at)", "task pickles + rest of submit", "sbatch", "other")


# --- the sweep ---------------------------------------------------------------------------

def write_sweep(work: Path, trials: int, name: str) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: what is a rubric?"},
                          {"role": "assistant", "content": f"Answer {i}: a list of criteria."}]} for i in range(8)]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    manifest = work / "sweep.yaml"
    manifest.write_text(f"""name: {name}
output_dir: {json.dumps(str(work / 'runs'))}
data: {{train_files: [train.jsonl]}}
model: {{path: {json.dumps(str(work / 'tiny-model'))}, tiny_arch: llama}}
lora: {{r: 4, alpha: 8}}
train: {{method: lora, max_steps: 1, batch_size: 2, grad_accum: 1, max_length: 64, save_steps: 1}}
slurm: {{gpus: 0, time_min: 10}}
sweep:
  grid: {{train.seed: {json.dumps(list(range(trials)))}}}
  parallelism: 4
""", encoding="utf-8")
    return manifest


# --- child: the CLI in-process, with timers --------------------------------------------------

class Timers:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._depth: dict[str, int] = {}

    def wrap(self, owner, attr: str, label: str, classmethod_: bool = False) -> None:
        original = getattr(owner, attr)
        func = original.__func__ if classmethod_ else original

        @functools.wraps(func)
        def timed(*args, **kwargs):
            if self._depth.get(label):  # nested call of the same phase: counted once, by the outer one
                return func(*args, **kwargs)
            self._depth[label] = 1
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self._depth[label] = 0
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(owner, attr, classmethod(timed) if classmethod_ else timed)


def child_in_process(args: argparse.Namespace) -> dict:
    argv = json.loads(args.child)  # the slurmtune command line, as sweep_argv made it
    import submitit.core.utils
    import slurmtune.jobs.pipeline as pipeline  # imported lazily by the CLI: create_sweep, expand, submit_trials
    import slurmtune.cluster.slurm
    import slurmtune.runs.sweep
    from slurmtune.cli.main import main
    from slurmtune.runs.folder import Run
    import slurmtune.checks  # noqa: F401

    timers = Timers()
    timers.wrap(slurmtune.cluster.slurm, "_run", "preflight queries")
    timers.wrap(pipeline, "create_sweep", "create_sweep")
    timers.wrap(pipeline, "expand", "expand")
    timers.wrap(slurmtune.runs.sweep, "apply_values", "trial configs (apply_values)")  # called by expand
    timers.wrap(Run, "create_at", "trial folders (Run.create_at)", classmethod_=True)
    timers.wrap(pipeline, "submit_trials", "submit_trials")
    timers.wrap(submitit.core.utils.CommandFunction, "__call__", "sbatch")
    printed = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        rc = main(argv)
    total = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"slurmtune {shlex.join(argv)} returned {rc}:\n{printed.getvalue()}")
    s = timers.seconds
    phases = {
        "preflight queries": s.get("preflight queries", 0.0),
        "expand (the override sets)": s.get("expand", 0.0) - s.get("trial configs (apply_values)", 0.0),
        "trial configs (apply_values)": s.get("trial configs (apply_values)", 0.0),
        "trial folders (Run.create_at)": s.get("trial folders (Run.create_at)", 0.0),
        "task pickles + rest of submit": s.get("submit_trials", 0.0) - s.get("sbatch", 0.0),
        "sbatch": s.get("sbatch", 0.0),
    }
    phases["other"] = total - sum(phases.values())
    return {"seconds": total, "phases": phases, "stdout": printed.getvalue(),
            "sbatch_calls": timers.calls.get("sbatch", 0), "folders": timers.calls.get("trial folders (Run.create_at)", 0),
            "create_sweep_s": s.get("create_sweep", 0.0)}


# --- the three ways ----------------------------------------------------------------------

def sweep_argv(args: argparse.Namespace) -> list[str]:
    return ["sweep", str(args.manifest), "--cluster", args.cluster, "--hold"]


def submit_fresh(args: argparse.Namespace, log: SbatchLog) -> dict:
    log.reset()
    done, seconds = harness.timed_slurmtune(*sweep_argv(args))
    run_dir = harness.folder_from(done.stdout, "sweep")
    return {"seconds": seconds, "run_dir": run_dir, "job_ids": job_ids_of(run_dir), "sbatch_calls": len(log.calls()),
            "sbatch_log": log.calls()}


def submit_in_process(args: argparse.Namespace, log: SbatchLog) -> dict:
    log.reset()
    result = harness.spawn_child(__file__, [json.dumps(sweep_argv(args))], what="in-process child", cwd=REPO)
    run_dir = harness.folder_from(result["stdout"], "sweep")
    result.update(run_dir=run_dir, job_ids=job_ids_of(run_dir), sbatch_logged=len(log.calls()))
    return result


def write_raw_loop(path: Path, real_sbatch: str, trials: int, name: str, out_dir: Path) -> None:
    path.write_text(f"""#!/bin/bash
set -euo pipefail
for i in $(seq 0 {trials - 1}); do
  {shlex.quote(real_sbatch)} --hold --parsable --job-name={shlex.quote(name)} \\
      --output={shlex.quote(str(out_dir))}/raw-%j.out --time=10 --wrap true
done
""", encoding="utf-8")


def submit_raw(script: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    ids = [line.split(";")[0] for line in done.stdout.split()]
    if done.returncode != 0:
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)
        raise RuntimeError(f"raw sbatch loop failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return {"seconds": seconds, "job_ids": ids, "sbatch_calls": len(ids)}


# --- held, cancelled, gone -----------------------------------------------------------------

def cancel_sweep(run_dir: Path) -> None:
    harness.slurmtune("cancel", str(run_dir))


def ours_in_queue(name: str) -> list[str]:
    shown = subprocess.run(["squeue", "-h", "-o", "%F|%j"], capture_output=True, text=True)
    return sorted({line.split("|", 1)[0] for line in shown.stdout.splitlines()
                   if line.partition("|")[2].startswith(name)})


# --- measuring and reporting ---------------------------------------------------------------

def measure(args: argparse.Namespace, log: SbatchLog, raw_script: Path) -> tuple[dict[str, list[dict]], list[str]]:
    samples: dict[str, list[dict]] = {m: [] for m in METHODS}
    problems: list[str] = []
    for r in range(args.repeat):
        order = METHODS[r % 3:] + METHODS[:r % 3]
        for method in order:
            if method == "in-process" and r >= args.split_repeat:
                continue
            if method == "raw":
                sample = submit_raw(raw_script)
                problems += harness.held_problems(sample["job_ids"], f"raw repeat {r + 1}")
                subprocess.run(["scancel", *sample["job_ids"]], capture_output=True)
            else:
                sample = submit_fresh(args, log) if method == "fresh" else submit_in_process(args, log)
                problems += harness.held_problems(sample["job_ids"], f"{method} repeat {r + 1}")
                cancel_sweep(sample["run_dir"])
                sample["folder_count"] = len(list((sample["run_dir"] / "trials").iterdir()))
                sample["files"] = sum(len(files) for _, _, files in os.walk(sample["run_dir"]))
            samples[method].append(sample)
    return samples, problems


def med(samples: list[dict], key: str = "seconds") -> float:
    return statistics.median(s[key] for s in samples)


TABLE = [Column("method", "<38"), Column("sbatch calls", ">12"), Column("jobs", ">5"), Column("median s", ">9.2f"),
         Column("min s", ">7.2f"), Column("per trial ms", ">12.2f"), Column("raw / this", ">9.2f", suffix="x")]


def print_table(samples: dict[str, list[dict]], trials: int) -> None:
    raw = med(samples["raw"])
    labels = {"fresh": "slurmtune sweep --hold (fresh CLI)", "in-process": "slurmtune sweep (in-process, timed)",
              "raw": f"raw: {trials} x sbatch --hold --wrap true"}
    rows = []
    for method in METHODS:
        s = samples[method]
        m = med(s)
        rows.append((labels[method], max(x["sbatch_calls"] for x in s), max(len(x["job_ids"]) for x in s), m,
                     min(x["seconds"] for x in s), m / trials * 1000, raw / m))
    harness.print_table(TABLE, rows)


def print_split(samples: list[dict]) -> None:
    total = med(samples)
    print(f"\nwhere the in-process submission's {total:.2f} s go (median of each phase):")
    for phase in PHASES:
        value = statistics.median(s["phases"][phase] for s in samples)
        print(f"  {phase:<32} {value:>7.2f} s  {value / total:>6.1%}")
    first = samples[0]
    print(f"  ({first['folders']} run folders written by Run.create_at: the sweep's own + one per trial; "
          f"{first['files']:,} files under the sweep folder after submission)")
    manifest = next((Path(first["run_dir"]) / "trials").iterdir()) / "manifest.yaml"
    text = manifest.read_text(encoding="utf-8")
    sweep_part = text[text.find("\nsweep:") + 1:] if "\nsweep:" in text else ""
    print(f"  one trial's manifest.yaml: {len(text):,} bytes, of which its copy of the sweep section "
          f"{len(sweep_part):,} bytes ({len(sweep_part) / len(text):.0%})")


def check_counts(samples: dict[str, list[dict]], trials: int, max_array: int) -> list[tuple[str, bool]]:
    arrays = -(-trials // max_array)
    checks = []
    for method in ("fresh", "in-process"):
        for i, s in enumerate(samples[method]):
            calls = s["sbatch_calls"] if method == "fresh" else s["sbatch_logged"]
            scripts = [Path(line.split()[-1]) for line in s.get("sbatch_log", [])]
            arrays_seen = sum("#SBATCH --array" in p.read_text(encoding="utf-8") for p in scripts if p.is_file())
            ok = (calls == arrays and s["folder_count"] == trials
                  and (method != "fresh" or arrays_seen == arrays))
            text = (f"{method} repeat {i + 1}: {calls} sbatch call(s) == {arrays} array(s)"
                    + (f" ({arrays_seen} script(s) with #SBATCH --array)" if method == "fresh" else "")
                    + f", {s['folder_count']} trial folders")
            checks.append((text, ok))
    checks.append((f"raw: {trials} distinct job ids per loop",
                   all(len(set(s["job_ids"])) == trials for s in samples["raw"])))
    return checks


def bench(args: argparse.Namespace, work: Path) -> int:
    if not harness.cluster_answers():
        print(harness.NO_CLUSTER, file=sys.stderr)
        return 2
    from slurmtune.cluster.slurm import max_array_size
    name = f"bench-sweep-{os.getpid()}"
    args.manifest = write_sweep(work, args.trials, name)
    log = SbatchLog(work)
    raw_script = work / "raw-loop.sh"
    (work / "raw-out").mkdir(exist_ok=True)
    write_raw_loop(raw_script, log.real, args.trials, f"{name}-raw", work / "raw-out")
    max_array = max_array_size()
    started = time.perf_counter()
    print(f"{harness.machine()}, {args.repeat} repeats, {args.trials} trials "
          f"(grid over train.seed), cluster {args.cluster} (MaxArraySize {max_array}), work folder {work}\n")
    problems: list[str] = []
    try:
        samples, problems = measure(args, log, raw_script)
    except (RuntimeError, harness.ChildFailed) as e:
        print(f"submission failed: {e}", file=sys.stderr)
        return 1
    finally:
        leftover = ours_in_queue(name)
        if leftover:
            subprocess.run(["scancel", *leftover], capture_output=True)
    print_table(samples, args.trials)
    print_split(samples["in-process"])
    problems += harness.report_checks(check_counts(samples, args.trials, max_array))
    time.sleep(1)
    left = ours_in_queue(name)
    problems += harness.report_checks([(f"squeue after cancelling: {len(left)} job(s) of this bench left"
                                        + (f": {', '.join(left[:10])}" if left else ""), not left)], heading=None)
    if left:
        subprocess.run(["scancel", *left], capture_output=True)
    return harness.finish(problems, started)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = harness.parser(__doc__)
    ap.add_argument("--trials", type=int, default=1000, help="grid points, so trials and raw jobs (default 1000)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="submissions per method, interleaved (default 2)")
    ap.add_argument("--split-repeat", type=int, default=1,
                    help="of those, how many also run the in-process, timed submission (default 1)")
    ap.add_argument("--cluster", default="local-test", help="cluster profile (default local-test)")
    harness.add_keep(ap)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trials < 1 or args.repeat < 1 or not 1 <= args.split_repeat:
        ap.error("expected --trials >= 1, --repeat >= 1 and --split-repeat >= 1")
    args.split_repeat = min(args.split_repeat, args.repeat)
    return args


def main(argv: list[str] | None = None) -> int:
    return harness.run_bench(parse_args(argv), bench, "bench-sweep-", child=child_in_process)


if __name__ == "__main__":
    sys.exit(main())
