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

from slurmtune.config import RunConfig
from slurmtune.runs.folder import Run, has_eval
from slurmtune.runs.sweep import load_trials, trial_dir, trial_finished, write_sweep_results

from slurmtune.jobs.base import Job, requeue_pending
from slurmtune.jobs.convert import ConvertJob
from slurmtune.jobs.eval import EvalJob
from slurmtune.jobs.report import ReportJob
from slurmtune.jobs.train import TrainJob
from slurmtune.jobs.validate import ValidateJob


class TrialJob(Job):
    """One array task: every step of one trial, in the trial's own folder."""

    kind = "trial"

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
        if has_eval(trial_cfg):
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


