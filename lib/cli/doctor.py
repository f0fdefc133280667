"""`slurmtune doctor`: is this login node ready, and does the cluster take our jobs?"""

from __future__ import annotations

from slurmtune.cluster.profiles import load_profile


def add_commands(sub, argv: list[str]) -> None:
    _add_doctor(sub)


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="check this login node and cluster profile before submitting")
    p.add_argument("--cluster", metavar="NAME", help="cluster profile in slurm/ (or a YAML path)")
    p.set_defaults(func=_doctor)


def _doctor(args) -> int:
    from slurmtune.cluster.doctor import diagnose
    findings = diagnose(load_profile(args.cluster) if args.cluster else None)
    for f in findings:
        print(f"{f.level:<5} {f.message}")
        if f.fix:
            print(f"      fix: {f.fix}")
    bad = sum(f.level == "FAIL" for f in findings)
    print(f"doctor: {len(findings)} checks, {bad} failed")
    return 1 if bad else 0
