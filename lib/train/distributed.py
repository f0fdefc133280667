"""Several training processes as one: who each one is, where they meet, what they agree on.

::

    rdv = rendezvous(os.environ)     # from srun's SLURM_* variables, torchrun's, or submitit's local ones
    rdv.rank, rdv.local_rank, rdv.world_size, rdv.master_addr, rdv.master_port
    export_rendezvous(rdv)           # RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT for torch
    init_process_group(rdv, timeout_s=300, cuda=False)   # gloo on CPU, NCCL on GPUs

    expand_hostlist("gpu[01-03,07],login1")  # ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1']
    check_distributed(cfg)           # login node: QLoRA, the DeepSpeed file, micro x accum x world

    reports = RankReports(run_dir, "train", rdv)   # status/train.ranks/rank-N.json
    reports.beat("training", step=12)              # each rank, after each step
    reports.failed(error)            # -> (1, "stopped responding after step 12 ...") the rank to blame

One SLURM task runs per GPU (``srun`` starts them; submitit runs the job's
callable once in each). Every task derives the same rendezvous from the
environment SLURM gives it: the first node of the step hosts it, on a port
computed from the job id, so no address is ever written into a manifest. A
requeued job gets another port (the restart count is part of it): the old
attempt's sockets may still linger for a while on that node.

On CPU (the test cluster, laptops) ``distributed.gpus_per_node`` counts
processes: with ``distributed.device: cpu`` the job asks for that many tasks per
node and no GPUs (no ``--gres``), and the processes talk over gloo.
"""

from __future__ import annotations

import json
import os
import re
import socket
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from slurmtune import SOURCE_ROOT
from slurmtune.config import RunConfig
from slurmtune.errors import SlurmtuneError, UsageError

DEEPSPEED_DIR = SOURCE_ROOT / "manifests" / "deepspeed"
DEFAULT_DEEPSPEED = DEEPSPEED_DIR / "zero2.json"
# Rendezvous ports: below Linux's ephemeral range (32768+), above the usual services
# and SLURM's own ports (6817-6819).
PORT_BASE, PORT_SPAN = 15000, 5000
# A requeued attempt shifts the port by this (prime, so attempts of nearby jobs rarely meet).
PORT_RESTART_STRIDE = 997
ZERO_STAGES = (2, 3)
# DeepSpeed keys the Hugging Face integration fills in from train.*; a number there must agree.
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


# --- host lists ------------------------------------------------------------------------

def expand_hostlist(text: str) -> list[str]:
    """SLURM's compressed host list (``gpu[01-03,07],cpu-a[1-2]``) as names, in order, the
    way ``scontrol show hostnames`` prints them; zero padding follows the range's lower bound."""
    hosts: list[str] = []
    for expression in _split_outside_brackets(text):
        hosts += _expand_expression(expression, text)
    return hosts


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if depth not in (0, 1):
            raise ValueError(f"invalid host list {text!r}: unbalanced or nested brackets")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise ValueError(f"invalid host list {text!r}: unclosed bracket")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _expand_expression(expression: str, text: str) -> list[str]:
    match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\](.*)", expression)
    if not match:
        return [expression]
    prefix, ranges, rest = match.groups()
    tails = _expand_expression(rest, text) if rest else [""]
    return [prefix + number + tail for number in _numbers(ranges, text) for tail in tails]


def _numbers(ranges: str, text: str) -> list[str]:
    numbers = []
    for item in ranges.split(","):
        low, sep, high = item.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()) or (sep and int(high) < int(low)):
            raise ValueError(f"invalid host list {text!r}: bad range {item!r}")
        width = len(low)
        numbers += [str(n).zfill(width) for n in range(int(low), int(high if sep else low) + 1)]
    return numbers


def expand_tasks_per_node(text: str) -> list[int]:
    """``SLURM_STEP_TASKS_PER_NODE`` (``4(x2)`` or ``3,2(x2)``) as one count per node."""
    counts = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise ValueError(f"invalid tasks-per-node list {text!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


# --- rendezvous ------------------------------------------------------------------------

@dataclass(frozen=True)
class Rendezvous:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # slurm, torchrun, submitit-local or single
    job_id: str = ""
    hosts: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        """``rank 1 of 8 (node gpu02, local rank 1)``: how a failure names the process."""
        where = f"node {self.hosts[self.node_rank]}" if self.node_rank < len(self.hosts) else "this node"
        return f"rank {self.rank} of {self.world_size} ({where}, local rank {self.local_rank})"


def rendezvous(env: Mapping[str, str]) -> Rendezvous:
    """Rank, local rank, world size and meeting point from the environment alone (pure).
    Precedence: torchrun's variables, an srun step's, submitit's local executor's, else one process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torchrun(env)
    if "SLURM_PROCID" in env and "SLURM_JOB_ID" in env:
        return _from_slurm(env)
    if "SUBMITIT_LOCAL_GLOBALID" in env:
        n = int(env.get("SUBMITIT_LOCAL_NTASKS", 1))
        job = env.get("SUBMITIT_LOCAL_JOB_ID", "0")
        rank = int(env["SUBMITIT_LOCAL_GLOBALID"])
        return Rendezvous(rank, int(env.get("SUBMITIT_LOCAL_LOCALID", rank)), n, n, 0, "127.0.0.1",
                          _port(env, job, 0), "submitit-local", job, ("localhost",))
    return Rendezvous(0, 0, 1, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or 0), "single", "", ("localhost",))


def _from_torchrun(env: Mapping[str, str]) -> Rendezvous:
    world = int(env["WORLD_SIZE"])
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    return Rendezvous(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world, local_world,
                      int(env.get("GROUP_RANK", env.get("NODE_RANK", 0))), env.get("MASTER_ADDR", "127.0.0.1"),
                      int(env.get("MASTER_PORT", 29500)), "torchrun", env.get("SLURM_JOB_ID", ""))


def _from_slurm(env: Mapping[str, str]) -> Rendezvous:
    # Step variables first: they describe the srun that started this process; the job-wide
    # ones (what a batch shell sees) are the fallback.
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    hosts = tuple(expand_hostlist(nodelist)) if nodelist else (socket.gethostname(),)
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    node_rank = int(env.get("SLURM_NODEID", 0))
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    counts = expand_tasks_per_node(per_node) if per_node else [world // max(1, len(hosts))] * len(hosts)
    local_world = counts[node_rank] if node_rank < len(counts) else 1
    job = env["SLURM_JOB_ID"]
    restart = int(env.get("SLURM_RESTART_COUNT") or 0)
    return Rendezvous(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world, local_world, node_rank,
                      hosts[0], _port(env, job, restart), "slurm", job, hosts)


def _port(env: Mapping[str, str], job_id: str, restart: int) -> int:
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])  # set by the site or the user: theirs wins
    return rendezvous_port(job_id, restart)


def rendezvous_port(job_id: str, restart: int = 0) -> int:
    """A port every task of the job computes alike, in [PORT_BASE, PORT_BASE + PORT_SPAN)."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return PORT_BASE + (number + PORT_RESTART_STRIDE * restart) % PORT_SPAN


def export_rendezvous(rdv: Rendezvous, environ=os.environ) -> None:
    """The variables torch.distributed, accelerate and DeepSpeed read (``env://``)."""
    port = rdv.master_port or _free_port()
    environ.update({"RANK": str(rdv.rank), "LOCAL_RANK": str(rdv.local_rank), "WORLD_SIZE": str(rdv.world_size),
                    "LOCAL_WORLD_SIZE": str(rdv.local_world_size), "GROUP_RANK": str(rdv.node_rank),
                    "MASTER_ADDR": rdv.master_addr, "MASTER_PORT": str(port)})


def _free_port() -> int:
    """A lone process meets only itself: any free local port will do."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rdv: Rendezvous, timeout_s: int, cuda: bool, deepspeed: bool = True) -> None:
    """Join the others (``env://``), waiting at most ``timeout_s`` for them; the same limit then
    bounds every collective, so a dead or hung peer fails the job instead of stalling it."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    backend, timeout = ("nccl" if cuda else "gloo"), timedelta(seconds=timeout_s)
    # DeepSpeed reduces gradients in groups of its own (dist.new_group without a timeout), which
    # torch gives its module-wide default (30 min gloo, 10 min NCCL), not the world group's:
    # the limit must be the default itself to bound every collective of the job.
    from torch.distributed import distributed_c10d
    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    if not dist.is_initialized():
        export_rendezvous(rdv)
        if cuda:
            torch.cuda.set_device(rdv.local_rank)
        dist.init_process_group(backend, init_method="env://", rank=rdv.rank, world_size=rdv.world_size,
                                timeout=timeout)
    if deepspeed:
        # DeepSpeed keeps its own handle on the group; without it ZeRO-3's loading-time
        # partitioning believes it runs alone. It adopts the group above, timeout included.
        import deepspeed as ds
        ds.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# --- login-node checks -----------------------------------------------------------------

def world_size(cfg: RunConfig) -> int:
    return cfg.distributed.nodes * cfg.distributed.gpus_per_node


def deepspeed_config_path(cfg: RunConfig) -> Path:
    """The manifest's DeepSpeed file, or the shipped ZeRO-2 one when none is named."""
    return Path(cfg.distributed.deepspeed) if cfg.distributed.deepspeed else DEFAULT_DEEPSPEED


def read_deepspeed_config(path: Path) -> dict:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"distributed.deepspeed: {path}: {e.strerror or e}; shipped configs: "
                         f"{', '.join(str(p) for p in sorted(DEEPSPEED_DIR.glob('*.json')))}") from None
    except ValueError as e:
        raise UsageError(f"distributed.deepspeed: {path}: invalid JSON: {e}") from None
    if not isinstance(config, dict):
        raise UsageError(f"distributed.deepspeed: {path}: expected a JSON object")
    return config


def zero_stage(config: dict) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def check_distributed(cfg: RunConfig) -> list[str]:
    """Everything that makes a multi-process training pointless to queue, each with its fix
    (the values themselves, such as nodes >= 1, are checked by config.value_problems)."""
    problems = []
    d, world = cfg.distributed, world_size(cfg)
    if d.nodes < 1 or d.gpus_per_node < 1:
        return []  # value_problems says so; the arithmetic below needs a world
    if cfg.train.method == "qlora" and world > 1:
        problems.append(f"train.method=qlora with {world} processes is not supported; fix: train.method=lora "
                        "with distributed.deepspeed=manifests/deepspeed/zero3.json (ZeRO-3 splits the base "
                        "weights across the GPUs, so each holds 1/N of them), or QLoRA on one GPU "
                        "(distributed.nodes=1, distributed.gpus_per_node=1)")
    try:
        config = read_deepspeed_config(deepspeed_config_path(cfg))
    except UsageError as e:
        return problems + [str(e)]
    stage = zero_stage(config)
    if stage not in ZERO_STAGES:
        problems.append(f"distributed.deepspeed: {deepspeed_config_path(cfg)}: ZeRO stage {stage}; "
                        f"expected stage 2 or 3 (manifests/deepspeed/zero2.json or zero3.json)")
    if cfg.train.method == "lora-8bit" and stage == 3:
        problems.append("train.method=lora-8bit with ZeRO-3: the 8-bit base weights cannot be split across "
                        "processes (transformers refuses a device_map under ZeRO-3); fix: "
                        "distributed.deepspeed=manifests/deepspeed/zero2.json, or train.method=lora with ZeRO-3")
    return problems + batch_problems(cfg, config)


def batch_problems(cfg: RunConfig, deepspeed_config: dict | None = None) -> list[str]:
    """micro batch x grad accum x world size against distributed.global_batch_size and against
    numbers written into the DeepSpeed file; each problem says the settings that fit."""
    t, world = cfg.train, world_size(cfg)
    effective = t.batch_size * t.grad_accum * world
    problems = []
    wanted = cfg.distributed.global_batch_size
    if wanted is not None and wanted != effective:
        problems.append(f"distributed.global_batch_size={wanted}, but train.batch_size {t.batch_size} x "
                        f"train.grad_accum {t.grad_accum} x {world} processes = {effective}; fix: "
                        + batch_fix(wanted, t.batch_size, world))
    expected = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": t.grad_accum,
                "train_batch_size": effective}
    for key in BATCH_KEYS:
        value = (deepspeed_config or {}).get(key, "auto")
        if value != "auto" and value != expected[key]:
            problems.append(f"distributed.deepspeed: {key}={value} in the DeepSpeed file, but the manifest "
                            f"gives {expected[key]}; fix: set it to \"auto\" (filled in from train.*)")
    return problems


def batch_fix(wanted: int, micro: int, world: int) -> str:
    """The settings that give ``wanted`` samples per step with ``world`` processes."""
    if wanted % world:
        step = world * micro
        nearby = sorted({step * (wanted // step), step * (wanted // step + 1)} - {0})
        counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if wanted % n == 0 and n != world]
        return (f"{wanted} does not divide among {world} processes; use a multiple of {step} ({world} processes "
                f"x train.batch_size {micro}), e.g. distributed.global_batch_size={' or '.join(map(str, nearby))}, "
                f"or a process count that divides {wanted} (e.g. {', '.join(map(str, counts[-3:]))})")
    per_process = wanted // world
    if per_process % micro == 0:
        return f"train.grad_accum={per_process // micro}"
    best = max(m for m in range(1, micro + 1) if per_process % m == 0)
    return (f"{per_process} samples per process is not a multiple of train.batch_size {micro}; use "
            f"train.batch_size={best} with train.grad_accum={per_process // best}")


# --- which rank failed -----------------------------------------------------------------

# Errors a rank sees because a peer died or hung, not because of anything it did itself.
PEER_FAILURE = re.compile(r"(Connection closed by peer|Connection reset|Broken pipe|Timed out waiting|"
                          r"timed out|[Tt]imeout|DistBackendError|DistNetworkError|NCCL|gloo|"
                          r"Socket Timeout|recvBytes|sendBytes|failed to recv|peer)")
# How long a rank that saw a peer's failure waits for the others' reports before naming a culprit.
REPORT_GRACE_S = 3.0


class RankReports:
    """``RUN_DIR/status/<step>.ranks/rank-N.json``: each rank's last step, and its error if it
    failed. From them :func:`blame` names the rank that took the job down: the one with an
    error of its own, else the one that stopped reporting (killed, crashed or hung)."""

    def __init__(self, run_dir: str | Path, step: str, rdv: Rendezvous):
        self.folder = Path(run_dir) / "status" / f"{step}.ranks"
        self.rdv = rdv
        # The attempt tells this run's reports from those a requeued job's earlier attempt left.
        self.record = {"rank": rdv.rank, "host": socket.gethostname(), "pid": os.getpid(), "job_id": rdv.job_id,
                       "attempt": int(os.environ.get("SLURM_RESTART_COUNT") or 0), "phase": "starting", "step": None}

    def beat(self, phase: str, step: int | None = None, **fields) -> None:
        import time

        from slurmtune.data.jsonio import write_json_atomic

        self.record.update(fields, phase=phase, time=time.time())
        if step is not None:
            self.record["step"] = step
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.folder / f"rank-{self.rdv.rank}.json", self.record)

    def read_all(self) -> dict[int, dict]:
        found = {}
        for path in self.folder.glob("rank-*.json"):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if (record.get("job_id"), record.get("attempt")) == (self.record["job_id"], self.record["attempt"]):
                found[int(record["rank"])] = record
        return found

    def failed(self, error: BaseException) -> tuple[int, str]:
        """Record this rank's failure; (culprit rank, one line saying what happened to it)."""
        import time

        lines = str(error).strip().splitlines() or [""]
        # Our errors say what and how to fix on their first line; a traceback's point is its last.
        text = lines[0] if isinstance(error, SlurmtuneError) else f"{type(error).__name__}: {lines[-1]}"
        peer = not isinstance(error, SlurmtuneError) and bool(PEER_FAILURE.search(f"{type(error).__name__} {error}"))
        self.beat("failed", error=text[:300], peer_failure=peer)
        deadline = time.monotonic() + (REPORT_GRACE_S if peer else 0)
        while time.monotonic() < deadline:  # the others are failing too: let them say why
            if sum(r.get("phase") == "failed" for r in self.read_all().values()) >= self.rdv.world_size:
                break
            time.sleep(0.2)
        return blame(self.read_all(), self.rdv.world_size)


def blame(records: dict[int, dict], world_size: int) -> tuple[int, str]:
    """(rank, what happened to it) from every rank's last report (pure)."""
    own = sorted((r for r in records.values() if r.get("phase") == "failed" and not r.get("peer_failure")),
                 key=lambda r: r.get("time", 0))
    if own:
        return own[0]["rank"], own[0]["error"]
    silent = [rank for rank in range(world_size) if rank not in records]
    if silent:
        return silent[0], "never reported: it did not start, or died before loading anything"
    quiet = sorted((r for r in records.values() if r.get("phase") != "failed"),
                   key=lambda r: (r.get("step") is not None, r.get("step") or 0, r.get("time", 0)))
    if quiet:
        r = quiet[0]
        where = f"after step {r['step']}" if r.get("step") is not None else f"while {r.get('phase')}"
        return r["rank"], (f"stopped responding {where} with no error of its own (killed, crashed or hung); "
                           "the others gave up waiting for it")
    first = min(records.values(), key=lambda r: r.get("time", 0))
    return first["rank"], first.get("error", "failed")


def heartbeat_callback(reports: RankReports):
    """A TrainerCallback reporting each finished step of this rank (and, in tests only, the
    fault SLURMTUNE_FAULT_RANK=RANK:hang|exit|raise:STEP injected at that step)."""
    from transformers import TrainerCallback

    fault = os.environ.get("SLURMTUNE_FAULT_RANK", "")

    class Heartbeat(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            reports.beat("training", state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            reports.beat("training", state.global_step)
            _inject_fault(fault, reports.rdv.rank, state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            reports.beat("trained", state.global_step)

    return Heartbeat()


def _inject_fault(fault: str, rank: int, step: int) -> None:
    if not fault:
        return
    target, kind, at = fault.split(":")
    if int(target) != rank or int(at) != step:
        return
    print(f"fault injection: rank {rank} {kind} at step {step}", flush=True)
    if kind == "hang":
        import time
        while True:
            time.sleep(60)
    if kind == "exit":
        os._exit(7)  # like a segfault or the OOM killer: no Python error, no report
    raise RuntimeError(f"fault injection: rank {rank} failed at step {step}")
