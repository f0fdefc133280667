"""Job commands that need no cluster: overrides anywhere, login-node preflight, tiny models."""

from __future__ import annotations

import yaml

from conftest import write_jsonl
from slurmtune.runs.folder import Run, recent_runs


def _manifest(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}, explain the field?"},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(6)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    path = tmp_path / "m.yaml"
    path.write_text(f"""name: cli
output_dir: {tmp_path / 'runs'}
data: {{train_files: [train.jsonl]}}
model: {{path: {tmp_path / 'tiny'}}}
train: {{method: lora, max_steps: 1}}
slurm: {{gpus: 0}}
""")
    return path


def test_make_tiny_model_command(cli, tmp_path):
    r = cli("make-tiny-model", tmp_path / "tiny", "--arch", "phi3")
    assert r.code == 0 and "tiny phi3 model written to" in r.out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "tiny" / name).is_file()


def test_overrides_after_flags_and_preflight_on_the_login_node(cli, tmp_path):
    cli("make-tiny-model", tmp_path / "tiny")
    m = _manifest(tmp_path)
    r = cli("run", m, "--executor", "local", "--dry-run", "train.lr=3e-4", "lora.r=4")
    assert r.code == 0, r.err
    assert "tokens trained" in r.err and "in the first 6 rows" in r.err
    saved = yaml.safe_load((recent_runs(tmp_path / "runs")[0].dir / "manifest.yaml").read_text())
    assert saved["train"]["lr"] == 3e-4 and saved["lora"]["r"] == 4
    assert "notice: train.packing" not in r.err
    r = cli("run", m, "--executor", "local", "--dry-run", "train.packing=true")
    assert r.code == 0 and "notice: train.packing with sdpa attention computes each packed batch" in r.err
    before = len(list((tmp_path / "runs").iterdir()))
    r = cli("run", m, "--executor", "local", "train.max_length=4")
    assert r.code == 1 and "train: zero trained tokens in the first 6 rows" in r.err
    assert "fix: raise train.max_length" in r.err
    assert len(list((tmp_path / "runs").iterdir())) == before  # nothing created, nothing queued


def test_unknown_job_and_existing_run_overrides_are_usage_errors(cli, tmp_path):
    cli("make-tiny-model", tmp_path / "tiny")
    m = _manifest(tmp_path)
    assert cli("submit", "nope", m).code == 2
    assert cli("run", m, "--executor", "local", "--dry-run").code == 0
    run = recent_runs(tmp_path / "runs")[0]
    r = cli("submit", "train", run.dir, "train.lr=1")
    assert r.code == 2 and "an existing run keeps its manifest" in r.err
