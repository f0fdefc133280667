"""Checks made on the login node before anything is queued: a doomed job fails in a second.

::

    problems = check_request(cfg, steps, profile, facts)   # facts: the cluster's partitions etc.

Each problem says what is wrong and the fix. The cluster facts come from
slurmtune.cluster.slurm (``partitions()``, ``max_array_size()``) as plain data, so
these checks are pure and testable with recorded facts.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from slurmtune.config import RunConfig
from slurmtune.cluster.profiles import ClusterProfile


@dataclass
class StepNeeds:
    """What one step asks for, as the checks see it."""

    name: str
    kind: str
    gpus_per_node: int
    nodes: int
    time_min: int
    partition: str | None
    array_size: int | None = None


@dataclass
class ClusterFacts:
    partitions: dict  # name -> slurmtune.cluster.slurm.Partition
    max_array_size: int


# GPUs each job kind can use, per node: more is waste that waits longer in the queue.
GPU_LIMITS = {"convert": 0, "validate": 0, "report": 0, "train": 1, "eval": 1}


def check_paths(cfg: RunConfig, profile: ClusterProfile | None) -> list[str]:
    problems = []
    for key, path in _data_paths(cfg):
        if not Path(path).is_file():
            problems.append(f"{key}: {path}: no such file")
    if cfg.model.path and not Path(cfg.model.path).is_dir() and not cfg.model.tiny_arch:
        problems.append(f"model.path: {cfg.model.path}: no such model folder; compute nodes are offline, "
                        "so download it first on the login node: slurmtune fetch-model NAME")
    if profile and profile.require_shared_paths:
        shared = [str(Path(p)) for p in profile.shared_prefixes]
        for key, path in [*_data_paths(cfg), ("model.path", cfg.model.path)]:
            if path and not any(str(Path(path).resolve()).startswith(s.rstrip("/") + "/") or
                                str(Path(path).resolve()) == s for s in shared):
                problems.append(f"{key}: {path} is not on shared storage ({', '.join(shared)}); compute "
                                "nodes cannot see it: move it there")
    return problems


def _data_paths(cfg: RunConfig) -> list[tuple[str, str]]:
    d = cfg.data
    found = [(f"data.inputs[{i}]", p) for i, p in enumerate(d.inputs)]
    found += [(f"data.train_files[{i}]", p) for i, p in enumerate(d.train_files)]
    found += [(k, getattr(d, k.split(".")[1])) for k in ("data.validation_file", "data.eval_file")
              if getattr(d, k.split(".")[1])]
    return found


def check_gpus(cfg: RunConfig, steps: list[StepNeeds]) -> list[str]:
    problems = []
    for step in steps:
        limit = GPU_LIMITS.get(step.kind)
        if limit is None:
            continue
        if step.gpus_per_node > limit:
            why = ("QLoRA trains on one GPU" if cfg.train.method == "qlora" else "the train job uses one GPU") \
                if step.kind == "train" else f"the {step.kind} job uses {limit} GPU(s)"
            fix = ("slurm.gpus=1, or distributed.gpus_per_node=N with method lora for DeepSpeed"
                   if step.kind == "train" else f"ask for {limit}")
            problems.append(f"{step.name}: {step.gpus_per_node} GPUs requested but {why}; fix: {fix}")
    if cfg.train.method == "qlora" and cfg.distributed.nodes * cfg.distributed.gpus_per_node > 1:
        problems.append("QLoRA with several GPUs is not supported: use train.method=lora (or lora-8bit) "
                        "with distributed.*, or one GPU with qlora")
    return problems


def check_attention(cfg: RunConfig) -> list[str]:
    """The training attention kernel against where the run trains."""
    from slurmtune.train.distributed import world_size
    impl = cfg.model.attn_implementation
    problems = []
    on_cpu = cfg.distributed.device == "cpu" if world_size(cfg) > 1 else cfg.slurm.gpus == 0
    if impl in ("flash_attention_2", "flex_attention") and on_cpu:
        problems.append(f"model.attn_implementation={impl} trains on GPUs only (it has no backward pass on "
                        "CPU) but this run trains on CPU; fix: model.attn_implementation=sdpa, or slurm.gpus=1")
    if impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        problems.append("model.attn_implementation=flash_attention_2 needs the flash-attn package, which this "
                        "environment lacks; fix: install a flash-attn wheel built for this torch and CUDA, "
                        "or use flex_attention (part of torch)")
    return problems


def packing_notice(cfg: RunConfig) -> str | None:
    if cfg.train.packing and cfg.model.attn_implementation in ("sdpa", "eager"):
        return (f"notice: train.packing with {cfg.model.attn_implementation} attention computes each packed "
                "batch as one block (no padding, but attention across rows that a mask then hides); with "
                "long rows that is slower than padding (bench/RESULTS.md). On GPUs set "
                "model.attn_implementation=flex_attention or flash_attention_2")
    return None


def check_distributed(cfg: RunConfig, steps: list[StepNeeds]) -> list[str]:
    """A multi-process train step: its DeepSpeed file, ZeRO stage vs method, and the global batch
    arithmetic (micro batch x grad accum x processes vs distributed.global_batch_size)."""
    if not any(step.kind == "train_deepspeed" for step in steps):
        return []
    from slurmtune.train.distributed import check_distributed as problems
    return problems(cfg, qlora=False)  # check_gpus already refuses QLoRA with several GPUs


def check_cluster(steps: list[StepNeeds], facts: ClusterFacts) -> list[str]:
    problems = []
    default = next((p for p in facts.partitions.values() if p.default), None)
    for step in steps:
        part = facts.partitions.get(step.partition) if step.partition else default
        if step.partition and part is None:
            problems.append(f"{step.name}: partition {step.partition!r} does not exist; partitions: "
                            f"{', '.join(facts.partitions)}")
            continue
        if part is None:
            continue
        if part.max_time_min is not None and step.time_min > part.max_time_min:
            problems.append(f"{step.name}: {step.time_min} min is above partition {part.name}'s MaxTime "
                            f"of {part.max_time_min} min; fix: slurm.time_min={part.max_time_min} "
                            "(training resumes across requeues) or another partition")
        if step.gpus_per_node > part.gpus_per_node:
            problems.append(f"{step.name}: {step.gpus_per_node} GPUs per node requested but partition "
                            f"{part.name}'s nodes have {part.gpus_per_node}; fix: ask for at most "
                            f"{part.gpus_per_node}")
        if step.nodes > len(part.nodes):
            problems.append(f"{step.name}: {step.nodes} nodes requested but partition {part.name} has "
                            f"{len(part.nodes)}")
        if step.array_size and step.array_size > facts.max_array_size:
            problems.append(f"{step.name}: an array of {step.array_size} tasks is above the cluster's "
                            f"MaxArraySize of {facts.max_array_size}; fix: fewer shards")
    return problems
