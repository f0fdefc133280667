"""Single-GPU (Q)LoRA training that survives preemption and time limits.

On SLURM's warning signal (USR2, ``signal_lead_s`` before the limit) or SIGTERM
(what preemption sends first) the trainer saves a checkpoint at the next
optimizer step and stops; the job then requeues itself, and the requeued job
resumes from that checkpoint. Where nothing can requeue (the local executor),
the step is marked STOPPED and `slurmtune submit train RUN` resumes it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from slurmtune.config import RunConfig
from slurmtune.errors import SlurmtuneError
from slurmtune.checks import check_attention
from slurmtune.runs.folder import data_files, report_status
from slurmtune.cluster.slurm import requeue_current_job

from slurmtune.jobs.base import Job

MAX_REQUEUES = 50  # a job that never finishes within its limit should not loop forever


class TrainStopped(SlurmtuneError):
    """Training stopped on a signal and could not requeue itself; it resumes when resubmitted."""


class TrainJob(Job):
    kind = "train"
    gpus_used = 1

    def check(self, cfg: RunConfig) -> list[str]:
        problems = []
        if not cfg.model.path or (not Path(cfg.model.path).is_dir() and not cfg.model.tiny_arch):
            problems.append(f"model.path: {cfg.model.path!r} is not a model folder; download it on the "
                            "login node (slurmtune fetch-model) or set model.path")
        if cfg.slurm.gpus > 1 or cfg.distributed.nodes * cfg.distributed.gpus_per_node > 1:
            problems.append("the train job uses one GPU; for several use distributed.* with the "
                            "train_deepspeed job")
        return problems + check_attention(cfg)

    def run(self, cfg: RunConfig) -> dict:
        from slurmtune.train.recipe import StopRequest, install_signal_handlers, run_training
        if cfg.model.tiny_arch and not Path(cfg.model.path).is_dir():
            from slurmtune.train.tiny_model import make_tiny_model
            make_tiny_model(cfg.model.path, arch=cfg.model.tiny_arch)
        train_files, validation_file = data_files(cfg, self.run_dir)
        stop = StopRequest()
        restore = install_signal_handlers(stop)
        try:
            outcome = run_training(cfg, Path(self.run_dir), train_files, validation_file, stop=stop)
        finally:
            restore()
        if outcome.status == "completed":
            return {"final_dir": str(outcome.final_dir), "step": outcome.step}
        return self._after_stop(outcome)

    def _after_stop(self, outcome) -> dict:
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        note = f"stopped at step {outcome.step} ({outcome.checkpoint})"
        if attempt < MAX_REQUEUES and requeue_current_job():
            report_status(self.run_dir, self.step, "REQUEUED", note=note)
            print(f"{note}; requeued (attempt {attempt + 1})", flush=True)
            sys.stdout.flush()
            os._exit(0)  # the controller ends this attempt now; nothing must run after requeue
        raise TrainStopped(f"{note}; resume with: slurmtune submit train {self.run_dir}")
