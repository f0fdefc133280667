"""Sweeps: expansion and stable ids, and throttled arrays with resubmission on the real cluster."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl
from slurm_cluster import wait_for_state
from slurmtune.config import SweepConfig, load_manifest
from slurmtune.runs.folder import Run, recent_runs
from slurmtune.runs.sweep import expand, trial_id


def _manifest(tmp_path, sweep: str, extra: str = "", name="sweep.yaml") -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Question {i} about waves?"},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(8)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "val.jsonl", [{"messages": [{"role": "user", "content": "Held out?"},
                                                       {"role": "assistant", "content": "Yes."}]}])
    path = tmp_path / name
    path.write_text(f"""name: sw
output_dir: {tmp_path / 'runs'}
data: {{train_files: [train.jsonl], validation_file: val.jsonl}}
model: {{path: {tmp_path.parent / 'tiny-sweep-model'}, tiny_arch: llama}}
lora: {{r: 4, alpha: 8}}
train: {{method: lora, max_steps: 2, batch_size: 2, grad_accum: 1, lr: 1.0e-3, max_length: 64, save_steps: 1}}
eval: {{max_new_tokens: 4}}
slurm: {{gpus: 0, time_min: 10}}
{extra}
sweep:
{sweep}
""")
    return path


def test_expansion_grid_paired_random_and_explicit(tmp_path):
    m = _manifest(tmp_path, """  grid: {train.lr: [1.0e-4, 2.0e-4], lora.r: [4, 8]}
  paired: {train.max_steps: [2, 3], data.train_files: [[train.jsonl], [val.jsonl]]}
  random: {lora.dropout: {uniform: [0.0, 0.2]}}
  samples: 2
  seed: 5
  trials: [{train.seed: 1}]""")
    cfg = load_manifest(m)
    trials = expand(cfg.sweep, cfg, m.parent)
    assert len(trials) == 1 * 4 * 2 * 2
    first = trials[0].overrides
    assert set(first) == {"train.seed", "train.lr", "lora.r", "train.max_steps", "data.train_files", "lora.dropout"}
    assert {(t.overrides["train.max_steps"], tuple(t.overrides["data.train_files"])) for t in trials} == \
        {(2, ("train.jsonl",)), (3, ("val.jsonl",))}
    again = expand(load_manifest(m).sweep, cfg, m.parent)
    assert [t.id for t in again] == [t.id for t in trials]  # stable across re-expansion
    assert trials[0].id == trial_id(dict(reversed(list(first.items()))))  # key order does not matter


def test_trial_ids_survive_adding_values(tmp_path):
    cfg = load_manifest(_manifest(tmp_path, "  grid: {train.lr: [1.0e-4]}"))
    one = expand(SweepConfig(grid={"train.lr": [1e-4]}), cfg)
    two = expand(SweepConfig(grid={"train.lr": [1e-4, 3e-4]}), cfg)
    assert one[0].id == two[0].id and len(two) == 2


@pytest.mark.parametrize("sweep, message", [
    (SweepConfig(paired={"train.lr": [1e-4], "lora.r": [4, 8]}), "every list must have the same length"),
    (SweepConfig(random={"train.lr": {"gaussian": [0, 1]}}, samples=2), "expected one of uniform, log_uniform"),
    (SweepConfig(random={"train.lr": {"uniform": [0, 1]}}), "sweep.samples"),
    (SweepConfig(grid={"train.lrr": [1]}), "train.lrr: unknown key"),
    (SweepConfig(grid={"lora.r": ["x"]}), "lora.r: 'x' is not an integer"),
    (SweepConfig(), "nothing to sweep"),
])
def test_expansion_errors_say_what_is_wrong(tmp_path, sweep, message):
    cfg = load_manifest(_manifest(tmp_path, "  grid: {train.lr: [1.0e-4]}"))
    with pytest.raises(Exception) as err:
        expand(sweep, cfg)
    assert message in str(err.value)


def test_random_draws_are_seeded_and_in_range(tmp_path):
    cfg = load_manifest(_manifest(tmp_path, "  grid: {train.lr: [1.0e-4]}"))
    spec = {"train.lr": {"log_uniform": [1e-5, 1e-3]}, "lora.r": {"choice": [4, 8, 16]},
            "train.max_steps": {"int_uniform": [2, 9]}}
    a = expand(SweepConfig(random=spec, samples=20, seed=1), cfg)
    b = expand(SweepConfig(random=spec, samples=20, seed=1), cfg)
    assert [t.overrides for t in a] == [t.overrides for t in b]
    assert all(1e-5 <= t.overrides["train.lr"] <= 1e-3 and t.overrides["lora.r"] in (4, 8, 16)
               and 2 <= t.overrides["train.max_steps"] <= 9 for t in a)
    assert len({t.overrides["train.lr"] for t in a}) > 10


# --- on the real cluster ----------------------------------------------------------------------

def _counting_wrapper(tmp_path, names) -> Path:
    bindir = tmp_path / "countbin"
    bindir.mkdir(exist_ok=True)
    for name in names:
        real = subprocess.run(["which", name], capture_output=True, text=True).stdout.strip()
        path = bindir / name
        path.write_text(f"#!/bin/bash\necho {name} >> {tmp_path / 'calls.log'}\nexec {real} \"$@\"\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bindir


def _max_concurrency(job_id: str, env) -> int:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,Start,End"],
                         capture_output=True, text=True, env=env).stdout
    spans = []
    for line in out.splitlines():
        jid, start, end = line.split("|")
        if "[" in jid or start in ("Unknown", "None", "") or end in ("Unknown", "None", ""):
            continue
        spans.append((datetime.fromisoformat(start), datetime.fromisoformat(end)))
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


@pytest.mark.slurm
@pytest.mark.slow
def test_twelve_trials_one_array_at_most_three_at_once_and_resubmit_only_the_killed(
        slurm_cluster, cli, tmp_path, monkeypatch):
    from slurmtune.train.tiny_model import make_tiny_model
    make_tiny_model(tmp_path.parent / "tiny-sweep-model")
    m = _manifest(tmp_path, "  grid: {train.lr: [1.0e-3, 5.0e-4, 2.0e-4, 1.0e-4], lora.r: [2, 4, 8]}\n"
                            "  parallelism: 3")
    bindir = _counting_wrapper(tmp_path, ["sbatch"])
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    first = expand(load_manifest(m).sweep, load_manifest(m), m.parent)[0].id
    monkeypatch.setenv("SLURMTUNE_FAULT_PAUSE", f"{first}/eval.0:300")  # trial 0 waits in its eval phase
    r = cli("sweep", m, "--cluster", "local-test")
    assert r.code == 0, r.err
    run = Run.open(None, tmp_path / "runs")
    arrays = [s for s in run.record.steps if s.kind == "trial"]
    assert len(arrays) == 1 and arrays[0].array_size == 12
    assert (tmp_path / "calls.log").read_text().split() == ["sbatch"]  # one array, nothing else
    array_id = arrays[0].job_ids[0]
    assert re.search(r"#SBATCH --array=0-11%3", Path(arrays[0].script).read_text())
    killed = [4, 7]
    for task in killed:
        subprocess.run(["scancel", f"{array_id}_{task}"], check=True, env=slurm_cluster)
    # SLURM's warning signal reaches trial 0 while it evaluates: the task requeues and finishes.
    eval_status = run.dir / "trials" / first / "status" / "eval.0.json"
    deadline = time.monotonic() + 300
    while not (eval_status.is_file() and json.loads(eval_status.read_text())["state"] == "RUNNING"):
        assert time.monotonic() < deadline, "trial 0 never reached its eval phase"
        time.sleep(0.5)
    # scancel keeps retrying ("Job can not be altered now") while the signal's own requeue is under
    # way, and would signal the next attempt too: stop it once this attempt has asked to requeue.
    signal = subprocess.Popen(["scancel", "--signal=USR2", f"{array_id}_0"], env=slurm_cluster)
    trial_status = run.dir / "status" / f"trial.{first}.json"
    deadline = time.monotonic() + 120
    while signal.poll() is None and time.monotonic() < deadline:
        if trial_status.is_file() and json.loads(trial_status.read_text())["state"] == "REQUEUED":
            break
        time.sleep(0.2)
    signal.kill()  # scancel sits out SIGTERM while it waits to retry
    signal.wait()
    wait_for_state(array_id, timeout_s=900, env=slurm_cluster)
    for status_file in (run.dir / "status" / f"trial.{first}.json", eval_status):
        assert json.loads(status_file.read_text())["state"] == "COMPLETED"
        assert json.loads(status_file.read_text())["attempt"] == 1  # the second attempt finished it
    assert _max_concurrency(array_id, slurm_cluster) <= 3
    status = json.loads(cli("sweep", "status", run.dir, "--json").out)
    states = [t["state"] for t in status["trials"]]
    assert [i for i, s in enumerate(states) if s != "COMPLETED"] == killed, states
    # The trials wrote the results table as each ended: every finished trial has its metric.
    data = json.loads((run.dir / "sweep_results.json").read_text())
    assert len(data["trials"]) == 12 and sum(1 for t in data["trials"] if t["best"]) == 1
    scored = [i for i, t in enumerate(data["trials"]) if isinstance(t[data["metric"]], float)]
    assert scored == [i for i in range(12) if i not in killed]
    assert (run.dir / "sweep_results.png").stat().st_size > 1000
    r = cli("sweep", "results", run.dir)  # rebuilt on the login node with the scheduler's states
    assert r.code == 0 and [t["state"] for t in json.loads((run.dir / "sweep_results.json").read_text())
                            ["trials"]] == states
    (tmp_path / "calls.log").write_text("")
    r = cli("sweep", "resubmit", run.dir)
    assert r.code == 0, r.err
    ids = [status["trials"][i]["trial"] for i in killed]
    assert f"resubmitting 2 trial(s): {', '.join(ids)}" in r.out
    run = Run.open(run.dir)
    new_array = [s for s in run.record.steps if s.kind == "trial"][-1]
    assert new_array.array_size == 2 and (tmp_path / "calls.log").read_text().split() == ["sbatch"]
    wait_for_state(new_array.job_ids[0], timeout_s=600, env=slurm_cluster)
    status = json.loads(cli("sweep", "status", run.dir, "--json").out)
    assert all(t["state"] == "COMPLETED" for t in status["trials"])
    data = json.loads((run.dir / "sweep_results.json").read_text())  # the last trial's refresh
    assert all(isinstance(t[data["metric"]], float) for t in data["trials"])
    assert "nothing to resubmit" in cli("sweep", "resubmit", run.dir).out


@pytest.mark.slurm
def test_status_of_a_200_trial_sweep_is_one_scheduler_query(slurm_cluster, cli, tmp_path, monkeypatch):
    m = _manifest(tmp_path, "  grid: {train.lr: [" + ", ".join(f"{i}.0e-5" for i in range(1, 21)) + "],"
                            " lora.r: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}")
    r = cli("sweep", m, "--cluster", "local-test", "--hold")
    assert r.code == 0, r.err
    run = Run.open(None, tmp_path / "runs")
    try:
        trials = json.loads((run.dir / "sweep.json").read_text())["trials"]
        assert len(trials) == 200
        for trial in (trials[0], trials[-1]):  # a trial folder is a plain run of its overrides
            saved = yaml.safe_load((run.dir / "trials" / trial["id"] / "manifest.yaml").read_text())
            assert saved["train"]["lr"] == trial["overrides"]["train.lr"]
            assert saved["lora"]["r"] == trial["overrides"]["lora.r"]
            assert saved["sweep"]["grid"] == {} and saved["sweep"]["parallelism"] == SweepConfig().parallelism
        array_id = [s for s in run.record.steps if s.kind == "trial"][0].job_ids[0]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # accounting learns of a new job a moment after sbatch
            known = subprocess.run(["sacct", "-n", "-X", "-j", array_id, "-o", "JobID"], capture_output=True,
                                   text=True, env=slurm_cluster).stdout
            if known.strip():
                break
            time.sleep(0.5)
        bindir = _counting_wrapper(tmp_path, ["sacct", "squeue", "scontrol", "sinfo"])
        monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
        for poll in range(2):
            (tmp_path / "calls.log").write_text("")
            status = json.loads(cli("sweep", "status", run.dir, "--json").out)
            assert (tmp_path / "calls.log").read_text().split() == ["sacct"]
            assert len(status["trials"]) == 200 and {t["state"] for t in status["trials"]} == {"PENDING"}
    finally:
        cli("cancel", run.dir)


@pytest.mark.slurm
def test_more_trials_than_max_array_size_are_split(slurm_cluster, cli, tmp_path):
    m = _manifest(tmp_path, "  grid: {train.seed: [" + ", ".join(str(i) for i in range(1200)) + "]}")
    r = cli("sweep", m, "--cluster", "local-test", "--dry-run")
    assert r.code == 0, r.err
    (run,) = recent_runs(tmp_path / "runs")
    arrays = [s for s in run.record.steps if s.kind == "trial"]
    assert [(a.name, a.array_size) for a in arrays] == [("trials-0", 1001), ("trials-1", 199)]
    scripts = [Path(a.script).read_text() for a in arrays]
    assert "#SBATCH --array=0-1000%4" in scripts[0] and "#SBATCH --array=0-198%4" in scripts[1]
    assert "#SBATCH --dependency='afterany:<trials-0>'" in scripts[1] and "--dependency" not in scripts[0]
    assert arrays[1].depends_on == ["afterany:<trials-0>"]
