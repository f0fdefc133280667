"""Serving trained adapters over an OpenAI-compatible API, as a SLURM job or a local process.

::

    targets = [resolve_target("runs/r1/final")]          # login node: what is served, and checks
    problems = target_problems(targets, "transformers")  # [] or one line per refusal
    request = ServeRequest(targets, "transformers", time_min=120, gpus=0)
    request.write(serve_dir)                              # serve/request.json (+ api_key, 0600, for vLLM)
    ...                                                   # the serve job (slurmtune.jobs.serve) runs:
    models = prepare_models(request, serve_dir)           # canary of each adapter, merged for the engine
    endpoint = start_engine(request, serve_dir, models)   # a free port, the engine, its health: endpoint.json

Engines are existing servers: ``transformers serve`` (the embedded default, CPU or GPU) serves
each adapter merged into its base, laid out as a model-hub cache under ``serve/hub`` so that
``/v1/models`` lists it as ``slurmtune/<name>``; it has no API keys, so it listens on the
node's loopback only (reach it with the ``ssh -N -L`` line ``slurmtune serve status`` prints).
``vllm serve`` (GPU nodes, its own environment: the profile's ``vllm_bin``) serves the adapters
on the base with ``--enable-lora``, listens on the node's address and demands a per-job key,
kept 0600 in the serve folder and handed to vLLM in its environment, never on a command line.

Before any endpoint is written, the canary: each adapter's saved weights must all land in the
base model, and one fixed prompt must give other logits through the adapter than through the
base. An adapter whose weight names match no module otherwise answers exactly as its base.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slurmtune.data.jsonio import write_json_atomic
from slurmtune.errors import SlurmtuneError, UsageError

ENGINES = ("transformers", "vllm")
REQUEST, ENDPOINT, KEY_FILE, ENGINE_LOG = "request.json", "endpoint.json", "api_key", "engine.log"
HUB_OWNER = "slurmtune"  # served names are slurmtune/<name>
LOOPBACK = "127.0.0.1"
# vLLM's --max-lora-rank takes one of these values.
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
CANARY_PROMPT = "Reply with one word: are you ready?"
READY_TIMEOUT_S = 900  # a large model's first load from a shared file system


@dataclass
class Target:
    """One adapter to serve."""

    name: str  # clients ask for slurmtune/<name> (transformers) or <name> (vLLM)
    adapter: str  # the adapter folder
    base: str  # its base model folder
    rank: int = 0
    use_dora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    media: dict[str, int] = field(default_factory=dict)  # {"image": 1, "video": 2}: per prompt

    @property
    def served_name(self) -> str:
        return f"{HUB_OWNER}/{self.name}"


def resolve_target(adapter_dir: str | Path, name: str) -> Target:
    """The adapter of ``adapter_dir`` (a run's final/ or a checkpoint), named ``name``."""
    adapter = Path(adapter_dir)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise UsageError(f"{adapter}: no adapter_config.json; expected a trained adapter folder "
                         "(a run's final/ or one of its checkpoints/step-NNNNNN/)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path") or ""
    lineage_file = adapter / "lineage.json"
    lineage = json.loads(lineage_file.read_text(encoding="utf-8")) if lineage_file.is_file() else {}
    return Target(name=name, adapter=str(adapter.resolve()), base=base, rank=int(config.get("r") or 0),
                  use_dora=bool(config.get("use_dora")), modules_to_save=list(config.get("modules_to_save") or []),
                  media=media_per_prompt(lineage))


def media_per_prompt(lineage: dict) -> dict[str, int]:
    """Images / videos one prompt may carry, from the data the adapter was trained on."""
    fmt = ((lineage.get("config") or {}).get("data") or {}).get("format", "")
    if fmt == "qwen-pairs":
        return {"video": 2}  # both videos of one student in one prompt
    if fmt in ("qwen-single", "qwen-corrections"):
        return {"video": 1, "image": 1}
    if fmt == "image-messages":
        return {"image": 1}
    return {}


def target_problems(targets: list[Target], engine: str, vllm_bin: str | None = None) -> list[str]:
    """Every reason the targets cannot be served by ``engine``, one line each."""
    problems = []
    if engine not in ENGINES:
        return [f"--engine {engine}: expected one of {', '.join(ENGINES)}"]
    names = [t.name for t in targets]
    problems += [f"{n}: two adapters would be served under this name; fix: serve them from different runs"
                 for n in sorted({n for n in names if names.count(n) > 1})]
    bases = sorted({t.base for t in targets})
    if len(bases) > 1:
        problems.append(f"the adapters have different base models ({', '.join(bases)}); one server serves "
                        "adapters of one base: start one server per base")
    for t in targets:
        if not t.base or not (Path(t.base) / "config.json").is_file():
            problems.append(f"{t.adapter}: base model {t.base or '(none named)'} is not a model folder here; "
                            "nodes are offline: copy the model to shared storage first (slurmtune fetch-model)")
        if engine == "vllm":
            problems += vllm_problems(t)
    if engine == "vllm" and not (vllm_bin and os.access(vllm_bin, os.X_OK)):
        problems.append(f"engine vllm: {vllm_bin or 'the profile names no vllm_bin'} is not an executable; "
                        "vLLM pins its own torch: install it in an environment of its own (python3 -m venv "
                        "~/vllm-env && ~/vllm-env/bin/pip install vllm) and set the profile's vllm_bin to "
                        "its bin/vllm")
    if engine == "transformers":
        problems += _transformers_serve_problems()
    return problems


def vllm_problems(t: Target) -> list[str]:
    """What vLLM cannot load of an adapter (it would fail at the first request, not at start)."""
    problems = []
    if t.use_dora:
        problems.append(f"{t.adapter}: a DoRA adapter (use_dora); vLLM serves plain LoRA only; "
                        "fix: --engine transformers (serves it merged)")
    if t.modules_to_save:
        problems.append(f"{t.adapter}: the adapter also trains whole modules ({', '.join(t.modules_to_save)}, "
                        "modules_to_save), which vLLM cannot load; fix: --engine transformers")
    if t.rank > VLLM_RANKS[-1]:
        problems.append(f"{t.adapter}: LoRA rank {t.rank} is above vLLM's largest --max-lora-rank "
                        f"({VLLM_RANKS[-1]}); fix: --engine transformers, or train with lora.r <= {VLLM_RANKS[-1]}")
    return problems


def _transformers_serve_problems() -> list[str]:
    from importlib.util import find_spec

    missing = [m for m in ("fastapi", "uvicorn") if find_spec(m) is None]
    if missing:
        return [f"engine transformers: {', '.join(missing)} not installed (transformers[serving]); "
                "fix: bash env/setup.sh"]
    return []


# --- the request: what the job serves -------------------------------------------------

@dataclass
class ServeRequest:
    targets: list[Target]
    engine: str
    time_min: int
    gpus: int = 0
    vllm_bin: str | None = None
    submitted: str = ""

    def write(self, serve_dir: Path) -> None:
        """request.json, and for vLLM a new key (0600) beside it."""
        serve_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.engine == "vllm":
            key = serve_dir / KEY_FILE
            key.unlink(missing_ok=True)
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        self.submitted = self.submitted or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json_atomic(serve_dir / REQUEST, asdict(self))

    @classmethod
    def read(cls, serve_dir: Path) -> "ServeRequest":
        data = json.loads((serve_dir / REQUEST).read_text(encoding="utf-8"))
        data["targets"] = [Target(**t) for t in data["targets"]]
        return cls(**data)

    @property
    def base(self) -> str:
        return self.targets[0].base


def engine_argv(request: ServeRequest, serve_dir: Path, port: int | str, python: str) -> list[str]:
    """The engine's command line (no secret in it: vLLM reads its key from the environment)."""
    if request.engine == "vllm":
        rank = next(r for r in VLLM_RANKS if r >= max(t.rank for t in request.targets))
        argv = [request.vllm_bin or "vllm", "serve", request.base, "--host", "0.0.0.0", "--port", str(port),
                "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(len(request.targets)),
                "--lora-modules", *[f"{t.name}={t.adapter}" for t in request.targets]]
        media = {k: max(t.media.get(k, 0) for t in request.targets) for k in ("image", "video")}
        media = {k: v for k, v in media.items() if v}
        if media:
            argv += ["--limit-mm-per-prompt", json.dumps(media, sort_keys=True)]
        return argv
    return [python, "-m", "transformers.cli.transformers", "serve", request.targets[0].served_name,
            "--host", LOOPBACK, "--port", str(port), "--device", "cuda" if request.gpus else "cpu",
            "--dtype", "auto", "--log-level", "warning"]


def engine_env(request: ServeRequest, serve_dir: Path) -> dict[str, str]:
    """The engine's environment: offline, its cache, and for vLLM the key."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if request.engine == "vllm":
        env["VLLM_API_KEY"] = (serve_dir / KEY_FILE).read_text(encoding="utf-8").strip()
    else:
        env["HF_HUB_CACHE"] = str(serve_dir / "hub")
    return env


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on now (the kernel's choice, so two servers on a node never collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EngineFailed(SlurmtuneError):
    pass


# --- what `serve status` says --------------------------------------------------------------

def read_endpoint(serve_dir: Path) -> dict | None:
    try:
        return json.loads((Path(serve_dir) / ENDPOINT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def endpoint_status(serve_dir: Path, job_id: str | None, job_state: str | None) -> dict:
    """endpoint.json joined with the scheduler's state of the server's job ``job_id``: "up" only
    while that job runs (a job killed outright cannot mark its endpoint gone); else "queued",
    "starting" or "gone", with why."""
    endpoint = read_endpoint(serve_dir) or {}
    if endpoint and str(endpoint.get("job_id")) != str(job_id):
        endpoint = {}  # an earlier server's
    if endpoint.get("state") == "gone" and job_state in ("PENDING", "REQUEUED"):  # preempted, requeued
        return {"state": "queued", "reason": f"requeued after: {endpoint.get('reason', 'its end')}"}
    if endpoint.get("state") == "up" and job_state != "RUNNING":
        endpoint = {**endpoint, "state": "gone", "reason": f"its job is {job_state or 'unknown'}"}
    if not endpoint:
        state = {"PENDING": "queued", "REQUEUED": "queued", "RUNNING": "starting"}.get(job_state or "", "gone")
        endpoint = {"state": state, **({"reason": f"its job is {job_state or 'unknown'}"} if state == "gone" else {})}
    return endpoint


def tunnel_command(endpoint: dict, login_host: str, user: str, local_port: int = 8000) -> str:
    """How a laptop reaches the endpoint: through the login node to the node's loopback."""
    host = endpoint.get("host", LOOPBACK)
    target = LOOPBACK if host == LOOPBACK else host
    return f"ssh -N -L {local_port}:{target}:{endpoint['port']} -J {user}@{login_host} {user}@{endpoint['node']}"


def endpoint_client(where: str, model: str | None = None, concurrency: int = 4):
    """An EndpointClient of a server given as a URL (key: $SLURMTUNE_API_KEY) or as the run (or
    serve) folder whose endpoint.json says it is up (key: the folder's api_key)."""
    from slurmtune.evaluate.endpoint import EndpointClient

    if where.startswith(("http://", "https://")):
        if not model:
            raise UsageError(f"{where}: name the served model to ask (eval.endpoint_model, or predict's MODEL)")
        return EndpointClient(where, model, os.environ.get("SLURMTUNE_API_KEY"), concurrency)
    folder = Path(where)
    serve_dir = folder / "serve" if (folder / "serve").is_dir() else folder
    endpoint = read_endpoint(serve_dir)
    if not endpoint or endpoint.get("state") != "up":
        raise UsageError(f"{where}: no server is up there ({serve_dir / ENDPOINT}: "
                         f"{(endpoint or {}).get('state', 'missing')}); start one with: slurmtune serve {where}")
    key_file = serve_dir / KEY_FILE
    key = key_file.read_text(encoding="utf-8").strip() if key_file.is_file() else None
    return EndpointClient(endpoint["url"], model or endpoint["models"][0], key, concurrency)
