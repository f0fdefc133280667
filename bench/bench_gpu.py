"""The GPU paths of the train job, measured: QLoRA, LoRA-8bit and LoRA tokens/s and MFU at 2k tokens a
step, peak memory against the estimate, packed (flex_attention) vs padded, liger on vs off, and a
1-GPU DeepSpeed ZeRO-2 step. Run it through bench/gpu.sh (which installs carried wheels first).

::

    bash bench/gpu.sh                       # on a GPU node (~5 min on an H100/H200)
    bash bench/gpu.sh --cpu-smoke           # here: the same script end to end, tiny and on CPU (~2 min)
    python bench/bench_gpu.py --out FILE    # what gpu.sh runs; FILE gets the table

Model: random weights with Qwen2.5-7B's published widths (hidden 3584, MLP 18944, 28 heads, 4 KV
heads, vocabulary 152064), 4 decoder layers, built here and saved, then loaded by the real recipe
(``slurmtune.train.recipe.TrainingRecipe``: TRL's SFTTrainer, LoRA r 16 on all seven projections,
gradient checkpointing as on any GPU run). ``--cpu-smoke``: hidden 256, 2 layers, the tiny
tokenizer's 2,048 words, max_length 256, and only the cases that can run on CPU (the rest are
listed as skipped, with why).

Cases: ``lora``, ``lora-8bit``, ``qlora`` at batch 1 x max_length 2048 (every row is longer, so
each step trains 2048 tokens); ``lora liger`` (train.kernels=liger); ``padded`` and ``packed``
(batch 4 of rows 350-1,900 tokens long, as SpeechGradebook transcripts are; packed with
flex_attention, padded with sdpa: trained tokens/s); ``zero2`` (``lora`` under DeepSpeed ZeRO-2 in
one process). Each trains ``--steps`` optimizer steps; the first ``--warmup`` are not timed.

Reported: trained tokens/s and its ratio to ``lora`` (``padded`` for ``packed``), MFU = tokens/s x
(4 x frozen + 6 x trainable parameters) FLOPs per token / the bf16 matmul rate measured at the start
of the same run (and the GPU's, if named with --peak-tflops), peak allocated GPU memory and
``slurmtune.train.estimate``'s estimate for the same config, and their ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import harness
from harness import Column

QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv):
    ap = harness.parser(__doc__)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny, on CPU: check the script end to end")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; smoke 2)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per case (default 8; smoke 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2; smoke 1)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 TFLOP/s, for MFU")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    harness.add_keep(ap)
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    args.layers = args.layers or (2 if smoke else 4)
    args.steps = args.steps or (3 if smoke else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    args.max_length = 256 if smoke else 2048
    return args


# --- the model and the data ----------------------------------------------------------------

def build_model(work: Path, args) -> Path:
    """A random model of Qwen2.5-7B's widths (or tiny), saved with the tiny tokenizer and template."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from slurmtune.train.tiny_model import make_tiny_model

    folder = make_tiny_model(work / "model")  # tokenizer, chat template, generation config
    widths = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=2048, max_position_embeddings=4096) if args.cpu_smoke else QWEN_7B
    config = Qwen2Config(num_hidden_layers=args.layers, **widths)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if args.cpu_smoke else torch.bfloat16)
    model.save_pretrained(folder)
    del model
    gc.collect()
    return folder


def rows(n: int, lengths: list[int]) -> list[dict]:
    """Chats whose answers are about ``lengths[i % len]`` words (a word is about a token here)."""
    def answer(words: int) -> str:
        return " ".join(f"w{j % 97}" for j in range(words))

    return [{"messages": [{"role": "user", "content": f"Grade speech {i}."},
                          {"role": "assistant", "content": answer(lengths[i % len(lengths)])}]} for i in range(n)]


def write_rows(path: Path, data: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    return str(path)


# --- one case --------------------------------------------------------------------------------

def train_case(work: Path, model: Path, data: str, args, name: str, deepspeed: str | None = None,
               **train) -> dict:
    """Train one case with the real recipe; its tokens/s, peak memory and estimate."""
    import torch

    from slurmtune.config import RunConfig
    from slurmtune.train.estimate import Setting, estimate_memory, model_shape
    from slurmtune.train.recipe import TrainingRecipe

    cfg = RunConfig(name="bench-gpu")
    cfg.model.path = str(model)
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules = 16, 32, 0.05, list(TARGETS)
    attn = train.pop("attn", None)
    settings = dict(method="lora", max_steps=args.steps, batch_size=1, grad_accum=1, max_length=args.max_length,
                    warmup_ratio=0.0, save_steps=10**6, lr=1e-4)
    settings.update(train)
    for key, value in settings.items():
        setattr(cfg.train, key, value)
    if attn:
        cfg.model.attn_implementation = attn
    cuda = torch.cuda.is_available()
    probe = harness.StepProbe()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    recipe = TrainingRecipe(cfg, work / f"run-{name.replace(' ', '-')}", [data], None, deepspeed=deepspeed,
                            callbacks=(probe.callback(),))
    try:
        recipe.setup()
        recipe.train()
        shape_model = recipe.trainer.model
        trainable = sum(p.numel() for p in shape_model.parameters() if p.requires_grad)
    finally:
        recipe.cleanup()
        del recipe
        gc.collect()
    shape = model_shape(cfg)
    estimate = estimate_memory(shape, Setting.of(cfg, on_gpu=cuda)).total
    timed = probe.step_s[args.warmup:]
    return {"case": name, "tokens_per_s": probe.tokens_per_s(args.warmup), "step_s": sum(timed) / max(1, len(timed)),
            "peak": torch.cuda.max_memory_allocated() if cuda else None, "estimate": estimate,
            "flops_per_token": 4 * (shape.params - trainable) + 6 * trainable}


# --- the bench -------------------------------------------------------------------------------

def cases(args) -> list[tuple[str, dict, str | None]]:
    """(name, train settings, why it is skipped here or None)."""
    import importlib.util

    import torch

    gpu = None if torch.cuda.is_available() else "GPU only"
    liger = gpu or (None if importlib.util.find_spec("liger_kernel") else "liger-kernel not installed")
    return [("lora", {}, None), ("lora-8bit", {"method": "lora-8bit"}, gpu), ("qlora", {"method": "qlora"}, gpu),
            ("lora liger", {"kernels": "liger"}, liger),
            ("padded", {"batch_size": 4, "data": "varied"}, None),
            ("packed", {"batch_size": 4, "data": "varied", "packing": True, "attn": "flex_attention"}, gpu),
            ("zero2", {"deepspeed": "zero2"}, None)]


def bench(args, work: Path) -> int:
    import torch

    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"{harness.machine()}, {device}, torch {torch.__version__}{' (cpu smoke)' if args.cpu_smoke else ''}\n")
    matmul = _matmul_tflops() if cuda else None
    model = build_model(work, args)
    long_rows = write_rows(work / "long.jsonl", rows(64, [args.max_length * 2]))
    scale = args.max_length / 2048
    varied = write_rows(work / "varied.jsonl", rows(64, [int(n * scale) for n in (350, 900, 1400, 1900, 600, 1200)]))
    results, skipped = [], []
    for name, train, why in cases(args):
        if why:
            skipped.append((name, why))
            continue
        train = dict(train)
        data = varied if train.pop("data", None) == "varied" else long_rows
        deepspeed = train.pop("deepspeed", None)
        if deepspeed:
            deepspeed = _join_process_group(cuda, deepspeed)
        results.append(train_case(work, model, data, args, name, deepspeed=deepspeed, **train))
        print(f"  {name}: {results[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    return report(args, results, skipped, matmul, started)


def _matmul_tflops() -> float:
    from slurmtune.cluster.probe import _matmul

    return _matmul(1)["tflops"]


def _join_process_group(cuda: bool, stage: str) -> str:
    """One process as its own DeepSpeed world (what a 1-GPU DeepSpeed job does)."""
    from slurmtune.train.distributed import DEEPSPEED_DIR, init_process_group, rendezvous

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)})
    init_process_group(rendezvous(os.environ), 120, cuda=cuda)
    return str(DEEPSPEED_DIR / f"{stage}.json")


def report(args, results: list[dict], skipped: list, matmul: float | None, started: float) -> int:
    by = {r["case"]: r for r in results}
    rows_ = []
    for r in results:
        base = by["padded" if r["case"] == "packed" else "lora"]
        mfu = r["tokens_per_s"] * r["flops_per_token"] / (matmul * 1e12) if matmul else None
        peak = r["peak"] / 2**30 if r["peak"] else None
        rows_.append((r["case"], r["tokens_per_s"], r["tokens_per_s"] / base["tokens_per_s"], r["step_s"], mfu,
                      peak, r["estimate"] / 2**30, r["estimate"] / r["peak"] if r["peak"] else None))
    columns = [Column("case", "<10"), Column("tokens/s", ">10,.0f"), Column("vs base", ">7.2f"),
               Column("step s", ">7.2f"), Column("MFU", ">6.1%"), Column("peak GiB", ">8.2f"),
               Column("estimate GiB", ">12.2f"), Column("est/peak", ">8.2f")]
    lines = []
    _capture(lambda: harness.print_table(columns, rows_), lines)
    notes = [f"skipped {name}: {why}" for name, why in skipped]
    notes.append("vs base: ratio to lora (packed: to padded); MFU = tokens/s x (4 x frozen + 6 x trainable) "
                 f"FLOPs / the bf16 matmul rate measured here ({matmul:.0f} TFLOP/s)" if matmul else
                 "vs base: ratio to lora (packed: to padded); no MFU without a GPU")
    if matmul and args.peak_tflops:
        notes.append(f"matmul rate / stated peak: {matmul / args.peak_tflops:.2f}")
    text = "\n".join(lines + [""] + notes)
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    checks = [(f"{r['case']} trained tokens", r["tokens_per_s"] > 0) for r in results]
    checks += [(f"{r['case']}: estimate within 0.75-1.5 of the peak", 0.75 <= r["estimate"] / r["peak"] <= 1.5)
               for r in results if r["peak"]]
    return harness.finish(harness.report_checks(checks), started)


def _capture(fn, lines: list[str]) -> None:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        fn()
    lines += buffer.getvalue().rstrip("\n").splitlines()


def main(argv=None) -> int:
    args = parse_args(argv)
    return harness.run_bench(args, bench, "bench-gpu-")


if __name__ == "__main__":
    sys.exit(main())
