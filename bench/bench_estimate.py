"""The train job's memory estimate against the peak measured while the real recipe trains, on CPU.

::

    python bench/bench_estimate.py            # 12 settings, ~1 min
    python bench/bench_estimate.py --keep /tmp/bench-est

Each setting builds a tiny Llama (hidden 128 or 256, 4 layers, the tiny tokenizer's 2,048
words), trains one optimizer step of batch 2 through ``slurmtune.train.recipe.TrainingRecipe``
(LoRA r 8 on q/k/v/o, rows longer than max_length so every batch is full) and measures its peak
with ``slurmtune.train.estimate.measured_peak``: the weights held plus the peak of the tensors
made, counted by ``TensorMemory``. The estimate is ``estimate_memory(model_shape(cfg),
Setting.of(cfg, on_gpu=False))`` for the same config: the ratio estimate / measured is printed for
max_length 256, 512 and 1024, with and without gradient checkpointing. Exit 1 when a ratio leaves
0.9-1.1 (tests/test_estimate.py holds it within 5%).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import harness
from harness import Column

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from train_helpers import make_cfg, write_jsonl  # noqa: E402

SETTINGS = [(hidden, length, gc) for hidden in (128, 256) for length in (256, 512, 1024) for gc in ("off", "on")]


def measure(work: Path, hidden: int, max_length: int, checkpointing: str) -> tuple[int, int]:
    """(estimate, measured) bytes of one optimizer step."""
    from slurmtune.train.estimate import Setting, estimate_memory, measured_peak, model_shape
    from slurmtune.train.recipe import TrainingRecipe
    from slurmtune.train.tiny_model import make_tiny_model

    model_dir = work / f"model-{hidden}"
    if not (model_dir / "config.json").is_file():
        make_tiny_model(model_dir, hidden_size=hidden, num_layers=4)
    answer = " ".join(f"word{i}" for i in range(4000))
    rows = [{"messages": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": answer}]}] * 4
    cfg = make_cfg(model_dir, max_steps=1, batch_size=2, grad_accum=1, max_length=max_length,
                   gradient_checkpointing=checkpointing, save_steps=100)
    cfg.lora.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
    run = work / f"run-{hidden}-{max_length}-{checkpointing}"
    recipe = TrainingRecipe(cfg, run, [write_jsonl(work / "train.jsonl", rows)], None)
    try:
        recipe.setup()
        measured = measured_peak(recipe)
    finally:
        recipe.cleanup()
    return estimate_memory(model_shape(cfg), Setting.of(cfg, on_gpu=False)).total, measured


def bench(args, work: Path) -> int:
    started = time.perf_counter()
    print(f"{harness.machine()}\n")
    rows = []
    for hidden, length, gc in SETTINGS:
        estimate, measured = measure(work, hidden, length, gc)
        rows.append((hidden, length, gc, estimate / 2**20, measured / 2**20, estimate / measured))
    harness.print_table([Column("hidden", ">6"), Column("max_length", ">10"), Column("checkpointing", "<13"),
                         Column("estimate MiB", ">12.1f"), Column("measured MiB", ">12.1f"),
                         Column("estimate/measured", ">17.3f")], rows)
    failures = harness.report_checks(
        (f"hidden {h}, max_length {n}, checkpointing {gc}: {ratio:.3f} within 0.9-1.1", 0.9 <= ratio <= 1.1)
        for h, n, gc, _, _, ratio in rows)
    return harness.finish(failures, started)


def main(argv=None) -> int:
    ap = harness.parser(__doc__)
    harness.add_keep(ap)
    return harness.run_bench(ap.parse_args(argv), bench, "bench-estimate-")


if __name__ == "__main__":
    sys.exit(main())
