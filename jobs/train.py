"""Single-GPU (Q)LoRA training that survives preemption and time limits.

On SLURM's warning signal (USR2, ``signal_lead_s`` before the limit) or SIGTERM
(what preemption sends first) the trainer saves a checkpoint at the next
optimizer step and stops; the job then requeues itself, and the requeued job
resumes from that checkpoint. Where nothing can requeue (the local executor),
the step is marked STOPPED and `slurmtune submit train RUN` resumes it.
"""

from __future__ import annotations

from pathlib import Path

from slurmtune.config import RunConfig
from slurmtune.runs.folder import data_files

from slurmtune.jobs.base import Job, requeue_after_stop


class TrainJob(Job):
    kind = "train"

    def run(self, cfg: RunConfig) -> dict:
        from slurmtune.train.recipe import StopRequest, install_signal_handlers, run_training
        from slurmtune.train.tiny_model import ensure_model
        ensure_model(cfg.model)
        train_files, validation_file = data_files(cfg, self.run_dir)
        stop = StopRequest()
        restore = install_signal_handlers(stop)
        try:
            outcome = run_training(cfg, Path(self.run_dir), train_files, validation_file, stop=stop)
        finally:
            restore()
        if outcome.status == "completed":
            return {"final_dir": str(outcome.final_dir), "step": outcome.step}
        requeue_after_stop(self.run_dir, self.step, f"step {outcome.step} ({outcome.checkpoint})")
