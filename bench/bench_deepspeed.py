"""Per-process tokens/s of DeepSpeed LoRA with 1 and 2 processes (scaling efficiency), and the
checkpoint save time of ZeRO-2 against ZeRO-3.

::

    python bench/bench_deepspeed.py                 # defaults: 2 repeats per configuration (~5 min)
    python bench/bench_deepspeed.py --repeat 3 --max-steps 12 --threads 1

The data is the bundled SpeechGradebook sample converted with ``slurmtune convert
speechgradebook`` (42 chat rows of 570 to 2,140 tokens), the model the 2-layer tiny Llama of
``slurmtune.train.tiny_model``, the recipe the quickstart manifest's (LoRA r 8, loss on the assistant
turn) with batch 4 per process, no accumulation, max_length 2,048.

Configurations (each a set of fresh processes per repeat, interleaved so that load from other
users of the machine falls on all alike):

- ``plain-1``: one process, no DeepSpeed (the single-GPU recipe): the baseline;
- ``zero2-1``, ``zero3-1``: one process with DeepSpeed ZeRO-2 / ZeRO-3;
- ``zero2-2``, ``zero3-2``: two processes, started as torchrun starts them (RANK, WORLD_SIZE,
  MASTER_ADDR/PORT), meeting through ``slurmtune.train.distributed`` over gloo.

Every process gets ``--threads`` torch threads (default 1: a process stands for one GPU, and two
processes of one thread fill this 2-core machine). Per process, a TrainerCallback times each
optimizer step and a forward pre-hook counts the loss-bearing tokens it trained; the trainer's
``step-NNNNNN`` save is timed around ``_save_checkpoint`` (on every rank: a save is collective).

Reported (median over repeats): per-process trained tokens/s = a process's loss-bearing tokens /
the sum of its step times (mean over its ranks); aggregate tokens/s (sum over ranks); scaling
efficiency = per-process tok/s with 2 processes / with 1 (same ZeRO stage); checkpoint seconds
(median save) and ZeRO-3 / ZeRO-2. Exit 1 when a check fails: every run completes with complete
checkpoints (each rank's shard), and runs that trained the same global batches (plain-1, zero2-1,
zero3-1; zero2-2, zero3-2) end with adapters equal within 1e-5.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness
from harness import REPO, Column

CONFIGS = ("plain-1", "zero2-1", "zero2-2", "zero3-1", "zero3-2")
SAME_BATCHES = (("plain-1", "zero2-1", "zero3-1"), ("zero2-2", "zero3-2"))
ADAPTER_ATOL = 1e-5


# --- child: one rank of one training run -----------------------------------------------

def child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    from slurmtune.train.checkpoints import complete_checkpoints, missing_rank_files, read_marker, trainer_class
    from slurmtune.config import load_manifest
    from slurmtune.train.distributed import DEEPSPEED_DIR, init_process_group, rendezvous
    from slurmtune.train.recipe import TrainingRecipe

    trainer_class()  # imports TRL (seconds), not part of the run
    stage, procs = args.child.split("-")
    rdv = rendezvous(os.environ)
    deepspeed = None
    if stage != "plain":
        init_process_group(rdv, 120, cuda=False)
        deepspeed = str(DEEPSPEED_DIR / f"{stage}.json")
    cfg = load_manifest(REPO / "manifests" / "quickstart.yaml", [
        f"model.path={args.work / 'tiny-llama'}", "model.tiny_arch=llama", "data.inputs=[]",
        f"train.batch_size={args.batch_size}", "train.grad_accum=1", f"train.max_length={args.max_length}",
        f"train.max_steps={args.max_steps}", f"train.save_steps={args.save_steps}", "train.keep_last=2",
        "train.warmup_ratio=0", "lora.dropout=0.0", f"distributed.gpus_per_node={procs}",
        "distributed.device=cpu"])
    probe = harness.StepProbe()
    recipe = TrainingRecipe(cfg, args.run_dir, [str(args.train_file)], None, deepspeed=deepspeed,
                            callbacks=(probe.callback(),))
    try:
        recipe.setup()
        harness.time_saves(recipe.trainer, probe.save_s)
        setup_s = time.perf_counter() - started
        outcome = recipe.train()
    finally:
        recipe.cleanup()
    checkpoints = complete_checkpoints(args.run_dir / "checkpoints")
    markers = [read_marker(p) for p in checkpoints]
    return {"rank": rdv.rank, "world_size": rdv.world_size, "status": outcome.status, "steps": outcome.step,
            "setup_s": setup_s, "step_s": probe.step_s, "save_s": probe.save_s, "trained": probe.trained,
            "checkpoints": [p.name for p in checkpoints],
            "shards_complete": all(not missing_rank_files(m["files"], m) for m in markers if "world_size" in m)}


# --- parent ----------------------------------------------------------------------------

def run_config(args: argparse.Namespace, config: str, repeat: int) -> list[dict]:
    """Start the processes of one configuration and collect what each rank reports."""
    procs = int(config.split("-")[1])
    run_dir = args.work / f"run-{config}-{repeat}"
    shutil.rmtree(run_dir, ignore_errors=True)
    port = _free_port()
    children = []
    for rank in range(procs):
        env = {**os.environ, **harness.MODEL_ENV, "OMP_NUM_THREADS": str(args.threads),
               "PYTHONWARNINGS": "ignore::FutureWarning"}
        if procs > 1 or config != "plain-1":
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(procs), LOCAL_WORLD_SIZE=str(procs),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, __file__, "--child", config, "--work", str(args.work), "--run-dir", str(run_dir),
               "--train-file", str(args.train_file), "--threads", str(args.threads),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--max-steps", str(args.max_steps), "--save-steps", str(args.save_steps)]
        # Files, not pipes: a rank blocked on a full pipe would stall the other in a collective.
        out, err = (open(args.work / f"{config}-{repeat}-rank{rank}.{kind}", "w+") for kind in ("out", "err"))
        children.append((subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True), out, err))
    results = []
    for rank, (proc, out, err) in enumerate(children):
        proc.wait(timeout=900)
        out.seek(0), err.seek(0)
        text, errors = out.read(), err.read()
        out.close(), err.close()
        results.append(harness.read_reply(f"{config} rank {rank}", proc.returncode, text, errors))
    results[0]["adapter"] = str(run_dir / "final" / "adapter_model.safetensors")
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(runs: list[list[dict]]) -> dict:
    """Medians over repeats; each repeat is the list of its ranks' reports."""
    per_process = [statistics.mean(r["trained"] / sum(r["step_s"]) for r in ranks) for ranks in runs]
    aggregate = [sum(r["trained"] / sum(r["step_s"]) for r in ranks) for ranks in runs]
    saves = [statistics.median(s for r in ranks for s in r["save_s"]) for ranks in runs]
    return {"procs": runs[0][0]["world_size"], "steps": runs[0][0]["steps"],
            "trained_per_process": runs[0][0]["trained"], "per_process": statistics.median(per_process),
            "per_process_min": min(per_process), "per_process_max": max(per_process),
            "aggregate": statistics.median(aggregate), "step_s": statistics.median(
                statistics.mean(s for r in ranks for s in r["step_s"]) for ranks in runs),
            "save_s": statistics.median(saves), "setup_s": statistics.median(
                max(r["setup_s"] for r in ranks) for ranks in runs),
            "complete": all(r["status"] == "completed" and r["checkpoints"] and r["shards_complete"]
                            for ranks in runs for r in ranks),
            "adapters": [ranks[0]["adapter"] for ranks in runs]}


TABLE = [Column("config", "<8"), Column("procs", ">5"), Column("steps", ">5"), Column("trained/proc", ">12,"),
         Column("step s", ">7.3f"), Column("tok/s/proc", ">10,.0f"), Column("min", ">6,.0f"),
         Column("max", ">6,.0f"), Column("aggregate", ">9,.0f"), Column("ckpt s", ">7.3f"),
         Column("setup s", ">7.1f")]


def print_table(results: dict[str, dict]) -> None:
    harness.print_table(TABLE, [
        (config, s["procs"], s["steps"], s["trained_per_process"], s["step_s"], s["per_process"],
         s["per_process_min"], s["per_process_max"], s["aggregate"], s["save_s"], s["setup_s"])
        for config, s in results.items()])
    print()
    for stage in ("zero2", "zero3"):
        one, two = results[f"{stage}-1"], results[f"{stage}-2"]
        print(f"{stage}: scaling efficiency (tok/s per process, 2 vs 1 process) {two['per_process'] / one['per_process']:.2f}; "
              f"aggregate speed-up {two['aggregate'] / one['aggregate']:.2f}x")
    for procs in (1, 2):
        z2, z3 = results[f"zero2-{procs}"], results[f"zero3-{procs}"]
        print(f"{procs} process(es): checkpoint save ZeRO-3 / ZeRO-2 {z3['save_s'] / z2['save_s']:.2f}x "
              f"({z3['save_s']:.3f} s vs {z2['save_s']:.3f} s); step time ZeRO-3 / ZeRO-2 "
              f"{z3['step_s'] / z2['step_s']:.2f}x")
    base = results["plain-1"]
    print(f"DeepSpeed overhead on 1 process: ZeRO-2 {results['zero2-1']['per_process'] / base['per_process']:.2f}x, "
          f"ZeRO-3 {results['zero3-1']['per_process'] / base['per_process']:.2f}x the plain recipe's tok/s")


def check(results: dict[str, dict]) -> list[str]:
    from safetensors.torch import load_file

    checks = [(f"{c}: every run completed with complete checkpoints (each rank's shard)", s["complete"])
              for c, s in results.items()]
    for group in SAME_BATCHES:
        first = load_file(results[group[0]]["adapters"][0])
        for config in group:
            for i, path in enumerate(results[config]["adapters"]):
                other = load_file(path)
                diff = max((first[k] - other[k]).abs().max().item() for k in first)
                checks.append((f"{config} (repeat {i + 1}) adapter vs {group[0]} (repeat 1): max abs diff "
                               f"{diff:.1e} < {ADAPTER_ATOL:g}",
                               first.keys() == other.keys() and diff < ADAPTER_ATOL))
    return harness.report_checks(checks)


def bench(args: argparse.Namespace, work: Path) -> int:
    started = time.perf_counter()
    args.work = work  # the children get it as --work
    args.train_file = harness.convert_export(args.export, args.work)
    subprocess.run([sys.executable, "-c", "import sys; from slurmtune.train.tiny_model import make_tiny_model; "
                    "make_tiny_model(sys.argv[1])", str(args.work / "tiny-llama")], check=True)
    print(f"{harness.machine()}, {args.repeat} repeat(s), {args.threads} "
          f"thread(s) per process, batch {args.batch_size} per process, max_length {args.max_length}, "
          f"max_steps {args.max_steps}, save_steps {args.save_steps}, work folder {args.work}\n")
    runs: dict[str, list[list[dict]]] = {c: [] for c in CONFIGS}
    for i in range(args.repeat):
        for config in (CONFIGS if i % 2 == 0 else tuple(reversed(CONFIGS))):
            runs[config].append(run_config(args, config, i))
    results = {config: summarize(rs) for config, rs in runs.items()}
    print_table(results)
    return harness.finish(check(results), started)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = harness.parser(__doc__)
    harness.add_export(ap)
    ap.add_argument("--repeat", type=int, default=2, help="fresh runs per configuration (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--batch-size", type=int, default=4, help="train.batch_size per process (default 4)")
    ap.add_argument("--max-length", type=int, default=2048, help="train.max_length (default 2048)")
    ap.add_argument("--max-steps", type=int, default=10, help="train.max_steps (default 10)")
    ap.add_argument("--save-steps", type=int, default=5, help="train.save_steps (default 5)")
    harness.add_keep(ap)
    harness.add_training_child(ap)
    args = ap.parse_args(argv)
    if min(args.repeat, args.threads, args.batch_size, args.max_length, args.max_steps, args.save_steps) < 1:
        ap.error("expected every number >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return harness.run_bench(parse_args(argv), bench, "bench-deepspeed-", child=child)


if __name__ == "__main__":
    sys.exit(main())
