"""Generation tokens/s batched against one prompt at a time; the eval array's wall time with 4 shards against 1.

::

    eval "$(env/test-cluster/start.sh | tail -n 1)"    # the eval array part needs a SLURM cluster
    python bench/bench_generate.py                      # both parts (~6 min, most of it two quickstart runs)
    python bench/bench_generate.py --skip-cluster       # generation only
    python bench/bench_generate.py --skip-generation    # eval array only
    python bench/bench_generate.py --keep /tmp/bench-gen  # keep (and on a second call reuse) the two runs

Setup: two runs of the quickstart manifest, trained locally by the CLI as a user runs it
(``slurmtune run manifests/quickstart.yaml output_dir=WORK/runs eval.shards=N``, N = 1 and 4):
a run keeps its manifest, so ``slurmtune submit eval RUN`` cannot change the shard count of an
existing run. Training is deterministic, so both runs hold the same adapter (checked by hash).

1. Generation (one fresh child process, the model loaded once): ``slurmtune.evaluate.generate.predict``
   with the tiny Llama and the run's LoRA adapter (r 8), greedy, on the prompts of all 42 converted
   SpeechGradebook rows (every turn before the assistant's answer: 350 to 1,900 tokens), with
   ``batch_size`` 1 (one prompt at a time: the baseline), 8 and 16; ``predict`` sorts prompts by
   length and left-pads each batch. One untimed warm-up call, then ``--repeat`` rounds. Other
   users' load on this machine comes and goes within seconds, so a round does not time one
   batch size over all prompts after the other: the length-sorted prompts are cut into groups
   of 16 and every group runs at every batch size back to back (the order rotating), which
   makes exactly the batches one ``predict`` over all prompts would make. A batch size's time is
   the sum over the groups; median and best of the rounds.
   Generated tokens = tokens up to and including the first EOS of every answer (what a user
   gets; the padding steps of rows that stopped early are not counted). Exit 1 when any answer
   (text and token ids) differs between batch sizes or between rounds.
2. Eval array (``--cluster``, default local-test): in each run, delete ``eval/`` and submit
   ``slurmtune submit eval RUN --cluster local-test``; wait until every array task has ended and
   read ``sacct``: submit -> last task end, first start -> last end, mean task time. The 1- and
   4-shard submissions alternate, ``--repeat`` each; medians. Exit 1 when a task does not
   complete or the merged 4-shard predictions differ from the 1-shard ones.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import harness
from harness import Column, slurmtune

BATCH_SIZES = (1, 8, 16)
SHARDS = (1, 4)
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


# --- child: generation throughput ----------------------------------------------------------

class TokenCounter:
    """Wraps ``model.generate``: keeps the new token ids of every row, up to its first EOS."""

    def __init__(self, model, eos_ids: set[int]):
        self.model, self.eos_ids, self.rows, self.slots = model, eos_ids, [], 0
        self._generate = model.generate
        model.generate = self

    def __call__(self, *args, **kwargs):
        out = self._generate(*args, **kwargs)
        width = kwargs["input_ids"].shape[1]
        new = out[:, width:]
        self.slots += new.numel()
        for row in new.tolist():
            end = next((k + 1 for k, t in enumerate(row) if t in self.eos_ids), len(row))
            self.rows.append(row[:end])
        return out

    def take(self) -> tuple[list[list[int]], int]:
        rows, slots = self.rows, self.slots
        self.rows, self.slots = [], 0
        return rows, slots


def child_generate(args: argparse.Namespace) -> dict:
    """Every batch size over the same prompts, interleaved group by group (see the module doc)."""
    from slurmtune.evaluate.generate import load_for_generation, predict, prompt_ids
    from slurmtune.data.jsonio import iter_records

    records = [item.value for f in args.prompt_files for item in iter_records(f)]
    model, tokenizer = load_for_generation(args.model, adapter=args.adapter)
    eos = model.generation_config.eos_token_id
    counter = TokenCounter(model, set(eos if isinstance(eos, list) else [eos]))
    predict(model, tokenizer, records[:4], 4, args.max_new_tokens)  # warm-up, untimed
    counter.take()
    prompt_lengths = [len(prompt_ids(tokenizer, r)) for r in records]
    # predict() sorts by prompt length and cuts batches from that order; cutting the sorted
    # prompts into groups of the largest batch size gives every batch size exactly the batches
    # one predict() over all prompts would make (16 is a multiple of 8), in slices of seconds.
    order = sorted(range(len(records)), key=lambda i: prompt_lengths[i])
    step = max(BATCH_SIZES)
    groups = [order[i:i + step] for i in range(0, len(order), step)]
    rounds = []
    for r in range(args.repeat):
        result = {str(bs): {"seconds": 0.0, "cpu_s": 0.0, "answers": [""] * len(records), "tokens": 0,
                            "slots": 0, "ids": []} for bs in BATCH_SIZES}
        for g, group in enumerate(groups):
            shift = (r + g) % len(BATCH_SIZES)
            for batch_size in BATCH_SIZES[shift:] + BATCH_SIZES[:shift]:
                start, cpu = time.perf_counter(), time.process_time()
                answers = predict(model, tokenizer, [records[i] for i in group], batch_size, args.max_new_tokens)
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
                rows, slots = counter.take()
                out = result[str(batch_size)]
                out["seconds"] += seconds
                out["cpu_s"] += cpu
                out["tokens"] += sum(map(len, rows))
                out["slots"] += slots
                out["ids"] += rows
                for i, answer in zip(group, answers):
                    out["answers"][i] = answer
        for out in result.values():
            out["ids"].sort()
        rounds.append(result)
    return {"prompts": len(records), "prompt_lengths": prompt_lengths, "groups": len(groups), "rounds": rounds}


# --- parent: runs ----------------------------------------------------------------------------

def quickstart_run(work: Path, shards: int) -> tuple[Path, float]:
    """A finished local quickstart run with eval.shards=``shards`` (reused when --keep has one)."""
    root = work / f"runs-shards-{shards}"
    done = [Path(p).parent for p in sorted(glob.glob(str(root / "*" / "final" / "adapter_model.safetensors")))]
    if done:
        return done[-1].parent, 0.0
    start = time.perf_counter()
    out = slurmtune("run", "manifests/quickstart.yaml", f"output_dir={root}", f"eval.shards={shards}")
    return harness.folder_from(out.stdout), time.perf_counter() - start


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spawn_generate(args: argparse.Namespace, run_dir: Path) -> dict:
    manifest = run_dir / "manifest.yaml"
    import yaml
    model = yaml.safe_load(manifest.read_text(encoding="utf-8"))["model"]["path"]
    prompts = [str(run_dir / "data" / "train.jsonl"), str(run_dir / "data" / "validation.jsonl")]
    child_args = ["--model", model, "--adapter", str(run_dir / "final"), "--repeat", str(args.repeat),
                  "--max-new-tokens", str(args.max_new_tokens), "--prompt-files", *prompts]
    return harness.spawn_child(__file__, child_args, what="generation child", env=harness.MODEL_ENV)


def report_generation(gen: dict, args: argparse.Namespace) -> list[str]:
    lengths = sorted(gen["prompt_lengths"])
    print(f"generation: {gen['prompts']} prompts of {lengths[0]:,} to {lengths[-1]:,} tokens (median "
          f"{statistics.median(lengths):,.0f}), greedy, max_new_tokens {args.max_new_tokens}, "
          f"{len(gen['rounds'])} round(s) after a warm-up, each interleaving the batch sizes over "
          f"{gen['groups']} length-sorted groups of up to {max(BATCH_SIZES)} prompts\n")
    stats = {}
    for bs in BATCH_SIZES:
        runs = [rnd[str(bs)] for rnd in gen["rounds"]]
        secs = [r["seconds"] for r in runs]
        stats[bs] = {"median": statistics.median(secs), "best": min(secs), "tokens": runs[0]["tokens"],
                     "slots": runs[0]["slots"], "cpu": statistics.median(r["cpu_s"] for r in runs)}
    base = stats[1]
    harness.print_table(GENERATION_TABLE, [
        (bs, -(-gen["prompts"] // bs), s["tokens"], s["slots"], s["median"], s["best"], s["tokens"] / s["median"],
         s["tokens"] / s["best"], s["tokens"] / s["cpu"], base["best"] / s["best"], base["median"] / s["median"])
        for bs, s in stats.items()])
    return harness.report_checks(generation_checks(gen))


GENERATION_TABLE = [
    Column("batch", ">5"), Column("batches", ">7"), Column("gen tokens", ">10,"), Column("slots", ">7,"),
    Column("median s", ">9.2f"), Column("best s", ">7.2f"), Column("tok/s (median)", ">14,.0f"),
    Column("tok/s (best)", ">12,.0f"), Column("tok/CPU-s", ">9,.0f"),
    Column("vs batch 1 (best)", ">16.2f", suffix="x"), Column("(median)", ">7.2f", suffix="x")]


def generation_checks(gen: dict) -> list[tuple[str, bool]]:
    """Every batch size's answers and token ids against batch 1's of the first round."""
    reference = gen["rounds"][0]["1"]
    checks = []
    for bs in BATCH_SIZES:
        differ = set()
        for rnd in gen["rounds"]:
            got = rnd[str(bs)]
            differ |= {i for i, (a, b) in enumerate(zip(got["answers"], reference["answers"])) if a != b}
            if got["ids"] != reference["ids"]:
                differ.add(-1)
        text = (f"batch {bs}: answers and token ids identical to batch 1 in every round "
                f"({gen['prompts']} prompts)" if not differ else
                f"batch {bs}: {len(differ - {-1})} answer(s) differ from batch 1"
                + (" (token ids differ)" if -1 in differ else ""))
        checks.append((text, not differ))
    return checks


# --- parent: the eval array on the cluster ---------------------------------------------------

def sacct_tasks(job_id: str) -> list[dict]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,Submit,Start,End"],
                         capture_output=True, text=True)
    tasks = []
    for line in out.stdout.splitlines():
        jid, state, submit, start, end = line.split("|")
        tasks.append({"id": jid, "state": state.split()[0], "submit": submit, "start": start, "end": end})
    return tasks


def epoch(stamp: str) -> float | None:
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:  # Unknown / None: not started or not ended
        return None


def wait_for_array(job_id: str, shards: int, timeout_s: float) -> list[dict]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        rows = [t for t in sacct_tasks(job_id) if "[" not in t["id"]]
        # submitit submits a map of one item as a plain job (no --array): its row has no _N
        tasks = [t for t in rows if "_" in t["id"]] or [t for t in rows if t["id"] == job_id]
        if len(tasks) == shards and all(t["state"] in TERMINAL and epoch(t["end"]) for t in tasks):
            return tasks
        time.sleep(1.0)
    raise RuntimeError(f"eval array {job_id} not finished after {timeout_s:.0f} s: {sacct_tasks(job_id)}")


def submit_eval(run_dir: Path, shards: int, args: argparse.Namespace) -> dict:
    shutil.rmtree(run_dir / "eval", ignore_errors=True)
    t0 = time.time()
    out = slurmtune("submit", "eval", str(run_dir), "--cluster", args.cluster)
    cli_s = time.time() - t0
    steps = harness.run_steps(run_dir)
    job_id = steps[-1]["job_ids"][0]
    if steps[-1]["name"] != "eval" or steps[-1]["array_size"] != shards:
        raise RuntimeError(f"unexpected last step in {run_dir}/run.json: {steps[-1]}\n{out.stdout}")
    tasks = wait_for_array(job_id, shards, args.eval_timeout)
    starts = [epoch(t["start"]) for t in tasks]
    ends = [epoch(t["end"]) for t in tasks]
    submit = epoch(tasks[0]["submit"])
    return {"job_id": job_id, "shards": shards, "cli_s": cli_s, "states": sorted({t["state"] for t in tasks}),
            "submit_to_end": max(ends) - submit, "cli_to_end": max(ends) - t0,
            "queue_wait": min(starts) - submit, "start_to_end": max(ends) - min(starts),
            "task_mean": statistics.mean(e - s for s, e in zip(starts, ends)),
            "answers": merged_answers(run_dir, shards)}


def merged_answers(run_dir: Path, shards: int) -> list[str] | None:
    rows = {}
    for i in range(shards):
        path = run_dir / "eval" / f"predictions.shard-{i:04d}-of-{shards:04d}.jsonl"
        if not path.is_file():
            return None
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            rows[record["meta"]["eval_index"]] = record["actual"]
    return [rows[i] for i in sorted(rows)]


def cancel_leftovers(run_dirs: list[Path]) -> None:
    ids = []
    for run_dir in run_dirs:
        if (run_dir / "run.json").is_file():
            ids += [j for s in harness.run_steps(run_dir) if s["name"] == "eval"
                    for j in s["job_ids"] if j.isdigit() and len(j) < 9]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


def bench_eval_array(runs: dict[int, Path], args: argparse.Namespace) -> list[str]:
    samples: dict[int, list[dict]] = {n: [] for n in SHARDS}
    try:
        for r in range(args.repeat):
            for shards in (SHARDS if r % 2 == 0 else tuple(reversed(SHARDS))):
                samples[shards].append(submit_eval(runs[shards], shards, args))
    finally:
        cancel_leftovers(list(runs.values()))
    rows = len(samples[1][0]["answers"] or [])
    import yaml
    eval_cfg = yaml.safe_load((runs[1] / "manifest.yaml").read_text(encoding="utf-8"))["eval"]
    print(f"\neval array on cluster {args.cluster}: {rows} eval rows (the quickstart validation split), "
          f"eval.batch_size {eval_cfg['batch_size']}, max_new_tokens {eval_cfg['max_new_tokens']}, "
          f"array_parallelism {eval_cfg['array_parallelism']}, {args.repeat} submission(s) per shard count, "
          "times from sacct (1 s resolution)\n")
    keys = ("submit_to_end", "start_to_end", "queue_wait", "task_mean", "cli_s")
    med = {n: {k: statistics.median(s[k] for s in samples[n]) for k in keys} for n in SHARDS}
    harness.print_table(EVAL_TABLE, [(n, *(med[n][k] for k in keys), med[1]["submit_to_end"] / med[n]["submit_to_end"])
                                     for n in SHARDS])
    for n in SHARDS:
        print(f"  {n} shard(s), each submission (submit->last end s): "
              + ", ".join(f"{s['submit_to_end']:.0f} (job {s['job_id']})" for s in samples[n]))
    reference = samples[1][0]["answers"]
    return harness.report_checks(
        (f"{n} shard(s), job {s['job_id']}: tasks {'/'.join(s['states'])}, "
         f"merged answers {'identical to' if s['answers'] == reference else 'DIFFER from'} the first 1-shard run",
         s["states"] == ["COMPLETED"] and s["answers"] is not None and s["answers"] == reference)
        for n in SHARDS for s in samples[n])


EVAL_TABLE = [Column("shards", ">6"), Column("submit->last end s", ">18.1f"),
              Column("first start->last end s", ">23.1f"), Column("queue wait s", ">12.1f"),
              Column("mean task s", ">11.1f"), Column("CLI s", ">6.2f"), Column("vs 1 shard", ">9.2f", suffix="x")]


# --- main ------------------------------------------------------------------------------------

def bench(args: argparse.Namespace, work: Path) -> int:
    started = time.perf_counter()
    print(f"{harness.machine()}, {args.repeat} repeat(s), work folder {work}")
    runs = {}
    for shards in SHARDS:
        runs[shards], seconds = quickstart_run(work, shards)
        print(f"quickstart run, eval.shards={shards}: {runs[shards]}"
              + (f" (trained locally in {seconds:.0f} s)" if seconds else " (reused)"))
    hashes = {n: sha256(runs[n] / "final" / "adapter_model.safetensors") for n in SHARDS}
    failures = []
    same = len(set(hashes.values())) == 1
    print(f"adapters: {'identical' if same else 'DIFFERENT'} (sha256 {hashes[1][:12]}...)\n")
    if not same:
        failures.append("the two quickstart runs trained different adapters")
    if not args.skip_generation:
        failures += report_generation(spawn_generate(args, runs[1]), args)
    if not args.skip_cluster:
        if not harness.cluster_answers():
            print(f"{harness.NO_CLUSTER}, or pass --skip-cluster", file=sys.stderr)
            return 2
        failures += bench_eval_array(runs, args)
    return harness.finish(failures, started)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = harness.parser(__doc__)
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds of every batch size, and eval submissions per shard count (default 3)")
    ap.add_argument("--max-new-tokens", type=int, default=64,
                    help="generation part: max_new_tokens (default 64, the quickstart's eval setting)")
    ap.add_argument("--cluster", default="local-test", help="cluster profile for the eval array (default local-test)")
    ap.add_argument("--skip-cluster", action="store_true", help="generation only; no eval array submissions")
    ap.add_argument("--skip-generation", action="store_true", help="eval array only; no generation timing")
    ap.add_argument("--eval-timeout", type=float, default=600, help="seconds to wait for one eval array (default 600)")
    harness.add_keep(ap, help="work in DIR and keep it; finished quickstart runs found there are reused")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-files", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.max_new_tokens < 1:
        ap.error("expected --repeat >= 1 and --max-new-tokens >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return harness.run_bench(parse_args(argv), bench, "bench-generate-", child=child_generate)


if __name__ == "__main__":
    sys.exit(main())
