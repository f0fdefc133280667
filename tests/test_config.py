"""Run manifests: every bundled one loads; overrides and errors behave as documented."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from slurmtune.cluster.profiles import ClusterProfile
from slurmtune.config import RunConfig, SweepConfig, apply_values, load_manifest
from slurmtune.schema import build, to_dict, value_problems
from slurmtune.errors import ConfigError
from slurmtune.runs.sweep import expand

MANIFESTS = sorted((REPO / "manifests").glob("*.yaml"))


def test_there_are_manifests():
    names = {p.stem for p in MANIFESTS}
    assert {"quickstart", "speechgradebook-mistral", "aita-phi3", "trigger-teacher",
            "course-assistant-style", "course-assistant-writing", "course-assistant-all",
            "course-assistant-sample", "course-assistant-tool", "course-assistant-rag"} <= names


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
    assert "lora: is a section; expected a mapping of its keys (e.g. lora.r), got 3" in text
    assert "bogus: unknown key; valid keys of top level: name, description" in text
    assert "lora.r: 'eight' is not an integer" in text
    assert "train.method: 'full' is not one of 'qlora', 'lora-8bit', 'lora'" in text
    assert "train: is a section; expected a mapping of its keys (e.g. train.method), got 1" in text
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


def test_a_section_can_be_set_as_a_mapping_from_every_source(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text("lora: {r: 4}\n")
    cfg = load_manifest(m, ["train={lr: 3.0e-4, epochs: 1}"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.lr, cfg.train.epochs) == (4, 32, 3e-4, 1.0)
    trial = apply_values(cfg, {"lora": {"alpha": 8}})
    assert (trial.lora.r, trial.lora.alpha) == (4, 8) and cfg.lora.alpha == 32  # a copy, merged


def test_a_dotted_key_past_a_mapping_field_sets_one_entry(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text("data: {options: {trigger_value: 'TRIGGER:'}}\n")
    cfg = load_manifest(m, ["data.options.clean_replacement=Alice"])
    assert cfg.data.options == {"trigger_value": "TRIGGER:", "clean_replacement": "Alice"}
    trial = apply_values(cfg, {"data.options.clean_replacement": "Bob"})
    assert trial.data.options["clean_replacement"] == "Bob" and cfg.data.options["clean_replacement"] == "Alice"
    with pytest.raises(ConfigError) as err:
        load_manifest(m, ["sweep.grid.train.lr=3", "name.x=1"])
    assert err.value.problems == ["sweep.grid.train.lr: 3 is not a list of values", "name.x: 'name' has no sub-keys"]


# --- one message for a typo, whatever its source ------------------------------------------

TYPO = ("train.lrr: unknown key (did you mean 'lr'?); valid keys of train: method, epochs, max_steps, "
        "batch_size, grad_accum, lr, warmup_ratio, max_length, packing, kernels, gradient_checkpointing, loss_on, early_stopping_patience, "
        "save_steps, save_each_epoch, keep_last, seed, resume")


def test_a_typo_gets_the_same_message_from_a_manifest_the_command_line_and_a_sweep(cli, tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text("train:\n  lrr: 1.0e-4\n")
    with pytest.raises(ConfigError) as from_manifest:
        load_manifest(m)
    m.write_text("name: typo\n")
    with pytest.raises(ConfigError) as from_command_line:
        load_manifest(m, ["train.lrr=1e-4"])
    cfg = load_manifest(m)
    with pytest.raises(ConfigError) as from_sweep:
        expand(SweepConfig(grid={"train.lrr": [1e-4, 2e-4]}), cfg, m.parent)
    assert from_manifest.value.problems == from_command_line.value.problems == [TYPO]
    assert from_sweep.value.problems == [TYPO]
    r = cli("config", m, "train.lrr=1e-4")
    assert r.code == 2 and r.err == f"slurmtune: error: {m}: 1 problem(s):\n  {TYPO}\n"


def test_sweep_paths_resolve_against_the_manifest_folder_and_command_line_ones_against_the_cwd(
        tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    m = tmp_path / "m" / "run.yaml"
    m.write_text("sweep:\n  grid: {data.train_files: [[a.jsonl], [b.jsonl]]}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_manifest(m, ["data.eval_file=e.jsonl"])
    trials = expand(cfg.sweep, cfg, m.parent)
    assert [t.config.data.train_files for t in trials] == [[str(tmp_path / "m" / "a.jsonl")],
                                                           [str(tmp_path / "m" / "b.jsonl")]]
    assert all(t.config.data.eval_file == str(tmp_path / "e.jsonl") for t in trials)
    assert [t.overrides["data.train_files"] for t in trials] == [["a.jsonl"], ["b.jsonl"]]  # as written


# --- value constraints --------------------------------------------------------------------

BAD_VALUES = {  # override -> the problem it makes
    "data.split=1.5": "data.split: 1.5; expected a share between 0 and 1 (e.g. 0.9), or null",
    "lora.r=0": "lora.r: 0; expected 1 or more",
    "lora.alpha=0": "lora.alpha: 0; expected a positive number",
    "lora.dropout=1": "lora.dropout: 1.0; expected a value in [0, 1)",
    "lora.target_modules=[]": "lora.target_modules: empty; expected module names such as q_proj, v_proj",
    "train.epochs=0": "train.epochs and train.max_steps: expected epochs > 0 or max_steps > 0",
    "train.batch_size=0": "train.batch_size: 0; expected 1 or more",
    "train.grad_accum=0": "train.grad_accum: 0; expected 1 or more",
    "train.lr=0": "train.lr: 0.0; expected a positive learning rate",
    "train.warmup_ratio=1": "train.warmup_ratio: 1.0; expected a share in [0, 1)",
    "train.max_length=0": "train.max_length: 0; expected 1 or more tokens",
    "train.early_stopping_patience=0": "train.early_stopping_patience: 0; expected 1 or more",
    "train.save_steps=0": "train.save_steps: 0; expected 1 or more",
    "train.keep_last=0": "train.keep_last: 0; expected 1 or more (resume needs a checkpoint)",
    "eval.shards=0": "eval.shards: 0; expected 1 or more",
    "eval.array_parallelism=0": "eval.array_parallelism: 0; expected 1 or more",
    "eval.max_new_tokens=0": "eval.max_new_tokens: 0; expected 1 or more",
    "eval.batch_size=0": "eval.batch_size: 0; expected 1 or more",
    "slurm.time_min=0": "slurm.time_min: 0; expected 1 or more minutes",
    "slurm.gpus=-1": "slurm.gpus: -1; expected 0 or more",
    "slurm.cpus_per_gpu=0": "slurm.cpus_per_gpu: 0; expected 1 or more",
    "slurm.mem_gb_per_gpu=0": "slurm.mem_gb_per_gpu: 0; expected 1 or more",
    "distributed.nodes=0": "distributed.nodes: 0; expected 1 or more",
    "distributed.gpus_per_node=0": "distributed.gpus_per_node: 0; expected 1 or more",
    "distributed.global_batch_size=0": "distributed.global_batch_size: 0; expected 1 or more",
    "distributed.timeout_s=5": "distributed.timeout_s: 5; expected 10 s or more (ranks start at different "
                               "moments; loading a model takes a while)",
    "sweep.grid={train.lr: []}": "sweep.grid: {'train.lr': []}; expected a non-empty list of values for each key",
    "sweep.samples=-1": "sweep.samples: -1; expected 1 or more with sweep.random, else 0",
    "sweep.parallelism=0": "sweep.parallelism: 0; expected 1 or more",
    "sweep.metric=": "sweep.metric: empty; expected a metric such as eval_loss",
}


def test_value_problems_lists_every_bad_value_at_once_with_the_fix(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text("name: bad\n")
    assert value_problems(load_manifest(m)) == []
    assert value_problems(load_manifest(m, list(BAD_VALUES))) == list(BAD_VALUES.values())


@pytest.mark.parametrize("overrides", [
    ["train.save_steps=0", "train.save_each_epoch=true"],  # checkpoints per epoch: no step count needed
    ["train.epochs=0", "train.max_steps=10"],
    ["slurm.cpus_per_gpu=null", "slurm.gpus=0", "data.split=0.9", "sweep.random={lora.r: {choice: [4]}}",
     "sweep.samples=2"],
])
def test_values_that_depend_on_another_field_pass_when_it_allows_them(tmp_path, overrides):
    m = tmp_path / "m.yaml"
    m.write_text("name: ok\n")
    assert value_problems(load_manifest(m, overrides)) == []


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.stem)
def test_bundled_manifests_have_no_value_problems(manifest):
    assert value_problems(load_manifest(manifest)) == []


def test_a_cluster_profile_with_a_meaningless_value_is_refused():
    with pytest.raises(ConfigError) as err:
        build(ClusterProfile, {"cpus_per_gpu": 0, "signal_lead_s": 0, "max_array_size": None}, "site.yaml")
    assert err.value.problems == ["cpus_per_gpu: 0; expected 1 or more",
                                  "signal_lead_s: 0; expected 1 or more seconds"]


# --- the schema explained -----------------------------------------------------------------

def _walk(cls, prefix=""):
    """(key, field, is_section) of every field of a schema class and of its sections."""
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        yield prefix + f.name, f, dataclasses.is_dataclass(hint)
        if dataclasses.is_dataclass(hint):
            yield from _walk(hint, prefix + f.name + ".")


@pytest.mark.parametrize("schema", [RunConfig, ClusterProfile], ids=lambda c: c.__name__)
def test_every_field_of_the_schema_is_documented(schema):
    undocumented = [key for key, f, _ in _walk(schema) if not f.metadata.get("doc", "").strip()]
    assert undocumented == []


def test_explain_one_field(cli):
    r = cli("config", "--explain", "train.lr")
    assert r.code == 0 and r.err == ""
    assert r.out.splitlines() == [
        "train.lr: a number; default 0.0001; expected a positive learning rate",
        "    peak learning rate: reached after the warmup, then decayed linearly to 0",
    ]
    r = cli("config", "--explain", "train.save_steps")
    assert r.out.splitlines()[0] == "train.save_steps: an integer; default 50; expected 1 or more (unless save_each_epoch)"
    r = cli("config", "--explain", "data.train_files")
    assert r.out.splitlines()[0] == "data.train_files: a list of paths; default []"


def test_explain_a_section(cli):
    r = cli("config", "--explain", "lora")
    assert r.code == 0
    assert r.out.splitlines() == [
        "[lora] The adapter trained on top of the frozen base model.",
        "lora.r: an integer; default 16; expected 1 or more",
        "    rank of the adapter's matrices: more is more capacity, memory and time",
        "lora.alpha: an integer; default 32; expected a positive number",
        "    scale of the adapter's update (alpha / r); commonly 2 x r",
        "lora.dropout: a number; default 0.05; expected a value in [0, 1)",
        "    dropout on the adapter's input while training",
        "lora.target_modules: a list of strings; default ['q_proj', 'k_proj', 'v_proj', 'o_proj']; "
        "expected a non-empty value: module names such as q_proj, v_proj",
        "    names of the base model's linear layers that get an adapter",
        "lora.vision: a list of 'tower', 'projector'; default []",
        "    vision-language models: also adapt the vision tower's linear layers (tower) and/or the projector",
        "    that maps its features into the language model (projector); []: both stay frozen",
    ]


def test_explain_everything_groups_every_key_by_section(cli):
    r = cli("config", "--explain")
    assert r.code == 0
    lines = r.out.splitlines()
    assert [line for line in lines if line.startswith("[")] == [
        "[top level] A whole run: convert -> validate -> train -> eval -> report.",
        "[data] What the run converts, trains on and evaluates on.",
        "[model] The base model. Compute nodes are offline: a local folder or HF cache path.",
        "[lora] The adapter trained on top of the frozen base model.",
        "[train] How the adapter is trained. Defaults follow the course-assistant recipe (2 epochs, batch 1 x 8, "
        "lr 1e-4).",
        "[vision] How images and videos are given to a vision-language model (model.path with a vision tower).",
        "[eval] How the eval array generates answers for the eval set and scores them.",
        "[slurm] Where and how jobs run. Site facts (partition, account, ...) live in slurm/ profiles.",
        "[distributed] Training over several processes with DeepSpeed (see slurmtune.train.distributed).",
        "[sweep] Trials of a sweep (see slurmtune.runs.sweep); each factor given multiplies the others.",
    ]
    keys = [line.split(":")[0] for line in lines if line and not line.startswith(("[", " "))]
    assert keys == [key for key, _, is_section in _walk(RunConfig) if not is_section]
    assert "slurm.cpus_per_gpu: an integer or null; default null; expected 1 or more" in lines
    assert cli("config", "--explain", "--json").out.count('"key"') == len(keys)


def test_explain_profile_keys(cli):
    r = cli("config", "--explain-profile", "signal_lead_s")
    assert r.code == 0 and r.out.splitlines() == [
        "signal_lead_s: an integer; default 120; expected 1 or more seconds",
        "    USR2 comes this long before the time limit: time to checkpoint",
    ]


def test_explain_an_unknown_key_says_the_close_match_and_the_valid_keys(cli, tmp_path):
    r = cli("config", "--explain", "train.lrr")
    assert r.code == 2 and r.out == "" and r.err == f"slurmtune: error: {TYPO}\n"
    r = cli("config", "--explain", "trian")
    assert r.code == 2 and r.err == ("slurmtune: error: trian: unknown key (did you mean 'train'?); valid keys of "
                                     "top level: name, description, output_dir, data, model, lora, train, vision, eval, "
                                     "slurm, distributed, sweep\n")
    r = cli("config")
    assert r.code == 2 and "give a MANIFEST (or --explain [KEY]" in r.err
