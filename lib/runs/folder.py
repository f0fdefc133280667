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
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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


class Run:
    """One run folder. Create it on submission, open it by id (or path) later."""

    def __init__(self, directory: Path, record: RunRecord):
        self.dir = directory
        self.record = record

    # --- creation and lookup ----------------------------------------------------------

    @classmethod
    def create(cls, cfg: RunConfig, executor: str, cluster: str | None, dry_run: bool = False) -> "Run":
        run_id = f"{safe_name(cfg.name)}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        return cls.create_at(Path(cfg.output_dir).resolve() / run_id, cfg, executor, cluster, dry_run)

    @classmethod
    def create_at(cls, directory: Path, cfg: RunConfig, executor: str, cluster: str | None,
                  dry_run: bool = False) -> "Run":
        """A run folder at ``directory`` (a sweep's trials live in ``<sweep>/trials/<id>/``)."""
        check_safe_path(directory, "run folder")
        for sub in ("slurm", "status"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        (directory / "manifest.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        record = RunRecord(directory.name, time.strftime("%Y-%m-%dT%H:%M:%S%z"), executor, cluster,
                           socket.gethostname(), dry_run=dry_run)
        run = cls(directory, record)
        run.save()
        return run

    @classmethod
    def open(cls, ref: str | None, root: str | os.PathLike = "runs") -> "Run":
        """A run by folder path, by id under ``root``, or the newest one when ``ref`` is None."""
        root = Path(root)
        if ref is None:
            candidates = sorted(root.glob("*/run.json"), key=lambda p: p.stat().st_mtime)
            if not candidates:
                raise UsageError(f"no runs under {root.resolve()}; submit one with `slurmtune run MANIFEST`")
            directory = candidates[-1].parent
        else:
            directory = Path(ref) if (Path(ref) / "run.json").is_file() else root / ref
        if not (directory / "run.json").is_file():
            known = ", ".join(p.parent.name for p in sorted(root.glob("*/run.json"))[-5:])
            raise UsageError(f"no run {ref!r} under {root.resolve()}" + (f"; recent: {known}" if known else ""))
        data = json.loads((directory / "run.json").read_text(encoding="utf-8"))
        data["steps"] = [Step(**s) for s in data.get("steps", [])]
        return cls(directory.resolve(), RunRecord(**data))

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
