"""Cluster profiles: what a site needs in its sbatch scripts, one YAML file per site in slurm/.

::

    profile = load_profile("campus-example")     # slurm/campus-example.yaml
    profile = load_profile("/path/to/mine.yaml")  # or any file

Units live in the names (``time_min``, ``mem_gb_per_gpu``, ``signal_lead_s``).
Profiles hold no secrets: a value that looks like a token is refused, so none can
reach a script, a run folder or a log. Tokens stay in the user's environment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from slurmtune import SOURCE_ROOT
from slurmtune.config import build
from slurmtune.errors import UsageError

PROFILE_DIR = SOURCE_ROOT / "slurm"
SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|PRIVATE_KEY|ACCESS_KEY)(_|$)",
                         re.IGNORECASE)
SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9]{20,})\b")


@dataclass
class ClusterProfile:
    name: str = "generic"
    description: str = ""
    partition: str | None = None  # partition of GPU jobs
    cpu_partition: str | None = None  # partition of CPU-only steps (convert, validate, report); default: partition
    account: str | None = None
    qos: str | None = None
    gpu_request: Literal["gres", "gpus-per-node"] = "gres"  # --gres=gpu[:type]:N or --gpus-per-node=N
    gpu_type: str | None = None  # e.g. a40, v100
    constraint: str | None = None
    cpus_per_gpu: int = 4
    mem_gb_per_gpu: int = 32
    cpus_per_cpu_job: int = 2
    mem_gb_per_cpu_job: int = 8
    default_time_min: int = 60
    max_time_min: int | None = None  # site limit, if the partition does not say
    max_array_size: int | None = None  # default: read from the cluster (MaxArraySize)
    signal_lead_s: int = 120  # USR2 this long before the time limit: time to checkpoint
    extra_sbatch: list[str] = field(default_factory=list)  # e.g. ["--mail-type=END"]
    setup: list[str] = field(default_factory=list)  # shell lines before the job (module load, ...)
    env: dict[str, str] = field(default_factory=dict)  # exported in the job (HF_HOME, ...)
    shared_prefixes: list[str] = field(default_factory=list)  # paths visible from every node
    require_shared_paths: bool = False  # refuse model/data paths outside shared_prefixes
    python: str | None = None  # python on the nodes; default: the one submitting

    def problems(self) -> list[str]:
        found = []
        for key, value in self.env.items():
            if SECRET_NAME.search(key) or SECRET_VALUE.search(value):
                found.append(f"env.{key}: looks like a secret; keep tokens in your shell environment, "
                             "never in a profile (they would reach sbatch scripts and run folders)")
        for i, line in enumerate([*self.setup, *self.extra_sbatch]):
            if SECRET_VALUE.search(line):
                found.append(f"setup/extra_sbatch line {i + 1}: contains what looks like a token")
        for i, flag in enumerate(self.extra_sbatch):
            if not flag.startswith("--") or "\n" in flag:
                found.append(f"extra_sbatch[{i}]: {flag!r}; expected one sbatch flag like --mail-type=END")
        return found

    def sbatch_extras(self) -> dict[str, str | bool]:
        """extra_sbatch as submitit's additional_parameters."""
        extras: dict[str, str | bool] = {}
        for flag in self.extra_sbatch:
            key, sep, value = flag[2:].partition("=")
            extras[key.replace("-", "_")] = value if sep else True
        return extras


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str) -> ClusterProfile:
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UsageError(f"no cluster profile {name_or_path!r}; profiles in slurm/: "
                         f"{', '.join(profile_names())} (or give a YAML path)")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    raw.setdefault("name", path.stem)
    profile = build(ClusterProfile, raw, source=str(path))
    problems = profile.problems()
    if problems:
        raise UsageError(f"{path}: " + "; ".join(problems))
    return profile
