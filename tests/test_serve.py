"""`slurmtune serve`: the login-node refusals (vLLM's limits, weights named for another model), the
vLLM command against a recorded golden file, the canary in the job, what `serve status` says of an
endpoint whose job is gone, and on the real test cluster a transformers server whose greedy answer
is exactly `slurmtune predict`'s, stopped, beside a second one, and killed outright."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, read_jsonl, write_jsonl
from slurm_cluster import wait_for_state
from slurmtune.serve.engine import prepare_models
from slurmtune.serve.server import (EngineFailed, ServeRequest, endpoint_client, endpoint_status, engine_argv,
                                    resolve_target)
from slurmtune.train.tiny_model import make_tiny_model

PROMPT = "Score this speech: clear structure, weak conclusion."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("serve") / "tiny-llama")


def make_adapter(model_dir: Path, out: Path, trained: bool = True, **lora) -> Path:
    """An adapter as training leaves it (weights and tokenizer); ``trained``: nonzero lora_B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=lora.pop("r", 4), target_modules=["q_proj", "v_proj"], init_lora_weights=not trained,
                        **lora)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        get_peft_model(model, config).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def rename_keys(adapter: Path) -> Path:
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k.replace("self_attn", "attention"): v for k, v in tensors.items()}, str(weights))
    return adapter


def vllm_profile(tmp_path: Path) -> Path:
    vllm = tmp_path / "vllm-env" / "bin" / "vllm"
    vllm.parent.mkdir(parents=True)
    vllm.write_text("#!/bin/sh\nexit 1\n")
    vllm.chmod(0o755)
    profile = tmp_path / "gpu-cluster.yaml"
    profile.write_text((REPO / "slurm" / "campus-example.yaml").read_text() + f"\nvllm_bin: {vllm}\n")
    return profile


# --- the login node -------------------------------------------------------------------------

def test_vllm_refuses_what_it_cannot_load_before_queueing(cli, tiny, tmp_path):
    dora = make_adapter(tiny, tmp_path / "dora", use_dora=True)
    saved = make_adapter(tiny, tmp_path / "saved", modules_to_save=["lm_head"])
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "r": 1024}))
    r = cli("serve", dora, saved, "--engine", "vllm", "--cluster", vllm_profile(tmp_path), "--dry-run")
    assert r.code == 1
    lines = r.err.strip().splitlines()
    assert lines[0] == "slurmtune: error: not served: 3 problem(s):"
    assert [line.split(": ", 1)[1] for line in lines[1:]] == [
        "a DoRA adapter (use_dora); vLLM serves plain LoRA only; fix: --engine transformers (serves it merged)",
        "the adapter also trains whole modules (lm_head, modules_to_save), which vLLM cannot load; "
        "fix: --engine transformers",
        "LoRA rank 1024 is above vLLM's largest --max-lora-rank (512); fix: --engine transformers, "
        "or train with lora.r <= 512"]
    assert not (tmp_path / "dora-serve").exists() and not (tmp_path / "saved-serve").exists()


def test_vllm_command_and_job_script_are_the_recorded_ones(cli, tiny, tmp_path):
    """Flags, the environment it runs in and no key anywhere: vLLM reads it from its environment."""
    one, two = make_adapter(tiny, tmp_path / "one", r=16), make_adapter(tiny, tmp_path / "two", r=24)
    r = cli("serve", one, two, "--engine", "vllm", "--cluster", vllm_profile(tmp_path), "--time-min", "90",
            "--dry-run")
    assert r.code == 0, r.err
    text = r.out.replace(str(tmp_path), "<TMP>").replace(str(tiny), "<BASE>").replace(sys.executable, "PYTHON")
    assert text == (REPO / "tests" / "golden" / "serve-vllm.txt").read_text()
    assert not (tmp_path / "one-serve").exists()


def test_vllm_gets_a_key_of_its_own_and_the_media_limits_of_its_data(tiny, tmp_path):
    adapter = make_adapter(tiny, tmp_path / "pairs")
    (adapter / "lineage.json").write_text(json.dumps({"config": {"data": {"format": "qwen-pairs"}}}))
    request = ServeRequest([resolve_target(adapter, "pairs")], "vllm", time_min=5, gpus=1, vllm_bin="vllm")
    serve_dir = tmp_path / "serve"
    request.write(serve_dir)
    key = (serve_dir / "api_key").read_text()
    assert len(key) >= 40 and (serve_dir / "api_key").stat().st_mode & 0o777 == 0o600
    argv = engine_argv(request, serve_dir, 8000, "python")
    assert argv[argv.index("--limit-mm-per-prompt") + 1] == '{"video": 2}'  # both videos of one student
    assert key not in " ".join(argv) and key not in (serve_dir / "request.json").read_text()


def test_weights_named_for_another_model_are_refused_on_the_login_node(cli, tiny, tmp_path):
    adapter = rename_keys(make_adapter(tiny, tmp_path / "renamed"))
    r = cli("serve", adapter, "--dry-run")
    assert r.code == 1
    assert r.err.splitlines()[1] == (
        f"  {adapter}: 4 of 4 adapted modules are not in the base model {tiny}, e.g. "
        "model.layers.0.attention.q_proj (the base has model.layers.0.self_attn.q_proj); the adapter would "
        "change nothing; fix: use the adapter trained on this base")


def test_predict_refuses_an_adapter_whose_weights_land_nowhere(tiny, tmp_path):
    from slurmtune.errors import UsageError
    from slurmtune.evaluate.generate import load_for_generation

    adapter = rename_keys(make_adapter(tiny, tmp_path / "renamed"))
    with pytest.raises(UsageError, match=r"8 of 8 adapter weights match no module of the base model, e\.g\. "
                                         r"base_model\.model\.model\.layers\.0\.attention\.q_proj\.lora_A\.weight "
                                         r"\(the base's own name for such a weight: "
                                         r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight\)"):
        load_for_generation(adapter)


# --- the job's canary -----------------------------------------------------------------------

def test_the_canary_fails_an_adapter_that_changes_nothing(tiny, tmp_path):
    """Weights that load but are all zero (never trained, or zeroed by a bad conversion): the job
    fails before any endpoint exists, naming the adapter's weights."""
    untrained = make_adapter(tiny, tmp_path / "untrained", trained=False)
    request = ServeRequest([resolve_target(untrained, "untrained")], "transformers", time_min=5)
    serve_dir = tmp_path / "serve"
    request.write(serve_dir)
    with pytest.raises(EngineFailed) as e:
        prepare_models(request, serve_dir, log=lambda line: None)
    assert str(e.value).startswith(f"canary: {untrained} answers exactly as its base {tiny} (the same logits")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in str(e.value)
    assert not (serve_dir / "endpoint.json").exists() and not (serve_dir / "hub").exists()


def test_the_job_fails_an_adapter_whose_weights_land_nowhere_and_says_why(tiny, tmp_path):
    from slurmtune.errors import UsageError
    from slurmtune.jobs.serve import ServeJob

    renamed = rename_keys(make_adapter(tiny, tmp_path / "renamed"))
    serve_dir = tmp_path / "serve"
    ServeRequest([resolve_target(renamed, "renamed")], "transformers", time_min=5).write(serve_dir)
    with pytest.raises(UsageError):
        ServeJob(serve_dir)()
    endpoint = json.loads((serve_dir / "endpoint.json").read_text())
    assert endpoint["state"] == "gone" and endpoint["job_id"] == str(os.getpid())
    assert endpoint["reason"].startswith(f"failed: {renamed}: 8 of 8 adapter weights match no module of the base")
    assert not (serve_dir / "hub").exists()


def test_a_trained_adapter_passes_and_is_merged_once(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny, tmp_path / "good")
    request = ServeRequest([resolve_target(adapter, "good")], "transformers", time_min=5)
    serve_dir = tmp_path / "serve"
    request.write(serve_dir)
    lines: list[str] = []
    prepare_models(request, serve_dir, log=lines.append)
    snapshot = next((serve_dir / "hub" / "models--slurmtune--good" / "snapshots").iterdir())
    assert (serve_dir / "hub" / "models--slurmtune--good" / "refs" / "main").read_text() == snapshot.name
    merged = AutoModelForCausalLM.from_pretrained(snapshot)  # no peft
    base = AutoModelForCausalLM.from_pretrained(tiny)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    prepare_models(request, serve_dir, log=lines.append)  # a requeued server: nothing merged again
    assert lines[-1] == f"serve: slurmtune/good: merged model in place ({snapshot})"


def test_an_endpoint_is_up_only_while_its_own_job_runs(tmp_path):
    (tmp_path / "endpoint.json").write_text(json.dumps({"state": "up", "job_id": "41", "port": 5}))
    assert endpoint_status(tmp_path, "41", "RUNNING")["state"] == "up"
    assert endpoint_status(tmp_path, "41", "CANCELLED") == {
        "state": "gone", "job_id": "41", "port": 5, "reason": "its job is CANCELLED"}
    assert endpoint_status(tmp_path, "42", "RUNNING") == {"state": "starting"}  # an earlier server's file
    assert endpoint_status(tmp_path, "42", "PENDING") == {"state": "queued"}
    (tmp_path / "endpoint.json").write_text(json.dumps({"state": "gone", "job_id": "41", "reason": "stopped (SIGTERM)"}))
    assert endpoint_status(tmp_path, "41", "PENDING") == {"state": "queued", "reason": "requeued after: stopped (SIGTERM)"}


# --- the real test cluster --------------------------------------------------------------------

def chat(url: str, model: str, prompt: str, max_tokens: int) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}
    request = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"].strip()


def wait_for_endpoint(serve_dir: Path, ready, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            endpoint = json.loads((serve_dir / "endpoint.json").read_text())
        except (OSError, ValueError):
            endpoint = {}
        if endpoint and ready(endpoint):
            return endpoint
        time.sleep(1)
    raise AssertionError(f"{serve_dir}: no such endpoint within {timeout_s} s")


def serve_status(cli, target) -> dict:
    r = cli("serve", "status", target, "--json")
    return json.loads(r.out)


@pytest.mark.slurm
def test_serve_on_the_cluster(slurm_cluster, cli, tiny, tmp_path):
    one, two = make_adapter(tiny, tmp_path / "one"), make_adapter(tiny, tmp_path / "two", r=8)
    r = cli("serve", one, "--cluster", "local-test", "--time-min", "10", "--wait-min", "4")
    assert r.code == 0, r.err
    job_id = json.loads((tmp_path / "one-serve" / "job.json").read_text())["job_id"]
    assert r.out.splitlines()[0] == f"serve: job {job_id} (slurm), transformers engine: one"
    up = serve_status(cli, one)
    assert up["state"] == "up" and up["models"] == ["slurmtune/one"] and up["job_id"] == job_id
    assert 0 < up["time_left_s"] <= 600
    assert f"ssh -N -L 8000:127.0.0.1:{up['port']} -J " in cli("serve", "status", one).out

    # Greedy through the server is exactly slurmtune predict's answer, and predict --endpoint's.
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"messages": [{"role": "user", "content": PROMPT}]}])
    assert cli("predict", one, evals, "--out", tmp_path / "p.jsonl", "--max-new-tokens", "12").code == 0
    expected = read_jsonl(tmp_path / "p.jsonl")[0]["actual"]
    assert chat(up["url"], "slurmtune/one", PROMPT, 12) == expected != ""
    r = cli("predict", "slurmtune/one", evals, "--endpoint", one, "--out", tmp_path / "q.jsonl",
            "--max-new-tokens", "12")
    assert r.code == 0, r.err
    assert read_jsonl(tmp_path / "q.jsonl")[0]["actual"] == expected
    # eval.endpoint: the eval tasks' client, from the serve folder (the endpoint's first model)
    assert endpoint_client(str(tmp_path / "one-serve")).answers(read_jsonl(evals), 12) == [expected]

    # Preempted (requeued by the scheduler), it comes back on a port of its own and says so.
    subprocess.run(["scontrol", "requeue", job_id], check=True, env=slurm_cluster)
    back = wait_for_endpoint(tmp_path / "one-serve", lambda e: e["state"] == "up" and e["started"] != up["started"])
    assert serve_status(cli, one)["url"] == back["url"]
    assert chat(back["url"], "slurmtune/one", PROMPT, 12) == expected
    up = back

    # A second server on the same node gets its own port; killed outright, it is never reported up.
    r = cli("serve", two, "--cluster", "local-test", "--time-min", "10", "--wait-min", "4")
    assert r.code == 0, r.err
    second = serve_status(cli, two)
    assert second["state"] == "up" and second["node"] == up["node"] and second["port"] != up["port"]
    subprocess.run(["scancel", "-s", "KILL", second["job_id"]], check=True, env=slurm_cluster)
    wait_for_state(second["job_id"], timeout_s=60, env=slurm_cluster)
    assert json.loads((tmp_path / "two-serve" / "endpoint.json").read_text())["state"] == "up"  # never rewritten
    gone = serve_status(cli, two)
    assert gone["state"] == "gone" and gone["reason"].startswith("its job is ")

    r = cli("serve", "stop", one)
    assert r.code == 0 and r.out == f"server: stopped (job {job_id})\n"
    wait_for_state(job_id, timeout_s=60, env=slurm_cluster)
    ended = json.loads((tmp_path / "one-serve" / "endpoint.json").read_text())
    assert ended["state"] == "gone"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{up['url']}/models", timeout=5)
