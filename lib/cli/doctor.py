"""`slurmtune doctor`: is this login node ready, and does the cluster take our jobs?"""

from __future__ import annotations

from slurmtune.cluster.profiles import load_profile


def add_commands(sub, argv: list[str]) -> None:
    _add_doctor(sub)


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="check this login node and cluster profile before submitting")
    p.add_argument("--cluster", metavar="NAME", help="cluster profile in slurm/ (or a YAML path)")
    p.add_argument("--probe", action="store_true",
                   help="run a short job on the GPU partition: GPU, bf16 TFLOP/s, bitsandbytes, NCCL, attention "
                        "kernels, model cache; kept for the estimates of `run` and `estimate`")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="--probe: GPUs to ask for (2+: NCCL all-reduce)")
    p.add_argument("--wait-min", type=int, default=30, metavar="MIN", help="--probe: wait at most this long")
    p.set_defaults(func=_doctor)


def _doctor(args) -> int:
    if args.probe:
        return _probe(args)
    from slurmtune.cluster.doctor import diagnose
    findings = diagnose(load_profile(args.cluster) if args.cluster else None)
    for f in findings:
        print(f"{f.level:<5} {f.message}")
        if f.fix:
            print(f"      fix: {f.fix}")
    bad = sum(f.level == "FAIL" for f in findings)
    print(f"doctor: {len(findings)} checks, {bad} failed")
    return 1 if bad else 0


def _probe(args) -> int:
    """The probe's table; exit 1 only when a check found something broken (FAIL), not when the
    node lacks a thing (no CUDA is an answer)."""
    from slurmtune.cluster.doctor import probe
    from slurmtune.cluster.probe import format_probe, probe_path
    from slurmtune.cluster.profiles import ClusterProfile
    from slurmtune.cluster.slurm import sbatch_available
    from slurmtune.errors import UsageError

    if args.gpus < 0:
        raise UsageError(f"--gpus {args.gpus}: expected 0 or more")
    profile = load_profile(args.cluster) if args.cluster else ClusterProfile(name="local")
    executor = "slurm" if args.cluster and sbatch_available() else "local"
    result = probe(profile, args.gpus, executor, args.wait_min)
    print(format_probe(result))
    print(f"kept in {probe_path(profile)}: `run` and `estimate` read the GPU's memory and TFLOP/s from it")
    return 1 if any(c["status"] == "FAIL" for c in result["checks"]) else 0
