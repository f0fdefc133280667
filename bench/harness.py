"""The frame the benchmark scripts share: options, the work folder, child processes, tables, checks.

Each ``bench_*.py`` measures one thing against a baseline measured in the same run. What is
left in a script is what it measures and what it checks; the rest is here, written once::

    import harness   # bench/ is on sys.path: Python puts a script's own folder there

    def parse_args(argv):
        ap = harness.parser(__doc__)            # --help shows the script's docstring
        ap.add_argument("--repeat", type=int, default=3, help="runs per phase (default 3)")
        harness.add_keep(ap)                    # --keep DIR
        ap.add_argument("--child", help=argparse.SUPPRESS)
        return ap.parse_args(argv)

    def bench(args, work: Path) -> int:
        started = time.perf_counter()
        print(f"{harness.machine()}, {args.repeat} repeat(s)\\n")
        r = harness.spawn_child(__file__, ["load", str(work)], what="load")   # its last JSON line
        harness.print_table([harness.Column("phase", "<8"), harness.Column("seconds", ">8.2f")],
                            [("load", r["seconds"])])
        failures = harness.report_checks([(f"{r['rows']:,} rows", r["rows"] > 0)])
        return harness.finish(failures, started)    # "whole bench N s"; 1 when a check failed

    def main(argv=None):
        # --child ARG: measure(args) in this fresh interpreter, its dict printed as one JSON line;
        # else bench(args, work) in --keep DIR or a temporary folder
        return harness.run_bench(parse_args(argv), bench, "bench-x-", child=measure)

``slurmtune(...)`` and ``timed_slurmtune(...)`` run the CLI as a user does; ``folder_from`` and
``job_ids_of`` read back what it made. The SLURM benches share ``cluster_answers``, the
``SbatchLog`` wrapper that holds every job it submits, and ``held_problems``; the training
benches share ``convert_export`` (the bundled sample, converted) and ``time_saves`` (a timer
around the trainer's checkpoint save).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_EXPORT = REPO / "examples" / "speechgradebook" / "exported.json"
# The console script a user runs, from the same environment as this interpreter.
SLURMTUNE = Path(sys.executable).parent / "slurmtune"
# For children that load a model: nothing from the network, and no tokenizer threads
# competing with the ones being timed.
MODEL_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
# Enough of a failed child's output to show the error without flooding the terminal.
TAIL_CHARS = 4000


# --- options ---------------------------------------------------------------------------------

def parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help is the script's docstring: its first line, then all after the blank line."""
    lines = doc.splitlines()
    return argparse.ArgumentParser(description=lines[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(lines[2:]))


def add_keep(ap: argparse.ArgumentParser,
             help: str = "work in DIR and keep it (default: a temporary dir)") -> None:
    ap.add_argument("--keep", metavar="DIR", type=Path, help=help)


def add_export(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--export", type=Path, default=SAMPLE_EXPORT,
                    help="SpeechGradebook export to convert (default: the bundled sample)")


def add_training_child(ap: argparse.ArgumentParser) -> None:
    """The hidden options a training bench passes its child: what to run and where."""
    ap.add_argument("--child", help=argparse.SUPPRESS)
    for name in ("--work", "--run-dir", "--train-file"):
        ap.add_argument(name, type=Path, help=argparse.SUPPRESS)


# --- the work folder, and a bench's main ----------------------------------------------------

def run_bench(args: argparse.Namespace, bench: Callable[[argparse.Namespace, Path], int], prefix: str,
              child: Callable[[argparse.Namespace], dict] | None = None) -> int:
    """A bench script's main: with ``--child``, ``child(args)`` and its reply; else ``bench(args, work)``
    in the --keep folder or a temporary one named ``prefix...``; returns the exit status."""
    if child is not None and args.child:
        reply(child(args))
        return 0
    with work_folder(args.keep, prefix) as work:
        return bench(args, work)


@contextmanager
def work_folder(keep: Path | None, prefix: str) -> Iterator[Path]:
    """``keep`` (created, made absolute) and left in place; without it a temporary folder, removed after."""
    if keep:
        keep = keep.resolve()
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        yield Path(work)


def machine() -> str:
    """The start of every bench's first line: what ran it."""
    return f"python {sys.version.split()[0]}, {os.cpu_count()} cores"


# --- child processes -------------------------------------------------------------------------

class ChildFailed(SystemExit):
    """A child process failed. Uncaught, it ends the bench as ``sys.exit(message)`` does: the
    message on stderr, exit 1; ``finally`` blocks (cancelling jobs) still run."""


def reply(result: dict) -> None:
    """A child's answer: one JSON line, the last thing it prints (what ``read_reply`` reads)."""
    print(json.dumps(result, default=str))


def read_reply(what: str, returncode: int, stdout: str, stderr: str) -> dict:
    """The JSON line a child printed last; ChildFailed with the end of its stderr when it failed."""
    if returncode != 0:
        raise ChildFailed(f"{what} failed (exit {returncode}):\n{stderr[-TAIL_CHARS:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def spawn_child(script: str | Path, child_args: Sequence[str], what: str, env: dict[str, str] | None = None,
                cwd: Path | None = None, echo_stderr: bool = False) -> dict:
    """Run ``python SCRIPT --child CHILD_ARGS...`` in a fresh interpreter (``env`` added to this
    one's) and return its reply. ``echo_stderr`` prints what it wrote to stderr (a profile, say)."""
    done = subprocess.run([sys.executable, str(script), "--child", *child_args], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env}, cwd=cwd)
    result = read_reply(what, done.returncode, done.stdout, done.stderr)
    if echo_stderr:
        print(done.stderr)
    return result


def slurmtune(*argv: str) -> subprocess.CompletedProcess:
    """``slurmtune ARGV...`` from the repository root, as a user runs it; ChildFailed when it fails."""
    return timed_slurmtune(*argv)[0]


def timed_slurmtune(*argv: str) -> tuple[subprocess.CompletedProcess, float]:
    """``slurmtune(*argv)`` and its wall seconds: the fresh process alone (start-up, imports, the command)."""
    cmd = [str(SLURMTUNE), *argv]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise ChildFailed(f"{shlex.join(cmd)} failed (exit {done.returncode}):\n"
                          f"{done.stdout[-TAIL_CHARS:]}\n{done.stderr[-TAIL_CHARS:]}")
    return done, seconds


def folder_from(stdout: str, kind: str = "run") -> Path:
    """The folder slurmtune printed on the line after ``run ID`` (or ``sweep ID``): the first thing it prints."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith(kind + " "):
            return Path(lines[i + 1].strip())
    raise RuntimeError(f"no {kind} folder in slurmtune's output:\n{stdout}")


def run_steps(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["steps"]


def job_ids_of(run_dir: Path) -> list[str]:
    return [jid for step in run_steps(run_dir) for jid in step["job_ids"]]


# --- what the training benches share ---------------------------------------------------------

def convert_export(export: Path, work: Path) -> Path:
    """``slurmtune convert speechgradebook EXPORT --out WORK/data``; returns its train.jsonl."""
    out = work / "data"
    slurmtune("convert", "speechgradebook", str(export), "--out", str(out))
    return out / "train.jsonl"


def time_saves(trainer, seconds: list[float]) -> None:
    """Append the duration of every ``step-NNNNNN`` save the trainer makes to ``seconds``."""
    save = trainer._save_checkpoint

    def timed(*a, **kw):
        start = time.perf_counter()
        try:
            return save(*a, **kw)
        finally:
            seconds.append(time.perf_counter() - start)

    trainer._save_checkpoint = timed  # the instance attribute wins over the class method


class StepProbe:
    """What one training process did, step by step: wall and CPU seconds of each optimizer step
    (``on_step_begin`` to ``on_step_end``, after the GPU's queue is drained), the loss-bearing
    tokens of each step and in all (a forward pre-hook on the model), and the checkpoint saves
    ``time_saves`` appends to ``save_s``. A bench that reads more of each batch overrides
    ``on_batch``; pass ``probe.callback()`` in the recipe's ``callbacks``."""

    def __init__(self):
        self.step_s: list[float] = []
        self.step_cpu_s: list[float] = []
        self.step_tokens: list[int] = []
        self.save_s: list[float] = []
        self.trained = 0
        self.attn_implementation = ""
        self._t0 = self._cpu0 = 0.0
        self._tokens = 0

    def callback(self):
        from transformers import TrainerCallback

        probe = self

        class Timer(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                model.register_forward_pre_hook(probe.count, with_kwargs=True)
                probe.attn_implementation = model.config._attn_implementation

            def on_step_begin(self, args, state, control, **kwargs):
                _drain_gpu()
                probe._t0, probe._cpu0, probe._tokens = time.perf_counter(), time.process_time(), 0

            def on_step_end(self, args, state, control, **kwargs):
                _drain_gpu()
                probe.step_s.append(time.perf_counter() - probe._t0)
                probe.step_cpu_s.append(time.process_time() - probe._cpu0)
                probe.step_tokens.append(probe._tokens)

        return Timer()

    def count(self, module, args, kwargs) -> None:
        if not module.training:
            return
        trained = int((kwargs["labels"] != -100).sum())
        self.trained += trained
        self._tokens += trained
        self.on_batch(kwargs)

    def on_batch(self, kwargs) -> None:
        """Each training forward's inputs (input_ids, labels, attention_mask, position_ids)."""

    def tokens_per_s(self, skip: int = 0) -> float:
        """Loss-bearing tokens per second of the steps after the first ``skip``."""
        return sum(self.step_tokens[skip:]) / max(sum(self.step_s[skip:]), 1e-9)


def _drain_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- what the SLURM benches share ------------------------------------------------------------

def cluster_answers() -> bool:
    """Whether sbatch is here and a SLURM controller answers ``sinfo``."""
    return bool(shutil.which("sbatch")) and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


NO_CLUSTER = ("no SLURM cluster answers (sbatch missing or sinfo failed): start the test cluster with "
              "eval \"$(env/test-cluster/start.sh | tail -n 1)\"")


class SbatchLog:
    """An ``sbatch`` first on PATH that logs its arguments and execs the real one with --hold."""

    def __init__(self, work: Path):
        self.real = shutil.which("sbatch")
        self.path = work / "sbatch-calls.log"
        bin_dir = work / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        wrapper = bin_dir / "sbatch"
        # /bin/sh, not bash: the wrapper's own cost (about 1 ms) lands on every method alike.
        wrapper.write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(self.path))}\n'
                           f'exec {shlex.quote(self.real)} --hold "$@"\n', encoding="utf-8")
        wrapper.chmod(0o755)
        # Fresh processes and in-process calls (submitit runs "sbatch" by name) both see it.
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"

    def reset(self) -> None:
        self.path.write_text("", encoding="utf-8")

    def calls(self) -> list[str]:
        return self.path.read_text(encoding="utf-8").splitlines()


def held_problems(ids: list[str], what: str, most: int = 5) -> list[str]:
    """Problems, if any job of ``ids`` is not pending with priority 0 (held); the first ``most``."""
    shown = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%F|%T|%Q"],
                           capture_output=True, text=True)
    seen: dict[str, list[tuple[str, str]]] = {}
    for line in shown.stdout.splitlines():
        array_id, state, priority = line.split("|")
        seen.setdefault(array_id, []).append((state, priority))
    problems = []
    for jid in ids:
        rows = seen.get(jid)
        if not rows:
            problems.append(f"{what}: job {jid} not in squeue (it ran, or was cancelled by someone else)")
        elif any(state != "PENDING" or priority != "0" for state, priority in rows):
            problems.append(f"{what}: job {jid} not held: {rows[:3]}")
    return problems[:most] + ([f"{what}: ... {len(problems) - most} more"] if len(problems) > most else [])


# --- tables and checks -----------------------------------------------------------------------

class Column:
    """One column of ``print_table``: its title, how a value is formatted and what follows it.

    ``spec`` is a format spec (``"<20"``, ``">9.2f"``, ``">10,.0f"``); the title takes its
    alignment and the width of value + ``suffix`` (``"x"`` for a ratio). ``under`` is a second
    title line ("(best)"). With ``span`` 2 the title stands over this column and the next one,
    whose own title is then left empty (one title over a median and a min column). A value of
    None prints as "-".
    """

    # A plain class, not a dataclass: bench_convert's children report their RSS after imports,
    # and ``dataclasses`` (through ``inspect``) would add more than a megabyte to it.
    def __init__(self, title: str, spec: str, suffix: str = "", under: str = "", span: int = 1):
        self.title, self.spec, self.suffix, self.under, self.span = title, spec, suffix, under, span

    @property
    def align(self) -> str:
        return self.spec[0] if self.spec[:1] in "<>^" else ">"

    @property
    def width(self) -> int:
        digits = self.spec.lstrip("<>^").split(".")[0].rstrip(",_")
        return int(digits or 0) + len(self.suffix)

    def cell(self, value) -> str:
        if value is None:
            return format("-", f"{self.align}{self.width}")
        return format(value, self.spec) + self.suffix


def print_table(columns: Sequence[Column], rows: Iterable[Sequence]) -> None:
    """Title line (and the ``under`` line when any column has one), a rule as long as the
    title line, then one line per row of values in column order."""
    titles, i = [], 0
    while i < len(columns):
        col = columns[i]
        width = sum(c.width for c in columns[i:i + col.span]) + col.span - 1
        titles.append(format(col.title, f"{col.align}{width}"))
        i += col.span
    head = " ".join(titles)
    print(head)
    if any(c.under for c in columns):
        print(" ".join(format(c.under, f"{c.align}{c.width}") for c in columns))
    print("-" * len(head))
    for row in rows:
        print(" ".join(col.cell(value) for col, value in zip(columns, row)))


def report_checks(checks: Iterable[tuple[str, bool]], heading: str | None = "\nchecks:") -> list[str]:
    """Print ``heading``, then every (text, ok) as a line ending OK or MISMATCH; returns the failed texts."""
    if heading is not None:
        print(heading)
    failures = []
    for text, ok in checks:
        print(f"  {text}  {'OK' if ok else 'MISMATCH'}")
        if not ok:
            failures.append(text)
    return failures


def finish(failures: list[str], started: float | None = None) -> int:
    """The bench's last lines and its exit status: 1, with the failed checks on stderr, when any failed."""
    if started is not None:
        print(f"\nwhole bench {time.perf_counter() - started:.0f} s")
    if not failures:
        return 0
    print(f"\n{len(failures)} check(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
    return 1
