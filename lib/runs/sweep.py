"""Sweeps: a manifest's ``sweep:`` section expanded into trials, and the table of their results.

::

    sweep:
      grid:   {train.lr: [1.0e-4, 2.0e-4], lora.r: [8, 16]}        # cartesian product
      paired: {data.train_files: [[a.jsonl], [b.jsonl]], train.epochs: [2, 3]}   # zipped
      random: {train.lr: {log_uniform: [1.0e-5, 1.0e-3]}, lora.r: {choice: [8, 16]}}
      samples: 6                                                  # random draws
      trials: [{train.lr: 5.0e-5}]                                # explicit override sets
      parallelism: 3                                              # at most 3 trials at once
      metric: eval_loss
      mode: min

Each generator that is given contributes a factor; a trial takes one element of
each (explicit set x grid point x paired row x random draw). A trial's id is a
hash of its overrides, so re-expanding the same manifest gives the same ids and
folders (``trials/<id>/``), and a trial keeps its id when others are added.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from slurmtune.config import RunConfig, SweepConfig, apply_values
from slurmtune.errors import UsageError
from slurmtune.data.jsonio import AtomicFiles
from slurmtune.runs.folder import Run, has_eval
from slurmtune.runs.status import ACTIVE, DONE

RANDOM_KINDS = ("uniform", "log_uniform", "choice", "int_uniform")


@dataclass
class Trial:
    id: str
    overrides: dict[str, Any]
    # The trial's own resolved config (set by expand): the base with the overrides, no sweep section.
    config: RunConfig | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "overrides": self.overrides}


def trial_id(overrides: dict[str, Any]) -> str:
    canonical = json.dumps(overrides, sort_keys=True, separators=(",", ":"), default=str)
    return "t" + hashlib.sha256(canonical.encode()).hexdigest()[:10]


def expand(sweep: SweepConfig, base: RunConfig, base_dir: Path | None = None) -> list[Trial]:
    """Every trial of a sweep with its config (bad keys and types fail here). A trial is a plain
    run: its config keeps no sweep section."""
    factors = []
    if sweep.trials:
        factors.append([dict(t) for t in sweep.trials])
    if sweep.grid:
        keys = list(sweep.grid)
        factors.append([dict(zip(keys, combo)) for combo in itertools.product(*(sweep.grid[k] for k in keys))])
    if sweep.paired:
        lengths = {k: len(v) for k, v in sweep.paired.items()}
        if len(set(lengths.values())) != 1:
            raise UsageError(f"sweep.paired: every list must have the same length; got {lengths}")
        keys = list(sweep.paired)
        factors.append([dict(zip(keys, row)) for row in zip(*(sweep.paired[k] for k in keys))])
    if sweep.random:
        factors.append(_random_draws(sweep))
    if not factors:
        raise UsageError("sweep: nothing to sweep; give grid, paired, random (+ samples) or trials")
    trials, seen = [], set()
    base = replace(base, sweep=SweepConfig())
    for parts in itertools.product(*factors):
        overrides = {k: v for part in parts for k, v in part.items()}
        tid = trial_id(overrides)
        if tid in seen:
            continue
        seen.add(tid)
        trials.append(Trial(tid, overrides, apply_values(base, overrides, f"sweep trial {tid}", base_dir)))
    return trials


def _random_draws(sweep: SweepConfig) -> list[dict]:
    if sweep.samples < 1:
        raise UsageError("sweep.samples: expected the number of random draws (1 or more) with sweep.random")
    rng = random.Random(sweep.seed)
    draws = []
    for _ in range(sweep.samples):
        draw = {}
        for key in sorted(sweep.random):  # sorted: the same draws whatever the YAML key order
            draw[key] = _draw(rng, key, sweep.random[key])
        draws.append(draw)
    return draws


def _draw(rng: random.Random, key: str, spec: Any) -> Any:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in RANDOM_KINDS:
        raise UsageError(f"sweep.random.{key}: expected one of {', '.join(RANDOM_KINDS)} "
                         "(e.g. {log_uniform: [1.0e-5, 1.0e-3]} or {choice: [8, 16]})")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise UsageError(f"sweep.random.{key}.choice: expected a non-empty list")
        return rng.choice(args)
    try:
        low, high = (float(a) for a in args)
    except (TypeError, ValueError):
        raise UsageError(f"sweep.random.{key}.{kind}: expected [low, high]") from None
    if kind == "log_uniform":
        if low <= 0 or high <= 0:
            raise UsageError(f"sweep.random.{key}.log_uniform: bounds must be above 0")
        return float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.6g}")
    if kind == "int_uniform":
        return rng.randint(int(low), int(high))
    return float(f"{rng.uniform(low, high):.6g}")


# --- results ------------------------------------------------------------------------------

def trial_metric(trial_dir: Path, name: str) -> float | None:
    """``eval_loss`` (best validation loss), ``train_loss`` (last), ``pass_rate``, or a dotted
    path into the trial's eval_report.json (e.g. ``metrics.exact_match.accuracy``)."""
    if name in ("eval_loss", "train_loss"):
        from slurmtune.evaluate.report import read_loss_history
        history = read_loss_history(trial_dir)
        points = history["eval" if name == "eval_loss" else "train"]
        if not points:
            return None
        return min(p[1] for p in points) if name == "eval_loss" else points[-1][1]
    report_path = trial_dir / "eval_report.json"
    if not report_path.is_file():
        return None
    report = json.loads(report_path.read_text(encoding="utf-8"))
    if name == "pass_rate":
        graded = report.get("passed", 0) + report.get("failed", 0)
        return report["passed"] / graded if graded else None
    value: Any = report
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def results_table(trials: list[Trial], rows: list[dict], metric: str, mode: str) -> list[dict]:
    """One dict per trial: id, state, overrides (flattened), the metric; the best one marked."""
    table = []
    for trial, row in zip(trials, rows):
        table.append({"trial": trial.id, "state": row.get("state", ""), **trial.overrides,
                      metric: row.get("metric"), "best": False})
    scored = [r for r in table if isinstance(r[metric], (int, float))]
    if scored:
        best = (min if mode == "min" else max)(scored, key=lambda r: r[metric])
        best["best"] = True
    return table


def write_results(sweep_dir: Path, table: list[dict], metric: str) -> dict[str, Path]:
    """sweep_results.csv, sweep_results.json and sweep_results.png (metric vs each parameter)."""
    columns = list(dict.fromkeys(k for row in table for k in row))
    with AtomicFiles(sweep_dir) as files:
        writer = csv.DictWriter(files.open("sweep_results.csv"), fieldnames=columns)
        writer.writeheader()
        for row in table:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
        files.write_json("sweep_results.json", {"metric": metric, "trials": table})
    png = sweep_dir / "sweep_results.png"
    _plot(table, metric, png)
    return {"csv": sweep_dir / "sweep_results.csv", "json": sweep_dir / "sweep_results.json", "png": png}


def _plot(table: list[dict], metric: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    params = [k for k in dict.fromkeys(k for row in table for k in row) if k not in ("trial", "state", metric, "best")]
    fig, axes = plt.subplots(1, max(1, len(params)), figsize=(4 * max(1, len(params)), 3.2), squeeze=False)
    for ax, param in zip(axes[0], params or ["trial"]):
        points = [(row.get(param), row[metric], row["best"]) for row in table if isinstance(row[metric], (int, float))]
        labels = [json.dumps(x) if isinstance(x, (list, dict)) else x for x, _, _ in points]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in labels)
        xs = labels if numeric else [str(x) for x in labels]
        ax.scatter(xs, [y for _, y, _ in points], c=["#d62728" if b else "#1f77b4" for _, _, b in points])
        if numeric and len(set(xs)) > 1 and min(xs) > 0 and max(xs) / min(xs) > 50:
            ax.set_xscale("log")
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(f"{metric} per trial (best in red)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(path)


def load_trials(sweep_dir: str | Path) -> tuple[dict, list[Trial]]:
    data = json.loads((Path(sweep_dir) / "sweep.json").read_text(encoding="utf-8"))
    return data, [Trial(t["id"], t["overrides"]) for t in data["trials"]]


def trial_dir(sweep_dir: str | Path, trial: Trial) -> Path:
    return Path(sweep_dir) / "trials" / trial.id


def trial_finished(folder: Path, cfg: RunConfig) -> bool:
    return (folder / "final" / "adapter_model.safetensors").is_file() and \
        (not has_eval(cfg) or (folder / "eval_report.json").is_file())


RERUN = {"FAILED", "TIMEOUT", "PREEMPTED", "CANCELLED", "LOST", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "NOT STARTED", "STOPPED", "DRY-RUN"}


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
        from slurmtune.cluster.slurm import job_states
        states = job_states(array_ids)
    return [_trial_row(run, data, trial, latest.get(i), states) for i, trial in enumerate(trials)]


def _trial_row(run: Run, data: dict, trial: Trial, where, states: dict | None) -> dict:
    folder = trial_dir(run.dir, trial)
    own = run.job_status(f"trial.{trial.id}")
    row = {"trial": trial.id, "overrides": trial.overrides,
           "state": "DRY-RUN" if run.record.dry_run else "NOT STARTED", "restarts": 0,
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
