"""Other libraries' noise out of sight: kept in the run's ``debug.log``, shown with ``--verbose``.

::

    with quiet_output(run_dir, "train"):   # a job (jobs/base.py, jobs/train_deepspeed.py)
        ...
    with quiet_output(verbose=args.verbose):   # the command line (cli/main.py), no run folder yet
        ...

Inside, what other libraries say goes to ``RUN_DIR/debug.log`` instead of the terminal or the
SLURM log: every record of a logger that is not ours (transformers, datasets, accelerate, peft,
bitsandbytes, DeepSpeed, submitit, torch, ...), every Python warning issued by a module that
is not ours, and what DeepSpeed prints (PRINTING_LIBRARIES: print() where others log). One line per message, stamped with the time, the step and the pid; each is one
append to the file, so the jobs of a run (and the ranks of a DeepSpeed step) share it. The filter
goes by where a message comes from, never by its text, so a new message of an old library is
filtered too. Records of ERROR and above are shown as well: they may say why a job failed.

``slurmtune --verbose`` (SLURMTUNE_VERBOSE=1 in the environment, inherited by the jobs a
command starts, exported by sbatch) shows every filtered message on stderr too. Hugging Face
progress bars are off unless verbose on a terminal: in a batch log a bar is a heap of carriage
returns (our own loops print plain lines there: slurmtune.progress). Our own output (print
lines, training.log, progress, errors) passes untouched.

A command outside any run folder (``slurmtune predict``) keeps its debug log in
``$XDG_STATE_HOME/slurmtune/debug.log`` (``~/.local/state/...``), or SLURMTUNE_DEBUG_LOG.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from slurmtune.progress import on_terminal

VERBOSE_ENV = "SLURMTUNE_VERBOSE"
DEBUG_LOG = "debug.log"
SHOWN_LEVEL = logging.ERROR  # third-party records from here up are also shown
OURS = ("slurmtune",)  # logger names and module names of our own code
# Libraries that print() where others would log: DeepSpeed's "... built successfully" and its
# op builders' "[WARNING] ..." lines, once per rank.
PRINTING_LIBRARIES = ("deepspeed",)

# Read by the libraries when they are imported (often inside a job, after it started) or by the
# processes a command starts: submitit logs a job's start and end outside our job's code.
QUIET_ENV = {"SUBMITIT_LOG_LEVEL": "WARNING"}
NO_BARS_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
# Libraries already imported read the variables above no more: (module, is_off, off, on).
BAR_SWITCHES = (
    ("huggingface_hub.utils.tqdm", "are_progress_bars_disabled", "disable_progress_bars", "enable_progress_bars"),
    ("datasets.utils.tqdm", "are_progress_bars_disabled", "disable_progress_bars", "enable_progress_bars"),
    ("transformers.utils.logging", None, "disable_progress_bar", "enable_progress_bar"),
)

_sinks: list[_DebugLog] = []  # innermost last: a local pipeline runs its steps inside itself
_original: dict[str, Callable] = {}


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextmanager
def quiet_output(run_dir: str | Path | None = None, step: str = "cli",
                 verbose: bool | None = None) -> Iterator[None]:
    """Filter other libraries' output into ``run_dir/debug.log`` (the state folder's without a
    run) while inside; ``verbose`` (default: SLURMTUNE_VERBOSE) also shows it on stderr."""
    verbose = verbose_requested() if verbose is None else verbose
    path = Path(run_dir) / DEBUG_LOG if run_dir is not None else _state_log()
    sink = _DebugLog(path, step, verbose)
    if run_dir is not None:  # which job wrote the lines below, as submitit's own start line said
        sink.append(f"--- starts: host {socket.gethostname()}, job {_job_id()}")
    env = {VERBOSE_ENV: "1"} if verbose else dict(QUIET_ENV)
    bars = verbose and on_terminal()
    if not bars:
        env.update(NO_BARS_ENV)
    restore_env = _set_env(env)
    restore_bars = (lambda: None) if bars else _bars_off()
    if not _sinks:
        _install()
    _sinks.append(sink)
    try:
        yield
    finally:
        _sinks.remove(sink)
        if not _sinks:
            _uninstall()
        restore_bars()
        restore_env()
        sink.close()


class _DebugLog:
    """Appends to one file, opened at the first message; one ``write`` per message, which
    O_APPEND puts at the end of the file whichever process wrote last."""

    def __init__(self, path: Path, step: str, verbose: bool):
        self.path, self.step, self.verbose = path, step, verbose
        self.fd: int | None = None
        self.broken = False  # a debug log that cannot be written must not fail the job

    def write(self, text: str, show: bool = False) -> None:
        """Into the file; on stderr too when ``show`` or verbose."""
        if show or self.verbose:
            print(text, file=sys.stderr, flush=True)
        self.append(text)

    def append(self, text: str) -> None:
        if self.broken:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        data = f"{stamp} {self.step}[{os.getpid()}] {text}".replace("\n", "\n    ") + "\n"
        try:
            if self.fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(self.fd, data.encode("utf-8", "replace"))
        except OSError:
            self.broken = True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _install() -> None:
    _original["callHandlers"] = logging.Logger.callHandlers
    _original["showwarning"] = warnings.showwarning
    # Every record passes here, whichever handlers its library attached, and whenever: transformers
    # and DeepSpeed attach theirs when first imported, which is inside the job.
    logging.Logger.callHandlers = _route_record
    warnings.showwarning = _route_warning
    sys.stdout, sys.stderr = _Printed(sys.stdout), _Printed(sys.stderr)


def _uninstall() -> None:
    logging.Logger.callHandlers = _original.pop("callHandlers")
    warnings.showwarning = _original.pop("showwarning")
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, _Printed):  # (not when someone replaced it meanwhile)
            setattr(sys, name, stream.stream)


def _route_record(logger: logging.Logger, record: logging.LogRecord) -> None:
    if not _sinks or _is_ours(record.name):
        return _original["callHandlers"](logger, record)
    try:
        message = record.getMessage()
    except Exception:  # a library's bad format arguments must not fail its caller
        message = f"{record.msg!r} % {record.args!r}"
    text = f"{record.levelname} {record.name}: {message}"
    if record.exc_info:
        text += "\n" + logging.Formatter().formatException(record.exc_info)
    _sinks[-1].write(text, show=record.levelno >= SHOWN_LEVEL)


def _route_warning(message, category, filename, lineno, file=None, line=None) -> None:
    issuer = _issuer()
    if not _sinks or _is_ours(issuer):
        return _original["showwarning"](message, category, filename, lineno, file, line)
    _sinks[-1].write(f"{category.__name__} {issuer} ({Path(filename).name}:{lineno}): {message}")


class _Printed:
    """stdout or stderr, less what a library of PRINTING_LIBRARIES prints (into the debug log)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        caller = sys._getframe(1).f_globals.get("__name__", "?")  # print() itself has no frame
        if not _sinks or not _within(caller, PRINTING_LIBRARIES):
            return self.stream.write(text)
        if text.strip():  # print() writes the line end on its own
            _sinks[-1].write(f"print {caller}: {text.rstrip()}")
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _issuer() -> str:
    """The module that called ``warnings.warn``: the first frame outside the warnings machinery
    (the file a warning names is often its caller's, by ``stacklevel``)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") in (__name__, "warnings"):
        frame = frame.f_back
    return frame.f_globals.get("__name__", "?") if frame is not None else "?"


def _is_ours(name: str) -> bool:
    return _within(name, OURS)


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _set_env(values: dict[str, str]) -> Callable[[], None]:
    """Set what the user has not set (SLURMTUNE_VERBOSE follows the flag); returns the undo."""
    before = {k: os.environ.get(k) for k in values if k == VERBOSE_ENV or k not in os.environ}
    os.environ.update({k: values[k] for k in before})

    def undo() -> None:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return undo


def _bars_off() -> Callable[[], None]:
    """Progress bars off in the libraries already imported; returns the undo."""
    turned_off = []
    for module_name, is_off, off, on in BAR_SWITCHES:
        module = sys.modules.get(module_name)
        if module is None:
            continue
        was_on = not getattr(module, is_off)() if is_off else module.is_progress_bar_enabled()
        if was_on:
            getattr(module, off)()
            turned_off.append(getattr(module, on))

    def undo() -> None:
        for on in turned_off:
            on()
    return undo


def _state_log() -> Path:
    if os.environ.get("SLURMTUNE_DEBUG_LOG"):
        return Path(os.environ["SLURMTUNE_DEBUG_LOG"])
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "slurmtune" / DEBUG_LOG


def _job_id() -> str:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or "none (in this process)"
