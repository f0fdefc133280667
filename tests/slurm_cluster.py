"""Access to the single-node SLURM test cluster (env/test-cluster/start.sh).

Usage in a test module::

    from slurm_cluster import slurm_cluster, wait_for_state  # noqa: F401

    @pytest.mark.slurm
    def test_something(slurm_cluster):          # slurm_cluster is an env dict
        subprocess.run(["sbatch", ...], env=slurm_cluster, check=True)

The cluster is started at most once per process and never stopped here: other
test processes may share it (run env/test-cluster/stop.sh to end it).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
START_SCRIPT = REPO_ROOT / "env" / "test-cluster" / "start.sh"
# A cold start installs ~200 MB of packages; leave room for a slow mirror.
START_TIMEOUT_S = 900

EXPORT_PREFIX = "export SLURM_CONF="

# Job states after which a job does not run again on its own.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


class ClusterStartError(RuntimeError):
    """start.sh failed; the message ends with the tail of its output."""


_lock = threading.Lock()
_result: dict[str, str] | ClusterStartError | None = None


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _start() -> dict[str, str]:
    try:
        proc = subprocess.run(
            ["bash", str(START_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterStartError(f"{START_SCRIPT} could not run: {exc}") from exc
    output = _tail(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise ClusterStartError(
            f"{START_SCRIPT} exited with {proc.returncode}:\n{output}"
        )
    lines = proc.stdout.strip().splitlines()
    last = lines[-1] if lines else ""
    if not last.startswith(EXPORT_PREFIX):
        raise ClusterStartError(
            f"{START_SCRIPT} did not end with '{EXPORT_PREFIX}...':\n{output}"
        )
    env = os.environ.copy()
    env["SLURM_CONF"] = last[len(EXPORT_PREFIX):].strip()
    return env


def ensure_cluster() -> dict[str, str]:
    """Start the test cluster (once per process) and return an env for subprocesses.

    Also sets ``os.environ["SLURM_CONF"]`` so that in-process users such as
    submitit find the cluster. Raises ClusterStartError if it cannot start
    (the failure is remembered: later calls raise it again without retrying).
    """
    global _result
    with _lock:
        if _result is None:
            try:
                _result = _start()
            except ClusterStartError as exc:
                _result = exc
        if isinstance(_result, ClusterStartError):
            raise _result
        os.environ["SLURM_CONF"] = _result["SLURM_CONF"]
        return dict(_result)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Session fixture: the env dict (with SLURM_CONF) of the running test cluster.

    Skips when the cluster cannot start, except on CI (CI=true) where that
    is a failure.
    """
    try:
        env = ensure_cluster()
    except ClusterStartError as exc:
        error = exc
    else:
        error = None
    # (outside the except block, so the report is not an exception chain)
    if error is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"SLURM test cluster did not start: {error}", pytrace=False)
        pytest.skip(f"SLURM test cluster unavailable: {error}")
    # A 1-minute limit ends a job 60-90 s after it starts (limits are checked about every 30 s):
    # submitted with the first cluster test, it has timed out long before test_test_cluster asks.
    timeout_job = _sbatch(env, "--time=1", "-J", "timeout-check", "-o", os.devnull, "--wrap", "sleep 600")
    EARLY_JOBS["timeout"] = timeout_job
    yield env
    subprocess.run(["scancel", timeout_job], capture_output=True, env=env)


EARLY_JOBS: dict[str, str] = {}  # jobs the session fixture submits first: name -> job id


def _sbatch(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env, check=True)
    return proc.stdout.strip().split(";")[0]  # "<id>[;<cluster>]"


def _states(cmd: list[str], env: dict[str, str]) -> list[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # e.g. squeue on a job slurmctld already forgot
        return []
    # "CANCELLED by 0" -> "CANCELLED"; one line per job (or array task).
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def job_states(job_id: str | int, env: dict[str, str] | None = None) -> list[str]:
    """Current state(s) of a job: one entry per array task, [] if unknown yet.

    Reads sacct. Falls back to squeue when slurmctld knows more rows than
    accounting does: a job not yet in the database, pending array tasks, or
    the moment after an array ends when sacct briefly shows a single row.
    """
    env = env if env is not None else os.environ.copy()
    accounted = _states(
        ["sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", "State"], env
    )
    # -t all: include finished jobs (kept for MinJobAge); -r: a row per task.
    live = _states(["squeue", "-h", "-r", "-t", "all", "-j", str(job_id), "-o", "%T"], env)
    return live if len(live) > len(accounted) else accounted


def wait_for_state(
    job_id: str | int,
    states: str | Iterable[str] = TERMINAL_STATES,
    timeout_s: float = 60,
    env: dict[str, str] | None = None,
    poll_s: float = 0.5,
) -> str:
    """Poll until the job's state is in ``states`` and return that state.

    For a job array, waits until every task is in ``states`` and returns the
    first task's state. Raises TimeoutError (with the last state seen).
    """
    wanted = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while True:
        seen = job_states(job_id, env)
        if seen and all(state in wanted for state in seen):
            return seen[0]
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"job {job_id} not in {sorted(wanted)} after {timeout_s} s "
                f"(last seen: {seen or 'unknown'})"
            )
        time.sleep(poll_s)
