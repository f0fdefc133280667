"""Run manifests: every bundled one loads; overrides and errors behave as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO
from slurmtune.config import RunConfig, load_manifest, to_dict
from slurmtune.errors import ConfigError

MANIFESTS = sorted((REPO / "manifests").glob("*.yaml"))


def test_there_are_manifests():
    names = {p.stem for p in MANIFESTS}
    assert {"quickstart", "speechgradebook-mistral", "aita-phi3", "trigger-teacher",
            "course-assistant-style", "course-assistant-writing", "course-assistant-all",
            "course-assistant-sample"} <= names


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.stem)
def test_every_manifest_loads_and_its_data_exists(manifest):
    cfg = load_manifest(manifest)
    assert isinstance(cfg, RunConfig) and cfg.name == manifest.stem
    data = cfg.data
    for path in [*data.inputs, *data.train_files, data.validation_file, data.eval_file]:
        if path:
            assert Path(path).is_absolute() and Path(path).is_file(), path
    assert data.inputs or data.train_files, "a manifest must name data to train on"


def test_paths_resolve_against_the_manifest_folder(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "run.yaml").write_text("data:\n  train_files: [d/train.jsonl]\n")
    monkeypatch.chdir("/")
    cfg = load_manifest(tmp_path / "m" / "run.yaml", ["data.eval_file=rel/eval.jsonl"])
    assert cfg.data.train_files == [str(tmp_path / "m" / "d" / "train.jsonl")]
    assert cfg.data.eval_file == "/rel/eval.jsonl"  # command-line paths: relative to the cwd


def test_overrides_are_typed(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text("train:\n  lr: 1e-4\n")  # PyYAML reads 1e-4 as a string; the schema says float
    cfg = load_manifest(m, ["train.epochs=3", "lora.r=8", "lora.target_modules=[q_proj, v_proj]",
                            "train.packing=true", "data.split=null", "name=my run", "train.lr=2e-4"])
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.epochs, float) and cfg.train.epochs == 3.0
    assert cfg.lora.r == 8 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.packing is True and cfg.data.split is None and cfg.name == "my run"
    assert load_manifest(m).train.lr == 1e-4


def test_every_problem_is_reported_once_with_the_fix(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text("train:\n  lrr: 1\n  packing: 'yes'\nlora: 3\nbogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_manifest(m, ["lora.r=eight", "train.method=full", "train=1", "nope.x=1", "train.lr"])
    problems = err.value.problems
    text = "\n".join(problems)
    assert "train.lrr: unknown key (did you mean 'lr'?); valid keys of train: method, epochs" in text
    assert "train.packing: 'yes' is not a boolean (true/false)" in text
    assert "lora: expected a mapping, got 3" in text
    assert "bogus: unknown key; valid keys of top level: name, description" in text
    assert "lora.r: 'eight' is not an integer" in text
    assert "train.method: 'full' is not one of 'qlora', 'lora-8bit', 'lora'" in text
    assert "train: is a section; set one of its keys, e.g. train.method=..." in text
    assert "nope: unknown key" in text
    assert "train.lr: expected key.sub=value" in text
    assert len(problems) == 9


def test_config_command_prints_the_resolved_manifest(cli, tmp_path):
    r = cli("config", REPO / "manifests/quickstart.yaml", "train.lr=0.5", "lora.r=4")
    assert r.code == 0
    printed = yaml.safe_load(r.out)
    assert printed["train"]["lr"] == 0.5 and printed["lora"]["r"] == 4
    assert printed == to_dict(load_manifest(REPO / "manifests/quickstart.yaml", ["train.lr=0.5", "lora.r=4"]))
    bad = cli("config", REPO / "manifests/quickstart.yaml", "train.lr=fast")
    assert bad.code == 2 and "train.lr: 'fast' is not a number" in bad.err
    assert "Traceback" not in bad.err
    missing = cli("config", tmp_path / "nope.yaml")
    assert missing.code == 2 and "no such manifest file" in missing.err


def test_invalid_yaml_names_the_line(cli, tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text("train:\n  lr: [1, 2\n")
    r = cli("config", m)
    assert r.code == 2 and f"{m}:" in r.err and "invalid YAML" in r.err
