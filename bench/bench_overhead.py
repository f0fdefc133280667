"""slurmtune's training against the plain TRL script a user would write: the loop in one process,
and the whole command against ``python script.py``.

::

    python bench/bench_overhead.py               # 3 repeats of each (~4 min)
    python bench/bench_overhead.py --repeat 5 --skip-process

Both train the same thing: the 2-layer tiny Llama of ``slurmtune.train.tiny_model``, the bundled
SpeechGradebook sample converted (42 chat rows of 570 to 2,140 tokens), LoRA r 16 on all seven
projections, batch 4, max_length 1536, 8 optimizer steps, lr 1e-4, loss on the assistant's
tokens, no evaluation, no checkpoint, on CPU.

1. The loop (one process, the model and data loaded before the clock starts; ``--repeat``
   rounds, the two alternating, one untimed warm-up each): plain = TRL's ``SFTTrainer`` given the
   ``messages`` rows (``assistant_only_loss``), ``trainer.train()``; slurmtune = the recipe every
   train job runs (``TrainingRecipe``: setup untimed, then ``train()`` timed, which includes what
   its guarantees need: the stop-signal and log callbacks, deterministic kernels, the final
   adapter's save with its lineage).
2. The process (``--skip-process`` leaves it out): ``slurmtune run MANIFEST --executor debug``
   (every step of the pipeline in one process, as the local executor's job runs them: convert,
   validate, train) against ``python plain.py`` (the script of part 1, as a file, converting
   nothing: it reads the converted rows), paired rounds, wall time and peak RSS of each child.

Ratios slurmtune / plain of the medians; the goals are at most 1.05 (loop) and 1.15 (process).
Exit 1 when a run fails or trains a different number of steps.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness
from harness import REPO, Column

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS, BATCH, MAX_LENGTH = 8, 4, 1536

PLAIN = '''\
import sys, time
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer


def main(model_dir, train_file, out):
    rows = load_dataset("json", data_files=train_file, split="train").select_columns(["messages"])
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=SFTConfig(output_dir=out, max_steps=STEPS, per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
                       learning_rate=1e-4, assistant_only_loss=True, save_strategy="no", report_to=[],
                       use_cpu=True, disable_tqdm=True, seed=42),
        train_dataset=rows,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(out)
    return seconds, trainer.state.global_step


if __name__ == "__main__":
    main(*sys.argv[1:4])
'''.replace("STEPS", str(STEPS)).replace("BATCH", str(BATCH)).replace("MAX_LENGTH", str(MAX_LENGTH)) \
    .replace("TARGETS", repr(TARGETS))


def parse_args(argv):
    ap = harness.parser(__doc__)
    ap.add_argument("--repeat", type=int, default=3, help="rounds of each (default 3)")
    ap.add_argument("--skip-process", action="store_true", help="the loop only")
    harness.add_keep(ap)
    return ap.parse_args(argv)


def recipe_config(model_dir: Path):
    from slurmtune.config import RunConfig

    cfg = RunConfig(name="overhead")
    cfg.model.path = str(model_dir)
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules = 16, 32, 0.05, list(TARGETS)
    for key, value in dict(method="lora", max_steps=STEPS, batch_size=BATCH, grad_accum=1, max_length=MAX_LENGTH,
                           lr=1e-4, warmup_ratio=0.0, save_steps=1000).items():
        setattr(cfg.train, key, value)
    return cfg


def loop_ours(work: Path, model_dir: Path, train: Path, i: int) -> tuple[float, int]:
    from slurmtune.train.recipe import TrainingRecipe

    run = work / f"ours-{i}"
    shutil.rmtree(run, ignore_errors=True)
    recipe = TrainingRecipe(recipe_config(model_dir), run, [str(train)], None)
    try:
        recipe.setup()
        start = time.perf_counter()
        outcome = recipe.train()
        return time.perf_counter() - start, outcome.step
    finally:
        recipe.cleanup()


def loop_plain(work: Path, model_dir: Path, train: Path, i: int) -> tuple[float, int]:
    """The plain script's main() in this process: the timer wraps its trainer.train() alone."""
    out = work / f"plain-{i}"
    shutil.rmtree(out, ignore_errors=True)
    namespace = {"__name__": "plain"}
    exec(compile(PLAIN, "plain.py", "exec"), namespace)
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's printed dicts
        return namespace["main"](str(model_dir), str(train), str(out))


def measure_loops(args, work: Path, model_dir: Path, train: Path) -> dict:
    times: dict[str, list[float]] = {"plain": [], "slurmtune": []}
    steps = set()
    loop_plain(work, model_dir, train, -1)
    loop_ours(work, model_dir, train, -1)
    for i in range(args.repeat):
        order = [("plain", loop_plain), ("slurmtune", loop_ours)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            seconds, step = fn(work, model_dir, train, i)
            times[name].append(seconds)
            steps.add(step)
    return {"times": times, "steps": steps}


def measure_processes(args, work: Path, model_dir: Path, train: Path, export: Path) -> dict:
    script = work / "plain.py"
    script.write_text(PLAIN, encoding="utf-8")
    manifest = work / "m.yaml"
    manifest.write_text(json.dumps({
        "name": "overhead", "output_dir": str(work / "runs"),
        "data": {"format": "speechgradebook", "inputs": [str(export)]},
        "model": {"path": str(model_dir)},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": TARGETS},
        "train": {"method": "lora", "max_steps": STEPS, "batch_size": BATCH, "grad_accum": 1,
                  "max_length": MAX_LENGTH, "lr": 1e-4, "warmup_ratio": 0.0, "save_steps": 1000},
        "slurm": {"gpus": 0}}), encoding="utf-8")
    commands = {"plain": [sys.executable, "-c", PEAK_AT_EXIT, "path", str(script), str(model_dir), str(train),
                          str(work / "plain-out")],
                "slurmtune": [sys.executable, "-c", PEAK_AT_EXIT, "module", "slurmtune", "run", str(manifest),
                              "--executor", "debug"]}
    found: dict[str, list[tuple[float, float]]] = {"plain": [], "slurmtune": []}
    for i in range(args.repeat):
        for name in (("plain", "slurmtune") if i % 2 == 0 else ("slurmtune", "plain")):
            found[name].append(_timed_child(commands[name]))
    return found


# The child's own peak (VmHWM of its memory map), written as it exits. Not getrusage: a child
# forked from this process, which holds torch and TRL, inherits its peak RSS until it execs.
PEAK_AT_EXIT = """\
import atexit, os, re, runpy, sys
def peak():
    with open("/proc/self/status") as f, open(os.environ["PEAK_FILE"], "w") as out:
        out.write(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1))
atexit.register(peak)
kind, target, *sys.argv[1:] = sys.argv[1:]
sys.argv[0] = target
runpy.run_path(target, run_name="__main__") if kind == "path" else runpy.run_module(target, run_name="__main__")
"""


def _timed_child(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    peak_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-overhead-peak-{os.getpid()}"
    env = {**os.environ, **harness.MODEL_ENV, "SLURMTUNE_QUIET": "1", "PEAK_FILE": str(peak_file)}
    start = time.perf_counter()
    child = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise harness.ChildFailed(f"{' '.join(command[4:7])} failed: {child.stderr.decode()[-500:]}")
    peak_kib = int(peak_file.read_text())
    peak_file.unlink()
    return seconds, peak_kib / 1024


def bench(args, work: Path) -> int:
    from slurmtune.train.tiny_model import make_tiny_model

    started = time.perf_counter()
    print(f"{harness.machine()}, {args.repeat} round(s)\n")
    model_dir = make_tiny_model(work / "tiny-llama")
    train = harness.convert_export(harness.SAMPLE_EXPORT, work)
    loops = measure_loops(args, work, model_dir, train)
    med = {k: statistics.median(v) for k, v in loops["times"].items()}
    rows = [("loop", med["plain"], med["slurmtune"], med["slurmtune"] / med["plain"], 1.05)]
    rounds = ["loop seconds, each round: " + "; ".join(f"{k} {', '.join(f'{s:.2f}' for s in v)}"
                                                       for k, v in loops["times"].items())]
    if not args.skip_process:
        procs = measure_processes(args, work, model_dir, train, harness.SAMPLE_EXPORT)
        wall = {k: statistics.median(s for s, _ in v) for k, v in procs.items()}
        rss = {k: statistics.median(m for _, m in v) for k, v in procs.items()}
        rows.append(("process s", wall["plain"], wall["slurmtune"], wall["slurmtune"] / wall["plain"], 1.15))
        rows.append(("peak RSS MiB", rss["plain"], rss["slurmtune"], rss["slurmtune"] / rss["plain"], None))
        rounds.append("process seconds / peak RSS MiB, each round: " + "; ".join(
            f"{k} {', '.join(f'{s:.1f}/{m:.0f}' for s, m in v)}" for k, v in procs.items()))
    harness.print_table([Column("what", "<12"), Column("plain TRL", ">10.2f"), Column("slurmtune", ">10.2f"),
                         Column("ratio", ">6.2f"), Column("goal", ">5.2f")], rows)
    print("\n" + "\n".join(rounds))
    checks = [(f"every loop trained {STEPS} steps (saw {sorted(loops['steps'])})", loops["steps"] == {STEPS})]
    return harness.finish(harness.report_checks(checks), started)


def main(argv=None) -> int:
    return harness.run_bench(parse_args(argv), bench, "bench-overhead-")


if __name__ == "__main__":
    sys.exit(main())
