"""Sweeps as throttled job arrays: one array task per trial, each a small run of its own.

::

    runs/<sweep>/
        sweep.json                 trials (id, overrides) and the arrays that ran them
        trials/<id>/               a run folder per trial: manifest.yaml, final/, eval_report.json ...
        sweep_results.{csv,json,png}

A trial task converts/validates its data, trains (resuming from its own
checkpoints after a requeue), evaluates and reports, all in its own folder, and
then rewrites the sweep's results table, so a sweep is one ``sbatch`` call
however many trials it has (up to MaxArraySize). A trial that is already
complete returns at once, so `slurmtune sweep resubmit` can never redo finished
work. Beyond MaxArraySize the trials are split over several arrays, each
starting after the last (so ``sweep.parallelism`` bounds the whole sweep).
"""

from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from slurmtune.config import RunConfig
from slurmtune.jsonio import write_json_atomic
from slurmtune.profiles import ClusterProfile
from slurmtune.runs import Run, Step
from slurmtune.slurm import Request, render_script, submit
from slurmtune.status import ACTIVE, DONE
from slurmtune.sweep import Trial, expand, results_table, trial_metric, write_results

from slurmtune.jobs.base import Job, requeue_pending
from slurmtune.jobs.convert import ConvertJob
from slurmtune.jobs.eval import EvalJob
from slurmtune.jobs.report import ReportJob
from slurmtune.jobs.train import TrainJob
from slurmtune.jobs.validate import ValidateJob


def load_trials(sweep_dir: str | Path) -> tuple[dict, list[Trial]]:
    data = json.loads((Path(sweep_dir) / "sweep.json").read_text(encoding="utf-8"))
    return data, [Trial(t["id"], t["overrides"]) for t in data["trials"]]


def trial_dir(sweep_dir: str | Path, trial: Trial) -> Path:
    return Path(sweep_dir) / "trials" / trial.id


def trial_finished(folder: Path, cfg: RunConfig) -> bool:
    has_eval = bool(cfg.data.eval_file or cfg.data.split or cfg.data.validation_file)
    return (folder / "final" / "adapter_model.safetensors").is_file() and \
        (not has_eval or (folder / "eval_report.json").is_file())


class TrialJob(Job):
    """One array task: every step of one trial, in the trial's own folder."""

    kind = "trial"
    gpus_used = 1

    def run(self, cfg: RunConfig, index: int) -> str:
        _, trials = load_trials(self.run_dir)
        folder = trial_dir(self.run_dir, trials[index])
        trial_cfg = Run.open(folder).config()
        if trial_finished(folder, trial_cfg):
            print(f"trial {trials[index].id} is complete", flush=True)
            return str(folder)
        print(f"trial {trials[index].id}: {json.dumps(trials[index].overrides)}", flush=True)
        if trial_cfg.data.inputs:
            ConvertJob(folder)()
        ValidateJob(folder)()
        TrainJob(folder)()
        if trial_cfg.data.eval_file or trial_cfg.data.split or trial_cfg.data.validation_file:
            EvalJob(folder)(0)
            ReportJob(folder)()
        return str(folder)

    def step_name(self, index: int = 0) -> str:
        _, trials = load_trials(self.run_dir)
        return f"trial.{trials[index].id}"

    def __call__(self, index: int) -> str:
        try:
            return super().__call__(index)
        finally:
            if not requeue_pending():
                refresh_results(self.run_dir)


def refresh_results(sweep_dir: str | Path) -> None:
    """The results table as the trials' own status files see it, rewritten by each trial as it
    ends (under a lock, so the last writer has seen every earlier trial). No scheduler query
    from the compute node: `slurmtune sweep results RUN` rebuilds it with the scheduler's view."""
    try:
        with _lock(Path(sweep_dir) / ".results.lock"):
            paths = write_sweep_results(Run.open(sweep_dir), query_scheduler=False)
        print(f"sweep results: {paths['csv']}", flush=True)
    except Exception as e:  # a finished trial must not fail over the summary table
        print(f"warning: sweep results not refreshed ({type(e).__name__}: {e}); "
              f"rebuild them with: slurmtune sweep results {sweep_dir}", flush=True)


@contextmanager
def _lock(path: Path):
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a shared file system without locks: atomic writes still, maybe a stale table
            pass
        yield


# --- submission ---------------------------------------------------------------------------

def create_sweep(cfg: RunConfig, manifest_dir: Path, executor: str, cluster: str | None,
                 dry_run: bool) -> tuple[Run, list[Trial]]:
    """The sweep folder with one run folder per trial; nothing submitted yet."""
    trials = expand(cfg.sweep, cfg, manifest_dir)
    run = Run.create(cfg, executor, cluster, dry_run)
    for trial in trials:
        trial.config.eval.shards = 1  # a trial evaluates inside its own array task
        Run.create_at(trial_dir(run.dir, trial), trial.config, executor, cluster, dry_run)
    write_json_atomic(run.dir / "sweep.json", {
        "metric": cfg.sweep.metric, "mode": cfg.sweep.mode,
        "trials": [t.to_json() for t in trials], "arrays": []})
    return run, trials


def submit_trials(run: Run, indices: list[int], executor: str, profile: ClusterProfile, max_array: int,
                  dry_run: bool = False, hold: bool = False, echo: Callable[[str], None] = print) -> list[str]:
    """Submit trials ``indices`` as arrays of at most ``max_array`` tasks: one sbatch call each."""
    cfg = run.config()
    data, _ = load_trials(run.dir)
    job = TrialJob(run.dir, "trials")
    if executor != "slurm":
        return _submit_local(run, indices, executor, profile, job, dry_run, echo)
    blocks = [indices[i:i + max_array] for i in range(0, len(indices), max_array)]
    after: list[str] = []
    ids = []
    first = len(data["arrays"])  # a resubmission's arrays number on from the earlier ones
    for n, block in enumerate(blocks):
        name = f"trials-{first + n}"
        req = Request(f"{cfg.name}-trial", cfg.slurm.time_min, gpus_per_node=min(cfg.slurm.gpus, 1),
                      array_size=len(block), array_parallelism=cfg.sweep.parallelism, hold=hold)
        if dry_run:
            script = run.slurm_dir / f"dry-run-{name}.sh"
            script.write_text(render_script(run.slurm_dir, profile, req, after, array=True), encoding="utf-8")
            run.add_step(Step(name, "trial", [], len(block), list(after), str(script), req.gpus_per_node))
            data["arrays"].append({"step": name, "job_id": None, "items": block})
            echo(f"{name}: {script} (array of {len(block)}, %{cfg.sweep.parallelism})")
            after = [f"afterany:<{name}>"]  # the job id it would have
            continue
        sub = submit("slurm", run.slurm_dir, profile, req, job, after=after, items=block)
        run.add_step(Step(name, "trial", sub.job_ids, len(block), list(after), sub.script, req.gpus_per_node))
        data["arrays"].append({"step": name, "job_id": sub.job_ids[0], "items": block})
        ids += sub.job_ids
        echo(f"{name}: array job {sub.job_ids[0]} of {len(block)} trials, at most {cfg.sweep.parallelism} at once")
        after = [f"afterany:{sub.job_ids[0]}"]  # the next block starts when this one is over
    write_json_atomic(run.dir / "sweep.json", data)
    return ids


def _submit_local(run, indices, executor, profile, job, dry_run, echo) -> list[str]:
    from slurmtune.jobs.pipeline import LocalPipeline
    data, _ = load_trials(run.dir)
    name = f"trials-{len(data['arrays'])}"
    if dry_run:
        echo(f"dry run: {executor} executor would run {len(indices)} trials one after another")
        return []
    pipeline = LocalPipeline([job], [indices], keep_going=True)
    cfg = run.config()
    sub = submit(executor, run.slurm_dir, profile, Request(run.run_id, cfg.slurm.time_min * len(indices)), pipeline)
    data["arrays"].append({"step": name, "job_id": sub.job_ids[0], "items": indices, "local": True})
    write_json_atomic(run.dir / "sweep.json", data)
    run.record.steps.append(Step(name, "trial", sub.job_ids, len(indices), []))
    run.save()
    run.local_jobs = sub.jobs
    echo(f"{executor}: {len(indices)} trials in process {sub.job_ids[0]}")
    return sub.job_ids


# --- status, resubmission, results --------------------------------------------------------------

RERUN = {"FAILED", "TIMEOUT", "PREEMPTED", "CANCELLED", "LOST", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "NOT STARTED", "STOPPED"}


def sweep_status(run: Run, query_scheduler: bool = True) -> list[dict]:
    """One row per trial from ONE scheduler query for all of the sweep's arrays (or, without
    the query, from the trials' own status files: a submitted trial with none is PENDING)."""
    data, trials = load_trials(run.dir)
    latest: dict[int, tuple[dict, int]] = {}
    for array in data["arrays"]:
        for position, index in enumerate(array["items"]):
            latest[index] = (array, position)  # a resubmitted trial: its newest array wins
    states = {} if query_scheduler else None
    array_ids = [a["job_id"] for a in data["arrays"] if a.get("job_id") and not a.get("local")]
    if query_scheduler and array_ids and run.record.executor == "slurm":
        from slurmtune.slurm import job_states
        states = job_states(array_ids)
    return [_trial_row(run, data, trial, latest.get(i), states) for i, trial in enumerate(trials)]


def _trial_row(run: Run, data: dict, trial: Trial, where, states: dict | None) -> dict:
    folder = trial_dir(run.dir, trial)
    own = run.job_status(f"trial.{trial.id}")
    row = {"trial": trial.id, "overrides": trial.overrides, "state": "NOT STARTED", "restarts": 0,
           "step": _last_step(folder), "elapsed_s": 0, "metric": trial_metric(folder, data["metric"])}
    if where is None:
        return row
    array, position = where
    task = None
    if states is not None:
        task = states.get(f"{array['job_id']}_{position}")
        if task is None and array["job_id"] in states:  # tasks not started yet: the array's line
            task = states[array["job_id"]]
    if task is not None and run.record.executor == "slurm":
        row.update(state=task.state, restarts=task.restarts, elapsed_s=task.elapsed_s)
    elif own:
        row["state"] = own.get("state", row["state"])
    elif states is None and array.get("job_id"):
        row["state"] = "PENDING"  # submitted, not started as far as its folder knows
    if row["state"] == "COMPLETED" and own.get("state") == "FAILED":
        row["state"] = "FAILED"  # the task ended cleanly but the trial's job reported a failure
    if own.get("error") and row["state"] not in DONE | ACTIVE:
        row["error"] = own["error"]
    return row


def _last_step(folder: Path) -> int | None:
    log = folder / "training.log"
    if not log.is_file():
        return None
    import re
    steps = re.findall(r"step (\d+)/\d+", log.read_text(encoding="utf-8", errors="replace")[-20000:])
    return int(steps[-1]) if steps else None


def to_rerun(rows: list[dict]) -> list[int]:
    """Trials that failed, timed out, were preempted without requeue, or never started."""
    return [i for i, row in enumerate(rows) if row["state"] in RERUN]


def write_sweep_results(run: Run, query_scheduler: bool = True) -> dict[str, Path]:
    data, trials = load_trials(run.dir)
    rows = sweep_status(run, query_scheduler)
    return write_results(run.dir, results_table(trials, rows, data["metric"], data["mode"]), data["metric"])


def format_sweep_table(run: Run, rows: list[dict], metric: str) -> str:
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines = [f"sweep {run.run_id}: {len(rows)} trials ("
             + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) + ")",
             f"  {'trial':<12} {'state':<11} {'restarts':>8} {'step':>6} {metric:>12} {'elapsed':>8}  overrides"]
    for r in rows:
        value = f"{r['metric']:.4g}" if isinstance(r["metric"], (int, float)) else "-"
        elapsed = f"{r['elapsed_s'] // 60}:{r['elapsed_s'] % 60:02d}"
        over = ", ".join(f"{k}={json.dumps(v)}" for k, v in r["overrides"].items())
        lines.append(f"  {r['trial']:<12} {r['state']:<11} {r['restarts']:>8} {r['step'] or '-':>6} "
                     f"{value:>12} {elapsed:>8}  {over}")
        if r.get("error"):
            lines.append(f"      error: {r['error']}")
    return "\n".join(lines)
