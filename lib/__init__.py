"""slurmtune: LoRA/QLoRA fine-tuning of language models on course data, as SLURM batch jobs.

The rooms, in the one direction imports flow (ARCHITECTURE.md has the whole map)::

    errors, config, progress        the base every room may use
    data/       convert -> validate -> split; records, chat templates, the training dataset
    train/      the LoRA/QLoRA recipe, checkpoints, DeepSpeed, lineage, tiny models
    evaluate/   generation, metrics, reports
    cluster/    SLURM (through submitit), cluster profiles, doctor
    runs/       run folders, their status, sweeps
    checks      every check of a command, before anything is created or queued
    jobs/       the job kinds (one shape: jobs/base.py) and the pipeline that chains them
    cli/        the command line, one file per command group
"""

from pathlib import Path

__version__ = "0.1.0"

# The source checkout: manifests/ (DeepSpeed configs) and slurm/ (profiles) live here.
SOURCE_ROOT = Path(__file__).resolve().parent.parent
