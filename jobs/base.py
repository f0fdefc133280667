"""The one shape every job has: validate on construction, run, checkpoint for requeue.

::

    job = TrainJob(run_dir)   # the job of runs/<id>/ (its manifest.yaml is read when it runs)
    job()                     # what the SLURM task (or local process) executes
    job.checkpoint()          # what submitit calls on a timeout/preemption signal

A job is a small picklable object holding only its run folder and step name:
the configuration is read from the run's resolved manifest, so what runs on
the node is exactly what `slurmtune config` printed on the login node. A job
starts by running ``slurmtune.checks.job_problems`` for its kind, the same
checks the login node ran before submitting it. Each job reports its own state
to ``status/<step>.json`` so `slurmtune status` can say what happened even when
the scheduler has forgotten the job.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from slurmtune.checks import CheckFailed, job_problems, raise_problems
from slurmtune.cluster.slurm import MAX_REQUEUES, cancel, requeue_current_job, resubmission
from slurmtune.config import RunConfig
from slurmtune.errors import SlurmtuneError
from slurmtune.logs import quiet_output
from slurmtune.runs.folder import Run, report_status

# Set by checkpoint(): submitit requeues the job right after it and ends this attempt with
# SystemExit, which must not read as a failure (nor cancel the steps waiting on this one).
_requeue_pending = False
_depth = 0  # jobs running in this process (a pipeline or a sweep trial runs steps inside itself)


def requeue_pending() -> bool:
    """Whether this process's job has asked to be requeued (its attempt is ending)."""
    return _requeue_pending


def requeue(job, *args, **kwargs):
    """What a ``checkpoint()`` returns: call ``job(*args, **kwargs)`` again after the requeue
    that follows."""
    global _requeue_pending
    _requeue_pending = True
    return resubmission(job, *args, **kwargs)


class Stopped(SlurmtuneError):
    """The job saved its progress on a signal and nothing could requeue it (the local
    executor, or the requeue limit): its step is STOPPED and resumes when resubmitted."""


class Job:
    kind: ClassVar[str]

    def __init__(self, run_dir: str | Path, step: str | None = None):
        self.run_dir = str(Path(run_dir).resolve())
        self.step = step or self.kind

    def config(self) -> RunConfig:
        """The run's resolved manifest, checked as the login node checked it before submitting."""
        cfg = Run.open(self.run_dir).config()
        raise_problems(job_problems(cfg, self.kind), f"{self.kind} job")
        return cfg

    def run(self, cfg: RunConfig, *args: Any) -> Any:
        raise NotImplementedError

    def __call__(self, *args: Any) -> Any:
        global _requeue_pending
        _requeue_pending = False  # a new attempt (or a debug executor's next job in this process)
        step = self.step_name(*args)
        report_status(self.run_dir, step, "RUNNING")
        try:
            with job_scope(), quiet_output(self.run_dir, step):  # other libraries' noise: debug.log
                _fault_pause(step, Path(self.run_dir).name)
                result = self.run(self.config(), *args)
        except BaseException as e:
            if isinstance(e, SystemExit) and _requeue_pending:
                raise  # requeued: this step runs again, what depends on it keeps waiting
            report_status(self.run_dir, step, "STOPPED" if isinstance(e, Stopped) else "FAILED",
                          error=_last_line(e))
            if not isinstance(e, SlurmtuneError):
                traceback.print_exc()
            cancel_dependants(self.run_dir, self.step)
            raise
        report_status(self.run_dir, step, "COMPLETED")
        return result

    def step_name(self, *args: Any) -> str:
        return self.step if not args else f"{self.step}.{args[0]}"

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Requeue this same job; it resumes from whatever it saved."""
        report_status(self.run_dir, self.step_name(*args), "REQUEUED")
        return requeue(self, *args, **kwargs)


def requeue_after_stop(run_dir: str, step: str, saved: str) -> None:
    """A job that saved its progress on a signal (``saved`` says what) hands itself back to
    SLURM, which starts it again from the queue; where nothing can requeue it, or after
    MAX_REQUEUES attempts, it raises Stopped with the command that resumes it."""
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    note = f"stopped at {saved}"
    if attempt < MAX_REQUEUES and requeue_current_job():
        report_status(run_dir, step, "REQUEUED", note=note)
        print(f"{note}; requeued (attempt {attempt + 1})", flush=True)
        sys.stdout.flush()
        os._exit(0)  # the controller ends this attempt now; nothing must run after requeue
    why = "" if attempt < MAX_REQUEUES else f" after {attempt} requeues (the limit)"
    raise Stopped(f"{note}{why}; resume with: slurmtune submit {step.split('.')[0]} {run_dir}")


def _fault_pause(step: str, run_name: str) -> None:
    """Fault injection for the tests: SLURMTUNE_FAULT_PAUSE=[RUN/]STEP:SECONDS holds the first
    attempt of that step (of the run folder named RUN) at its start, a window to signal it."""
    name, _, seconds = os.environ.get("SLURMTUNE_FAULT_PAUSE", "").rpartition(":")
    if name in (step, f"{run_name}/{step}") and int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0:
        time.sleep(float(seconds))


@contextmanager
def job_scope():
    """One job running in this process. Jobs nest: a local pipeline or a sweep trial runs its
    steps inside itself, and a late warning signal is ignored only once the outermost is done."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _depth == 0:
        _ignore_late_signals()


def _ignore_late_signals() -> None:
    """The work is done: a warning signal that arrives now (the time limit is near) must not
    kill the exiting process, which would turn a finished job into a FAILED one and cancel
    its dependants."""
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread (a debug executor in a thread)
            pass


def _last_line(e: BaseException) -> str:
    if isinstance(e, CheckFailed):
        return e.one_line()
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0] if isinstance(e, SlurmtuneError) else f"{type(e).__name__}: {text.splitlines()[-1]}"


def cancel_dependants(run_dir: str, step: str) -> None:
    """Cancel the steps after a failed one now, rather than when the scheduler notices
    (``--kill-on-invalid-dep`` still covers jobs killed outside Python)."""
    run = Run.open(run_dir)
    if run.record.executor != "slurm":
        return
    names = [s.name for s in run.record.steps]
    if step not in names:
        return
    later = [j for s in run.record.steps[names.index(step) + 1:] for j in s.job_ids]
    try:
        cancel(later)
    except OSError:
        pass  # the scheduler's own rule cancels them a little later
