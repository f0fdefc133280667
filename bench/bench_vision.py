"""The vision recipe on CPU: training samples/s of image and video rows against text-only rows,
and the memory estimate against the measured peak for three frame/pixel settings.

::

    python bench/bench_vision.py            # ~1 min
    python bench/bench_vision.py --keep /tmp/bench-vision

A tiny Qwen2.5-VL (make_tiny_vlm: the real tokenizer, template and image processor config, 2
layers) trains through ``slurmtune.train.recipe.TrainingRecipe`` (LoRA r 8, batch 2, 6 steps
after one warm-up step) on rows of one kind each: text only, a 448x336 image, a 4-second 448x336
video. samples/s is printed as a ratio to the text rows measured in the same run (the frames come
from the run's frame cache after the first epoch, as in a real run). The estimate is what the
login node prints (``estimate_memory`` for the longest counted row) and the measured peak is
``measured_peak`` (the weights held plus the tensors made) of one optimizer step, for video at
3,136 / 12,544 pixels per frame and 4 / 8 frames.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import harness
from harness import Column

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from train_helpers import make_cfg, write_jsonl  # noqa: E402

QWEN_VL = REPO.parent / "shared" / "models" / "qwen2.5-vl-instruct"
MEMORY_SETTINGS = [(3136, 4), (12544, 4), (12544, 8)]  # (max_pixels, max_frames)


def media(work: Path) -> dict:
    import numpy as np
    from PIL import Image

    from test_media import write_video

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (336, 448, 3), dtype=np.uint8)).save(work / "page.png")
    return {"image": work / "page.png", "video": write_video(work / "talk.mp4", seconds=4, fps=8, size=(448, 336))}


def rows_of(kind: str, files: dict) -> list[dict]:
    part = [] if kind == "text" else [{"type": kind, kind: str(files[kind])}]
    return [{"messages": [{"role": "user", "content": [{"type": "text", "text": f"Describe item {i}."}, *part]},
                          {"role": "assistant", "content": f"Item {i} is a sample of the {kind} rows."}]}
            for i in range(16)]


def recipe_for(work: Path, model: Path, name: str, rows: list[dict], max_pixels: int, max_frames: int,
               steps: int):
    from slurmtune.train.recipe import TrainingRecipe

    cfg = make_cfg(model, max_steps=steps, batch_size=2, grad_accum=1, max_length=1024, save_steps=1000)
    cfg.vision.max_pixels, cfg.vision.max_frames = max_pixels, max_frames
    data = write_jsonl(work / f"{name}.jsonl", rows)
    cfg.data.train_files = [str(data)]
    return cfg, TrainingRecipe(cfg, work / f"run-{name}", [data], None)


def samples_per_s(work: Path, model: Path, kind: str, files: dict) -> float:
    cfg, recipe = recipe_for(work, model, f"speed-{kind}", rows_of(kind, files), 12544, 8, steps=7)
    try:
        recipe.setup()
        started = []
        recipe.trainer.add_callback(_start_after_first_step(started))
        recipe.trainer.train()
        return 6 * cfg.train.batch_size / (time.perf_counter() - started[0])
    finally:
        recipe.cleanup()


def _start_after_first_step(started: list):
    """A callback noting when the first (warm-up: decoding, allocation) step ends."""
    from transformers import TrainerCallback

    class StartAfterFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if not started:
                started.append(time.perf_counter())

    return StartAfterFirstStep()


def memory(work: Path, model: Path, files: dict, max_pixels: int, max_frames: int) -> tuple[int, int]:
    """(estimate, measured) bytes of one optimizer step on video rows."""
    from slurmtune.checks import vision_preview
    from slurmtune.train.estimate import Setting, estimate_memory, measured_peak, model_shape

    name = f"mem-{max_pixels}-{max_frames}"
    cfg, recipe = recipe_for(work, model, name, rows_of("video", files), max_pixels, max_frames, steps=1)
    preview, problems = vision_preview(cfg, None)
    assert not problems, problems
    longest = preview.report["longest"]["tokens"]
    estimate = estimate_memory(model_shape(cfg), replace(Setting.of(cfg, on_gpu=False), row_tokens=longest)).total
    try:
        recipe.setup()
        measured = measured_peak(recipe)
    finally:
        recipe.cleanup()
    return estimate, measured


def bench(args, work: Path) -> int:
    from slurmtune.train.tiny_model import make_tiny_vlm

    started = time.perf_counter()
    print(f"{harness.machine()}\n")
    model = make_tiny_vlm(work / "tiny-vl", QWEN_VL)
    files = media(work)
    speed = {kind: samples_per_s(work, model, kind, files) for kind in ("text", "image", "video")}
    harness.print_table([Column("rows", "<6"), Column("samples/s", ">10.2f"), Column("vs text", ">8.2f")],
                        [(k, v, v / speed["text"]) for k, v in speed.items()])
    print()
    rows = []
    for max_pixels, max_frames in MEMORY_SETTINGS:
        estimate, measured = memory(work, model, files, max_pixels, max_frames)
        rows.append((max_pixels, max_frames, estimate / 2**20, measured / 2**20, estimate / measured))
    harness.print_table([Column("max_pixels", ">10"), Column("max_frames", ">10"), Column("estimate MiB", ">12.1f"),
                         Column("measured MiB", ">12.1f"), Column("estimate/measured", ">17.3f")], rows)
    failures = harness.report_checks(
        [(f"max_pixels {p}, max_frames {f}: estimate/measured {r:.3f} within 0.9-1.1", 0.9 <= r <= 1.1)
         for p, f, _, _, r in rows])
    return harness.finish(failures, started)


def main(argv=None) -> int:
    ap = harness.parser(__doc__)
    harness.add_keep(ap)
    return harness.run_bench(ap.parse_args(argv), bench, "bench-vision-")


if __name__ == "__main__":
    sys.exit(main())
