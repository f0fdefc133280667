"""Every check before anything is created: value, path, resource and data problems fail on the
login node (exit 1, nothing under runs/), and each job runs the same checks on its node."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import EXAMPLES, REPO
from slurmtune.checks import CheckFailed, StepNeeds, Submission, job_problems, submission_problems
from slurmtune.cluster.profiles import ClusterProfile
from slurmtune.config import load_manifest
from slurmtune.jobs.eval import EvalJob
from slurmtune.jobs.pipeline import plan_run
from slurmtune.runs.folder import Run

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
EXPORT = EXAMPLES / "speechgradebook" / "exported.json"
# Mistral-7B-Instruct-v0.3's template as later revised upstream in spirit: a system turn is
# accepted and rendered inside the first [INST] block (the original raises on it).
MISTRAL_REVISION = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{% if loop.first and system is defined %}{{ '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def _raw_manifest(tmp_path: Path, model: Path, extra: str = "") -> Path:
    """A run that starts from raw SpeechGradebook data, as the seeds' workflows do."""
    path = tmp_path / "raw.yaml"
    path.write_text(f"""name: raw
output_dir: {tmp_path / 'runs'}
data: {{format: speechgradebook, inputs: [{EXPORT}], split: 0.8}}
model: {{path: {model}}}
train: {{method: lora, max_steps: 2, max_length: 1536}}
slurm: {{gpus: 0}}
{extra}""")
    return path


@pytest.fixture(scope="module")
def mistral_revised(tmp_path_factory) -> Path:
    """A model folder as the login node sees it (config and tokenizer; weights are never read
    there) carrying a Mistral template revision we have no marked copy of."""
    folder = tmp_path_factory.mktemp("mistral-revised")
    source = MODELS / "mistral-7b-instruct-v0.3"
    for f in source.iterdir():
        if f.name != "PROVENANCE.md":
            shutil.copy(f, folder / f.name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = MISTRAL_REVISION
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _no_runs(tmp_path: Path) -> bool:
    return not (tmp_path / "runs").exists()


def test_value_problems_fail_the_dry_run_all_at_once(cli, tmp_path, mistral_revised):
    m = _raw_manifest(tmp_path, mistral_revised)
    r = cli("run", m, "--executor", "local", "--dry-run", "train.lr=-1", "lora.r=0", "train.batch_size=0")
    assert r.code == 1, r.err
    assert "not submitted: 3 problem(s):" in r.err
    for line in ("train.lr: -1.0; expected a positive learning rate", "lora.r: 0; expected 1 or more",
                 "train.batch_size: 0; expected 1 or more"):
        assert line in r.err
    assert "Traceback" not in r.err and _no_runs(tmp_path)


def test_zero_eval_shards_fail_before_the_run_folder_exists(cli, tmp_path, mistral_revised):
    r = cli("run", _raw_manifest(tmp_path, mistral_revised), "--executor", "local", "eval.shards=0")
    assert r.code == 1 and "eval.shards: 0; expected 1 or more" in r.err, r.err
    assert _no_runs(tmp_path)


def test_a_sweep_of_multi_gpu_trials_is_refused(cli, tmp_path, mistral_revised):
    m = _raw_manifest(tmp_path, mistral_revised, "distributed: {gpus_per_node: 2, device: cpu}\n"
                                                 "sweep: {grid: {train.lr: [1.0e-4, 2.0e-4]}}\n")
    r = cli("sweep", m, "--executor", "local", "--dry-run")
    assert r.code == 1 and "a sweep trial trains in one process (one array task each)" in r.err, r.err
    assert _no_runs(tmp_path)


def test_a_bad_trial_is_named_with_its_overrides(cli, tmp_path, mistral_revised):
    m = _raw_manifest(tmp_path, mistral_revised, "sweep: {grid: {train.lr: [1.0e-4, -1.0]}}\n")
    r = cli("sweep", m, "--executor", "local", "--dry-run")
    assert r.code == 1, r.err
    assert "(train.lr=-1.0): train.lr: -1.0; expected a positive learning rate" in r.err
    assert r.err.count("expected a positive learning rate") == 1  # the good trial adds nothing
    assert _no_runs(tmp_path)


def test_a_raw_data_run_is_checked_on_converted_rows_with_the_models_template(cli, tmp_path, mistral_revised):
    """The template trap: raw inputs, a template revision no marked copy matches. The login node
    converts the first rows in memory and renders them with the model's own template."""
    r = cli("run", _raw_manifest(tmp_path, mistral_revised), "--executor", "local", "--dry-run")
    assert r.code == 0, r.err
    assert "preflight:" in r.err and "speechgradebook data converted from exported.json" in r.err
    # ... and what the login node could see, it says: the answer cut off by max_length.
    r = cli("run", _raw_manifest(tmp_path, mistral_revised), "--executor", "local", "train.max_length=32")
    assert r.code == 1 and "train: zero trained tokens in the first" in r.err, r.err
    assert "fix: raise train.max_length" in r.err and len(list((tmp_path / "runs").iterdir())) == 1  # the dry run's


def test_converter_problems_are_found_before_the_convert_step(cli, tmp_path, mistral_revised):
    m = _raw_manifest(tmp_path, mistral_revised)
    m.write_text(m.read_text().replace("format: speechgradebook", "format: trigger-qa"))
    r = cli("run", m, "--executor", "local", "--dry-run")
    assert r.code == 1 and "data.options.clean_replacement: required by trigger-qa" in r.err, r.err
    m.write_text(m.read_text().replace("format: trigger-qa", "format: qwen-single"))
    r = cli("run", m, "--executor", "local", "--dry-run")
    assert r.code == 1 and "data.format=qwen-single writes 'qwen-single' records" in r.err, r.err
    assert _no_runs(tmp_path)


def test_media_rows_are_refused_by_the_text_recipe_naming_them(cli, tmp_path):
    """Converted document-image records on a text model: refused on the login node, not trained
    on placeholder words (the run used to complete)."""
    assert cli("convert", "image-messages", EXAMPLES / "docvqa" / "train.jsonl", "--out", tmp_path / "data").code == 0
    train = tmp_path / "data" / "train.jsonl"
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: docs\noutput_dir: {tmp_path / 'runs'}\ndata: {{train_files: [{train}]}}\n"
                        f"model: {{path: {tmp_path / 'tiny'}, tiny_arch: llama}}\nslurm: {{gpus: 0}}\n")
    r = cli("run", manifest, "--executor", "local", "--dry-run")
    assert r.code == 1
    assert (f"  train: 4 row(s) have image or video parts ({train}:1: messages[0].content[1].image, "
            f"{train}:2: messages[1].content[1].image, ") in r.err, r.err
    assert "the text recipe would train on placeholder words instead of the media" in r.err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "tiny").exists()


def test_the_job_runs_the_same_checks_on_its_node(tmp_path, mistral_revised):
    """The login node's problems for a plan are exactly its jobs' own checks, and a job that
    reaches its node with a bad config (here: a run folder written around the checks) fails
    with the same problems before doing anything."""
    cfg = load_manifest(_raw_manifest(tmp_path, mistral_revised), ["eval.shards=0", "train.lr=-1"])
    plan = plan_run(cfg)
    needs = [StepNeeds(s.name, s.kind, s.request.gpus_per_node, s.request.nodes, s.request.time_min, None)
             for s in plan]
    login = submission_problems(Submission(cfg, needs, ClusterProfile(name="local"), "local"))
    on_nodes = list(dict.fromkeys(p for s in plan for p in job_problems(cfg, s.kind)))
    assert login == on_nodes and len(login) == 2
    run = Run.create(cfg, "debug", None)
    with pytest.raises(CheckFailed) as failed:
        EvalJob(run.dir)(0)
    assert failed.value.problems == job_problems(cfg, "eval") == login
    status = json.loads((run.dir / "status" / "eval.0.json").read_text())
    assert status["state"] == "FAILED" and status["error"] == f"eval job: {login[0]} (+1 more)"
    assert not (run.dir / "eval").exists()  # nothing was generated


def test_manifest_cpus_and_memory_per_gpu_reach_the_script(tmp_path):
    from slurmtune.cluster.slurm import render_script
    cfg = load_manifest(_raw_manifest(tmp_path, tmp_path), ["slurm.gpus=1", "slurm.cpus_per_gpu=7",
                                                            "slurm.mem_gb_per_gpu=48"])
    train = next(s for s in plan_run(cfg) if s.name == "train")
    text = render_script(tmp_path, ClusterProfile(name="site", cpus_per_gpu=4, mem_gb_per_gpu=32), train.request)
    assert "#SBATCH --cpus-per-task=7" in text and "#SBATCH --mem=48GB" in text
    cfg = load_manifest(_raw_manifest(tmp_path, tmp_path), ["slurm.gpus=1"])
    train = next(s for s in plan_run(cfg) if s.name == "train")
    text = render_script(tmp_path, ClusterProfile(name="site", cpus_per_gpu=4, mem_gb_per_gpu=32), train.request)
    assert "#SBATCH --cpus-per-task=4" in text and "#SBATCH --mem=32GB" in text  # the profile's


def test_a_stop_that_nothing_can_requeue_is_written_STOPPED(tmp_path, mistral_revised, monkeypatch):
    """Outside SLURM (the local executor) a job that saved on a signal cannot requeue itself:
    its step says STOPPED, with the command that resumes it, not FAILED."""
    from slurmtune.jobs.base import Job, Stopped, requeue_after_stop
    from slurmtune.runs.status import run_status

    class SavesAndStops(Job):
        kind = "report"

        def run(self, cfg):
            requeue_after_stop(self.run_dir, self.step, "step 3 (checkpoints/step-000003)")

    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    run = Run.create(load_manifest(_raw_manifest(tmp_path, mistral_revised)), "debug", None)
    with pytest.raises(Stopped):
        SavesAndStops(run.dir)()
    status = json.loads((run.dir / "status" / "report.json").read_text())
    assert status["state"] == "STOPPED"
    assert status["error"] == f"stopped at step 3 (checkpoints/step-000003); resume with: slurmtune submit report {run.dir}"
    from slurmtune.runs.folder import Step
    run.add_step(Step("report", "report", []))
    assert [r.state for r in run_status(run)] == ["STOPPED"]


def test_liger_kernels_are_refused_on_cpu_and_without_the_package():
    """train.kernels=liger: Triton kernels, GPU only; this CPU environment has no liger-kernel."""
    quickstart = REPO / "manifests" / "quickstart.yaml"
    on_cpu = job_problems(load_manifest(quickstart, ["train.kernels=liger"]), "train")
    assert on_cpu == [
        "train.kernels=liger runs on GPUs only (its kernels are Triton, which has no CPU backend) but this run "
        "trains on CPU; fix: train.kernels=default, or slurm.gpus=1",
        "train.kernels=liger needs the liger-kernel package, which this environment lacks; fix: pip install -r "
        "env/requirements-gpu.txt into the run's environment, or train.kernels=default"]
    on_gpu = job_problems(load_manifest(quickstart, ["train.kernels=liger", "slurm.gpus=1"]), "train")
    assert on_gpu == on_cpu[1:]
    assert job_problems(load_manifest(quickstart, ["slurm.gpus=1"]), "train") == []
