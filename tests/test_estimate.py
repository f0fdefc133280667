"""The memory and time estimate of a train job: against measured memory, and as the refusal
and warning users see before anything is queued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO
from train_helpers import chat_rows, make_cfg, write_jsonl
from slurmtune.cluster.profiles import ClusterProfile, gpu_facts, load_profile
from slurmtune.train.estimate import (
    TRL_TOKEN_TILE,
    TRL_VOCAB_TILE,
    Setting,
    estimate_memory,
    measured_peak,
    model_shape,
    requeues,
)

MISTRAL_7B = REPO.parent / "shared" / "models" / "mistral-7b-instruct-v0.3"  # its config.json, no weights
TOLERANCE = 0.05  # estimate / measured peak (bench/bench_estimate.py: 0.996-1.009)


def test_the_lm_head_tiles_are_those_of_the_installed_trl():
    from trl.kernels import chunked_logprob
    from trl.trainer import utils

    assert (TRL_TOKEN_TILE, TRL_VOCAB_TILE) == (chunked_logprob.TOKEN_CHUNK_SIZE,
                                                utils._CHUNKED_LOGPROB_CHUNK_SIZE)


@pytest.fixture(scope="module")
def wide_tiny_model(tmp_path_factory):
    """A tiny Llama wide and deep enough for its activations to weigh next to the LM head."""
    from slurmtune.train.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("wide") / "model", hidden_size=256, num_layers=6)


@pytest.mark.parametrize("checkpointing", ["off", "on"])
@pytest.mark.parametrize("max_length", [256, 512])
def test_estimate_is_within_tolerance_of_the_measured_peak(wide_tiny_model, tmp_path, checkpointing, max_length):
    from slurmtune.train.recipe import TrainingRecipe

    long_answer = " ".join(f"word{i}" for i in range(2000))  # every row is cut at max_length
    rows = [{"messages": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": long_answer}]}] * 4
    cfg = make_cfg(wide_tiny_model, max_steps=1, batch_size=2, grad_accum=1, max_length=max_length,
                   gradient_checkpointing=checkpointing, save_steps=100)
    cfg.lora.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
    recipe = TrainingRecipe(cfg, tmp_path / "run", [write_jsonl(tmp_path / "train.jsonl", rows)], None)
    try:
        recipe.setup()
        measured = measured_peak(recipe)
        assert recipe.trainer.model.is_activation_checkpointing == (checkpointing == "on")  # the trainer turns it on
    finally:
        recipe.cleanup()
    estimate = estimate_memory(model_shape(cfg), Setting.of(cfg, on_gpu=False)).total
    assert abs(estimate / measured - 1) <= TOLERANCE, (estimate, measured)


def test_checkpointing_trades_memory_for_compute_in_the_estimate():
    cfg = make_cfg(MISTRAL_7B, method="lora", batch_size=1, max_length=2048)
    shape = model_shape(cfg)
    assert shape.params == 7_248_023_552  # Mistral-7B v0.3 as published
    on = estimate_memory(shape, Setting.of(_with(cfg, gradient_checkpointing="on"), on_gpu=True))
    off = estimate_memory(shape, Setting.of(_with(cfg, gradient_checkpointing="off"), on_gpu=True))
    assert on.weights == off.weights and on.activations < off.activations / 10
    qlora = estimate_memory(shape, Setting.of(_with(cfg, method="qlora"), on_gpu=True))
    assert 3.5e9 < qlora.weights < 4.5e9  # nf4 linear layers + bf16 embeddings and head
    assert 14.0e9 < on.weights < 15.0e9  # bf16: 2 bytes a parameter


def _with(cfg, **train):
    import copy

    cfg = copy.deepcopy(cfg)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def _mistral_manifest(tmp_path: Path, extra: str = "", method: str = "lora") -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    path = tmp_path / "m.yaml"
    path.write_text(f"""
name: big
output_dir: {json.dumps(str(tmp_path / "runs"))}
data:
  train_files: [{json.dumps(data)}]
model:
  path: {json.dumps(str(MISTRAL_7B))}
train:
  method: {method}
  max_length: 2048
  epochs: 1
slurm:
  gpus: 1
  time_min: 60
{extra}""", encoding="utf-8")
    return path


def _profile(tmp_path: Path, **fields) -> Path:
    base = (REPO / "slurm" / "local-test.yaml").read_text(encoding="utf-8")
    path = tmp_path / "gpu16.yaml"
    path.write_text(base + "".join(f"\n{k}: {v}" for k, v in fields.items()) + "\n", encoding="utf-8")
    return path


def test_a_7b_bf16_lora_on_a_16_gb_gpu_is_refused_with_the_settings_that_fit(cli, tmp_path):
    r = cli("estimate", _mistral_manifest(tmp_path), "--cluster", _profile(tmp_path, gpu_mem_gb=16))
    assert r.code == 1
    problem = next(line for line in r.err.splitlines() if "more than the" in line)
    assert "train: estimated 14.8 GiB" in problem and "14.5 GiB usable of a 16 GB GPU" in problem
    assert "train.method=lora-8bit: 8.3 GiB" in problem and "train.method=qlora: 5.1 GiB" in problem
    assert "train.max_length=1024" in problem
    assert not (tmp_path / "runs").exists()

    fits = cli("estimate", _mistral_manifest(tmp_path, method="qlora"), "--cluster", _profile(tmp_path, gpu_mem_gb=16))
    assert fits.code == 0, fits.err
    assert "estimate: train needs 5.1 GiB" in fits.err and "fits: nothing was submitted" in fits.out


def test_each_sweep_trial_is_estimated_on_its_own_settings(cli, tmp_path):
    sweep = "sweep:\n  grid:\n    train.method: [lora, qlora]\n"
    r = cli("estimate", _mistral_manifest(tmp_path, sweep), "--cluster", _profile(tmp_path, gpu_type="t4"))
    assert r.code == 1
    problems = [line for line in r.err.splitlines() if "more than the" in line]
    assert len(problems) == 1 and "sweep trial" in problems[0] and "(profile gpu16: gpu_type t4)" in problems[0]
    assert sum("estimate: sweep trial" in line and "needs" in line for line in r.err.splitlines()) == 2


def test_a_time_limit_shorter_than_the_estimate_warns_with_the_requeues(cli, tmp_path):
    # 0.01 TFLOP/s makes the 8 rows x 1 epoch take hours: each 60 min attempt finishes part of it.
    r = cli("estimate", _mistral_manifest(tmp_path, method="qlora"),
            "--cluster", _profile(tmp_path, gpu_mem_gb=80, gpu_tflops=0.01))
    assert r.code == 0, r.err
    warning = next(line for line in r.err.splitlines() if line.startswith("warning:"))
    assert "but slurm.time_min=60: it will be requeued ~" in warning and "fix: slurm.time_min=" in warning


def test_requeues_count_the_attempts_a_time_limit_implies():
    # 5 h of work, 60 min attempts that each lose 120 s of start-up and the 120 s signal lead
    assert requeues(5 * 3600, time_min=60, signal_lead_s=120) == 5
    assert requeues(50 * 60, time_min=60, signal_lead_s=120) == 0
    assert requeues(3 * 3600, time_min=4, signal_lead_s=120) == 10**6  # no useful time at all


@pytest.mark.parametrize("gpu_type, mem", [("a100_80gb", 80), ("A100-SXM4-80GB", 80), ("a100", None),
                                           ("nvidia_h100", 80), ("l40s", 48), ("l40", 48), ("rtx_a6000", 48),
                                           ("v100-32g", 32), ("mystery", None)])
def test_gpu_memory_comes_from_the_type_only_when_the_name_is_unambiguous(gpu_type, mem):
    assert gpu_facts(ClusterProfile(gpu_type=gpu_type)).mem_gb == mem


def test_the_profile_states_memory_over_the_type(tmp_path):
    facts = gpu_facts(load_profile(str(_profile(tmp_path, gpu_type="a40", gpu_mem_gb=24))))
    assert (facts.mem_gb, facts.tflops) == (24, 150)
    assert facts.source == "profile gpu16: gpu_mem_gb, gpu_type a40"


@pytest.mark.slurm
def test_run_refuses_a_run_that_cannot_fit_before_anything_is_created(slurm_cluster, cli, tmp_path):
    r = cli("run", _mistral_manifest(tmp_path), "--cluster", _profile(tmp_path, gpu_mem_gb=16), "--dry-run")
    assert r.code == 1
    assert "train: estimated 14.8 GiB" in r.err and "train.method=qlora: 5.1 GiB" in r.err
    assert not (tmp_path / "runs").exists()


# --- the probe ---------------------------------------------------------------------------------

def _probed_profile(tmp_path: Path, checks: list | str) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    profile = _profile(tmp_path, cache_dir=json.dumps(str(cache)))
    body = checks if isinstance(checks, str) else json.dumps({"node": "gpu01", "when": "2026-12-01T10:00:00+0000",
                                                              "checks": checks})
    (cache / "probe-gpu16.json").write_text(body, encoding="utf-8")
    return profile


def test_the_estimate_uses_the_probed_gpu(cli, tmp_path):
    profile = _probed_profile(tmp_path, [
        {"name": "gpu", "status": "ok", "value": "1 x Tesla T4, 14.6 GiB", "memory_gb": 14.6},
        {"name": "bf16 matmul", "status": "ok", "value": "60 TFLOP/s", "tflops": 60.0}])
    r = cli("estimate", _mistral_manifest(tmp_path, method="lora-8bit"), "--cluster", profile)
    assert r.code == 0, r.err
    assert "(14.6 GB, profile gpu16: probe of 2026-12-01)" in r.err
    assert "60 TFLOP/s per GPU" in r.err


@pytest.mark.parametrize("body", ["{not json", json.dumps({"checks": "none"}), json.dumps([1, 2])])
def test_an_unreadable_probe_is_ignored(cli, tmp_path, body):
    r = cli("estimate", _mistral_manifest(tmp_path, method="qlora"), "--cluster", _probed_profile(tmp_path, body))
    assert r.code == 0, r.err
    assert "GPU memory unknown: set gpu_mem_gb (or gpu_type)" in r.err


def test_the_probe_without_a_cluster_runs_here_and_says_no_cuda_per_check(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    r = cli("doctor", "--probe")
    assert r.code == 0, r.err
    for check in ("gpu", "bf16 matmul", "bitsandbytes nf4", "nccl all-reduce"):
        assert any(line.startswith(f"no    {check} ") and "no CUDA" in line for line in r.out.splitlines()), check
    kept = json.loads((tmp_path / "slurmtune" / "probe-local.json").read_text())
    assert [c["name"] for c in kept["checks"]][:4] == ["gpu", "bf16 matmul", "bitsandbytes nf4", "nccl all-reduce"]


@pytest.mark.slurm
def test_the_probe_job_on_the_cluster_completes_and_run_reads_it_back(slurm_cluster, cli, tmp_path):
    cache = tmp_path / "cache"
    profile = _profile(tmp_path, cache_dir=json.dumps(str(cache)))
    r = cli("doctor", "--cluster", profile, "--probe")
    assert r.code == 0, r.err
    job_line = next(line for line in r.out.splitlines() if line.startswith("probe job ") and "submitted" in line)
    job_id = job_line.split()[2]
    assert f"(job {job_id})" in r.out
    assert sum("no CUDA" in line for line in r.out.splitlines()) == 4
    kept = json.loads((cache / "probe-gpu16.json").read_text())
    assert kept["job_id"] == job_id and kept["cuda"] is None

    run = cli("run", _mistral_manifest(tmp_path, method="qlora"), "--cluster", profile, "--dry-run")
    assert run.code == 0, run.err
    assert "GPU memory unknown" in run.err  # the probe found no GPU: nothing to check against, no error


def test_the_gpu_bench_runs_end_to_end_on_cpu(tmp_path):
    import subprocess

    out = tmp_path / "gpu.txt"
    p = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--cpu-smoke", "--out", str(out), "--keep",
                        str(tmp_path / "work")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    table = out.read_text(encoding="utf-8").splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["lora", "padded", "zero2"]
    assert all(float(line.split()[1].replace(",", "")) > 0 for line in table[2:5])  # trained tokens/s
    assert "skipped qlora: GPU only" in table and "skipped packed: GPU only" in table


def test_a_vision_language_model_is_estimated_from_its_config():
    cfg = make_cfg(REPO.parent / "shared" / "models" / "qwen2.5-vl-instruct", method="lora", batch_size=1,
                   max_length=2048)
    shape = model_shape(cfg)
    assert shape.params == 8_292_166_656  # Qwen2.5-VL-7B with its vision tower, as published
    assert (shape.layers, shape.hidden, shape.vocab) == (28, 3584, 152064)  # the language model's
    assert 0.999 < shape.quantizable / (28 * shape.largest_layer) < 1  # the decoder's linear weights only
    memory = estimate_memory(shape, Setting.of(cfg, on_gpu=True))
    assert 16e9 < memory.weights < 17e9  # bf16, tower included


def test_a_model_transformers_cannot_train_is_one_line(tmp_path):
    from slurmtune.errors import UsageError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}), encoding="utf-8")
    with pytest.raises(UsageError, match="cannot build a 'clip' model for training"):
        model_shape(make_cfg(tmp_path))
