"""SLURM jobs on the real test cluster: submission, chains, failure, status, quoting, secrets."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, REPO, write_jsonl
from slurm_cluster import wait_for_state
from slurmtune.cluster.profiles import load_profile
from slurmtune.runs.folder import Run, recent_runs
from slurmtune.cluster.slurm import Request, render_script

pytestmark = pytest.mark.slurm
SAMPLE = EXAMPLES / "speechgradebook" / "exported.json"


def manifest(tmp_path, body: str, name="m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


def convert_manifest(tmp_path, runs_dir, extra: str = "") -> Path:
    return manifest(tmp_path, f"""
name: chain
output_dir: {json.dumps(str(runs_dir))}
data:
  format: speechgradebook
  inputs: [{json.dumps(str(SAMPLE))}]
  split: 0.8
model:
  path: {json.dumps(str(tmp_path / 'tiny'))}
  tiny_arch: llama
slurm:
  time_min: 10
  gpus: 0
{extra}""")


def newest_run(runs_dir) -> Run:
    """The newest run folder, dry runs included (Run.open(None) never picks those)."""
    return recent_runs(runs_dir)[0]


def wait_run(cli, run: Run, timeout_s=120, done=("COMPLETED", "FAILED")) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = json.loads(cli("status", run.dir, "--json").out)
        if status["state"] in done or time.monotonic() > deadline:
            return status
        time.sleep(1)


def test_golden_sbatch_script():
    """The rendered script is recorded: any change to quoting or flags shows up in review."""
    text = render_script(Path("/shared/runs/demo-1/slurm"), load_profile("campus-example"),
                         Request("demo-train", 240, gpus_per_node=1), after=["101", "102"])
    text = text.replace(sys.executable, "PYTHON")
    assert text == (REPO / "tests" / "golden" / "train-campus.sbatch").read_text()


def test_one_job_runs_and_status_reattaches(slurm_cluster, cli, tmp_path):
    runs = tmp_path / "runs"
    r = cli("submit", "convert", convert_manifest(tmp_path, runs), "--cluster", "local-test")
    assert r.code == 0, r.err
    assert re.search(r"convert: job \d+", r.out)
    run = newest_run(runs)
    job_id = run.step("convert").job_ids[0]
    assert wait_for_state(job_id, timeout_s=90, env=slurm_cluster) == "COMPLETED"
    # a later shell: only the run id is needed
    status = json.loads(cli("status", run.run_id, "--root", runs, "--json").out)
    assert status["steps"][0]["state"] == "COMPLETED" and status["state"] == "COMPLETED"
    summary = json.loads((run.dir / "data" / "summary.json").read_text())
    assert summary["read"] == 48 and summary["written"] == 42
    assert (run.slurm_dir / f"{job_id}_submission.sh").is_file()
    assert (run.dir / "status" / "convert.json").is_file()
    logs = cli("logs", run.dir, "convert")
    assert "speechgradebook: read 48, written 42" in logs.out


def test_a_failing_middle_step_cancels_the_rest(slurm_cluster, cli, tmp_path):
    bad_eval = write_jsonl(tmp_path / "eval.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    m = convert_manifest(tmp_path, tmp_path / "runs", extra="""eval:
  shards: 2
""")
    text = m.read_text().replace("  split: 0.8\n", f"  split: 0.8\n  eval_file: {json.dumps(str(bad_eval))}\n")
    m.write_text(text)
    r = cli("run", m, "--cluster", "local-test")
    assert r.code == 0, r.err
    run = newest_run(tmp_path / "runs")
    assert [s.name for s in run.record.steps] == ["convert", "validate", "train", "eval", "report"]
    status = wait_run(cli, run, timeout_s=400, done=("FAILED",))
    states = {s["step"]: s for s in status["steps"]}
    deadline = time.monotonic() + 60
    while any(states[n]["state"] == "PENDING" for n in ("train", "eval", "report")) and time.monotonic() < deadline:
        time.sleep(2)  # kill_on_invalid_dep acts on the next scheduling pass
        states = {s["step"]: s for s in json.loads(cli("status", run.dir, "--json").out)["steps"]}
    assert states["convert"]["state"] == "COMPLETED"
    assert states["validate"]["state"] == "FAILED"
    assert "messages: no assistant turn" in states["validate"]["error"]
    assert states["validate"]["log"] and Path(states["validate"]["log"]).is_file()
    for later in ("train", "eval", "report"):
        assert states[later]["state"] == "CANCELLED", states[later]
        assert states[later]["error"] == "not run: step validate failed"
    ids = ",".join(j for s in run.record.steps for j in s.job_ids)
    deadline = time.monotonic() + 60  # the failed job may still be COMPLETING after it reported itself
    while True:
        out = subprocess.run(["squeue", "-h", "-o", "%i %T %r", "-j", ids],
                             capture_output=True, text=True, env=slurm_cluster).stdout
        if not out.strip() or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert out.strip() == ""  # nothing left PENDING on DependencyNeverSatisfied
    table = cli("status", run.dir)
    assert table.code == 1 and "validate   FAILED" in table.out


def test_status_after_external_scancel(slurm_cluster, cli, tmp_path):
    r = cli("run", convert_manifest(tmp_path, tmp_path / "runs"), "--cluster", "local-test")
    assert r.code == 0, r.err
    run = newest_run(tmp_path / "runs")
    validate_id = run.step("validate").job_ids[0]
    subprocess.run(["scancel", validate_id], check=True, env=slurm_cluster)
    wait_for_state(validate_id, timeout_s=60, env=slurm_cluster)
    deadline = time.monotonic() + 120
    while True:  # SLURM cancels the dependants itself, one scheduling pass per level
        status = json.loads(cli("status", run.dir, "--json").out)
        states = {s["step"]: s["state"] for s in status["steps"]}
        if states["report"] != "PENDING" or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert states["validate"] == "CANCELLED" and status["state"] == "FAILED"
    assert states["train"] == states["eval"] == states["report"] == "CANCELLED"


def test_dry_run_submits_nothing(slurm_cluster, cli, tmp_path):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=slurm_cluster).stdout
    r = cli("run", convert_manifest(tmp_path, tmp_path / "runs"), "--cluster", "local-test", "--dry-run")
    assert r.code == 0, r.err
    assert "#SBATCH --array=0-0%1" in r.out and "#SBATCH --dependency=afterok:<train>" in r.out.replace("'", "")
    run = newest_run(tmp_path / "runs")
    assert run.record.dry_run and all(not s.job_ids for s in run.record.steps)
    assert all(Path(s.script).is_file() for s in run.record.steps)
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=slurm_cluster).stdout
    assert set(after.split()) <= set(before.split())
    assert not list(run.slurm_dir.glob("*_submitted.pkl"))


WEIRD = "we ird 'q\" $(touch PWNED1) `touch PWNED2` ;touch PWNED3"


def test_weird_paths_never_execute_anything(slurm_cluster, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / WEIRD / "runs"
    r = cli("submit", "convert", convert_manifest(tmp_path, runs, ), "--cluster", "local-test")
    assert r.code == 0, r.err
    run = newest_run(runs)
    assert wait_for_state(run.step("convert").job_ids[0], timeout_s=90, env=slurm_cluster) == "COMPLETED"
    assert (run.dir / "data" / "train.jsonl").is_file()
    found = subprocess.run(["find", str(tmp_path), "/tmp", str(REPO), "-maxdepth", "3", "-name", "PWNED*"],
                           capture_output=True, text=True).stdout
    assert found == ""
    newline = tmp_path / "bad\nname"
    r = cli("submit", "convert", convert_manifest(tmp_path, newline, ), "--cluster", "local-test")
    assert r.code == 2 and "contains a newline or control character" in r.err


def test_secrets_never_reach_scripts_run_folders_or_logs(slurm_cluster, cli, tmp_path, monkeypatch):
    secret = "hf_SECRETVALUEthatmustneverleak123456"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-987654321")
    r = cli("submit", "convert", convert_manifest(tmp_path, tmp_path / "runs"), "--cluster", "local-test")
    assert r.code == 0
    run = newest_run(tmp_path / "runs")
    wait_for_state(run.step("convert").job_ids[0], timeout_s=90, env=slurm_cluster)
    for path in run.dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data and b"wandb-secret" not in data, path
    bad = tmp_path / "leaky.yaml"
    bad.write_text("env:\n  HF_TOKEN: hf_abcdefghijklmnopqrstuvwxyz\n")
    r = cli("run", convert_manifest(tmp_path, tmp_path / "runs"), "--cluster", str(bad))
    assert r.code == 2 and "env.HF_TOKEN: looks like a secret" in r.err


@pytest.mark.parametrize("overrides, message", [
    (["slurm.gpus=2"], "train: 2 GPUs requested but QLoRA trains on one GPU"),
    (["slurm.time_min=100"], "train: 100 min is above partition debug's MaxTime of 60 min"),
    (["eval.shards=1500", "data.eval_file=" + str(EXAMPLES / "course_assistant/eval/style_benchmark.jsonl")],
     "eval: an array of 1500 tasks is above the cluster's MaxArraySize of 1001"),
    (["distributed.gpus_per_node=4", "train.method=lora"],
     "train: 4 GPUs per node requested but partition debug's nodes have 2"),
    (["data.inputs=[/nonexistent/exported.json]"], "data.inputs[0]: /nonexistent/exported.json: no such file"),
    (["model.attn_implementation=flex_attention"],
     "model.attn_implementation=flex_attention trains on GPUs only (it has no backward pass on CPU)"),
    (["model.attn_implementation=flash_attention_2", "slurm.gpus=1"],
     "model.attn_implementation=flash_attention_2 needs the flash-attn package"),
])
def test_impossible_requests_fail_at_once(slurm_cluster, cli, tmp_path, overrides, message):
    m = convert_manifest(tmp_path, tmp_path / "runs")
    start = time.monotonic()
    r = cli("run", m, *overrides, "train.method=qlora", "--cluster", "local-test") \
        if "train.method=lora" not in overrides else cli("run", m, *overrides, "--cluster", "local-test")
    assert r.code == 1 and message in r.err, r.err
    assert "not submitted" in r.err and time.monotonic() - start < 10
    assert not (tmp_path / "runs").exists()


def _fake_bin(tmp_path, name: str, body: str) -> Path:
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    path = bindir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bindir


def test_transient_sbatch_failures_are_retried(slurm_cluster, cli, tmp_path, monkeypatch):
    real = subprocess.run(["which", "sbatch"], capture_output=True, text=True).stdout.strip()
    counter = tmp_path / "calls"
    bindir = _fake_bin(tmp_path, "sbatch", f"""n=$(cat {counter} 2>/dev/null || echo 0); echo $((n+1)) > {counter}
if [ "$n" -lt 2 ]; then echo "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation" >&2; exit 1; fi
exec {real} "$@"
""")
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr("slurmtune.cluster.slurm.time.sleep", lambda s: None)
    r = cli("submit", "convert", convert_manifest(tmp_path, tmp_path / "runs"), "--cluster", "local-test")
    assert r.code == 0, r.err
    assert counter.read_text().strip() == "3"
    assert r.err.count("retrying in") == 2


def test_status_without_sacct_falls_back_and_reports_lost_jobs(slurm_cluster, cli, tmp_path, monkeypatch):
    r = cli("submit", "convert", convert_manifest(tmp_path, tmp_path / "runs"), "--cluster", "local-test")
    assert r.code == 0, r.err
    run = newest_run(tmp_path / "runs")
    job_id = run.step("convert").job_ids[0]
    wait_for_state(job_id, timeout_s=90, env=slurm_cluster)
    run.record.steps[0].job_ids.append("999999")  # a job no part of SLURM knows
    run.save()
    bindir = _fake_bin(tmp_path, "sacct", "echo 'sacct: error: Problem talking to the database' >&2; exit 1\n")
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    from slurmtune.cluster.slurm import job_states
    states = job_states([job_id, "999999"])
    assert states[job_id].state == "COMPLETED" and states[job_id].source == "scontrol"
    assert states["999999"].state == "LOST"
    status = json.loads(cli("status", run.dir, "--json").out)
    assert status["steps"][0]["state"] == "LOST"


def test_a_job_that_reported_itself_is_not_shown_pending_or_running_while_accounting_lags(tmp_path, monkeypatch):
    """sacct learns of a job's start and end a moment after the job; the job's own report wins
    then, but only its own: a resubmitted step's new job is not mistaken for the old one."""
    from slurmtune.config import RunConfig
    from slurmtune.runs.folder import Step, report_status
    from slurmtune.cluster.slurm import JobState
    from slurmtune.runs.status import run_status
    run = Run.create_at(tmp_path / "run", RunConfig(name="lag"), "slurm", "local-test")
    run.add_step(Step("validate", "validate", ["101"]))
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    report_status(run.dir, "validate", "FAILED", error="data.jsonl:1: messages: no assistant turn")
    pending = lambda ids: {i: JobState(i, "PENDING") for i in ids}  # noqa: E731
    row = run_status(run, scheduler_states=pending)[0]
    assert (row.state, row.error) == ("FAILED", "data.jsonl:1: messages: no assistant turn")
    running = lambda ids: {i: JobState(i, "RUNNING") for i in ids}  # noqa: E731
    assert run_status(run, scheduler_states=running)[0].state == "FAILED"  # the end not yet recorded
    run.record.steps[0].job_ids = ["102"]  # resubmitted: the report is the old job's
    assert run_status(run, scheduler_states=pending)[0].state == "PENDING"
    assert run_status(run, scheduler_states=running)[0].state == "RUNNING"
