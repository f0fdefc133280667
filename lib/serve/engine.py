"""The serve job's side on its node: the canary, the models laid out for the engine, the engine's
process, and ``endpoint.json`` (see slurmtune.serve.server for the whole picture).

::

    request = ServeRequest.read(serve_dir)
    prepare_models(request, serve_dir)          # canary of each adapter; merged for transformers serve
    engine = Engine(request, serve_dir).start() # a free port, the engine, its health: endpoint.json "up"
    engine.wait(stop)                            # until a signal (or the engine's exit): endpoint "gone"

endpoint.json is written atomically once the engine answers, and rewritten "gone" (with why)
when the job ends by a signal, a stop or the engine's own exit, so a reader never sees an
endpoint that was never up; a job killed outright cannot rewrite it, which is why
``slurmtune serve status`` also asks the scheduler (slurmtune.serve.server.endpoint_status).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from slurmtune.data.jsonio import write_json_atomic
from slurmtune.serve.server import (ENDPOINT, ENGINE_LOG, HUB_OWNER, KEY_FILE, LOOPBACK, READY_TIMEOUT_S,
                                    CANARY_PROMPT, EngineFailed, ServeRequest, Target, engine_argv, engine_env,
                                    free_port, read_endpoint)


# --- the canary and the models ----------------------------------------------------------

def prepare_models(request: ServeRequest, serve_dir: Path, log=print) -> None:
    """Every adapter passes the canary; for transformers serve each is merged into its base, once
    (a requeued server finds its merged models in place)."""
    for target in request.targets:
        snapshot = hub_snapshot(serve_dir, target) if request.engine == "transformers" else None
        if snapshot is not None and snapshot.is_dir():
            log(f"serve: {target.served_name}: merged model in place ({snapshot})")
            continue
        from slurmtune.evaluate.generate import load_to_merge, media_files, save_merged

        model, tokenizer = load_to_merge(target.adapter)  # refuses weights that land in no module
        canary(model, tokenizer, target)
        log(f"serve: {target.name}: canary passed (the adapter changes the base's answer)")
        if snapshot is not None:
            save_merged(model, tokenizer, snapshot, media_files(target.adapter))
            (snapshot.parent.parent / "refs").mkdir(exist_ok=True)
            (snapshot.parent.parent / "refs" / "main").write_text(snapshot.name, encoding="utf-8")
            log(f"serve: {target.served_name}: merged into {snapshot}")
        del model
        gc.collect()


def canary(peft_model, tokenizer, target: Target) -> None:
    """One fixed prompt through the base and through the adapter: the logits must differ."""
    import torch

    from slurmtune.data.chat_format import render

    ids = render(tokenizer, [{"role": "user", "content": CANARY_PROMPT}], add_generation_prompt=True)
    batch = torch.tensor([ids], device=peft_model.device)
    with torch.inference_mode():
        adapted = peft_model(input_ids=batch).logits[0, -1].float()
        with peft_model.disable_adapter():
            base = peft_model(input_ids=batch).logits[0, -1].float()
    if torch.equal(adapted, base):
        from safetensors import safe_open
        with safe_open(str(Path(target.adapter) / "adapter_model.safetensors"), "pt") as f:
            keys = sorted(f.keys())
        raise EngineFailed(f"canary: {target.adapter} answers exactly as its base {target.base} (the same logits "
                           f"for {CANARY_PROMPT!r}): its weights change nothing. Its weights: "
                           f"{', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}; an untrained adapter "
                           "(lora_B all zero) or weights named for another model do this")


def hub_snapshot(serve_dir: Path, target: Target) -> Path:
    """Where the merged model of ``target`` lies in serve/hub, a model-hub cache (so that transformers
    serve lists and loads it offline as slurmtune/<name>); named by the adapter's and base's bytes."""
    from slurmtune.data.dataset import file_sha256

    parts = [file_sha256(Path(target.adapter) / "adapter_model.safetensors"),
             file_sha256(Path(target.base) / "config.json"), target.base]
    revision = hashlib.sha1("\n".join(parts).encode()).hexdigest()  # 40 hex digits, as hub revisions are
    return serve_dir / "hub" / f"models--{HUB_OWNER}--{target.name}" / "snapshots" / revision


# --- the engine's process ----------------------------------------------------------------

class Engine:
    """The engine as a child process of the serve job, and the endpoint it answers on."""

    def __init__(self, request: ServeRequest, serve_dir: Path, job_id: str | None = None, log=print):
        self.request, self.serve_dir, self.job_id, self.log = request, Path(serve_dir), job_id, log
        self.proc: subprocess.Popen | None = None
        self.endpoint: dict = {}

    def start(self) -> "Engine":
        vllm = self.request.engine == "vllm"
        host = "0.0.0.0" if vllm else LOOPBACK
        port = free_port(host)
        argv = engine_argv(self.request, self.serve_dir, port, sys.executable)
        self.log(f"serve: starting {self.request.engine} on port {port}: {' '.join(argv)}")
        out = open(self.serve_dir / ENGINE_LOG, "ab")
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=engine_env(self.request, self.serve_dir), preexec_fn=_die_with_parent)
        out.close()
        node = socket.gethostname()
        self.endpoint = {
            "state": "up", "engine": self.request.engine, "node": node, "host": node if vllm else LOOPBACK,
            "port": port, "url": f"http://{node if vllm else LOOPBACK}:{port}/v1",
            "models": [t.name if vllm else t.served_name for t in self.request.targets],
            "job_id": self.job_id, "pid": self.proc.pid,
            "auth": f"bearer key in {KEY_FILE} (0600)" if vllm else None}
        self._wait_ready(f"http://{LOOPBACK}:{port}")
        self.endpoint["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json_atomic(self.serve_dir / ENDPOINT, self.endpoint)
        self.log(f"serve: up at {self.endpoint['url']} on {node}: {', '.join(self.endpoint['models'])}")
        return self

    def _wait_ready(self, base_url: str) -> None:
        """Until the engine answers its health endpoint with the model loaded (or dies)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        path = "/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineFailed(f"serve: the {self.request.engine} engine exited with status "
                                   f"{self.proc.returncode} before answering; see {self.serve_dir / ENGINE_LOG}")
            try:
                with urllib.request.urlopen(base_url + path, timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise EngineFailed(f"serve: the engine did not answer {path} within {READY_TIMEOUT_S} s; "
                           f"see {self.serve_dir / ENGINE_LOG}")

    def wait(self, stop: "StopFlag") -> int:
        """Serve until a signal or the engine's own exit; the endpoint is then marked gone."""
        while self.proc.poll() is None and not stop.reason:
            time.sleep(0.5)
        if stop.reason:
            self.stop()
            mark_gone(self.serve_dir, stop.reason)
            return 0
        mark_gone(self.serve_dir, f"the engine exited with status {self.proc.returncode}")
        raise EngineFailed(f"serve: the engine exited with status {self.proc.returncode}; "
                           f"see {self.serve_dir / ENGINE_LOG}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def mark_gone(serve_dir: Path, reason: str, job_id: str | None = None) -> None:
    """endpoint.json rewritten as no longer answering (kept: where it was, and why it ended); with
    ``job_id``, written for a server that never came up, so that `serve status` says why."""
    endpoint = read_endpoint(serve_dir)
    if endpoint is None:
        if job_id is None:
            return
        endpoint = {"job_id": job_id}
    if endpoint.get("state") == "gone" or (job_id is not None and str(endpoint.get("job_id")) != str(job_id)):
        return
    endpoint.update(state="gone", reason=reason, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json_atomic(Path(serve_dir) / ENDPOINT, endpoint)


class StopFlag:
    """Set by SIGTERM (scancel, preemption: SLURM requeues a preempted job by itself), SIGUSR2
    (the time limit is near) and SIGINT; the server then ends cleanly."""

    NAMES = {signal.SIGTERM: "stopped (SIGTERM: scancel, serve stop or preemption)",
             signal.SIGUSR2: "time limit reached", signal.SIGINT: "interrupted (SIGINT)"}

    def __init__(self):
        self.reason: str | None = None

    def install(self):
        """Handle the signals; returns what puts the previous handlers back."""
        previous = {sig: signal.signal(sig, self._handle) for sig in self.NAMES}
        return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]

    def _handle(self, signum, frame) -> None:
        self.reason = self.reason or self.NAMES.get(signum, f"signal {signum}")


def _die_with_parent() -> None:
    """The engine gets SIGTERM if the serve job dies without stopping it (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_server(serve_dir: Path, job_id: str | None, log=print) -> int:
    """The serve job: canary, models, engine, endpoint; until stopped."""
    stop = StopFlag()
    restore = stop.install()
    engine = None
    try:
        request = ServeRequest.read(serve_dir)
        prepare_models(request, serve_dir, log)
        if stop.reason:
            return 0
        engine = Engine(request, serve_dir, job_id, log)
        engine.start()
        return engine.wait(stop)
    except BaseException as e:
        if engine is not None:
            engine.stop()
        text = str(e).strip()
        mark_gone(serve_dir, f"failed: {text.splitlines()[0] if text else type(e).__name__}", job_id)
        raise
    finally:
        restore()

