"""The embedded server (``slurmtune serve``, transformers engine) against ``slurmtune predict``'s
batch path, on the same prompts, on this machine.

::

    python bench/bench_serve.py                   # 32 prompts, 1/4/16 clients (~3 min on 2 cores)
    python bench/bench_serve.py --prompts 64 --max-new-tokens 48

The model is the 2-layer tiny Llama of ``slurmtune.train.tiny_model`` with a LoRA adapter
(r 8 on q/k/v/o, random weights), on CPU. The prompts are the SpeechGradebook sample's
questions (user turns of 200 to 900 tokens), answered greedily to ``--max-new-tokens``.

1. predict: ``load_for_generation`` + ``predict`` in this process (batch 8, prompts sorted by
   length, left padding): answers per second over the whole set, the model loaded before the
   clock starts.
2. serve: ``slurmtune serve ADAPTER`` with the local executor (canary, merge, transformers serve
   on a free loopback port), then the same prompts through ``/v1/chat/completions`` from 1, 4
   and 16 concurrent clients: answers per second, and p50/p95 latency of one answer.

Ratios are against predict's answers per second, measured in the same run. Exit 1 when a
request fails, or when the server's answers differ from predict's (both are greedy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLIENTS = (1, 4, 16)


def make_adapter(root: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slurmtune.train.tiny_model import make_tiny_model

    model_dir = make_tiny_model(root / "tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    config = LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(root / "adapter")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(root / "adapter")
    return root / "adapter"


def prompts(root: Path, n: int) -> list[dict]:
    """The first user turn of each converted SpeechGradebook sample row, repeated up to ``n``."""
    subprocess.run([sys.executable, "-m", "slurmtune", "convert", "speechgradebook",
                    str(REPO / "examples" / "speechgradebook" / "exported.json"), "--out", str(root / "data")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    asked = [{"messages": [next(m for m in r["messages"] if m["role"] == "user")]} for r in rows]
    return [asked[i % len(asked)] for i in range(n)]


def timed_predict(adapter: Path, records: list[dict], max_new_tokens: int) -> tuple[float, list[str]]:
    from slurmtune.evaluate.generate import load_for_generation, predict

    model, tokenizer = load_for_generation(adapter)
    predict(model, tokenizer, records[:2], 8, max_new_tokens)  # warm-up
    start = time.perf_counter()
    answers = predict(model, tokenizer, records, 8, max_new_tokens)
    return time.perf_counter() - start, answers


def timed_clients(url: str, records: list[dict], clients: int, max_new_tokens: int):
    from slurmtune.evaluate.endpoint import EndpointClient

    client = EndpointClient(url, "slurmtune/adapter")
    latencies: list[float] = []

    def one(record: dict) -> str:
        t = time.perf_counter()
        answer = client.answers([record], max_new_tokens)[0]
        latencies.append(time.perf_counter() - t)
        return answer

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(one, records))
    return time.perf_counter() - start, latencies, answers


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    adapter = make_adapter(root)
    records = prompts(root, args.prompts)
    predict_s, expected = timed_predict(adapter, records, args.max_new_tokens)
    cli = [sys.executable, "-m", "slurmtune"]
    started = time.perf_counter()
    subprocess.run([*cli, "serve", str(adapter), "--executor", "local", "--time-min", "30", "--wait-min", "5"],
                   check=True, cwd=root, stdout=subprocess.DEVNULL)
    start_s = time.perf_counter() - started
    endpoint = json.loads((root / "adapter-serve" / "endpoint.json").read_text())
    rows, failed = [], 0
    try:
        for clients in CLIENTS:
            timed_clients(endpoint["url"], records[:2], 1, args.max_new_tokens)  # warm-up
            seconds, latencies, answers = timed_clients(endpoint["url"], records, clients, args.max_new_tokens)
            failed += sum(a != e for a, e in zip(answers, expected))
            rows.append((clients, len(records) / seconds, percentile(latencies, 0.5), percentile(latencies, 0.95)))
    finally:
        subprocess.run([*cli, "serve", "stop", str(adapter)], cwd=root, stdout=subprocess.DEVNULL)
    base = len(records) / predict_s
    print(f"{len(records)} prompts, {args.max_new_tokens} new tokens each, greedy, CPU ({os.cpu_count()} cores); "
          f"server start (canary, merge, load): {start_s:.1f} s")
    print(f"{'path':<22}{'answers/s':>10}{'vs predict':>11}{'p50 s':>8}{'p95 s':>8}")
    print("-" * 59)
    print(f"{'predict (batch 8)':<22}{base:>10.2f}{1.0:>11.2f}{'-':>8}{'-':>8}")
    for clients, rate, p50, p95 in rows:
        print(f"{f'serve, {clients} client(s)':<22}{rate:>10.2f}{rate / base:>11.2f}{p50:>8.2f}{p95:>8.2f}")
    print(f"server answers equal to predict's: {len(records) * len(CLIENTS) - failed}/{len(records) * len(CLIENTS)}"
          + ("  OK" if not failed else "  DIFFER"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
