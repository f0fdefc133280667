"""`slurmtune doctor`: is this login node ready to submit, and does the cluster take our jobs?

Each finding has a level (ok, warn, FAIL), what was seen, and the fix.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from slurmtune.cluster import slurm
from slurmtune.cluster.profiles import ClusterProfile
from slurmtune.errors import SlurmtuneError


@dataclass
class Finding:
    level: str
    message: str
    fix: str = ""


def diagnose(profile: ClusterProfile | None) -> list[Finding]:
    found = []
    missing = slurm.missing_commands()
    if missing:
        found.append(Finding("FAIL", f"SLURM commands not on PATH: {', '.join(missing)}",
                             "run this on the cluster's login node, after `module load slurm` if your site needs it; "
                             "without SLURM, jobs run here with --executor local"))
        return found + _environment(profile)
    found.append(Finding("ok", "sbatch, squeue, sacct, scontrol, sinfo and scancel are on PATH"))
    found += _cluster(profile)
    return found + _environment(profile)


def _cluster(profile: ClusterProfile | None) -> list[Finding]:
    found = []
    try:
        parts = slurm.partitions()
        gpus = slurm.free_gpus()
    except (slurm.SchedulerError, OSError) as e:
        return [Finding("FAIL", f"the controller does not answer: {e}", "check SLURM_CONF / the cluster's status page")]
    for name, part in parts.items():
        free, total = gpus.get(name, (0, 0))
        limit = f"{part.max_time_min} min" if part.max_time_min else "unlimited"
        found.append(Finding("ok", f"partition {name}{' (default)' if part.default else ''}: {part.state}, "
                                   f"MaxTime {limit}, GPUs free {free}/{total}"))
    ok, why = slurm.accounting_works()
    found.append(Finding("ok", "sacct answers: job states survive the end of jobs") if ok else
                 Finding("warn", f"sacct does not work ({why or 'no accounting'})",
                         "status falls back to squeue/scontrol, which forget jobs minutes after they end"))
    if profile is None:
        found.append(Finding("warn", "no cluster profile given", "pass --cluster NAME (see slurm/) to check account, qos, partition"))
        return found
    part_name = profile.partition or next((p.name for p in parts.values() if p.default), None)
    if profile.partition and profile.partition not in parts:
        found.append(Finding("FAIL", f"profile {profile.name}: partition {profile.partition!r} does not exist",
                             f"set partition to one of {', '.join(parts)}"))
        return found
    accepted, message = slurm.test_only(profile, part_name, 1 if parts.get(part_name, None) and
                                        parts[part_name].gpus_per_node else 0)
    found.append(Finding("ok", f"sbatch --test-only accepts account={profile.account} qos={profile.qos} "
                               f"partition={part_name}: {message}") if accepted else
                 Finding("FAIL", f"sbatch --test-only refuses account={profile.account} qos={profile.qos} "
                                 f"partition={part_name}: {message}",
                         "check `sacctmgr show assoc user=$USER format=account,qos` and fix the profile"))
    part = parts.get(part_name)
    if part and part.max_time_min and profile.default_time_min > part.max_time_min:
        found.append(Finding("FAIL", f"profile default_time_min {profile.default_time_min} is above "
                                     f"{part_name}'s MaxTime {part.max_time_min}",
                             f"set default_time_min to at most {part.max_time_min}"))
    found += _signals(profile)
    return found


def _signals(profile: ClusterProfile) -> list[Finding]:
    found = []
    if profile.signal_lead_s < 30:
        found.append(Finding("warn", f"signal_lead_s {profile.signal_lead_s}: little time to save a checkpoint "
                                     "before the time limit", "use 60-300 s"))
    else:
        found.append(Finding("ok", f"jobs get USR2 {profile.signal_lead_s} s before their time limit "
                                   "(checkpoint and requeue)"))
    preempt = slurm.config_value("PreemptMode") or "OFF"
    params = slurm.config_value("SlurmctldParameters") or ""
    if preempt.upper() != "OFF" and "preempt_send_user_signal" not in params:
        found.append(Finding("warn", f"PreemptMode={preempt}: preempted jobs get SIGTERM only",
                             "slurmtune checkpoints on SIGTERM too; keep GraceTime long enough for one optimizer step"))
    return found


def _environment(profile: ClusterProfile | None) -> list[Finding]:
    found = []
    python = Path(sys.executable)
    shared = [p for p in (profile.shared_prefixes if profile else []) if p]
    if shared and not any(str(python).startswith(p) for p in shared):
        found.append(Finding("warn", f"this Python ({python}) is not under the shared prefixes {', '.join(shared)}",
                             "compute nodes must see the environment: create .venv on shared storage"))
    else:
        found.append(Finding("ok", f"Python environment: {python.parent.parent}"))
    cache = (profile.env.get("HF_HOME") if profile else None) or os.environ.get("HF_HOME")
    if cache:
        visible = Path(cache).is_dir()
        found.append(Finding("ok" if visible else "warn", f"model cache HF_HOME={cache}"
                             + ("" if visible else " does not exist"),
                             "" if visible else "create it on shared storage and run slurmtune fetch-model there"))
    for name in ("HF_TOKEN", "WANDB_API_KEY"):
        if os.environ.get(name):
            found.append(Finding("ok", f"{name} is set in this shell; slurmtune never writes it to scripts, "
                                       "run folders or logs"))
    return found


# --- the probe job -----------------------------------------------------------------------

PROBE_TIME_MIN = 10
WAITING = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED"}


def probe(profile: ClusterProfile, gpus: int, executor: str, wait_min: int, echo=print) -> dict:
    """Run the probe where train jobs run (a job on the profile's GPU partition, or here with
    the local executor), wait for it, and keep its result in the profile's cache folder."""
    from slurmtune.cluster.probe import ProbeJob, probe_path, read_probe

    path = probe_path(profile)
    job = ProbeJob(str(path), gpus, profile.env.get("HF_HOME"))
    if executor != "slurm":
        return job()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = path.parent / "probe-jobs" / f"{profile.name}-{stamp}"
    (folder / "slurm").mkdir(parents=True, mode=0o700)
    path.unlink(missing_ok=True)  # what is read back is this job's answer, or nothing
    request = slurm.Request(job_name=f"slurmtune-probe-{profile.name}", time_min=PROBE_TIME_MIN,
                            gpus_per_node=gpus, partition=profile.partition)
    job_id = slurm.submit("slurm", folder / "slurm", profile, request, job).job_ids[0]
    echo(f"probe job {job_id} submitted to {profile.partition or 'the default partition'}; waiting for it "
         f"(at most {wait_min} min; its log: {folder / 'slurm'})")
    state = _wait(job_id, wait_min, echo)
    result = read_probe(profile)
    if result is None:
        tail = _log_tail(folder / "slurm" / f"{job_id}_0_log.err")
        raise SlurmtuneError(f"probe job {job_id} ended {state} without a result" + (f"; its log ends: {tail}"
                                                                                     if tail else ""))
    return result


def _wait(job_id: str, wait_min: int, echo) -> str:
    deadline, said = time.monotonic() + wait_min * 60, None
    while True:
        state = slurm.job_states([job_id])[job_id].state
        if state not in WAITING:
            return state
        if state != said:
            echo(f"probe job {job_id}: {state}")
            said = state
        if time.monotonic() > deadline:
            raise SlurmtuneError(f"probe job {job_id} still {state} after {wait_min} min; it keeps running: "
                                 f"`slurmtune doctor --cluster NAME --probe` again reads its result once it ends, "
                                 f"or scancel {job_id}")
        time.sleep(2)


def _log_tail(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""
