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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from slurmtune import SOURCE_ROOT
from slurmtune.schema import above, at_least, build, field_
from slurmtune.errors import UsageError

PROFILE_DIR = SOURCE_ROOT / "slurm"
SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|PRIVATE_KEY|ACCESS_KEY)(_|$)",
                         re.IGNORECASE)
SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9]{20,})\b")


@dataclass
class ClusterProfile:
    """What a site needs in its sbatch scripts: one YAML file per site in slurm/."""

    name: str = field_("generic", "the profile's name; a file in slurm/ without one gets its file's name")
    description: str = field_("", "free text shown by `slurmtune doctor`")
    partition: str | None = field_(None, "partition of GPU jobs; null: the cluster's default")
    cpu_partition: str | None = field_(None, "partition of CPU-only steps (convert, validate, report); "
                                             "null: partition")
    account: str | None = field_(None, "account charged for the jobs (--account)")
    qos: str | None = field_(None, "quality of service of the jobs (--qos)")
    gpu_request: Literal["gres", "gpus-per-node"] = field_("gres", "how GPUs are asked for: "
                                                                   "--gres=gpu[:type]:N or --gpus-per-node=N")
    gpu_type: str | None = field_(None, "GPU type in the request, e.g. a40, v100; null: any")
    constraint: str | None = field_(None, "node features the jobs need (--constraint)")
    gpu_mem_gb: float | None = field_(None, "memory of one GPU of the partition, in GB as its maker states it "
                                            "(80 for an 80 GB A100); null: from gpu_type when it names a known "
                                            "GPU. Train jobs whose estimate does not fit are refused",
                                      above(0, "a positive size"))
    gpu_tflops: float | None = field_(None, "dense bf16 TFLOP/s of one GPU (fp16 where it has no bf16), for "
                                            "time estimates; null: from gpu_type when it names a known GPU",
                                      above(0, "a positive rate"))
    cpus_per_gpu: int = field_(4, "CPU cores per GPU of a GPU job", at_least(1))
    mem_gb_per_gpu: int = field_(32, "memory per GPU of a GPU job, in GB", at_least(1))
    cpus_per_cpu_job: int = field_(2, "CPU cores of a CPU-only job", at_least(1))
    mem_gb_per_cpu_job: int = field_(8, "memory of a CPU-only job, in GB", at_least(1))
    default_time_min: int = field_(60, "wall time of a job that names none, in minutes", at_least(1))
    max_time_min: int | None = field_(None, "the site's wall-time limit, if the partition does not say",
                                      at_least(1))
    max_array_size: int | None = field_(None, "most tasks in one job array; null: read from the cluster "
                                              "(MaxArraySize)", at_least(1))
    signal_lead_s: int = field_(120, "USR2 comes this long before the time limit: time to checkpoint",
                                at_least(1, "1 or more seconds"))
    extra_sbatch: list[str] = field_([], "more sbatch flags, e.g. [\"--mail-type=END\"]")
    setup: list[str] = field_([], "shell lines run before the job (module load, ...)")
    env: dict[str, str] = field_({}, "variables exported in the job (HF_HOME, ...); never tokens")
    shared_prefixes: list[str] = field_([], "paths visible from every node")
    require_shared_paths: bool = field_(False, "refuse model and data paths outside shared_prefixes")
    python: str | None = field_(None, "python on the nodes; null: the one submitting")
    vllm_bin: str | None = field_(None, "vLLM's executable in an environment of its own (vLLM pins its own "
                                        "torch), for `slurmtune serve --engine vllm`; null: no vLLM")
    cache_dir: str | None = field_(None, "folder for what slurmtune learns about this cluster (the results of "
                                         "`doctor --probe`); null: ~/.cache/slurmtune")
    run_group: str | None = field_(None, "group that may read run folders (0750, setgid); null: owner "
                                         "only (0700). Never group-writable: jobs refuse to start from a "
                                         "folder others can write into")

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


# Memory (GB, as sold) and dense bf16 TFLOP/s (fp16 for V100 and T4, which lack bf16) of GPUs
# by the names sites give them in gres types. Names with several sizes (A100) are left out
# unless the type says its size ("a100_80gb"): a wrong guess would refuse runs that fit.
KNOWN_GPUS = {"h200": (141, 989), "h100": (80, 989), "l40s": (48, 362), "l40": (48, 181), "a40": (48, 150),
              "a6000": (48, 155), "a100": (None, 312), "a10": (24, 125), "l4": (24, 121), "v100": (None, 125),
              "t4": (16, 65)}


@dataclass(frozen=True)
class GpuFacts:
    """One GPU of the partition, for the estimates; ``source`` says where the numbers came from."""

    mem_gb: float | None
    tflops: float | None
    source: str

    @property
    def usable_bytes(self) -> float | None:
        """What a training process can fill: the CUDA context and cuBLAS workspaces take about
        0.75 GiB, and the caching allocator loses ~5% to fragmentation."""
        return None if self.mem_gb is None else (self.mem_gb - 0.75) * 0.95 * 2**30


def gpu_facts(profile: ClusterProfile) -> GpuFacts:
    """The partition's GPU: what the profile states, else what `doctor --probe` measured, else
    what its gpu_type is known to be."""
    from slurmtune.cluster.probe import probe_facts, read_probe

    probe = read_probe(profile)
    probed = probe_facts(probe) if probe else (None, None)
    known = _known_gpu(profile.gpu_type)
    values, sources = [], []
    for stated, name, measured, typical in ((profile.gpu_mem_gb, "gpu_mem_gb", probed[0], known[0]),
                                           (profile.gpu_tflops, "gpu_tflops", probed[1], known[1])):
        if stated is not None:
            values.append(stated)
            sources.append(name)
        elif measured is not None:
            values.append(measured)
            sources.append(f"probe of {probe.get('when', '?')[:10]}")
        else:
            values.append(typical)
            sources.append(f"gpu_type {profile.gpu_type}" if typical is not None else "")
    source = ", ".join(dict.fromkeys(s for s in sources if s)) or "nothing known"
    return GpuFacts(values[0], values[1], f"profile {profile.name}: {source}")


def _known_gpu(gpu_type: str | None) -> tuple[float | None, float | None]:
    """("a100_80gb" | "A100-SXM4-80GB" | "nvidia_h100" | "l40s") -> (GB or None, TFLOP/s or None)."""
    if not gpu_type:
        return None, None
    text = gpu_type.lower()
    name = re.sub(r"[^a-z0-9]", "", text).removeprefix("nvidia").removeprefix("rtx")
    sized = re.search(r"[-_ ](\d+)\s*gb?$", text)
    for known in sorted(KNOWN_GPUS, key=len, reverse=True):  # l40s before l40, a100 before a10
        if name.startswith(known):
            mem, tflops = KNOWN_GPUS[known]
            return (float(sized.group(1)) if sized else mem), tflops
    return None, None


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
