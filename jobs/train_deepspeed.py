"""Multi-GPU / multi-node LoRA with DeepSpeed ZeRO: one SLURM task per GPU, resumable like `train`.

::

    # manifest                                   # what the train step then asks SLURM for
    distributed: {nodes: 2, gpus_per_node: 4}     # --nodes=2 --ntasks-per-node=4 --gres=gpu:4
    distributed: {deepspeed: ../manifests/deepspeed/zero3.json, global_batch_size: 64}
    distributed: {device: cpu}   # gpus_per_node counts CPU processes: no --gres, gloo instead of NCCL

srun starts every task; each derives its rank and the rendezvous (first node
of the allocation, a port from the job id) from SLURM's environment
(slurmtune.train.distributed) and joins the process group with
``distributed.timeout_s`` as the limit for the rendezvous and for every
collective. srun runs with ``--kill-on-bad-exit=1``: one task that fails ends
the others, so a dead or hung rank fails the job in about ``timeout_s``
instead of burning the allocation. Each rank reports its progress to
``status/train.ranks/``; the rank that took the job down is named in the
step's status (``slurmtune status``).

USR2 or SIGTERM on any rank: all ranks save the same step together (the stop
flag is combined after every step), rank 0 requeues the job and the requeued
job resumes exactly. Checkpoints count only with every rank's shard; a resume
with another number of processes is refused (see slurmtune.train.checkpoints).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from slurmtune.config import RunConfig
from slurmtune.train.distributed import (
    RankReports, barrier, deepspeed_config_path, heartbeat_callback, init_process_group,
    rendezvous, world_size,
)
from slurmtune.errors import UsageError
from slurmtune.logs import quiet_output
from slurmtune.runs.folder import data_files, report_status

from slurmtune.jobs.base import Job, Stopped, cancel_dependants, job_scope, requeue_after_stop, requeue_pending


class TrainDeepSpeedJob(Job):
    kind = "train_deepspeed"

    def __call__(self) -> dict:
        """Every rank runs this; rank 0 speaks for the step, and on a failure the rank that
        caused it is named whichever rank gets to write last."""
        rdv = rendezvous(os.environ)
        reports = RankReports(self.run_dir, self.step, rdv)
        reports.beat("starting")
        if rdv.rank == 0:
            report_status(self.run_dir, self.step, "RUNNING", world_size=rdv.world_size)
        try:
            with job_scope(), quiet_output(self.run_dir, f"{self.step}.rank{rdv.rank}"):  # late signals ignored; noise in debug.log
                result = self.run(self.config(), rdv, reports)
        except Stopped as e:  # saved, but nothing could requeue it: resubmit to resume
            if rdv.rank == 0:
                report_status(self.run_dir, self.step, "STOPPED", error=str(e).splitlines()[0])
            raise
        except BaseException as e:
            if isinstance(e, SystemExit) and requeue_pending():
                raise  # submitit requeued the job (a signal outside training): it runs again
            culprit, what = reports.failed(e)
            host = reports.read_all().get(culprit, {}).get("host", "?")
            report_status(self.run_dir, self.step, "FAILED", failed_rank=culprit,
                          error=f"rank {culprit} of {rdv.world_size} (host {host}): {what}"
                                f"{_log_hint(rdv, culprit)}")
            cancel_dependants(self.run_dir, self.step)
            raise
        reports.beat("done")
        if rdv.rank == 0:
            report_status(self.run_dir, self.step, "COMPLETED")
        return result

    def run(self, cfg: RunConfig, rdv=None, reports=None) -> dict:
        rdv = rdv or rendezvous(os.environ)
        reports = reports or RankReports(self.run_dir, self.step, rdv)
        from slurmtune.train.recipe import StopRequest, install_signal_handlers
        stop = StopRequest()
        restore = install_signal_handlers(stop)  # first: a signal during loading still counts
        try:
            outcome = self._train(cfg, rdv, reports, stop)
        finally:
            restore()
        if outcome.status == "completed":
            _leave_process_group()
            return {"final_dir": str(outcome.final_dir), "step": outcome.step, "world_size": rdv.world_size}
        reports.beat("stopped", outcome.step)
        return self._after_stop(outcome, rdv)

    def _train(self, cfg: RunConfig, rdv, reports: RankReports, stop):
        if rdv.world_size != world_size(cfg):  # the global batch and the checkpoints depend on it
            raise UsageError(f"distributed.nodes x gpus_per_node = {world_size(cfg)}, but this job runs "
                             f"{rdv.world_size} process(es) ({rdv.source}); fix: submit the train step on its "
                             f"own (slurmtune submit train RUN; the local executor then starts "
                             f"{world_size(cfg)} processes here), or set distributed.* to what runs")
        if cfg.distributed.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # asked for no GPU: use none, even where one is visible
        _threads_per_process()
        import torch
        from slurmtune.train.recipe import run_training
        _quiet_deprecations()
        if cfg.distributed.device == "gpu" and not torch.cuda.is_available():
            raise UsageError("distributed.device=gpu, but this task sees no CUDA device; fix: a GPU partition "
                             "(slurm profile) or distributed.device=cpu to train with CPU processes")
        init_process_group(rdv, cfg.distributed.timeout_s, cuda=cfg.distributed.device == "gpu")
        if rdv.rank == 0 and not (Path(cfg.model.path) / "config.json").is_file():
            from slurmtune.train.tiny_model import ensure_model  # torch and transformers: seconds
            ensure_model(cfg.model)  # one writer; the others wait for it on the barrier
        barrier()  # every rank, so none is left waiting in it whatever each saw on disk
        train_files, validation_file = data_files(cfg, self.run_dir)
        reports.beat("loading")
        return run_training(cfg, Path(self.run_dir), train_files, validation_file, stop=stop,
                            deepspeed=str(deepspeed_config_path(cfg)), callbacks=(heartbeat_callback(reports),))

    def _after_stop(self, outcome, rdv) -> dict:
        barrier()  # every rank is past the save before rank 0 hands the job back
        if rdv.rank != 0:
            sys.stdout.flush()
            os._exit(0)  # rank 0 requeues (which ends this step) or reports that it could not
        requeue_after_stop(self.run_dir, self.step, f"step {outcome.step} ({outcome.checkpoint})")


def _log_hint(rdv, rank: int) -> str:
    """Where submitit put that rank's output (``%j_%t_log.err``: one log per task)."""
    if rdv.source != "slurm" or not rdv.job_id:
        return ""
    return f"; its log: slurm/{rdv.job_id}_{rank}_log.err"


def _threads_per_process() -> None:
    """The CPUs SLURM gave this task, not accelerate's fallback of 1 (or all cores per process)."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = cpus
        import torch
        torch.set_num_threads(int(cpus))


def _quiet_deprecations() -> None:
    # DeepSpeed 0.19 calls torch.distributed names that torch 2.13 deprecates, once per step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def _leave_process_group() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
