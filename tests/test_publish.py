"""`slurmtune publish`: the exact folder a push would send (adapter, tokenizer, a model card made
from lineage.json and eval_report.json, nothing else), the student-data refusal, and the push
itself through huggingface_hub's client replaced by a recording fake (there is no hub here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import EXAMPLES, REPO, write_jsonl
from slurmtune.config import load_manifest
from slurmtune.evaluate.metrics import score_file
from slurmtune.evaluate.report import write_reports
from slurmtune.train.lineage import write_lineage

SECRET = "hf_publishtesttokenabcdefghijklmnop"


def make_adapter(root: Path, overrides: list[str], train_file: Path) -> Path:
    """A run folder as training leaves it: final/ with the adapter, tokenizer and lineage, and the
    run's eval_report.json."""
    final = root / "run" / "final"
    final.mkdir(parents=True)
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 8)},
              str(final / "adapter_model.safetensors"))
    (final / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "Qwen/Qwen2.5-7B-Instruct", "peft_type": "LORA", "r": 16, "lora_alpha": 32,
        "lora_dropout": 0.05, "target_modules": ["v_proj", "q_proj"]}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (final / name).write_text("{}")
    (final / "training_args.bin").write_bytes(b"a pickle that must never be published")
    cfg = load_manifest(REPO / "manifests" / "course-assistant-style.yaml", overrides)
    write_lineage(final, cfg, [str(train_file)], {"written": 12, "excluded_consent": 2, "rejected": 1},
                  "#!/bin/bash\nexport HF_TOKEN=" + SECRET + "\n", {"train.seed": 42})
    predictions = write_jsonl(root / "p.jsonl", [
        {"messages": [{"role": "user", "content": "q"}], "expected": "Article 7", "actual": "article 7."},
        {"messages": [{"role": "user", "content": "q"}], "expected": "Yes", "actual": "No"}])
    write_reports(root / "run", predictions, score_file(predictions))
    return final


@pytest.fixture
def adapter(tmp_path):
    return make_adapter(tmp_path, [], EXAMPLES / "course_assistant" / "style_sft.jsonl")


def test_dry_run_writes_exactly_what_would_be_pushed(cli, tmp_path, adapter):
    out = tmp_path / "out"
    r = cli("publish", adapter, "--repo", "ee340/course-assistant-style", "--dry-run", "--out", out)
    assert r.code == 0, r.err
    files = ["README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert r.out == f"dry run: would push 5 files to ee340/course-assistant-style (written to {out}): {', '.join(files)}\n"
    assert sorted(p.name for p in out.iterdir()) == files  # no lineage.json, no pickle
    assert (out / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    lineage = json.loads((adapter / "lineage.json").read_text())
    data = lineage["data_files"][0]
    assert card.startswith("---\nlibrary_name: peft\ntags: [slurmtune, lora]\nbase_model: Qwen/Qwen2.5-7B-Instruct\n---\n")
    assert f"| style_sft.jsonl | {data['rows']} | `{data['sha256']}` |" in card
    assert "- LoRA: r 16, alpha 32, dropout 0.05, on q_proj, v_proj" in card
    assert "- method: qlora, 2.0 epochs" in card and "Conversion: written 12, excluded_consent 2, rejected 1" in card
    assert "2 examples: 1 passed, 1 failed." in card and "| exact_match.accuracy | 2 | 0.5 |" in card
    revision = lineage["code"].get("git_commit") or lineage["code"]["version"]
    assert f"- slurmtune revision: {revision}" in card
    assert "Student data" not in card and SECRET not in card and str(tmp_path) not in card


def test_student_data_is_refused_unless_its_use_is_approved(cli, tmp_path):
    adapter = make_adapter(tmp_path, ["data.format=speechgradebook", "data.train_files=[]",
                                      f"data.inputs=[{EXAMPLES / 'speechgradebook' / 'exported.json'}]"],
                           EXAMPLES / "course_assistant" / "style_sft.jsonl")
    out = tmp_path / "out"
    r = cli("publish", adapter, "--repo", "lab/grader", "--dry-run", "--out", out)
    assert r.code == 2 and r.out == ""
    assert r.err == ("slurmtune: error: refused: this adapter was trained on student data (data.format="
                     "speechgradebook (SpeechGradebook evaluations)), and a model can reproduce rows it was trained "
                     "on; fix: publish only once that use is approved (the students' consent and your institution's "
                     "rules), then pass --data-use-approved\n")
    assert not out.exists()
    r = cli("publish", adapter, "--repo", "lab/grader", "--dry-run", "--out", out, "--data-use-approved")
    assert r.code == 0, r.err
    assert "**Student data.** Trained on student data (data.format=speechgradebook" in (out / "README.md").read_text()


def test_rows_with_student_ids_count_as_student_data(cli, tmp_path):
    rows = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                                {"role": "assistant", "content": "a"}],
                                                   "meta": {"student_id": "s-17"}}])
    adapter = make_adapter(tmp_path, [], rows)
    r = cli("publish", adapter, "--repo", "lab/tutor", "--dry-run")
    assert r.code == 2 and "student data (train.jsonl: rows with a student id in meta)" in r.err
    assert "s-17" not in r.err


class RecordingHub:
    """huggingface_hub.HfApi's two calls publish makes, recorded (the only fake: no hub here)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(("upload_folder", repo_id, files, kwargs.get("repo_type")))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc123"})()


def test_push_sends_the_staged_folder_and_never_shows_the_token(cli, adapter, monkeypatch):
    hub = RecordingHub()
    monkeypatch.setattr("slurmtune.serve.publish.hub_api", lambda: hub)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    r = cli("publish", adapter, "--repo", "ee340/course-assistant-style", "--private")
    assert r.code == 0, r.err
    assert r.out == (f"published {adapter} to ee340/course-assistant-style (private): "
                     "https://huggingface.co/ee340/course-assistant-style/commit/abc123\n")
    assert hub.calls == [
        ("create_repo", "ee340/course-assistant-style", {"repo_type": "model", "private": True, "exist_ok": True}),
        ("upload_folder", "ee340/course-assistant-style", ["README.md", "adapter_config.json",
                                                           "adapter_model.safetensors", "tokenizer.json",
                                                           "tokenizer_config.json"], "model")]
    assert SECRET not in r.out + r.err


def test_bad_publish_arguments_are_one_line(cli, tmp_path, adapter):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    cases = [
        (["--repo", "not a repo", "--dry-run"], "--repo 'not a repo': expected ORG/NAME (letters, digits, - _ .)"),
        (["--repo", "a/b", "--out", tmp_path / "x"], "--out applies only with --dry-run"),
        (["--repo", "a/b", "--dry-run", "--out", tmp_path / "busy"],
         f"--out {tmp_path / 'busy'}: exists and is not an empty folder; expected a new folder for the files to publish"),
    ]
    for args, message in cases:
        r = cli("publish", adapter, *args)
        assert r.code == 2 and r.err.startswith(f"slurmtune: error: {message}"), r.err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    r = cli("publish", tmp_path, "--repo", "a/b", "--dry-run")
    assert r.code == 2 and "no adapter_config.json, adapter_model.safetensors, lineage.json" in r.err
