"""Training on CPU with the 2-layer tiny model: the files a run leaves, which tokens are trained,
the preflight's errors, exact resume after a signal, atomic checkpoints, QLoRA, packing,
prompt-completion data and lineage.

Every training test lives in this module: importing TRL costs ~8 s per process, and the tiny
model and the uninterrupted baseline run are shared by the whole module.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it, when this file runs first

import pytest
import torch

from slurmtune.train.checkpoints import (
    MARKER, find_resume_checkpoint, prune, read_marker, step_dir_name, write_checkpoint,
)
from slurmtune.errors import UsageError
from slurmtune.train.tiny_model import CHAT_TEMPLATE, make_tiny_model
from slurmtune.train.recipe import StopRequest, TrainingRecipe, install_signal_handlers, preflight, run_training
from train_helpers import (
    SignalOnLine, chat_rows, logged_losses, make_cfg, prompt_completion_rows, sha256, step_lines, write_jsonl,
)

FINAL_FILES = {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json",
               "tokenizer_config.json", "lineage.json"}
CHECKPOINT_FILES = {MARKER, "adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json", "sampler_state.json", "training_config.json"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("data")
    return {"train": write_jsonl(d / "train.jsonl", chat_rows(16)),
            "validation": write_jsonl(d / "validation.jsonl", chat_rows(4)),
            "pc": write_jsonl(d / "pc.jsonl", prompt_completion_rows(16))}


@pytest.fixture(scope="module")
def baseline(tiny, data, tmp_path_factory):
    """An uninterrupted 8-step run with validation: every other test compares against it."""
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    outcome = run_training(make_cfg(tiny), run_dir, [data["train"]], data["validation"],
                           sbatch_script="#!/bin/bash\nexport HF_TOKEN=hf_never_in_lineage\nsrun python -m x\n")
    return run_dir, outcome


@pytest.fixture(scope="module")
def stopped(tiny, data, tmp_path_factory):
    """The same run, SIGUSR2 arriving while step 3 trains (after step 2's log line). Read-only: copy it."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    stop = StopRequest()
    restore = install_signal_handlers(stop)
    stdout, sys.stdout = sys.stdout, SignalOnLine(sys.stdout, " step 2/8  loss")
    try:
        outcome = run_training(make_cfg(tiny), run_dir, [data["train"]], data["validation"], stop)
    finally:
        sys.stdout = stdout
        restore()
    return run_dir, outcome, stop


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- a plain run ------------------------------------------------------------------------

def test_lora_run_writes_the_documented_files(baseline):
    run_dir, outcome = baseline
    assert outcome.status == "completed" and outcome.step == 8
    assert outcome.final_dir == run_dir / "final"
    assert {p.name for p in run_dir.iterdir()} == {"checkpoints", "final", "runs", "training.log",
                                                   "training_config.json"}
    assert {p.name for p in outcome.final_dir.iterdir()} == FINAL_FILES
    # keep_last=2 of the checkpoints at steps 2, 4, 6, 8
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    assert outcome.checkpoint == run_dir / "checkpoints" / "step-000008"
    for checkpoint in (run_dir / "checkpoints").iterdir():
        assert CHECKPOINT_FILES <= {p.name for p in checkpoint.iterdir()}
        assert read_marker(checkpoint)["step"] == int(checkpoint.name[5:])
    assert read_marker(outcome.checkpoint)["done"] is True
    assert list((run_dir / "runs").rglob("events.out.tfevents.*"))
    config = json.loads((run_dir / "training_config.json").read_text())
    assert config["lora"]["r"] == 8 and config["data"]["train_files"][0].endswith("train.jsonl")
    assert sorted(step_lines(run_dir)) == list(range(1, 9))


def test_adapter_loads_with_peft_and_losses_fall(baseline, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, outcome = baseline
    adapter = json.loads((outcome.final_dir / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (8, 16, ["q_proj", "v_proj"])
    base = AutoModelForCausalLM.from_pretrained(tiny)
    ids = torch.tensor([[1, 5, 206, 300, 301, 302]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, outcome.final_dir)
        after = tuned(ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after)
    losses = logged_losses(outcome.checkpoint)
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses.values())
    assert losses[8] < losses[1] - 0.2, losses  # four repeated chats: the loss must come down


# --- which tokens are trained -----------------------------------------------------------

def test_only_assistant_tokens_are_trained_and_preflight_counts_them(tiny, data, tmp_path):
    cfg = make_cfg(tiny)
    recipe = TrainingRecipe(cfg, tmp_path / "run", [data["train"]], None)
    try:
        recipe.setup()
        trainer, tokenizer = recipe.trainer, recipe.tokenizer
        trained_by_trainer = 0
        for row in trainer.train_dataset:
            trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
            assert [label for label in row["labels"] if label != -100] == trained
            assert tokenizer.decode(trained).startswith("Your ") and tokenizer.decode(trained).endswith("</s>")
            trained_by_trainer += len(trained)
        batch = next(iter(trainer.get_train_dataloader()))
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            kept = labels[labels != -100]
            assert tokenizer.decode(kept).split("</s>")[0].startswith("Your ")
            assert (labels[mask == 0] == -100).all()  # padding never trained
    finally:
        recipe.cleanup()
    report = preflight(cfg, [data["train"]])
    assert report["rows"] == 16 and report["trained_tokens"] == trained_by_trainer
    assert 0 < report["trained_share"] < 1


def test_preflight_refuses_when_max_length_cuts_off_the_answer(tiny, data):
    with pytest.raises(UsageError, match=r"zero trained tokens .* the assistant turn is truncated by "
                                         r"max_length 12 .*fix: raise train.max_length above \d+"):
        preflight(make_cfg(tiny, max_length=12), [data["train"]])


def test_preflight_refuses_when_every_token_would_be_trained(tiny, data, tmp_path):
    # A broken override: the generation markers wrap the whole conversation, prompts included.
    everything = tmp_path / "everything.jinja"
    everything.write_text("{% generation %}" + CHAT_TEMPLATE.replace("{%- generation -%}", "")
                          .replace("{%- endgeneration -%}", "") + "{% endgeneration %}")
    cfg = make_cfg(tiny)
    cfg.model.chat_template = str(everything)
    with pytest.raises(UsageError, match=r"every token of the first 16 rows would be trained although "
                                         r"train\.loss_on=assistant.*fix:"):
        preflight(cfg, [data["train"]])


def test_preflight_without_markers_counts_the_same_tokens_as_with_them(tiny, data, tmp_path):
    plain = tmp_path / "plain.jinja"
    plain.write_text(CHAT_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", ""))
    cfg = make_cfg(tiny, loss_on="all")
    cfg.model.chat_template = str(plain)
    assert preflight(cfg, [data["train"]])["trained_share"] == 1.0
    cfg.train.loss_on = "assistant"  # without markers the masks come from rendering each turn
    computed = preflight(cfg, [data["train"]])
    assert computed["template"].endswith("assistant tokens found by rendering each turn")
    marked = preflight(make_cfg(tiny), [data["train"]])
    assert (computed["trained_tokens"], computed["tokens"]) == (marked["trained_tokens"], marked["tokens"])


# --- stop and exact resume --------------------------------------------------------------

def test_signal_stops_at_the_next_step_with_a_checkpoint_of_it(stopped):
    run_dir, outcome, stop = stopped
    assert stop.requested and stop.reason == "SIGUSR2"
    assert (outcome.status, outcome.step, outcome.final_dir) == ("stopped", 3, None)
    assert outcome.checkpoint == run_dir / "checkpoints" / "step-000003"
    assert find_resume_checkpoint(run_dir / "checkpoints") == outcome.checkpoint
    assert read_marker(outcome.checkpoint)["step"] == 3 and read_marker(outcome.checkpoint)["done"] is False
    assert not (run_dir / "final").exists()
    assert json.loads((outcome.checkpoint / "sampler_state.json").read_text())["batches_done_in_epoch"] == 6


def test_resumed_run_equals_the_uninterrupted_one(stopped, baseline, tiny, data, tmp_path):
    run_dir = copy_run(stopped[0], tmp_path / "run")
    outcome = run_training(make_cfg(tiny), run_dir, [data["train"]], data["validation"])
    base_dir, base = baseline
    assert (outcome.status, outcome.step) == ("completed", 8)
    assert sha256(outcome.final_dir / "adapter_model.safetensors") == \
        sha256(base.final_dir / "adapter_model.safetensors")
    assert logged_losses(outcome.checkpoint) == logged_losses(base.checkpoint)  # full precision, step by step
    assert step_lines(run_dir) == step_lines(base_dir)
    log = (run_dir / "training.log").read_text()
    assert "stop requested (SIGUSR2) at step 3" in log and "resuming from checkpoints/step-000003" in log


def test_config_change_is_refused_with_a_diff_and_force_continues(stopped, tiny, data, tmp_path):
    run_dir = copy_run(stopped[0], tmp_path / "run")
    changed = make_cfg(tiny, lr=1e-3)
    changed.lora.r = 4
    changed.slurm.time_min = 5  # may change between attempts: not part of the diff
    with pytest.raises(UsageError) as refused:
        run_training(changed, run_dir, [data["train"]], data["validation"])
    message = str(refused.value)
    assert "lora.r: 8 -> 4" in message and "train.lr: 0.005 -> 0.001" in message
    assert "slurm" not in message and "train.resume=force" in message
    changed.train.resume = "force"
    with pytest.raises(UsageError, match=r"cannot continue .*adapter's shape changed \(lora.r: 8 -> 4\)"):
        run_training(changed, run_dir, [data["train"]], data["validation"])
    forced = make_cfg(tiny, lr=1e-3, resume="force")
    outcome = run_training(forced, run_dir, [data["train"]], data["validation"])
    assert (outcome.status, outcome.step) == ("completed", 8)
    assert "train.resume=force: config changed since the checkpoint: train.lr: 0.005 -> 0.001" in \
        (run_dir / "training.log").read_text()


def test_a_run_killed_before_final_finishes_without_training_again(baseline, tiny, data, tmp_path):
    run_dir = copy_run(baseline[0], tmp_path / "run")
    shutil.rmtree(run_dir / "final")
    lines_before = step_lines(run_dir)
    outcome = run_training(make_cfg(tiny), run_dir, [data["train"]], data["validation"])
    assert (outcome.status, outcome.step) == ("completed", 8)
    assert sha256(outcome.final_dir / "adapter_model.safetensors") == \
        sha256(baseline[1].final_dir / "adapter_model.safetensors")
    assert step_lines(run_dir) == lines_before  # no step trained twice
    assert (run_dir / "training.log").read_text().count(" step 9/") == 0


def test_resume_never_refuses_a_run_folder_with_checkpoints(stopped, tiny, data):
    with pytest.raises(UsageError, match="already holds checkpoints .*new run folder"):
        run_training(make_cfg(tiny, resume="never"), stopped[0], [data["train"]], data["validation"])


# --- the checkpoint format --------------------------------------------------------------

def fake_checkpoint(root: Path, step: int) -> Path:
    def fill(tmp: Path) -> None:
        (tmp / "adapter_model.safetensors").write_bytes(f"weights {step}".encode())
        (tmp / "trainer_state.json").write_text("{}")
    return write_checkpoint(root, step, epoch=step / 4, fill=fill)


def test_incomplete_checkpoints_are_ignored_and_keep_last_prunes(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        fake_checkpoint(root, step)
    assert find_resume_checkpoint(root) == root / "step-000006"
    assert json.loads((root / "step-000006" / MARKER).read_text())["epoch"] == 1.5

    (root / "step-000008").mkdir()  # killed before the marker (never renamed by us, but copied by hand)
    (root / "step-000008" / "adapter_model.safetensors").write_bytes(b"half")
    shutil.copytree(root / "step-000006", root / ".step-000010.tmp-99999")  # a dead writer's tmp folder
    late = fake_checkpoint(root, 12)
    (late / "optimizer.pt").write_bytes(b"written after the marker")
    corrupt = fake_checkpoint(root, 14)
    (corrupt / "adapter_model.safetensors").write_bytes(b"weights 99")  # same size, other bytes
    wrong = fake_checkpoint(root, 16)
    shutil.move(wrong, root / step_dir_name(18))  # marker says 16, folder says 18
    assert find_resume_checkpoint(root) == root / "step-000006"
    assert find_resume_checkpoint(tmp_path / "nothing-here") is None

    fake_checkpoint(root, 20)
    removed = prune(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir() if read_marker(p)) == ["step-000006", "step-000020"]
    assert root / "step-000004" in removed and not (root / ".step-000010.tmp-99999").exists()
    assert (root / "step-000008").exists()  # not ours to judge: unsealed folders are only ignored
    prune(root, keep_last=1, protect=(root / "step-000006",))  # the best checkpoint outlives keep_last
    assert sorted(p.name for p in root.iterdir() if read_marker(p)) == ["step-000006", "step-000020"]
    prune(root, keep_last=1)
    assert find_resume_checkpoint(root) == root / "step-000020"


# --- methods and data kinds -------------------------------------------------------------

def run_recipe(cfg, run_dir, train_files, inspect=None):
    recipe = TrainingRecipe(cfg, run_dir, train_files, None)
    try:
        recipe.setup()
        if inspect:
            inspect(recipe.trainer)
        return recipe.train()
    finally:
        recipe.cleanup()


@pytest.mark.parametrize("method, layer", [("qlora", "Linear4bit"), ("lora-8bit", "Linear8bitLt")])
def test_quantized_methods_train_on_cpu(method, layer, tiny, data, tmp_path):
    import bitsandbytes as bnb

    def quantized(trainer):
        q_proj = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
        assert isinstance(q_proj.base_layer, getattr(bnb.nn, layer))
        if method == "qlora":
            assert q_proj.base_layer.weight.quant_type == "nf4"

    outcome = run_recipe(make_cfg(tiny, method=method, max_steps=2), tmp_path / "run", [data["train"]], quantized)
    assert (outcome.status, outcome.step) == ("completed", 2)
    losses = logged_losses(outcome.checkpoint)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packing_runs_padding_free_and_packed_rows_never_attend_to_each_other(tiny, data, tmp_path, attention):
    import torch

    def packed(trainer):
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch  # rows side by side, no padding
        assert trainer.model.config._attn_implementation == attention
        ids, positions = batch["input_ids"], batch["position_ids"]
        starts = [i for i in range(ids.shape[1]) if positions[0, i] == 0] + [ids.shape[1]]
        assert len(starts) > 2  # several rows in the first batch
        model = trainer.model.eval()  # no dropout: the same numbers both ways
        with torch.no_grad():  # as TRL's compute_loss calls it: no cache, the rows told by position_ids
            together = model(input_ids=ids, position_ids=positions, use_cache=False).logits
            alone = torch.cat([model(input_ids=ids[:, a:b], use_cache=False).logits
                               for a, b in zip(starts, starts[1:])], dim=1)
        model.train()
        assert torch.allclose(together, alone, atol=1e-5), (together - alone).abs().max()

    cfg = make_cfg(tiny, packing=True, max_steps=3)
    cfg.model.attn_implementation = attention
    outcome = run_recipe(cfg, tmp_path / "run", [data["train"]], packed)
    assert outcome.status == "completed"
    assert all(math.isfinite(v) for v in logged_losses(outcome.checkpoint).values())


def test_prompt_completion_trains_on_the_completion_only(tiny, data, tmp_path):
    def completion_only(trainer):
        tokenizer = trainer.processing_class
        for row in trainer.train_dataset:
            trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
            assert tokenizer.decode(trained).endswith("out of 5.</s>")
            assert "rate the" not in tokenizer.decode(trained)

    outcome = run_recipe(make_cfg(tiny, max_steps=3), tmp_path / "run", [data["pc"]], completion_only)
    assert outcome.status == "completed"
    assert all(math.isfinite(v) for v in logged_losses(outcome.checkpoint).values())


def test_bad_train_settings_are_reported_together(tiny, data, tmp_path):
    with pytest.raises(UsageError) as refused:
        run_training(make_cfg(tiny, batch_size=0, lr=0.0, keep_last=0), tmp_path / "run", [data["train"]], None)
    message = str(refused.value)
    assert "3 problem(s)" in message and "train.batch_size: 0" in message and "train.keep_last: 0" in message
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_mixing_chat_and_prompt_completion_files_is_refused(tiny, data, tmp_path):
    with pytest.raises(UsageError, match="mix chat and prompt-completion"):
        run_training(make_cfg(tiny), tmp_path / "run", [data["train"], data["pc"]], None)


# --- lineage ----------------------------------------------------------------------------

def test_lineage_records_data_config_versions_and_no_environment(baseline, data):
    run_dir, outcome = baseline
    text = (outcome.final_dir / "lineage.json").read_text()
    lineage = json.loads(text)
    files = {Path(f["path"]).name: f for f in lineage["data_files"]}
    assert files["train.jsonl"] == {"path": files["train.jsonl"]["path"], "sha256": sha256(data["train"]),
                                    "rows": 16}
    assert files["validation.jsonl"]["rows"] == 4
    assert lineage["config"] == json.loads((run_dir / "training_config.json").read_text())
    assert lineage["packages"]["torch"] == torch.__version__ and lineage["packages"]["trl"]
    assert set(lineage["packages"]) >= {"transformers", "peft", "datasets", "accelerate", "bitsandbytes",
                                        "deepspeed", "submitit"}
    assert lineage["code"].get("git_commit") or lineage["code"].get("version")
    assert lineage["seeds"] == {"seed": 42, "data_seed": 42}
    assert lineage["started_at"] <= lineage["ended_at"] and lineage["hostname"] and lineage["python"]
    assert "hf_never_in_lineage" not in text and "HF_TOKEN=<redacted>" in lineage["sbatch_script"]
    assert os.environ["PATH"] not in text and "HF_HUB_OFFLINE" not in text


def test_the_job_logs_its_memory_estimate_and_keeps_it_in_the_lineage(baseline, tiny):
    from slurmtune.train.estimate import Setting, estimate_memory, model_shape, size

    run_dir, outcome = baseline
    cfg = make_cfg(tiny)
    estimate = estimate_memory(model_shape(cfg), Setting.of(cfg, on_gpu=False))
    memory = json.loads((outcome.final_dir / "lineage.json").read_text())["memory"]
    assert memory["estimate_bytes"] == estimate.total and memory["estimate"]["weights"] == estimate.weights
    assert memory["peak_allocated_bytes"] is None  # CPU: no allocator statistics
    assert f"estimate: {size(estimate.total)} (weights" in (run_dir / "training.log").read_text()


def test_a_field_added_to_the_schema_does_not_block_resume():
    from slurmtune.config import RunConfig
    from slurmtune.schema import to_dict
    from slurmtune.train.recipe import config_diff
    old, new = to_dict(RunConfig()), to_dict(RunConfig())
    del old["distributed"]["nodes"]  # a checkpoint written before the field existed
    assert config_diff(old, new) == []
    old["lora"]["r"] = 8
    assert config_diff(old, new) == ["lora.r: 8 -> 16"]
