"""Following runs: status, logs, cancel."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from slurmtune.runs.folder import Run


def add_commands(sub, argv: list[str]) -> None:
    _add_status(sub)
    _add_logs(sub)
    _add_cancel(sub)


def add_root_flag(p) -> None:
    p.add_argument("--root", default="runs", help="folder holding run folders (default: runs)")


def add_run_command(sub, name: str, help_text: str, func, newest: bool = False):
    """A command about one run: RUN (a run id under --root, or a run folder; with ``newest``,
    optional and the newest run by default)."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("run", nargs="?" if newest else None, metavar="RUN")
    add_root_flag(p)
    p.set_defaults(func=func)
    return p


def _add_status(sub) -> None:
    p = add_run_command(sub, "status", "state of each step of a run (default: the newest run)", _status, newest=True)
    p.add_argument("--json", action="store_true")


def _status(args) -> int:
    from slurmtune.runs.status import as_json, format_table, overall, run_status
    run = Run.open(args.run, args.root)
    rows = run_status(run)
    print(json.dumps(as_json(run, rows), indent=2) if args.json else format_table(run, rows))
    return 1 if overall(rows) == "FAILED" else 0


def _add_logs(sub) -> None:
    p = add_run_command(sub, "logs", "print (or follow) the logs of a run's step", _logs)
    p.add_argument("step", nargs="?", metavar="STEP")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the step ends")


def _logs(args) -> int:
    from slurmtune.runs.status import ACTIVE, run_status
    run = Run.open(args.run, args.root)
    if args.step is not None:
        run.step(args.step)  # an unknown step is a usage error naming the steps there are
    follower = Follower(run, args.step)
    follower.print_new()
    while args.follow:
        time.sleep(1.0)
        follower.print_new()
        rows = [r for r in run_status(run) if args.step in (None, r.step)]
        if not any(r.state in ACTIVE for r in rows):
            follower.print_new()
            break
    return 0


class Follower:
    """Prints what a run's (or one step's) log files gained since the last call."""

    def __init__(self, run: Run, step: str | None = None):
        self.run, self.step, self.offsets = run, step, {}

    def files(self) -> list[Path]:
        ids = [j for s in self.run.record.steps if self.step in (None, s.name) for j in s.job_ids]
        found = []
        for jid in dict.fromkeys(ids):
            found += sorted(self.run.slurm_dir.glob(f"{jid}_*log.out")) + sorted(self.run.slurm_dir.glob(f"{jid}_*log.err"))
        return found

    def print_new(self) -> None:
        for path in self.files():
            start = self.offsets.get(path, 0)
            with open(path, "rb") as f:
                f.seek(start)
                chunk = f.read()
            if chunk:
                self.offsets[path] = start + len(chunk)
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()


def _add_cancel(sub) -> None:
    add_run_command(sub, "cancel", "cancel every job of a run", _cancel)


def _cancel(args) -> int:
    import os
    import signal
    from slurmtune.cluster import slurm
    run = Run.open(args.run, args.root)
    ids = list(dict.fromkeys(j for s in run.record.steps for j in s.job_ids))
    if run.record.executor == "slurm":
        slurm.cancel(ids)
    else:
        for pid in ids:
            try:
                os.kill(int(pid), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
    run.record.cancelled = True
    run.save()
    print(f"cancelled {run.run_id}: jobs {', '.join(ids) or 'none'}")
    return 0
