"""What happened to a run: scheduler states and the jobs' own reports, in one table.

::

    rows = run_status(run)          # one sacct call for all of the run's jobs
    print(format_table(rows))

The scheduler is the authority on jobs that never started or were killed from
outside Python (scancel, node failure, a time limit before Python ran); the
jobs' ``status/<step>.json`` files add what only the job knows (the last error
line, a requeue note). A job that neither knows any more is reported LOST.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from slurmtune.runs.folder import Run, Step

DONE = {"COMPLETED"}
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
          "PREEMPTED", "LOST", "STOPPED"}
DRY_RUN = "DRY-RUN"  # `--dry-run`: scripts written, nothing submitted
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
          "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}


@dataclass
class StepStatus:
    step: str
    state: str
    job_ids: list[str]
    elapsed_s: int = 0
    restarts: int = 0
    tasks: str = ""  # e.g. "3/4 done" for arrays
    log: str | None = None
    error: str | None = None


def run_status(run: Run, scheduler_states=None) -> list[StepStatus]:
    """Status of every step; ``scheduler_states`` is slurm.job_states (injected for tests)."""
    steps = run.record.steps
    if run.record.dry_run:  # only scripts were written: nothing is queued, nothing will run
        return [StepStatus(s.name, DRY_RUN, [], tasks=f"{s.array_size} tasks" if s.array_size else "")
                for s in steps]
    if run.record.executor == "slurm":
        if scheduler_states is None:
            from slurmtune.cluster.slurm import job_states as scheduler_states
        states = scheduler_states([j for s in steps for j in s.job_ids])
        rows = [_slurm_step(run, s, states) for s in steps]
    else:
        rows = [_local_step(run, s) for s in steps]
    _explain_cancelled(rows)
    return rows


def _tasks_of(step: Step, states: dict) -> list:
    found = []
    for jid in step.job_ids:
        found += [st for key, st in states.items() if key == jid or key.startswith(f"{jid}_")]
    return found


def _slurm_step(run: Run, step: Step, states: dict) -> StepStatus:
    tasks = _tasks_of(step, states)
    names = [t.state for t in tasks]
    if not names:
        state = "LOST"
    elif any(n in FAILED for n in names) and not any(n in ACTIVE for n in names):
        state = next(n for n in names if n in FAILED)
    elif all(n in DONE for n in names) and (not step.array_size or len(names) >= step.array_size):
        state = "COMPLETED"
    elif any(n == "RUNNING" for n in names):
        state = "RUNNING"
    else:
        state = next((n for n in names if n in ACTIVE), names[0])
    own = run.job_status(step.name)
    if not step.array_size and step.job_ids == [own.get("job_id")] and (
            state in ("PENDING", "LOST") and own.get("state") in ("RUNNING", "COMPLETED", "FAILED")
            or state in ("RUNNING", "COMPLETING") and own.get("state") in ("COMPLETED", "FAILED")):
        state = own["state"]  # this job has reported itself; accounting has not caught up yet
    row = StepStatus(step.name, state, step.job_ids, max((t.elapsed_s for t in tasks), default=0),
                     sum(t.restarts for t in tasks))
    if step.array_size:
        row.tasks = f"{sum(n in DONE for n in names)}/{step.array_size} done"
    if state in FAILED:
        failed = next((t for t in tasks if t.state in FAILED), None)
        row.log = _log_path(run, failed.job_id if failed else step.job_ids[0])
        row.error = own.get("error") or _last_error_line(row.log) or (failed.reason if failed else None)
    return row


def _local_step(run: Run, step: Step) -> StepStatus:
    own = run.job_status(step.name)
    if step.array_size:
        shards = [run.job_status(f"{step.name}.{i}") for i in range(step.array_size)]
        done = sum(s.get("state") == "COMPLETED" for s in shards)
        failed = next((s for s in shards if s.get("state") == "FAILED"), None)
        state = "FAILED" if failed else "COMPLETED" if done == step.array_size else \
            "RUNNING" if any(shards) else "PENDING"
        own = failed or (shards[0] if shards else {})
    else:
        state = own.get("state", "PENDING")
    if state in ("RUNNING", "PENDING") and step.job_ids and not process_alive(step.job_ids[0]):
        state = "LOST" if state == "RUNNING" or run.record.executor == "local" else state
    elapsed = int((own.get("ended") or time.time()) - own["started"]) if own.get("started") else 0
    row = StepStatus(step.name, state, step.job_ids, elapsed, int(own.get("attempt", 0)))
    if step.array_size:
        row.tasks = f"{done}/{step.array_size} done"
    if state in FAILED:
        row.log = _log_path(run, step.job_ids[0]) if step.job_ids else None
        row.error = own.get("error") or _last_error_line(row.log)
    return row


def process_alive(pid: str) -> bool:
    """Whether the local process ``pid`` runs: one that ended but is not yet reaped (a zombie of
    the process that started it) has ended."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def _explain_cancelled(rows: list[StepStatus]) -> None:
    """A dependant cancelled because an earlier step failed says which step."""
    failed = None
    for row in rows:
        if failed and row.state in ("CANCELLED", "LOST"):
            row.state = "CANCELLED"
            row.error = f"not run: step {failed} failed"
        elif failed and row.state == "PENDING":
            # SLURM cancels it on its next scheduling pass (--kill-on-invalid-dep=yes)
            row.error = f"step {failed} failed: being cancelled"
        elif row.state in FAILED and failed is None:
            failed = row.step


def _log_path(run: Run, job_id: str) -> str | None:
    for suffix in ("_0_log.err", "_0_log.out"):
        path = run.slurm_dir / f"{job_id}{suffix}"
        if path.is_file():
            return str(path)
    return None


_ERROR = re.compile(r"(Error|Exception|error:|Traceback|Killed|CANCELLED|DUE TO TIME LIMIT)")


def _last_error_line(log: str | None) -> str | None:
    if not log or not Path(log).is_file():
        return None
    with open(log, "rb") as f:
        f.seek(max(0, os.path.getsize(log) - 64 * 1024))
        lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if _ERROR.search(line):
            return line[:300]
    return lines[-1][:300] if lines else None


def overall(rows: list[StepStatus]) -> str:
    states = [r.state for r in rows]
    if states and all(s == DRY_RUN for s in states):
        return DRY_RUN
    if any(s in FAILED for s in states):
        return "FAILED"
    if states and all(s in DONE for s in states):
        return "COMPLETED"
    return "RUNNING" if any(s == "RUNNING" for s in states) else "PENDING"


def format_table(run: Run, rows: list[StepStatus]) -> str:
    lines = [f"run {run.run_id}  ({run.record.executor}{', ' + run.record.cluster if run.record.cluster else ''})"
             f"  {overall(rows)}", f"  {run.dir}"]
    lines.append(f"  {'step':<10} {'state':<11} {'job':<14} {'elapsed':>8} {'restarts':>8}  tasks")
    for r in rows:
        job = ",".join(r.job_ids) or "-"
        lines.append(f"  {r.step:<10} {r.state:<11} {job:<14} {_fmt(r.elapsed_s):>8} {r.restarts:>8}  {r.tasks}")
        if r.error:
            lines.append(f"      error: {r.error}")
        if r.log:
            lines.append(f"      log:   {r.log}")
    return "\n".join(lines)


def _fmt(seconds: int) -> str:
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def as_json(run: Run, rows: list[StepStatus]) -> dict:
    return {"run_id": run.run_id, "dir": str(run.dir), "executor": run.record.executor,
            "state": overall(rows), "steps": [asdict(r) for r in rows]}
