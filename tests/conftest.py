"""Shared fixtures: the CLI in-process (fast) or as a real subprocess (exit codes, stderr)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helper modules such as slurm_cluster

from browser import chromium  # noqa: E402,F401  (the fixtures, for every test module)
from slurm_cluster import slurm_cluster  # noqa: E402,F401

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
os.environ.setdefault("SLURMTUNE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Commands run in-process log third-party noise here, not into the user's ~/.local/state.
os.environ.setdefault("SLURMTUNE_DEBUG_LOG", str(Path(tempfile.gettempdir()) / f"slurmtune-tests-{os.getpid()}-debug.log"))


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run ``slurmtune ARGS`` in this process: ``cli("convert", ...) -> Result``."""
    from slurmtune.cli.main import main

    def run(*args) -> Result:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            code = e.code
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def run_subprocess(*args, env=None, cwd=None, timeout=120) -> Result:
    """The real command line, as scripts call it."""
    p = subprocess.run([sys.executable, "-m", "slurmtune", *map(str, args)], capture_output=True,
                       text=True, env=env, cwd=cwd, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


def read_jsonl(path) -> list:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path, rows) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
