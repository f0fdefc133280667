"""The one module that talks to submitit and to SLURM's commands. Everything else passes plain data.

::

    kind, notice = choose_executor("auto", profile_name)
    sub = submit(kind, run.slurm_dir, profile, Request("train", time_min=120, gpus_per_node=1),
                 job, after=["1234"])
    states = job_states(["1234", "1235_0"])   # one sacct call, whatever the number of jobs

Executors: ``slurm`` (sbatch through submitit), ``local`` (submitit's local
executor: the same job code in a background process on this machine) and
``debug`` (in this process, for debugging).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from slurmtune.errors import SlurmtuneError, UsageError
from slurmtune.cluster.profiles import ClusterProfile

EXECUTORS = ("slurm", "local", "debug")
# sbatch failures worth another try: the controller is busy or briefly unreachable.
TRANSIENT = re.compile(r"(Socket timed out|temporarily unavailable|Unable to contact slurm controller|"
                       r"Resource temporarily unavailable|try again|Transport endpoint)", re.IGNORECASE)
SUBMIT_RETRIES = 5
# Requeues of one job, whoever asks for them (submitit's handler on a signal outside training,
# the trainer after saving a checkpoint): a job that never fits its time limit must not loop forever.
MAX_REQUEUES = 50
COMMAND_TIMEOUT_S = 30


class SchedulerError(SlurmtuneError):
    pass


@dataclass
class Request:
    """What one step asks of the scheduler."""

    job_name: str
    time_min: int
    gpus_per_node: int = 0
    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    cpus_per_gpu: int | None = None  # default: the profile's
    mem_gb_per_gpu: int | None = None  # default: the profile's
    array_size: int | None = None
    array_parallelism: int = 4
    partition: str | None = None
    hold: bool = False  # submit held: nothing starts until `scontrol release`


@dataclass
class Submitted:
    job_ids: list[str]
    script: str | None = None  # path of the sbatch script, for the run record and lineage
    jobs: list[Any] = field(default_factory=list, repr=False)  # submitit Job objects (local waits on them)


def sbatch_available() -> bool:
    return shutil.which("sbatch") is not None


def choose_executor(requested: str, cluster: str | None) -> tuple[str, str | None]:
    """(executor, one-line notice or None). auto = slurm when sbatch is here and a profile is chosen."""
    if requested not in ("auto", *EXECUTORS):
        raise UsageError(f"unknown executor {requested!r}; expected auto, {', '.join(EXECUTORS)}")
    if requested == "slurm" and not sbatch_available():
        raise UsageError("executor slurm: sbatch is not on PATH (load the SLURM module, or use --executor local)")
    if requested != "auto":
        return requested, None
    if sbatch_available() and cluster:
        return "slurm", None
    why = "no SLURM here (sbatch not on PATH)" if not sbatch_available() else "no cluster profile chosen"
    return "local", f"notice: {why}: running on this machine with the local executor"


# --- submission -----------------------------------------------------------------------

def _parameters(kind: str, profile: ClusterProfile, req: Request, after: list[str]) -> dict[str, Any]:
    """submitit AutoExecutor parameters (generic names, ``slurm_`` for SLURM-only ones)."""
    gpus = req.gpus_per_node
    cpus_per_gpu = req.cpus_per_gpu or profile.cpus_per_gpu
    cpus = req.cpus_per_task or (max(1, cpus_per_gpu * gpus // req.tasks_per_node) if gpus
                                 else profile.cpus_per_cpu_job)
    params: dict[str, Any] = {
        "name": safe_name(req.job_name, "slurmtune"),
        "timeout_min": req.time_min,
        "nodes": req.nodes,
        "tasks_per_node": req.tasks_per_node,
        "cpus_per_task": cpus,
        "mem_gb": req.mem_gb or ((req.mem_gb_per_gpu or profile.mem_gb_per_gpu) * gpus if gpus
                                 else profile.mem_gb_per_cpu_job),
        "slurm_signal_delay_s": profile.signal_lead_s,
        "slurm_array_parallelism": req.array_parallelism,
        "slurm_setup": _setup_lines(profile),
    }
    if req.nodes * req.tasks_per_node > 1:
        # One task failing ends the step: its peers would otherwise wait in a collective.
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
    # --gres is the common way to ask for GPUs; submitit itself only knows --gpus-per-node.
    if gpus and (kind != "slurm" or profile.gpu_request == "gpus-per-node"):
        params["gpus_per_node"] = gpus
    partition = req.partition or (profile.partition if gpus else (profile.cpu_partition or profile.partition))
    if partition:
        params["slurm_partition"] = partition
    extra = dict(profile.sbatch_extras())
    if gpus and profile.gpu_request == "gres":
        extra["gres"] = f"gpu:{profile.gpu_type}:{gpus}" if profile.gpu_type else f"gpu:{gpus}"
    for key in ("account", "qos", "constraint"):
        if getattr(profile, key):
            extra[key] = getattr(profile, key)
    if after:
        # afterany:ID runs after ID whatever its end; a plain list means afterok.
        kind, ids = (after[0].split(":", 1)[0], [a.split(":", 1)[1] for a in after]) \
            if after[0].startswith("afterany:") else ("afterok", after)
        extra["dependency"] = f"{kind}:" + ":".join(ids)
        # A failed dependency cancels the dependant instead of leaving it PENDING forever.
        extra["kill_on_invalid_dep"] = "yes"
    if req.hold:
        extra["hold"] = True
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def _setup_lines(profile: ClusterProfile) -> list[str]:
    lines = list(profile.setup)
    lines += [f"export {key}={shlex.quote(value)}" for key, value in profile.env.items()
              if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key)]
    return lines


def make_executor(kind: str, folder: Path, profile: ClusterProfile, req: Request, after: list[str] = ()):
    import submitit
    check_safe_path(folder, "run folder")
    options = {"slurm_max_num_timeout": MAX_REQUEUES}
    if profile.python:
        options["slurm_python"] = profile.python
    ex = submitit.AutoExecutor(folder=folder, cluster=kind, **(options if kind == "slurm" else {}))
    params = _parameters(kind, profile, req, list(after))
    params["slurm_setup"] = [*private_folder_check(folder), *params["slurm_setup"]]
    ex.update_parameters(**params)
    return ex


# Files a job writes are never group- or other-writable: its requeue pickle included, which
# the next attempt's check would otherwise refuse (srun hands the umask on to the tasks).
JOB_UMASK = 0o027


def private_folder_check(folder: Path) -> list[str]:
    """Shell lines that stop a job before submitit unpickles ``folder/*_submitted.pkl`` when
    the run folder, ``folder`` or a pickle there is writable by group or others, or is not
    the job owner's: whoever can write there would run code as the job's owner."""
    run_dir, slurm_dir = shlex.quote(str(folder.parent)), shlex.quote(str(folder))
    return [
        f"umask {JOB_UMASK:03o}",
        # The paths reach the message only as "$d" / "$f": expanded, never evaluated again.
        f"d={run_dir}; s={slurm_dir}; "
        'for f in "$d" "$s" "$s"/*_submitted.pkl; do [ -e "$f" ] || continue; '
        'if [ -n "$(find "$f" -maxdepth 0 \\( -perm /022 -o ! -user "$(id -u)" \\) -print)" ]; then '
        'echo "slurmtune: refusing to start: $f is writable by others or not yours; whoever can write '
        'there runs code as you (fix: chmod -R go-w $d, or start a new run)" >&2; exit 1; fi; done',
    ]


def folder_problems(*paths: Path) -> list[str]:
    """What the job-start check would refuse, checked in Python (the local executor, resubmission)."""
    found = []
    for path in [*paths, *(p for folder in paths[1:] if folder.is_dir() for p in sorted(folder.glob("*_submitted.pkl")))]:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if st.st_uid != os.getuid():
            found.append(f"{path} belongs to another user (uid {st.st_uid}); whoever can write there runs code as you")
        elif st.st_mode & 0o022:
            found.append(f"{path} is writable by group or others (mode {st.st_mode & 0o7777:04o}); "
                         "whoever can write there runs code as you")
    return found


def submit(kind: str, folder: Path, profile: ClusterProfile, req: Request, fn: Callable,
           after: list[str] = (), items: list | None = None) -> Submitted:
    """Submit ``fn()`` (or ``fn(item)`` for each of ``items`` as one array job)."""
    problems = folder_problems(folder.parent, folder)
    if problems:
        raise UsageError(f"{problems[0]}; fix: chmod -R go-w {folder.parent} (or start a new run)")
    ex = make_executor(kind, folder, profile, req, after)
    umask = os.umask(JOB_UMASK)  # the pickles; a local job's process inherits it
    try:
        if items is not None and kind == "slurm":
            jobs = _retrying(lambda: ex.map_array(fn, items))
        elif items is not None:
            jobs = [ex.submit(fn, item) for item in items]
        else:
            jobs = [_retrying(lambda: ex.submit(fn))]
    finally:
        os.umask(umask)
    ids = [str(j.job_id) for j in jobs]
    if kind == "slurm" and items is not None:
        ids = sorted({i.split("_")[0] for i in ids})
    script = folder / f"{ids[0]}_submission.sh" if kind == "slurm" else None
    return Submitted(ids, str(script) if script and script.exists() else None, jobs)


def _retrying(action: Callable):
    """sbatch with bounded exponential backoff on transient controller errors."""
    delay = 1.0
    for attempt in range(1, SUBMIT_RETRIES + 1):
        try:
            return action()
        except (subprocess.CalledProcessError, OSError, RuntimeError) as e:
            message = _error_text(e)
            if attempt == SUBMIT_RETRIES or not TRANSIENT.search(message):
                raise SchedulerError(f"sbatch failed: {message.strip().splitlines()[-1] if message.strip() else e}") from None
            print(f"sbatch: {message.strip()[:200]}; retrying in {delay:.0f} s ({attempt}/{SUBMIT_RETRIES})",
                  file=sys.stderr)
            time.sleep(delay)
            delay = min(delay * 2, 30)


def _error_text(e: Exception) -> str:
    parts = [str(e)]
    for attr in ("stderr", "output"):
        value = getattr(e, attr, None)
        if value:
            parts.append(value.decode() if isinstance(value, bytes) else str(value))
    return "\n".join(parts)


def render_script(folder: Path, profile: ClusterProfile, req: Request, after: list[str] = (),
                  array: bool = False) -> str:
    """The sbatch script a submission would write, without submitting (for --dry-run)."""
    ex = make_executor("slurm", folder, profile, req, after)._executor
    if array and req.array_size:
        ex.parameters["map_count"] = req.array_size
    return ex._make_submission_file_text(ex._submitit_command_str, "DRYRUN")


# --- inside a job -----------------------------------------------------------------------

def resubmission(job: Callable, *args, **kwargs):
    """What a job's ``checkpoint()`` returns: call ``job`` again, with the same arguments (an
    array task's item), after the requeue."""
    import submitit
    return submitit.helpers.DelayedSubmission(job, *args, **kwargs)


def requeue_current_job() -> bool:
    """Ask SLURM to requeue the job this process runs in; False when not under SLURM."""
    job_id = current_job_id()
    if not job_id or not shutil.which("scontrol"):
        return False
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                            timeout=COMMAND_TIMEOUT_S)
    return result.returncode == 0


# --- queries ----------------------------------------------------------------------------

@dataclass
class JobState:
    job_id: str
    state: str  # PENDING RUNNING COMPLETED FAILED CANCELLED TIMEOUT PREEMPTED NODE_FAIL OUT_OF_MEMORY LOST
    exit_code: str = ""
    elapsed_s: int = 0
    restarts: int = 0
    reason: str = ""
    source: str = "sacct"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


def job_states(job_ids: list[str]) -> dict[str, JobState]:
    """States of many jobs (array tasks included) from ONE sacct call; squeue/scontrol
    answer when sacct cannot, and a job nobody knows any more is LOST."""
    if not job_ids:
        return {}
    states: dict[str, JobState] = {}
    try:
        states = _sacct(job_ids)
    except (subprocess.SubprocessError, OSError, SchedulerError):
        states = {}
    missing = [j for j in job_ids if not any(k == j or k.startswith(f"{j}_") for k in states)]
    if missing:
        for jid, st in _squeue(missing).items():
            states.setdefault(jid, st)
    for jid in job_ids:
        if not any(k == jid or k.startswith(f"{jid}_") for k in states):
            states[jid] = JobState(jid, "LOST", source="none")
    return states


def _sacct(job_ids: list[str]) -> dict[str, JobState]:
    # -D lists every run of a requeued job, so restarts can be counted.
    result = _run(["sacct", "-n", "-P", "-X", "-D", "-j", ",".join(job_ids),
                   "-o", "JobID,State,ExitCode,ElapsedRaw,Reason"])
    if result.returncode != 0:
        raise SchedulerError(result.stderr.strip() or "sacct failed")
    states: dict[str, JobState] = {}
    for line in result.stdout.splitlines():
        parts = line.split("|")
        if len(parts) < 5:
            continue
        jid, state, exit_code, elapsed, reason = parts[:5]
        state = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
        if "[" in jid:  # an array whose tasks have not started, e.g. 12_[0-3%2]
            base = jid.split("_")[0]
            states.setdefault(base, JobState(base, state, exit_code, 0, 0, reason))
            continue
        prev = states.get(jid)
        restarts = (prev.restarts + 1) if prev else 0
        states[jid] = JobState(jid, state, exit_code, int(elapsed or 0), restarts, reason)
    return states


def _squeue(job_ids: list[str]) -> dict[str, JobState]:
    states: dict[str, JobState] = {}
    try:
        result = _run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%M|%r"])
    except (subprocess.SubprocessError, OSError):
        return states
    for line in result.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 4:
            states[parts[0]] = JobState(parts[0], parts[1], "", _hms(parts[2]), 0, parts[3], "squeue")
    for jid in job_ids:  # recently ended jobs are still known to the controller
        if jid in states:
            continue
        try:
            shown = _run(["scontrol", "show", "job", "-o", jid])
        except (subprocess.SubprocessError, OSError):
            continue
        fields = dict(kv.split("=", 1) for kv in shown.stdout.split() if "=" in kv)
        if "JobState" in fields:
            states[jid] = JobState(jid, fields["JobState"], fields.get("ExitCode", ""),
                                   _hms(fields.get("RunTime", "0")), int(fields.get("Restarts", 0)),
                                   fields.get("Reason", ""), "scontrol")
    return states


def _hms(text: str) -> int:
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":") if p.isdigit()]
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + p
    return seconds + int(days or 0) * 86400


def time_left(job_id: str) -> int | None:
    """Seconds a running job has left before its time limit (squeue), None when unknown."""
    try:
        result = _run(["squeue", "-h", "-j", job_id, "-o", "%L"])
    except (subprocess.SubprocessError, OSError):
        return None
    text = result.stdout.strip()
    return _hms(text) if result.returncode == 0 and text and text[0].isdigit() else None


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        _run(["scancel", *job_ids])


# --- cluster facts, for checks before anything is queued -------------------------------

@dataclass
class Partition:
    name: str
    max_time_min: int | None
    nodes: list[str]
    gpus_per_node: int
    state: str
    default: bool = False


def partitions() -> dict[str, Partition]:
    cmd = ["scontrol", "show", "partition", "-o"]
    try:
        result = _run(cmd)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SchedulerError(_unreachable(cmd, str(e))) from None
    if result.returncode != 0:
        raise SchedulerError(_unreachable(cmd, result.stderr))
    gpus = _gpus_per_node()
    found = {}
    for line in result.stdout.splitlines():
        f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        name = f.get("PartitionName")
        if not name:
            continue
        nodes = _expand_nodes(f.get("Nodes", ""))
        found[name] = Partition(name, _minutes(f.get("MaxTime", "UNLIMITED")), nodes,
                                max((gpus.get(n, 0) for n in nodes), default=0), f.get("State", "UP"),
                                f.get("Default") == "YES")
    return found


def _unreachable(cmd: list[str], error: str) -> str:
    """One line for a controller that does not answer (scontrol prints resolver noise)."""
    lines = [re.sub(r"^\w+: error: ", "", line.strip()) for line in error.splitlines() if line.strip()]
    # scontrol retries the resolver a dozen times before the line that says what failed
    said = next((line for pattern in (r"Unable to (resolve|contact)", r"Unable|refused|timed out")
                 for line in lines if re.search(pattern, line)), lines[-1] if lines else "no answer")
    conf = os.environ.get("SLURM_CONF", "the default slurm.conf")
    return (f"the SLURM controller did not answer `{' '.join(cmd)}` ({said[:160]}); check it is up and that "
            f"{conf} names it (run from a login node), or use --executor local")


def _gpus_per_node() -> dict[str, int]:
    result = _run(["sinfo", "-h", "-N", "-o", "%N|%G"])
    gpus = {}
    for line in result.stdout.splitlines():
        node, _, gres = line.partition("|")
        m = re.search(r"gpu(?::[^:,()]+)?:(\d+)", gres)
        gpus[node] = max(gpus.get(node, 0), int(m.group(1)) if m else 0)
    return gpus


def _expand_nodes(text: str) -> list[str]:
    if not text or text == "(null)":
        return []
    result = _run(["scontrol", "show", "hostnames", text])
    return result.stdout.split() if result.returncode == 0 else [text]


def _minutes(text: str) -> int | None:
    if text in ("UNLIMITED", "INFINITE", ""):
        return None
    return _hms(text + (":00" if text.count(":") == 1 and "-" not in text else "")) // 60 \
        if ":" in text else int(text)


def max_array_size() -> int:
    result = _run(["scontrol", "show", "config"])
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", result.stdout, re.MULTILINE)
    return int(m.group(1)) if m else 1001


def test_only(profile: ClusterProfile, partition: str | None, gpus: int) -> tuple[bool, str]:
    """Would sbatch accept this account/qos/partition? (``sbatch --test-only``: nothing is queued)"""
    cmd = ["sbatch", "--test-only", "--time=1", "--wrap=true"]
    for flag, value in (("--partition", partition), ("--account", profile.account), ("--qos", profile.qos),
                        ("--constraint", profile.constraint)):
        if value:
            cmd.append(f"{flag}={value}")
    if gpus:
        cmd.append(f"--gres=gpu:{gpus}" if profile.gpu_request == "gres" else f"--gpus-per-node={gpus}")
    result = _run(cmd)
    text = (result.stderr or result.stdout).strip()
    return result.returncode == 0, text.splitlines()[-1] if text else ""


# --- for `slurmtune doctor` -------------------------------------------------------------

SLURM_COMMANDS = ("sbatch", "squeue", "sacct", "scontrol", "sinfo", "scancel")


def missing_commands() -> list[str]:
    return [c for c in SLURM_COMMANDS if shutil.which(c) is None]


def accounting_works() -> tuple[bool, str]:
    try:
        result = _run(["sacct", "-n", "-X", "-S", "now-1hours", "-o", "JobID", "--noconvert"])
    except (subprocess.SubprocessError, OSError) as e:
        return False, str(e)
    return result.returncode == 0, (result.stderr or "").strip()


def free_gpus() -> dict[str, tuple[int, int]]:
    """Per partition: (free GPUs, total GPUs) over its nodes that are up."""
    result = _run(["scontrol", "show", "node", "-o"])
    nodes = {}
    for line in result.stdout.splitlines():
        f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        total = re.search(r"gpu(?::[^:,()]+)?:(\d+)", f.get("Gres", ""))
        used = re.search(r"gres/gpu=(\d+)", f.get("AllocTRES", ""))
        up = not re.search(r"DOWN|DRAIN|FAIL", f.get("State", ""))
        nodes[f.get("NodeName")] = (int(total.group(1)) if total else 0, int(used.group(1)) if used else 0, up)
    found = {}
    for name, part in partitions().items():
        total = sum(nodes.get(n, (0, 0, False))[0] for n in part.nodes if nodes.get(n, (0, 0, False))[2])
        used = sum(nodes.get(n, (0, 0, False))[1] for n in part.nodes if nodes.get(n, (0, 0, False))[2])
        found[name] = (total - used, total)
    return found


def config_value(key: str) -> str | None:
    result = _run(["scontrol", "show", "config"])
    m = re.search(rf"^{re.escape(key)}\s*=\s*(.*)$", result.stdout, re.MULTILINE)
    return m.group(1).strip() if m else None


# --- names and paths that scripts can hold ------------------------------------------

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, default: str = "run") -> str:
    """A job or run name that is safe in any shell line and SLURM field."""
    return _UNSAFE_NAME.sub("-", text).strip("-.")[:64] or default


def check_safe_path(path: str | os.PathLike, what: str = "path") -> None:
    """Paths end up in ``#SBATCH`` lines: a newline would start a new script line and
    '%' is a SLURM file-name pattern. Everything else (spaces, quotes, $(...)) is quoted."""
    text = str(path)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise UsageError(f"{what} {text!r} contains a newline or control character; "
                         "SLURM scripts cannot hold it safely: choose another folder")
    if "%" in text:
        raise UsageError(f"{what} {text!r} contains '%', which SLURM expands in log file names; "
                         "choose another folder")


def current_job_id() -> str | None:
    """The SLURM job (or array task, ``ARRAY_TASK``) this process runs in, if any."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")
