"""Trained tokens/s of packed (padding-free) against padded batches; checkpoint time against step time.

::

    python bench/bench_train.py                   # defaults: 3 repeats per configuration (~5 min)
    python bench/bench_train.py --repeat 3 --max-steps 4
    python bench/bench_train.py --max-length 1536 --keep /tmp/bench-train   # keep the run folders

The data is the bundled SpeechGradebook sample (``examples/speechgradebook/exported.json``)
converted with ``slurmtune convert speechgradebook``: 42 chat rows of 570 to 2,140 tokens
(a realistic spread: a rubric prompt, a transcript, a JSON answer). The model is the
2-layer tiny Llama of ``slurmtune.train.tiny_model``, built in the work folder; the recipe is the
quickstart manifest's (LoRA r 8, batch 4, lr 1e-3, loss on the assistant turn only), with
``train.max_length`` raised to the tiny model's 2,048 positions so that (nearly) no row is cut.

Two configurations, each in its own fresh interpreter per repeat (``import trl`` alone takes
seconds, and a warm process would favour the one run second), interleaved so load from other
users of the machine falls on both alike:

- padded: ``train.packing=false``: rows padded to the longest of their batch of 4;
- packed: ``train.packing=true``: TRL's ``bfd`` packing, padding-free batches of 4 bins of up
  to ``max_length`` tokens, flattened into one sequence with ``position_ids``.

Each child calls the same recipe ``run_training`` calls (``TrainingRecipe``: setup, train,
cleanup) on a fresh run folder, with a TrainerCallback that times every optimizer step
(``on_step_begin`` to ``on_step_end``) and registers a forward pre-hook on the model that
counts what the trainer really feeds it: batch slots, real (non-pad) tokens and loss-bearing
(label != -100) tokens. The trainer's ``step-NNNNNN`` save (``_save_checkpoint``) is timed
around the call. ``save_steps`` is set so that each run writes checkpoints mid-run.

Reported per configuration (the pad fraction and token counts are the same every repeat):
trained tokens/s = loss-bearing tokens / sum of step times, best and median of the repeats
(other users' load only ever slows a run down, so the best is the least disturbed one), and
per CPU-second (process CPU time of the steps, which that load disturbs less); the pad fraction
= padding slots / all slots of the batches the model saw; checkpoint seconds (median of the
run's step-NNNNNN saves) and their ratio to that run's mean step time (median of repeats).

Exit 1 when a check fails: the padded run's real tokens must equal the tokenized lengths
(capped at max_length) of the rows it trained on, the packed run must contain no padding,
both must save at least one complete checkpoint, and with full epochs both must train the
same number of loss-bearing tokens.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import harness
from harness import REPO, Column

CONFIGS = ("padded", "packed")
BASELINE = "padded"


# --- child: tokenized lengths of the data (no training) -------------------------------------

def child_lengths(args: argparse.Namespace) -> dict:
    """Length and trained tokens of every row as training tokenizes it; builds the tiny model."""
    from slurmtune.data.dataset import TemplateFit, encode, prepare_tokenizer, read_train_files
    from slurmtune.train.tiny_model import ensure_model

    cfg = make_config(args, packing=False)
    data = read_train_files([str(args.train_file)])
    ensure_model(cfg.model)  # builds the tiny model when missing
    tokenizer, _ = prepare_tokenizer(cfg, data.kind)
    fit = TemplateFit(tokenizer)
    rows = []
    for record in data.records:
        ids, trained = encode(tokenizer, {"messages": fit.messages(record["messages"])}, data.kind,
                              cfg.train.loss_on, None)
        rows.append({"tokens": len(ids), "trained": sum(trained),
                     "trained_kept": sum(trained[:args.max_length])})
    return {"rows": rows, "kind": data.kind}


# --- child: one training run, instrumented ---------------------------------------------------

def make_config(args: argparse.Namespace, packing: bool):
    from slurmtune.config import load_manifest

    overrides = [f"model.path={args.work / 'tiny-llama'}", "model.tiny_arch=llama", "data.inputs=[]",
                 f"train.batch_size={args.batch_size}", "train.grad_accum=1",
                 f"train.max_length={args.max_length}", f"train.packing={str(packing).lower()}",
                 f"train.save_steps={args.save_steps}", "train.keep_last=2", "train.warmup_ratio=0"]
    if args.max_steps > 0:
        overrides.append(f"train.max_steps={args.max_steps}")
    else:
        overrides.append(f"train.epochs={args.epochs}")
    return load_manifest(REPO / "manifests" / "quickstart.yaml", overrides)


class Probe(harness.StepProbe):
    """The steps of one training run (harness.StepProbe), and what the model is fed in each batch."""

    def __init__(self):
        super().__init__()
        self.batches: list[dict] = []

    def on_batch(self, kwargs) -> None:
        ids, labels = kwargs["input_ids"], kwargs["labels"]
        mask = kwargs.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(ids.numel())
        padding_free = kwargs.get("position_ids") is not None and mask is None
        if padding_free:  # one row of concatenated sequences; each starts again at position 0
            positions = kwargs["position_ids"][0]
            starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
            lengths = [b - a for a, b in zip(starts, starts[1:])]
        else:
            lengths = mask.sum(dim=1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
        self.batches.append({"shape": list(ids.shape), "slots": int(ids.numel()), "real": real,
                             "trained": int((labels != -100).sum()), "padding_free": padding_free,
                             # attention scores per layer and head: what a dense mask over the batch's
                             # rows computes, and what a kernel that skips padding and other rows needs
                             "attn_dense": ids.shape[0] * ids.shape[1] ** 2,
                             "attn_needed": sum(n * n for n in lengths)})


def child_train(args: argparse.Namespace, config: str) -> dict:
    import slurmtune.train.recipe  # noqa: F401  (imports are not the run)
    from slurmtune.train.checkpoints import complete_checkpoints, trainer_class
    from slurmtune.train.recipe import TrainingRecipe

    trainer_class()  # imports TRL (seconds)
    cfg = make_config(args, packing=(config == "packed"))
    run_dir = args.run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    probe = Probe()
    recipe = TrainingRecipe(cfg, run_dir, [str(args.train_file)], None, callbacks=(probe.callback(),))
    try:
        start = time.perf_counter()
        recipe.setup()
        setup_s = time.perf_counter() - start
        harness.time_saves(recipe.trainer, probe.save_s)
        start = time.perf_counter()
        outcome = recipe.train()
        train_s = time.perf_counter() - start
        rows_in_dataset = len(recipe.trainer.train_dataset)
        epoch = recipe.trainer.state.epoch
    finally:
        recipe.cleanup()
    return {"config": config, "status": outcome.status, "steps": outcome.step, "epoch": epoch,
            "setup_s": setup_s, "train_s": train_s, "step_s": probe.step_s, "step_cpu_s": probe.step_cpu_s,
            "save_s": probe.save_s,
            "batches": probe.batches, "attn_implementation": probe.attn_implementation,
            "dataset_rows": rows_in_dataset,
            "checkpoints": [p.name for p in complete_checkpoints(run_dir / "checkpoints")]}


# --- parent ----------------------------------------------------------------------------------

def spawn(args: argparse.Namespace, phase: str, run_dir: Path | None = None) -> dict:
    child_args = [phase, "--work", str(args.work), "--max-length", str(args.max_length),
                  "--batch-size", str(args.batch_size), "--max-steps", str(args.max_steps),
                  "--epochs", str(args.epochs), "--save-steps", str(args.save_steps),
                  "--train-file", str(args.train_file)]
    if run_dir is not None:
        child_args += ["--run-dir", str(run_dir)]
    return harness.spawn_child(__file__, child_args, what=phase, env=harness.MODEL_ENV)


def summarize(runs: list[dict]) -> dict:
    """Median over repeats of the timings; token counts from the first run (checked equal)."""
    first = runs[0]
    batches = first["batches"]
    slots = sum(b["slots"] for b in batches)
    real = sum(b["real"] for b in batches)
    trained = sum(b["trained"] for b in batches)
    rates = [trained / sum(r["step_s"]) for r in runs]
    cpu_rates = [trained / sum(r["step_cpu_s"]) for r in runs]
    step_means = [statistics.mean(r["step_s"]) for r in runs]
    saves = [statistics.median(r["save_s"]) for r in runs if r["save_s"]]
    ratios = [statistics.median(r["save_s"]) / statistics.mean(r["step_s"]) for r in runs if r["save_s"]]
    return {"steps": first["steps"], "epoch": first["epoch"], "slots": slots, "real": real, "trained": trained, "pad_fraction": (slots - real) / slots,
            "shape": batches[0]["shape"], "padding_free": all(b["padding_free"] for b in batches),
            "rate": statistics.median(rates), "rate_best": max(rates), "rates": rates,
            "cpu_rate": statistics.median(cpu_rates), "step_s": min(step_means), "save_s": statistics.median(saves) if saves else None,
            "save_step": statistics.median(ratios) if ratios else None,
            "saves": sum(len(r["save_s"]) for r in runs) // len(runs),
            "train_s": statistics.median(r["train_s"] for r in runs),
            "attn_dense": sum(b["attn_dense"] for b in batches),
            "attn_needed": sum(b["attn_needed"] for b in batches),
            "attn_implementation": first["attn_implementation"],
            "dataset_rows": first["dataset_rows"], "checkpoints": first["checkpoints"],
            "consistent": all(sum(b["trained"] for b in r["batches"]) == trained
                              and sum(b["real"] for b in r["batches"]) == real for r in runs)}


TABLE = [Column("config", "<7"), Column("steps", ">5"), Column("slots", ">7,"), Column("real tok", ">8,"),
         Column("trained", ">7,"), Column("pad frac", ">8.1%"), Column("step s", ">7.3f", under="(best)"),
         Column("trained tok/s", ">13,.0f", under="(best)"), Column("tok/s", ">6,.0f", under="(med)"),
         Column("tok/CPU-s", ">9,.0f", under="(med)"), Column("ckpt s", ">7.3f", under="(med)"),
         Column("ckpt/step", ">8.3f", suffix="x", under="(med)")]


def print_table(results: dict[str, dict]) -> None:
    harness.print_table(TABLE, [
        (config, s["steps"], s["slots"], s["real"], s["trained"], s["pad_fraction"], s["step_s"], s["rate_best"],
         s["rate"], s["cpu_rate"], s["save_s"], s["save_step"]) for config, s in results.items()])
    base = results[BASELINE]
    print()
    for config, s in results.items():
        if config != BASELINE:
            print(f"trained tok/s {config} / {BASELINE}: best-of {s['rate_best'] / base['rate_best']:.2f}x, "
                  f"median {s['rate'] / base['rate']:.2f}x, per CPU-second (median) "
                  f"{s['cpu_rate'] / base['cpu_rate']:.2f}x")
    for config, s in results.items():
        print(f"{config}: trained tok/s per repeat {', '.join(f'{r:,.0f}' for r in s['rates'])}; first batch "
              f"shape {s['shape']}, {s['real'] / s['steps']:,.0f} real tokens per step; train() {s['train_s']:.1f} s "
              f"(median) incl. {s['saves']} step save(s) and final/")
    print()
    for config, s in results.items():
        print(f"{config}: attention scores per layer and head, one epoch: {s['attn_dense'] / 1e6:,.1f}M computed "
              f"with a dense mask ({s['attn_implementation']} here), {s['attn_needed'] / 1e6:,.1f}M needed by a "
              f"kernel that skips padding and the other rows (varlen flash-attention)")


def print_lengths(lengths: dict, max_length: int) -> None:
    rows = lengths["rows"]
    tokens = sorted(r["tokens"] for r in rows)
    cut = [r for r in rows if r["tokens"] > max_length]
    lost = sum(r["tokens"] - max_length for r in cut)
    lost_trained = sum(r["trained"] - r["trained_kept"] for r in cut)
    print(f"data: {len(rows)} {lengths['kind']} rows, tokens min {tokens[0]:,} / median "
          f"{statistics.median(tokens):,.0f} / max {tokens[-1]:,}, {sum(tokens):,} in all, "
          f"{sum(r['trained'] for r in rows):,} loss-bearing")
    print(f"max_length {max_length:,}: {len(cut)} row(s) truncated, {lost:,} tokens cut "
          f"({lost_trained:,} of them loss-bearing); rows left without a trained token: "
          f"{sum(1 for r in cut if r['trained_kept'] == 0)}")


def check(results: dict[str, dict], lengths: dict, args: argparse.Namespace) -> list[str]:
    rows = lengths["rows"]
    full_epochs = args.max_steps <= 0
    checks = []
    for config, s in results.items():
        checks.append((f"{config}: same token counts in every repeat", s["consistent"]))
        checks.append((f"{config}: at least one complete step checkpoint ({', '.join(s['checkpoints']) or 'none'})",
                       bool(s["checkpoints"]) and s["save_s"] is not None))
    packed, padded = results["packed"], results["padded"]
    checks.append((f"packed: padding-free batches, {packed['slots'] - packed['real']} padding slots",
                   packed["padding_free"] and packed["slots"] == packed["real"]))
    if full_epochs:
        kept = sum(min(r["tokens"], args.max_length) for r in rows if r["trained_kept"] > 0)
        expected = round(kept * args.epochs)
        checks.append((f"padded: real tokens {padded['real']:,} == tokenized rows capped at max_length "
                       f"x {args.epochs:g} epoch(s) {expected:,}", padded["real"] == expected))
        checks.append((f"packed trained tokens {packed['trained']:,} == padded {padded['trained']:,} "
                       "(the same rows, once per epoch)", packed["trained"] == padded["trained"]))
    return harness.report_checks(checks)


def bench(args: argparse.Namespace, work: Path) -> int:
    started = time.perf_counter()
    args.work = work  # the children get it as --work
    args.train_file = harness.convert_export(args.export, args.work)
    lengths = spawn(args, "lengths")
    print(f"{harness.machine()}, {args.repeat} repeat(s) per configuration, "
          f"batch {args.batch_size}, max_length {args.max_length}, "
          + (f"max_steps {args.max_steps}" if args.max_steps > 0 else f"{args.epochs:g} epoch(s)")
          + f", save_steps {args.save_steps}, work folder {args.work}")
    print_lengths(lengths, args.max_length)
    print()
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for i in range(args.repeat):
        for config in (CONFIGS if i % 2 == 0 else tuple(reversed(CONFIGS))):
            runs[config].append(spawn(args, config, args.work / f"run-{config}"))
    results = {config: summarize(rs) for config, rs in runs.items()}
    print_table(results)
    return harness.finish(check(results, lengths, args), started)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = harness.parser(__doc__)
    harness.add_export(ap)
    ap.add_argument("--repeat", type=int, default=3,
                    help="fresh runs per configuration, interleaved; best and median are reported (default 3)")
    ap.add_argument("--batch-size", type=int, default=4, help="train.batch_size (default 4)")
    ap.add_argument("--max-length", type=int, default=2048,
                    help="train.max_length in tokens (default 2048, the tiny model's positions)")
    ap.add_argument("--epochs", type=float, default=1.0,
                    help="train.epochs when --max-steps is 0 (default 1: every row once, the same data for both)")
    ap.add_argument("--max-steps", type=int, default=0,
                    help="train.max_steps per configuration; 0 = whole epochs (default 0)")
    ap.add_argument("--save-steps", type=int, default=2, help="train.save_steps (default 2)")
    harness.add_keep(ap)
    harness.add_training_child(ap)
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.batch_size < 1 or args.max_length < 1 or args.save_steps < 1:
        ap.error("expected --repeat, --batch-size, --max-length and --save-steps >= 1")
    if args.max_steps <= 0 and args.epochs <= 0:
        ap.error("expected --epochs > 0 or --max-steps > 0")
    return args


def child(args: argparse.Namespace) -> dict:
    return child_lengths(args) if args.child == "lengths" else child_train(args, args.child)


def main(argv: list[str] | None = None) -> int:
    return harness.run_bench(parse_args(argv), bench, "bench-train-", child=child)


if __name__ == "__main__":
    sys.exit(main())
