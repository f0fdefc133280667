"""Serving: serve RUN|ADAPTER ... (a server job), serve status RUN, serve stop RUN."""

from __future__ import annotations

import getpass
import json
import os
import signal
import socket
import time
from pathlib import Path

from slurmtune.cli.status import add_root_flag
from slurmtune.errors import UsageError
from slurmtune.runs.status import process_alive

ACTIONS = ("status", "stop")
JOB_FILE = "job.json"


def add_commands(sub, argv: list[str]) -> None:
    p = sub.add_parser("serve", help="serve adapters over an OpenAI-compatible API as a job; "
                                     "also: serve status|stop RUN",
                       description="slurmtune serve RUN|ADAPTER [...] | serve status RUN [--json] | serve stop RUN. "
                                   "Several adapters of one base model share one server.")
    p.add_argument("target", metavar="RUN|ADAPTER|ACTION")
    p.add_argument("rest", nargs="*", metavar="RUN|ADAPTER")
    p.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                   help="transformers serve (default; CPU or GPU, the adapter merged) or vLLM (GPU, LoRA)")
    p.add_argument("--cluster", metavar="NAME", help="cluster profile in slurm/ (or a YAML path)")
    p.add_argument("--executor", choices=["auto", "slurm", "local"], default="auto",
                   help="default: slurm when sbatch is here and a cluster is chosen, else local")
    p.add_argument("--time-min", type=int, default=None, help="how long the server runs (default: the profile's)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs of the server (default: 1 for vllm, 0 for transformers)")
    p.add_argument("--wait-min", type=float, default=None,
                   help="wait this long for the endpoint (default: 10 with the local executor, 0 on SLURM)")
    p.add_argument("--dry-run", action="store_true", help="print the job's script and the engine's command; "
                                                          "create and submit nothing")
    p.add_argument("--json", action="store_true", help="serve status: print JSON")
    add_root_flag(p)
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    if args.target in ACTIONS:
        if len(args.rest) != 1:
            raise UsageError(f"usage: slurmtune serve {args.target} RUN")
        serve_dir, _ = serve_dir_of(args.rest[0], args.root)
        return _status(serve_dir, args.json) if args.target == "status" else _stop(serve_dir)
    return _submit(args)


# --- what is served, and where its serve folder is ---------------------------------------

def _adapter_of(text: str, root: str) -> tuple[Path, Path | None, str]:
    """(adapter folder, its run folder or None, the served name) of RUN or ADAPTER."""
    from slurmtune.runs.folder import Run

    path = Path(text)
    if (path / "adapter_config.json").is_file():
        run_dir = next((p for p in (path.parent, path.parent.parent) if (p / "manifest.yaml").is_file()), None)
        return path, run_dir, (run_dir.name if run_dir else path.name)
    run = Run.open(text, root)
    adapter = run.dir / "final"
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"{run.dir}: no trained adapter in final/ yet; serve it once its train step has "
                         "completed (slurmtune status " + run.run_id + ")")
    return adapter, run.dir, run.run_id


def serve_dir_of(text: str, root: str) -> tuple[Path, Path | None]:
    adapter, run_dir, _ = _adapter_of(text, root)
    return _serve_dir(adapter, run_dir), run_dir


def _serve_dir(adapter: Path, run_dir: Path | None) -> Path:
    return run_dir / "serve" if run_dir else adapter.with_name(f"{adapter.name}-serve")


# --- serve ---------------------------------------------------------------------------------

def _submit(args) -> int:
    from slurmtune.cli.run import _profile_by_name
    from slurmtune.cluster.slurm import Request, choose_executor, render_script, submit
    from slurmtune.checks import raise_problems, serve_problems
    from slurmtune.serve.server import ServeRequest, engine_argv, resolve_target

    found = [_adapter_of(t, args.root) for t in [args.target, *args.rest]]
    targets = [resolve_target(adapter, name) for adapter, _, name in found]
    serve_dir = _serve_dir(*found[0][:2])
    executor, notice = choose_executor(args.executor, args.cluster)
    profile = _profile_by_name(args.cluster)
    raise_problems(serve_problems(targets, args.engine, profile.vllm_bin) + _already_serving(serve_dir),
                   "not served")
    if notice:
        print(notice)
    gpus = args.gpus if args.gpus is not None else (1 if args.engine == "vllm" else 0)
    request = ServeRequest(targets, args.engine, args.time_min or profile.default_time_min, gpus, profile.vllm_bin)
    job_request = Request(f"{targets[0].name}-serve", request.time_min, gpus_per_node=gpus)
    if args.dry_run:
        print("# the engine's command (PORT: a free port the job picks on its node)")
        print(" ".join(engine_argv(request, serve_dir, "PORT", profile.python or "python")))
        if executor == "slurm" or args.cluster:
            print(render_script(serve_dir / "slurm", profile, job_request))
        print("dry run: nothing was created or submitted")
        return 0
    from slurmtune.jobs.serve import ServeJob
    request.write(serve_dir)
    (serve_dir / "endpoint.json").unlink(missing_ok=True)  # an earlier server's
    sub = submit(executor, serve_dir / "slurm", profile, job_request, ServeJob(serve_dir))
    job_id = sub.job_ids[0]
    _write_job(serve_dir, {"job_id": job_id, "executor": executor, "cluster": args.cluster,
                           "time_min": request.time_min, "submitted_at": time.time()})
    print(f"serve: job {job_id} ({executor}), {args.engine} engine: {', '.join(t.name for t in targets)}")
    wait_min = args.wait_min if args.wait_min is not None else (10 if executor == "local" else 0)
    if wait_min <= 0:
        print(f"follow it with: slurmtune serve status {args.target}")
        return 0
    return _wait_up(serve_dir, wait_min)


def _already_serving(serve_dir: Path) -> list[str]:
    job = read_job(serve_dir)
    if not job:
        return []
    status = endpoint_of(serve_dir, job)
    if status["state"] in ("up", "starting", "queued"):
        return [f"{serve_dir}: a server is already {status['state']} (job {job['job_id']}); "
                f"stop it first: slurmtune serve stop {serve_dir.parent}"]
    return []


def _wait_up(serve_dir: Path, wait_min: float) -> int:
    job = read_job(serve_dir)
    deadline = time.monotonic() + wait_min * 60
    while time.monotonic() < deadline:
        status = endpoint_of(serve_dir, job)
        if status["state"] in ("up", "gone"):
            break
        time.sleep(1)
    return _status(serve_dir, as_json=False)


# --- status and stop -------------------------------------------------------------------------

def _status(serve_dir: Path, as_json: bool) -> int:
    from slurmtune.serve.server import tunnel_command

    job = read_job(serve_dir)
    if not job:
        raise UsageError(f"{serve_dir}: nothing was served from here; start it with: slurmtune serve RUN")
    status = endpoint_of(serve_dir, job)
    left = _time_left(job, status)
    if as_json:
        print(json.dumps({**status, "time_left_s": left}, indent=2))
        return 0 if status["state"] == "up" else 1
    print(f"server: {status['state']} (job {job['job_id']}, {job['executor']})"
          + (f": {status['reason']}" if status.get("reason") else ""))
    if status["state"] != "up":
        if status["state"] == "gone":
            print(f"engine log: {serve_dir / 'engine.log'}")
        return 0 if status["state"] in ("queued", "starting") else 1
    print(f"url: {status['url']}  (node {status['node']})")
    print(f"models: {', '.join(status['models'])}")
    if left is not None:
        print(f"time left: {left // 60} min")
    if status.get("auth"):
        print(f"auth: Authorization: Bearer <the key in {serve_dir / 'api_key'}>")
    print(f"from a laptop: {tunnel_command(status, socket.getfqdn(), getpass.getuser())}")
    return 0


def _stop(serve_dir: Path) -> int:
    from slurmtune.cluster.slurm import cancel
    from slurmtune.serve.engine import mark_gone

    job = read_job(serve_dir)
    if not job:
        raise UsageError(f"{serve_dir}: nothing was served from here")
    if job["executor"] == "slurm":
        cancel([job["job_id"]])
    elif process_alive(job["job_id"]):
        os.kill(int(job["job_id"]), signal.SIGTERM)
        for _ in range(60):  # the server stops its engine and marks its endpoint
            if not process_alive(job["job_id"]):
                break
            time.sleep(0.5)
    mark_gone(serve_dir, "stopped by slurmtune serve stop")
    print(f"server: stopped (job {job['job_id']})")
    return 0


def endpoint_of(serve_dir: Path, job: dict) -> dict:
    from slurmtune.serve.server import endpoint_status

    return endpoint_status(serve_dir, job["job_id"], _job_state(job))


def _job_state(job: dict) -> str:
    if job["executor"] != "slurm":
        return "RUNNING" if process_alive(job["job_id"]) else "ENDED"
    from slurmtune.cluster.slurm import job_states

    return job_states([job["job_id"]])[job["job_id"]].state


def _time_left(job: dict, status: dict) -> int | None:
    if status["state"] != "up":
        return None
    if job["executor"] == "slurm":
        from slurmtune.cluster.slurm import time_left
        return time_left(job["job_id"])
    return max(0, int(job["time_min"] * 60 - (time.time() - job["submitted_at"])))


def read_job(serve_dir: Path) -> dict | None:
    try:
        return json.loads((serve_dir / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_job(serve_dir: Path, job: dict) -> None:
    from slurmtune.data.jsonio import write_json_atomic

    write_json_atomic(serve_dir / JOB_FILE, job)
