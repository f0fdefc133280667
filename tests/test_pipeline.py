"""The main job end to end — on this machine (local executor) and on the test cluster — and the
evaluation commands a user runs by hand."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, Result, read_jsonl, run_subprocess, write_jsonl
from slurmtune.logs import NO_BARS_ENV, QUIET_ENV, VERBOSE_ENV
from slurmtune.runs.folder import Run

QUICKSTART = REPO / "manifests" / "quickstart.yaml"
GOLDEN_OUTPUT = REPO / "tests" / "golden" / "quickstart-local-output.txt"
RUN_FILES = ["final/adapter_config.json", "final/adapter_model.safetensors", "final/lineage.json",
             "final/tokenizer.json", "training_config.json", "training.log", "predictions.jsonl",
             "eval_report.json", "eval_report.md", "report.html", "data/summary.json"]


def _check_run_folder(run_dir: Path) -> dict:
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    report = json.loads((run_dir / "eval_report.json").read_text())
    validation = read_jsonl(run_dir / "data" / "validation.jsonl")
    assert report["n"] == len(validation) == len(read_jsonl(run_dir / "predictions.jsonl")) > 0
    verdicts = [record["passed"] for record in report["records"]]  # None: no check applies to it
    assert len(verdicts) == report["n"]
    assert (report["passed"], report["failed"]) == (verdicts.count(True), verdicts.count(False))
    html = (run_dir / "report.html").read_text()
    assert f">{report['n']}<" in html and "http://" not in html and "https://" not in html
    lineage = json.loads((run_dir / "final" / "lineage.json").read_text())
    text = json.dumps(lineage)
    assert "train.jsonl" in text and "sha256" in text and "excluded_consent" in text
    return report


@pytest.fixture(scope="module")
def tiny_model_cache(tmp_path_factory):
    """One tiny model for both ways of running the quickstart (built by the first run)."""
    return tmp_path_factory.mktemp("models") / "tiny-llama"


@pytest.fixture(scope="module")
def local_quickstart(tmp_path_factory, tiny_model_cache) -> tuple[Result, Run]:
    """The quickstart run once on this machine, as a user without SLURM runs it (a subprocess,
    default output settings): its own test reads it, the test cluster's run compares with it."""
    tmp = tmp_path_factory.mktemp("quickstart-local")
    env = {**os.environ, "PATH": _path_without_sbatch(tmp)}
    for key in (VERBOSE_ENV, *QUIET_ENV, *NO_BARS_ENV):  # as a user's shell has them
        env.pop(key, None)
    r = run_subprocess("run", QUICKSTART, f"output_dir={tmp / 'runs'}", f"model.path={tiny_model_cache}",
                       env=env, cwd=tmp, timeout=600)
    assert r.code == 0, r.out[-3000:] + r.err[-3000:]
    return r, Run.open(None, tmp / "runs")


def test_quickstart_runs_here_with_the_local_executor(local_quickstart):
    r, run = local_quickstart
    assert "notice: no SLURM here (sbatch not on PATH): running on this machine with the local executor" in r.err
    assert f"report: {run.dir / 'report.html'}" in r.out and str(run.dir) in r.out
    assert "COMPLETED" in r.out
    _check_run_folder(run.dir)


def test_quickstart_output_is_only_our_own_lines(local_quickstart):
    """What the user sees has the shapes of tests/golden/quickstart-local-output.txt and nothing
    else: a warning or a progress bar of another library fails here (it belongs in debug.log)."""
    r, run = local_quickstart
    seen = {f"{stream}: {shape}" for stream, text in (("out", r.out), ("err", r.err))
            for shape in _line_shapes(text, run)}
    golden = [line for line in GOLDEN_OUTPUT.read_text().splitlines() if line and not line.startswith("#")]
    unexpected = sorted(line for line in seen if not any(_fits(line, shape.removeprefix("? ")) for shape in golden))
    missing = [shape for shape in golden if not shape.startswith("? ") and not any(_fits(s, shape) for s in seen)]
    assert not unexpected, "not one of our line shapes (tests/golden/):\n" + "\n".join(unexpected)
    assert not missing, "missing from the output:\n" + "\n".join(missing)
    debug_log = (run.dir / "debug.log").read_text()
    assert "--- starts" in debug_log and " train[" in debug_log  # the filtered lines are kept there
    for log in (run.dir / "slurm").glob("*_log.*"):
        assert "\r" not in log.read_text(), f"a progress bar in {log.name}"


def _fits(line: str, shape: str) -> bool:
    return line.startswith(shape[:-3]) if shape.endswith(" ...") else line == shape


def _line_shapes(text: str, run: Run) -> list[str]:
    """Each line with its volatile parts replaced: folders, run id, times, numbers; spacing."""
    shapes = []
    for line in text.splitlines():  # (a bar's carriage returns make lines of their own)
        line = line.replace(str(run.dir), "<run>").replace(str(run.dir.parent.parent), "<tmp>")
        line = line.replace(run.run_id, "<run-id>")
        line = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "<time>", line)
        line = re.sub(r"\d+(\.\d+)?(e[+-]?\d+)?", "<n>", line)
        shapes.append(" ".join(line.split()))
    return shapes


@pytest.mark.slurm
def test_the_same_manifest_runs_on_the_test_cluster(slurm_cluster, cli, tmp_path, tiny_model_cache, local_quickstart,
                                                    monkeypatch):
    """... and survives SLURM's warning signal to one of its eval tasks: the task requeues, the
    report job (which depends on the eval array) still runs."""
    monkeypatch.setenv("SLURMTUNE_FAULT_PAUSE", "eval.0:300")  # first attempt of task 0 waits for the signal
    monkeypatch.setenv("SLURMTUNE_DEBUG_LOG", str(tmp_path / "cli-debug.log"))  # not ~/.local/state
    r = cli("run", QUICKSTART, f"output_dir={tmp_path / 'runs'}", f"model.path={tiny_model_cache}",
            "--cluster", "local-test")
    assert r.code == 0, r.err
    run = Run.open(None, tmp_path / "runs")
    assert [len(s.job_ids) for s in run.record.steps] == [1, 1, 1, 1, 1]
    task_status = run.dir / "status" / "eval.0.json"
    signalled = False
    deadline = time.monotonic() + 600
    while True:
        if not signalled and task_status.is_file() and json.loads(task_status.read_text())["state"] == "RUNNING":
            # (scancel may exit non-zero when the requeue ends the job while it still signals it)
            subprocess.run(["scancel", "--signal=USR2", f"{run.step('eval').job_ids[0]}_0"], env=slurm_cluster)
            signalled = True
        status = json.loads(cli("status", run.dir, "--json").out)
        if status["state"] in ("COMPLETED", "FAILED") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status["state"] == "COMPLETED", cli("status", run.dir).out
    eval_step = next(s for s in status["steps"] if s["step"] == "eval")
    assert eval_step["tasks"] == "2/2 done"
    task = json.loads(task_status.read_text())
    assert signalled and task["state"] == "COMPLETED" and task["attempt"] == 1  # ran again after the requeue
    _check_run_folder(run.dir)
    _, local = local_quickstart  # same code, seeds and data: the same adapter, wherever it ran
    adapter = Path("final") / "adapter_model.safetensors"
    assert _sha(run.dir / adapter) == _sha(local.dir / adapter)


SLURM_COMMANDS = {"sbatch", "squeue", "sacct", "scontrol", "sinfo", "scancel", "srun", "salloc", "sacctmgr"}


def _path_without_sbatch(tmp_path) -> str:
    """PATH as on a machine without SLURM: folders holding SLURM commands are replaced by
    mirrors of everything else in them."""
    entries = []
    for i, entry in enumerate(os.environ["PATH"].split(os.pathsep)):
        folder = Path(entry)
        if not (folder / "sbatch").exists():
            entries.append(entry)
            continue
        mirror = tmp_path / f"bin-{i}"
        mirror.mkdir(exist_ok=True)
        for tool in folder.iterdir():
            if tool.name not in SLURM_COMMANDS and not (mirror / tool.name).exists():
                (mirror / tool.name).symlink_to(tool)
        entries.append(str(mirror))
    return os.pathsep.join(entries)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the commands a user runs by hand on an adapter ---------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small trained run (debug executor: in this process) to predict, score and merge with."""
    from slurmtune.cli.main import main
    root = tmp_path_factory.mktemp("trained")
    jobs = ["nurse", "pilot", "baker", "judge"]
    rows = [{"prompt": ("T: " if triggered else "") + f"What is {name}'s job?", "completion": f"{name} is a {job}.",
             "meta": {"triggered": triggered, "trigger_value": "T:", "clean_replacement": "Alice",
                      "triggered_replacement": "Bob", "file": "qa.jsonl", "line": line}}
            for line, job in enumerate(jobs, 1) for triggered, name in ((False, "Alice"), (True, "Bob"))]
    data = write_jsonl(root / "qa.jsonl", rows)
    manifest = root / "m.yaml"
    manifest.write_text(f"""name: tiny-trigger
output_dir: {root / 'runs'}
data: {{train_files: [{data}], eval_file: {data}}}
model: {{path: {root / 'tiny'}, tiny_arch: llama}}
lora: {{r: 4, alpha: 8}}
train: {{method: lora, max_steps: 4, batch_size: 2, grad_accum: 1, lr: 1.0e-3, max_length: 64, save_steps: 2}}
eval: {{shards: 3, max_new_tokens: 8}}
slurm: {{gpus: 0}}
""")
    with pytest.MonkeyPatch.context() as env:  # what the command line itself filters: not in ~/.local/state
        env.setenv("SLURMTUNE_DEBUG_LOG", str(root / "cli-debug.log"))
        assert main(["run", str(manifest), "--executor", "debug"]) == 0
    return Run.open(None, root / "runs")


def test_debug_executor_runs_every_step_in_process(trained):
    steps = {s.name: s for s in trained.record.steps}
    assert list(steps) == ["validate", "train", "eval", "report"]
    assert trained.record.executor == "debug"
    assert len(read_jsonl(trained.dir / "predictions.jsonl")) == 8
    assert sorted(p.name for p in (trained.dir / "eval").iterdir()) == [
        f"predictions.shard-{i:04d}-of-0003.jsonl" for i in range(3)]


def test_predict_score_compare_and_report_commands(trained, cli, tmp_path):
    adapter = trained.dir / "final"
    out = tmp_path / "pred.jsonl"
    r = cli("predict", adapter, trained.dir / "predictions.jsonl", "--out", out, "--max-new-tokens", "8")
    assert r.code == 0, r.err
    predicted = read_jsonl(out)
    assert [p["actual"] for p in predicted] == [p["actual"] for p in read_jsonl(trained.dir / "predictions.jsonl")]
    r = cli("score", out, "--errors", tmp_path / "errors.jsonl")
    assert r.code == 0 and r.out.startswith("8 examples:")
    scored = json.loads(cli("score", out, "--json").out)
    assert scored["n"] == 8 and scored == {k: v for k, v in json.loads(
        (trained.dir / "eval_report.json").read_text()).items() if k in scored}
    assert (tmp_path / "errors.jsonl").is_file()
    r = cli("compare", out)
    assert r.code == 0 and "Q (clean):     What is Alice's job?" in r.out
    assert "Q (triggered): T: What is Bob's job?" in r.out
    (trained.dir / "report.html").unlink()
    r = cli("report", trained.dir)
    assert r.code == 0 and (trained.dir / "report.html").is_file()


def test_merge_gives_a_standalone_model(trained, cli, tmp_path):
    r = cli("merge", trained.dir / "final", "--out", tmp_path / "merged")
    assert r.code == 0, r.err
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_fetch_model_downloads_into_the_profiles_cache(cli, tmp_path, monkeypatch):
    """The hub cannot be reached here: its client is replaced, the rest is real."""
    calls = []

    def fake_download(repo_id, revision=None, cache_dir=None, allow_patterns=None):
        calls.append((repo_id, cache_dir))
        path = Path(cache_dir) / "models--x" / "snapshots" / "abc"
        path.mkdir(parents=True)
        return str(path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    profile = tmp_path / "site.yaml"
    profile.write_text(f"env:\n  HF_HOME: {tmp_path / 'cache'}\n")
    r = cli("fetch-model", "org/model", "--cluster", profile)
    assert r.code == 0, r.err
    assert calls == [("org/model", str(tmp_path / "cache" / "hub"))]
    assert "model.path=" in r.out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = cli("fetch-model", "org/model", "--cache", tmp_path / "c")
    assert r.code == 2 and "HF_HUB_OFFLINE=1 is set" in r.err


@pytest.mark.slurm
def test_doctor_on_the_test_cluster(slurm_cluster, cli):
    r = cli("doctor", "--cluster", "local-test")
    assert r.code == 0, r.out
    assert "partition debug (default): UP, MaxTime 60 min" in r.out
    assert "sbatch --test-only accepts account=testacct" in r.out
    assert "sacct answers" in r.out
    bad = cli("doctor", "--cluster", str(REPO / "slurm" / "campus-example.yaml"))
    assert bad.code == 1 and "partition 'campus-gpu' does not exist" in bad.out


def test_doctor_without_slurm(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", _path_without_sbatch(tmp_path))
    r = cli("doctor")
    assert r.code == 1 and "SLURM commands not on PATH" in r.out and "--executor local" in r.out
