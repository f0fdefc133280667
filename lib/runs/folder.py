"""Run folders: everything about one submission, findable from any later shell.

::

    runs/<run-id>/
        manifest.yaml        the resolved manifest (what every job reads)
        run.json             executor, cluster, steps with their job ids
        status/<step>.json   written by the jobs themselves: state, times, last error
        slurm/               sbatch scripts and logs (submitit's folder)
        data/ final/ checkpoints/ eval/ ...   the steps' outputs

``run.json`` is written by the submitting command, ``status/*.json`` by the
jobs; neither is ever written half (temporary name, then rename).

A run folder is its owner's only (0700): submitit unpickles ``slurm/*_submitted.pkl``
when a job starts, so whoever can write there runs code as the job's owner. A
cluster profile's ``run_group`` opens it to one group, read-only (0750, setgid so
what the jobs create stays in the group). Every job checks this again before it
starts (``cluster/slurm.py``: ``private_folder_check``).
"""

from __future__ import annotations

import grp
import json
import os
import secrets
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from slurmtune.config import RunConfig, from_dict
from slurmtune.schema import to_yaml
from slurmtune.errors import UsageError
from slurmtune.cluster.slurm import check_safe_path, current_job_id, safe_name
from slurmtune.data.jsonio import write_json_atomic

@dataclass
class Step:
    name: str
    kind: str
    job_ids: list[str] = field(default_factory=list)
    array_size: int | None = None
    depends_on: list[str] = field(default_factory=list)
    script: str | None = None
    gpus: int = 0


@dataclass
class RunRecord:
    run_id: str
    created: str
    executor: str
    cluster: str | None
    host: str
    steps: list[Step] = field(default_factory=list)
    dry_run: bool = False
    cancelled: bool = False
    created_at: float = 0.0  # seconds since the epoch; orders runs (0: a folder from before it)


class Run:
    """One run folder. Create it on submission, open it by id (or path) later."""

    def __init__(self, directory: Path, record: RunRecord):
        self.dir = directory
        self.record = record

    # --- creation and lookup ----------------------------------------------------------

    @classmethod
    def create(cls, cfg: RunConfig, executor: str, cluster: str | None, dry_run: bool = False,
               group: str | None = None) -> "Run":
        run_id = f"{safe_name(cfg.name)}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        return cls.create_at(Path(cfg.output_dir).resolve() / run_id, cfg, executor, cluster, dry_run, group)

    @classmethod
    def create_at(cls, directory: Path, cfg: RunConfig, executor: str, cluster: str | None,
                  dry_run: bool = False, group: str | None = None) -> "Run":
        """A run folder at ``directory`` (a sweep's trials live in ``<sweep>/trials/<id>/``),
        owner-only, or readable by ``group``."""
        check_safe_path(directory, "run folder")
        directory.parent.mkdir(parents=True, exist_ok=True)
        gid = group_id(group)
        for folder in (directory, directory / "slurm", directory / "status"):
            make_private_dir(folder, gid)
        (directory / "manifest.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        record = RunRecord(directory.name, time.strftime("%Y-%m-%dT%H:%M:%S%z"), executor, cluster,
                           socket.gethostname(), dry_run=dry_run, created_at=time.time())
        run = cls(directory, record)
        run.save()
        return run

    @classmethod
    def open(cls, ref: str | None, root: str | os.PathLike = "runs") -> "Run":
        """A run by folder path, by id under ``root``, or the newest one when ``ref`` is None."""
        root = Path(root)
        if ref is None:
            return cls._newest(root)
        directory = Path(ref) if (Path(ref) / "run.json").is_file() else root / ref
        if not (directory / "run.json").is_file():
            known = ", ".join(r.run_id for r in recent_runs(root)[:5])
            raise UsageError(f"no run {ref!r} under {root.resolve()}" + (f"; recent: {known}" if known else ""))
        return cls(directory.resolve(), _read_record(directory))

    @classmethod
    def _newest(cls, root: Path) -> "Run":
        """The newest run that was submitted: a dry run only wrote scripts, it is never "the" run."""
        runs = recent_runs(root)
        submitted = [r for r in runs if not r.record.dry_run]
        if submitted:
            return submitted[0]
        if runs:
            raise UsageError(f"no submitted runs under {root.resolve()}, only dry runs (newest: "
                             f"{runs[0].run_id}); name one, or submit without --dry-run")
        raise UsageError(f"no runs under {root.resolve()}; submit one with `slurmtune run MANIFEST`")

    # --- contents ---------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def slurm_dir(self) -> Path:
        return self.dir / "slurm"

    def config(self) -> RunConfig:
        import yaml
        from slurmtune.schema import SAFE_LOADER
        return from_dict(yaml.load((self.dir / "manifest.yaml").read_text(encoding="utf-8"), Loader=SAFE_LOADER))

    def step(self, name: str) -> Step:
        for s in self.record.steps:
            if s.name == name:
                return s
        raise UsageError(f"run {self.run_id} has no step {name!r}; steps: "
                         + ", ".join(s.name for s in self.record.steps))

    def add_step(self, step: Step) -> None:
        self.record.steps.append(step)
        self.save()

    def save(self) -> None:
        write_json_atomic(self.dir / "run.json", asdict(self.record))

    # --- what the jobs report ---------------------------------------------------------

    def status_file(self, step: str) -> Path:
        return self.dir / "status" / f"{safe_name(step)}.json"

    def job_status(self, step: str) -> dict[str, Any]:
        path = self.status_file(step)
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}


def recent_runs(root: str | os.PathLike) -> list[Run]:
    """The run folders under ``root``, newest first by the time they were created."""
    runs = []
    for path in Path(root).glob("*/run.json"):
        try:
            runs.append(Run(path.parent.resolve(), _read_record(path.parent)))
        except (OSError, ValueError, TypeError):
            continue  # not a run folder of ours (or half-copied): never listed
    return sorted(runs, key=lambda r: r.record.created_at or (r.dir / "run.json").stat().st_mtime, reverse=True)


def _read_record(directory: Path) -> RunRecord:
    data = json.loads((directory / "run.json").read_text(encoding="utf-8"))
    data["steps"] = [Step(**s) for s in data.get("steps", [])]
    return RunRecord(**data)


def group_id(group: str | None) -> int | None:
    """The id of the cluster profile's ``run_group``; one line if this machine has no such group."""
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise UsageError(f"run_group {group!r}: no such group on this machine; expected one of "
                         "the groups `id -Gn` lists, or no run_group (owner-only run folders)") from None


def make_private_dir(folder: Path, gid: int | None = None) -> None:
    """``folder`` as the owner's only (0700), or readable by group ``gid`` (0750 + setgid)."""
    folder.mkdir(exist_ok=True)
    if gid is not None:
        os.chown(folder, -1, gid)
    os.chmod(folder, 0o2750 if gid is not None else 0o700)  # explicit: the umask may allow more


@contextmanager
def discarded_if_unsubmitted(run: Run, new: bool = True) -> Iterator[None]:
    """Remove a new run folder when its submission fails before any job was queued: a run
    that never ran leaves nothing behind (it would read PENDING for ever)."""
    try:
        yield
    except BaseException:
        if new and not any(step.job_ids for step in run.record.steps) and not run.record.dry_run:
            shutil.rmtree(run.dir, ignore_errors=True)
            print(f"nothing was queued; removed {run.dir}", file=sys.stderr)
        raise


def report_status(run_dir: str | os.PathLike, step: str, state: str, **fields: Any) -> None:
    """Called by a job about itself (RUNNING, COMPLETED, FAILED, REQUEUED ...)."""
    path = Path(run_dir) / "status" / f"{safe_name(step)}.json"
    previous = {}
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            previous = {}
    now = time.time()
    record = {**previous, **fields, "state": state, "updated": now, "host": socket.gethostname(),
              "pid": os.getpid(), "attempt": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
              "job_id": current_job_id()}
    if state == "RUNNING" and "started" not in previous:
        record["started"] = now
    if state in ("COMPLETED", "FAILED"):
        record["ended"] = now
    write_json_atomic(path, record)


def data_files(cfg: RunConfig, run_dir: str | os.PathLike) -> tuple[list[str], str | None]:
    """(training files, validation file) a run trains on: the convert step's outputs when the
    manifest names raw ``data.inputs``, else ``data.train_files`` / ``data.validation_file``."""
    if not cfg.data.inputs:
        return list(cfg.data.train_files), cfg.data.validation_file
    from slurmtune.data.converters import get_converter
    from slurmtune.data.converters.base import validation_name
    first = get_converter(cfg.data.format).outputs[0]
    data = Path(run_dir) / "data"
    validation = str(data / validation_name(first)) if cfg.data.split else cfg.data.validation_file
    return [str(data / first)], validation


def eval_file(cfg: RunConfig, run_dir: str | os.PathLike) -> str | None:
    """What the eval step answers: ``data.eval_file``, else the validation split."""
    return cfg.data.eval_file or data_files(cfg, run_dir)[1]


def has_eval(cfg: RunConfig) -> bool:
    """Whether the run has an eval step (and a report): something to answer, named or split off."""
    return bool(cfg.data.eval_file or cfg.data.split or cfg.data.validation_file)
