"""The SLURM test cluster (env/test-cluster) behaves like a real cluster.

These run real jobs. The time-limit job is submitted when the session's first cluster test
starts the cluster (slurm_cluster.py), so its 60-90 s wait overlaps the other tests.
"""

import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from slurm_cluster import EARLY_JOBS, wait_for_state  # noqa: E402

pytestmark = pytest.mark.slurm


def run(cmd, env, check=True):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc


def sbatch(env, *args):
    """Submit a job, return its id."""
    out = run(["sbatch", "--parsable", *args], env).stdout.strip()
    return out.split(";")[0]  # "<id>[;<cluster>]"


def sacct(job_id, env, fields, duplicates=False):
    """Allocation rows (no steps) of a job as dicts; with duplicates, every requeued run."""
    cmd = ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", ",".join(fields)]
    if duplicates:
        cmd.append("-D")
    lines = run(cmd, env).stdout.splitlines()
    return [dict(zip(fields, line.split("|"))) for line in lines if line]


def assert_sacct(job_id, env, expected, timeout_s=15):
    """sacct's rows of a job equal ``expected`` within ``timeout_s``: slurmdbd records a job's end
    (and, for a short job, its partition and QOS) moments after the controller reports it."""
    fields = list(expected[0])
    deadline = time.monotonic() + timeout_s
    while (rows := sacct(job_id, env, fields)) != expected:
        assert time.monotonic() < deadline, rows
        time.sleep(0.5)


def wait_for_file_text(path, text, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.3)
    content = path.read_text() if path.exists() else "<no file>"
    raise AssertionError(f"{text!r} not in {path} after {timeout_s} s: {content!r}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm-jobs")


@pytest.fixture(scope="module")
def submitted(slurm_cluster):
    """Job ids submitted by this module; whatever still runs at the end is cancelled."""
    ids = []
    yield ids
    if ids:
        run(["scancel", *ids], slurm_cluster, check=False)


@pytest.fixture(scope="module")
def timeout_job(slurm_cluster):
    """A job with a 1-minute limit that would sleep 10 minutes, submitted when the cluster came up."""
    return EARLY_JOBS["timeout"]


def test_job_completes(slurm_cluster, workdir, submitted):
    out = workdir / "hello.out"
    job_id = sbatch(slurm_cluster, "-o", str(out), "--wrap", "echo hi")
    submitted.append(job_id)
    assert wait_for_state(job_id, timeout_s=60, env=slurm_cluster) == "COMPLETED"
    assert_sacct(job_id, slurm_cluster, [{"State": "COMPLETED", "ExitCode": "0:0"}])
    assert out.read_text().strip() == "hi"


def test_failing_job_reports_exit_code(slurm_cluster, workdir, submitted):
    job_id = sbatch(slurm_cluster, "-o", str(workdir / "fail.out"), "--wrap", "exit 3")
    submitted.append(job_id)
    assert wait_for_state(job_id, timeout_s=60, env=slurm_cluster) == "FAILED"
    assert_sacct(job_id, slurm_cluster, [{"State": "FAILED", "ExitCode": "3:0"}])


def test_fake_gpus(slurm_cluster, workdir, submitted):
    out = workdir / "gpu.out"
    job_id = sbatch(
        slurm_cluster, "-p", "gpu", "--gres=gpu:1", "-o", str(out),
        "--wrap", 'echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"',
    )
    submitted.append(job_id)
    assert wait_for_state(job_id, timeout_s=60, env=slurm_cluster) == "COMPLETED"
    assert out.read_text().strip() == "CUDA_VISIBLE_DEVICES=0"

    # The node has two GPUs: asking for three is refused at submission.
    proc = run(["sbatch", "--gres=gpu:3", "--wrap", "true"], slurm_cluster, check=False)
    assert proc.returncode != 0
    assert "Requested node configuration is not available" in proc.stderr


def test_partitions_account_and_qos(slurm_cluster, workdir, submitted):
    def test_only(*args):
        return run(["sbatch", "--test-only", *args, "--wrap", "true"], slurm_cluster, check=False)

    ok = test_only("--account", "testacct", "--qos", "campus-gpu")
    assert ok.returncode == 0, ok.stderr
    assert test_only("-p", "gpu", "--time=120").returncode == 0
    # EnforcePartLimits=ALL: over the partition's MaxTime is refused, not left pending.
    assert test_only("-p", "debug", "--time=61").returncode != 0

    # Associations are not enforced (unknown accounts/QOS are accepted), but
    # the ones that exist are recorded in accounting.
    job_id = sbatch(
        slurm_cluster, "-p", "gpu", "--account", "testacct", "--qos", "campus-gpu",
        "-o", str(workdir / "acct.out"), "--wrap", "true",
    )
    submitted.append(job_id)
    assert wait_for_state(job_id, timeout_s=60, env=slurm_cluster) == "COMPLETED"
    # For a job this short, slurmdbd may briefly hold a record without the
    # partition and with QOS "Unknown"; the start message completes it.
    assert_sacct(job_id, slurm_cluster, [{"Partition": "gpu", "Account": "testacct", "QOS": "campus-gpu"}])


def test_requeue_restarts_job(slurm_cluster, workdir, submitted):
    out = workdir / "requeue.out"
    script = workdir / "requeue.sh"
    script.write_text(
        "#!/bin/bash\n"
        'echo "run restart=${SLURM_RESTART_COUNT:-0}"\n'
        '[ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] && exit 0\n'
        "sleep 600\n"
    )
    # append: keep the first run's output when the job starts again.
    job_id = sbatch(slurm_cluster, "--open-mode=append", "-o", str(out), str(script))
    submitted.append(job_id)
    wait_for_file_text(out, "run restart=0", timeout_s=60)

    run(["scontrol", "requeue", job_id], slurm_cluster)
    show = run(["scontrol", "show", "job", job_id], slurm_cluster).stdout
    assert "Restarts=1" in show

    # cred_expire=10 lets the requeued job start again after ~12 s (not ~121 s).
    assert wait_for_state(job_id, timeout_s=60, env=slurm_cluster) == "COMPLETED"
    # (slurmstepd also writes a "CANCELLED ... DUE TO JOB REQUEUE" line there)
    runs_seen = [line for line in out.read_text().splitlines() if line.startswith("run ")]
    assert runs_seen == ["run restart=0", "run restart=1"]
    runs = sacct(job_id, slurm_cluster, ["State"], duplicates=True)
    assert [r["State"] for r in runs] == ["REQUEUED", "COMPLETED"]


def test_time_limit_gives_timeout(slurm_cluster, timeout_job):
    # Limits are checked about every 30 s: a 1-minute limit ends at ~60-90 s
    # after the start, and this job was submitted when the cluster came up.
    assert wait_for_state(timeout_job, timeout_s=150, env=slurm_cluster) == "TIMEOUT"
    assert_sacct(timeout_job, slurm_cluster, [{"State": "TIMEOUT", "Timelimit": "00:01:00"}])
