"""`slurmtune doctor --probe`: a short job on the GPU partition that says what its nodes can do.

::

    result = run_probe(gpus=2)             # on the node: a dict of checks (what the job runs)
    print(format_probe(result))            # the table `doctor --probe` prints
    write_probe(profile, result)           # probe-<profile>.json in the profile's cache folder
    read_probe(profile)                    # what `run` and `estimate` read back (None: no probe yet)

Each check is ``{"name", "status", "value", "detail"}`` with status ``ok``, ``no`` (the node
lacks it: no CUDA, no flash-attn) or ``FAIL`` (it is there and broke). Without CUDA each GPU check
says so in one line and the probe still succeeds: what it found is the answer.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from slurmtune.cluster.profiles import ClusterProfile

MATMUL_N = 8192  # bf16 square matmul for the TFLOP/s figure
ALL_REDUCE_MB = 256
CACHE_READ_MB = 512  # at most this much of the model cache is read for its speed
NO_CUDA = "no CUDA: torch sees no GPU on this node"


@dataclass
class ProbeJob:
    """What the probe job runs on its node (picklable: submitit sends it there)."""

    path: str  # where the JSON goes
    gpus: int = 1
    cache: str | None = None  # the model cache to time (the profile's HF_HOME)

    def __call__(self) -> dict:
        result = run_probe(self.gpus, self.cache)
        _write_atomic(Path(self.path), result)
        return result


def probe_path(profile: ClusterProfile) -> Path:
    base = Path(profile.cache_dir) if profile.cache_dir else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slurmtune"
    return base / f"probe-{profile.name}.json"


def read_probe(profile: ClusterProfile) -> dict | None:
    """The last probe's result for ``profile``, or None when there is none (or it is unreadable:
    the estimate then falls back to the profile's figures, so a bad file never blocks a run)."""
    path = probe_path(profile)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("checks"), list) else None


def write_probe(profile: ClusterProfile, result: dict) -> Path:
    path = probe_path(profile)
    _write_atomic(path, result)
    return path


def _write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def format_probe(result: dict) -> str:
    lines = [f"probe of {result.get('node', '?')} at {result.get('when', '?')}"
             + (f" (job {result['job_id']})" if result.get("job_id") else "")]
    for c in result["checks"]:
        detail = f"  ({c['detail']})" if c.get("detail") else ""
        lines.append(f"{c['status']:<5} {c['name']:<16} {c['value']}{detail}")
    return "\n".join(lines)


def probe_facts(result: dict) -> tuple[float | None, float | None]:
    """(GPU memory in GB, measured bf16 TFLOP/s) from a probe's result; None where it found none."""
    found = {c["name"]: c for c in result.get("checks", []) if isinstance(c, dict)}
    gpu, matmul = found.get("gpu", {}), found.get("bf16 matmul", {})
    mem = gpu.get("memory_gb") if gpu.get("status") == "ok" else None
    tflops = matmul.get("tflops") if matmul.get("status") == "ok" else None
    return mem, tflops


# --- on the node --------------------------------------------------------------------------

def run_probe(gpus: int = 1, cache: str | None = None) -> dict:
    """Every check, each in its own try: one broken library never hides the others."""
    import platform

    import torch

    cuda = torch.cuda.is_available()
    checks = [_check("gpu", _gpu)]
    for name, fn in (("bf16 matmul", _matmul), ("bitsandbytes nf4", _nf4), ("nccl all-reduce", _all_reduce)):
        checks.append(_check(name, lambda fn=fn: fn(gpus)) if cuda else {"name": name, "status": "no",
                                                                           "value": NO_CUDA})
    checks.append(_check("attention", lambda: _attention(cuda)))
    checks.append(_check("model cache read", lambda: _cache_read(cache)))
    checks.append(_check("offline cache", lambda: _offline(cache)))
    return {"node": platform.node(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "job_id": os.environ.get("SLURM_JOB_ID"), "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None, "checks": checks}


def _check(name: str, fn) -> dict:
    try:
        found = fn()
    except Exception as e:  # noqa: BLE001 - a probe reports what broke, and goes on
        return {"name": name, "status": "FAIL", "value": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return {"name": name, **found}


def _gpu() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"status": "no", "value": NO_CUDA}
    props = torch.cuda.get_device_properties(0)
    memory_gb = round(props.total_memory / 2**30, 1)
    driver = _driver_version()
    return {"status": "ok", "value": f"{torch.cuda.device_count()} x {props.name}, {memory_gb} GiB",
            "detail": f"driver {driver}, CUDA {torch.version.cuda}, compute {props.major}.{props.minor}",
            "memory_gb": memory_gb}


def _driver_version() -> str:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"
    return out[0] if out else "unknown"


def _matmul(gpus: int) -> dict:
    import torch

    a = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    tflops = 2 * MATMUL_N**3 * reps / (time.perf_counter() - start) / 1e12
    return {"status": "ok", "value": f"{tflops:.0f} TFLOP/s", "tflops": round(tflops, 1),
            "detail": f"{MATMUL_N}x{MATMUL_N} bf16, one GPU"}


def _nf4(gpus: int) -> dict:
    import torch
    try:
        import bitsandbytes as bnb
        from bitsandbytes import functional as F
    except ImportError:
        return {"status": "no", "value": "bitsandbytes is not installed: train.method=qlora and lora-8bit fail"}
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    q, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    got = bnb.matmul_4bit(x, q.t(), quant_state=state)
    want = x @ F.dequantize_4bit(q, state).t()
    error = ((got - want).abs().max() / want.abs().max()).item()
    ok = error < 1e-2
    return {"status": "ok" if ok else "FAIL", "value": f"max relative error {error:.1e} against the dequantized "
            "reference", "detail": f"bitsandbytes {bnb.__version__}" + ("" if ok else ": its CUDA kernels are wrong")}


def _all_reduce(gpus: int) -> dict:
    import torch

    n = min(gpus, torch.cuda.device_count())
    if n < 2:
        return {"status": "no", "value": f"{n} GPU allocated: nothing to all-reduce (use --gpus 2 or more)"}
    import torch.multiprocessing as mp

    port = 20000 + os.getpid() % 20000
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "busbw"
        mp.spawn(_all_reduce_rank, args=(n, port, str(out)), nprocs=n, join=True)
        busbw = float(out.read_text())
    return {"status": "ok", "value": f"{busbw:.0f} GB/s bus bandwidth", "busbw_gbs": round(busbw, 1),
            "detail": f"{ALL_REDUCE_MB} MB bf16 over {n} GPUs"}


def _all_reduce_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    x = torch.ones(ALL_REDUCE_MB * 2**20 // 2, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / reps
    if rank == 0:  # nccl-tests' bus bandwidth: size x 2(n-1)/n per second
        Path(out).write_text(str(x.numel() * 2 * 2 * (world - 1) / world / seconds / 1e9))
    dist.destroy_process_group()


def _attention(cuda: bool) -> dict:
    import importlib.util

    import torch

    found = ["sdpa"]
    missing = []
    if cuda:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            q = torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16)
            flex_attention(q, q, q)
            found.append("flex_attention")
        except Exception as e:  # noqa: BLE001
            missing.append(f"flex_attention ({type(e).__name__})")
    else:
        missing.append("flex_attention (GPU only)")
    if importlib.util.find_spec("flash_attn") is not None and cuda:
        found.append("flash_attention_2")
    else:
        missing.append("flash_attention_2 (" + ("no flash-attn package" if cuda else "GPU only") + ")")
    return {"status": "ok", "value": ", ".join(found), "detail": "not: " + ", ".join(missing) if missing else "",
            "kernels": found}


def _cache_read(cache: str | None) -> dict:
    root = Path(cache or os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    files = sorted((p for p in root.rglob("*") if p.is_file() and not p.is_symlink()),
                   key=lambda p: p.stat().st_size, reverse=True)[:8] if root.is_dir() else []
    if not files:
        return {"status": "no", "value": f"no model files under {root}"}
    start, read = time.perf_counter(), 0
    for path in files:
        with path.open("rb") as f:
            while read < CACHE_READ_MB * 2**20 and (chunk := f.read(16 * 2**20)):
                read += len(chunk)
        if read >= CACHE_READ_MB * 2**20:
            break
    seconds = max(time.perf_counter() - start, 1e-6)
    rate = read / seconds / 2**20
    return {"status": "ok", "value": f"{rate:.0f} MiB/s", "detail": f"{read / 2**20:.0f} MiB of {root} "
            "(a second read may come from the page cache)", "mib_s": round(rate)}


def _offline(cache: str | None) -> dict:
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(Path(cache) / "hub" if cache else None)
    except Exception as e:  # noqa: BLE001 - CacheNotFound and friends: the cache is not there
        return {"status": "no", "value": f"no hub cache ({type(e).__name__}); models given by path still load"}
    names = sorted(repo.repo_id for repo in info.repos if repo.repo_type == "model")
    return {"status": "ok", "value": f"{len(names)} model(s) resolve offline",
            "detail": ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")}
