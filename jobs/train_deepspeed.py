"""Multi-GPU / multi-node LoRA with DeepSpeed ZeRO: one SLURM task per GPU.

Not available yet: it needs the rendezvous derived from SLURM's environment,
checkpoints complete across ranks, and the DeepSpeed configs in
manifests/deepspeed/. Until then the job refuses at submit time, on the login
node, so no allocation is spent on it.
"""

from __future__ import annotations

from slurmtune.config import RunConfig

from slurmtune.jobs.base import Job


class TrainDeepSpeedJob(Job):
    kind = "train_deepspeed"

    def check(self, cfg: RunConfig) -> list[str]:
        return ["multi-GPU training (train_deepspeed) is not available in this version; "
                "train on one GPU with the train job (distributed.gpus_per_node: 1)"]
