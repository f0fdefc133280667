"""Convert and validate a generated SpeechGradebook export; compare with a plain ``json.load``.

::

    python bench/bench_convert.py                    # 200,000 evaluations (minutes)
    python bench/bench_convert.py --n 2000           # smoke check (seconds)
    python bench/bench_convert.py --repeat 3 --keep /tmp/bench   # best of 3, keep files
    python bench/bench_convert.py --n 20000 --profile            # + where convert spends its time

Each phase runs in a fresh interpreter, so its peak RSS is its own:

1. ``json.load`` of the export and a walk over its list (the baseline);
2. ``slurmtune convert speechgradebook FILE --out DIR --split 0.9 --on-error skip``,
   called as ``run_conversion`` inside the child so only the conversion is timed;
3. ``validate_files([FILE])``;
4. the same conversion of the same rows written as ONE line, as browsers save
   a large export, to show that such a file streams too.

Peak RSS is the child's ``ru_maxrss`` as read at its end, nothing subtracted;
its RSS right after imports is printed beside it so the growth is visible.
The counts of every conversion must add up (read == written + excluded +
rejected + skipped, and the files hold what the summary says), or the script
exits 1.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import harness

PHASES = ("json.load", "convert", "validate", "convert (one line)")


# --- child: one phase, one process --------------------------------------------------------

def proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB; None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_now_mb() -> float:
    now = proc_status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def child_json_load(export: Path, out_dir: Path) -> dict:
    start = time.perf_counter()
    with open(export, encoding="utf-8") as f:
        doc = json.load(f)
    rows = sum(1 for _ in doc["evaluations"])
    return {"seconds": time.perf_counter() - start, "rows": rows}


def child_convert(export: Path, out_dir: Path) -> dict:
    from dataclasses import asdict

    from slurmtune.data.converters import get_converter, run_conversion
    converter = get_converter("speechgradebook")()
    start = time.perf_counter()
    summary = run_conversion(converter, [export], out_dir, split=0.9, seed=42, on_error="skip")
    return {"seconds": time.perf_counter() - start, "rows": summary.read, "summary": asdict(summary)}


def child_validate(export: Path, out_dir: Path) -> dict:
    from slurmtune.data.validate import validate_files
    start = time.perf_counter()
    report = validate_files([str(export)])
    seconds = time.perf_counter() - start
    rows_with_problems = len({(p["file"], p["line"]) for p in report["problems"]})
    return {"seconds": seconds, "rows": report["rows"], "problems": len(report["problems"]),
            "rows_with_problems": rows_with_problems}


CHILD_PHASES = {"json.load": child_json_load, "convert": child_convert, "validate": child_validate}


def run_child(args: argparse.Namespace) -> dict:
    """Import what the phase needs, note the RSS, run it; returns its result and the RSS figures."""
    phase, export, out_dir = args.child[0], Path(args.child[1]), Path(args.child[2])
    if phase != "json.load":
        import slurmtune.data.converters.speechgradebook  # noqa: F401  (imports are not the phase)
        import slurmtune.data.validate  # noqa: F401
    rss_after_imports = rss_now_mb()
    if args.profile:
        import cProfile
        import pstats
        profiler = cProfile.Profile()
        result = profiler.runcall(CHILD_PHASES[phase], export, out_dir)
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(18)
        stats.sort_stats("cumulative").print_stats(18)
    else:
        result = CHILD_PHASES[phase](export, out_dir)
    # On Linux ru_maxrss survives exec: it is never below the parent's RSS at spawn time.
    # VmHWM is this process's own high-water mark, kept to catch that case.
    result.update(rss_after_imports_mb=rss_after_imports, peak_rss_mb=peak_rss_mb(),
                  own_hwm_mb=proc_status_mb("VmHWM"))
    return result


# --- parent: generate, measure, check -------------------------------------------------------

def measure(phase: str, export: Path, out_dir: Path, repeat: int) -> dict:
    """Best (fastest) of ``repeat`` fresh child processes; peak RSS is the highest seen."""
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out_dir, ignore_errors=True)
        runs.append(spawn(phase, export, out_dir))
    best = min(runs, key=lambda r: r["seconds"])
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return best


def spawn(phase: str, export: Path, out_dir: Path, profile: bool = False) -> dict:
    child_phase = "convert" if phase.startswith("convert") else phase
    child_args = [child_phase, str(export), str(out_dir)] + (["--profile"] if profile else [])
    return harness.spawn_child(__file__, child_args, what=f"phase {phase!r}", echo_stderr=profile)


def generate(n: int, path: Path, seed: int, invalid_share: float, one_line: bool) -> float:
    """Write the export; returns its size in MB."""
    from make_export import write_export  # beside this script, like harness
    write_export(n, str(path), seed=seed, invalid_share=invalid_share, indent=not one_line)
    return path.stat().st_size / 2**20


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    lines = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            lines += chunk.count(b"\n")
    return lines


def check_counts(label: str, summary: dict, out_dir: Path, n: int) -> list[tuple[str, bool]]:
    """Every row in one bucket, every bucket matching the files on disk."""
    s = summary
    excluded = s["excluded_consent"] + s["excluded_demo"]
    in_files = {name: count_lines(out_dir / name) for name in s["outputs"]}
    rejected_lines = count_lines(out_dir / "rejected.jsonl")
    checks = [
        (f"read {s['read']:,} == generated {n:,}", s["read"] == n),
        (f"read {s['read']:,} == written {s['written']:,} + excluded {excluded:,} "
         f"(consent {s['excluded_consent']:,}, demo {s['excluded_demo']:,}) + rejected {s['rejected']:,} "
         f"+ skipped {s['skipped']:,}", s["read"] == s["written"] + excluded + s["rejected"] + s["skipped"]),
        (" + ".join(f"{name} {c:,}" for name, c in in_files.items()) + f" == written {s['written']:,}",
         sum(in_files.values()) == s["written"]
         and all(in_files[name] == c for name, c in s["outputs"].items())),
        (f"rejected.jsonl {rejected_lines:,} == rejected {s['rejected']:,}", rejected_lines == s["rejected"]),
    ]
    return [(f"{label}: {text}", ok) for text, ok in checks]


TABLE = [harness.Column("phase", "<20"), harness.Column("seconds", ">9.2f"), harness.Column("rows/s", ">10,.0f"),
         harness.Column("RSS after imports MB", ">21.1f"), harness.Column("peak RSS MB", ">12.1f")]


def print_table(results: dict[str, dict]) -> None:
    harness.print_table(TABLE, [
        (phase, r["seconds"], r["rows"] / r["seconds"] if r["seconds"] > 0 else float("inf"),
         r["rss_after_imports_mb"], r["peak_rss_mb"]) for phase, r in results.items()])
    base = results["json.load"]
    for phase, r in results.items():
        if r["own_hwm_mb"] is not None and r["peak_rss_mb"] - r["own_hwm_mb"] > 1:
            print(f"note: {phase}: ru_maxrss {r['peak_rss_mb']:.1f} MB includes the parent's RSS at spawn; "
                  f"the child's own peak (VmHWM) was {r['own_hwm_mb']:.1f} MB")
    print()
    for what, key in (("time", "seconds"), ("peak", "peak_rss_mb")):
        for phase in PHASES[1:]:
            label = f"{what}({phase}) / {what}(json.load)"
            print(f"{label:<42} {results[phase][key] / base[key]:>7.2f}x")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = harness.parser(__doc__)
    ap.add_argument("--n", type=int, default=200_000, help="evaluations in the export (default 200,000)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per phase, each a fresh process; the fastest is reported (default 1)")
    ap.add_argument("--invalid", type=float, default=0.01, metavar="SHARE",
                    help="share of rows with a score above maxScore, so rejection runs (default 0.01)")
    ap.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    harness.add_keep(ap, help="write the exports and outputs into DIR and keep them (default: a temporary dir)")
    ap.add_argument("--profile", action="store_true",
                    help="then run the conversion once more under cProfile and print its hot spots")
    ap.add_argument("--child", nargs=3, metavar=("PHASE", "EXPORT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.n < 1 or args.repeat < 1 or not 0 <= args.invalid <= 1:
        ap.error("expected --n >= 1, --repeat >= 1 and 0 <= --invalid <= 1")
    return args


def bench(args: argparse.Namespace, work: Path) -> int:
    exports = {"indented": work / "exported.json", "one line": work / "exported-one-line.json"}
    for kind, path in exports.items():
        start = time.perf_counter()
        size_mb = generate(args.n, path, args.seed, args.invalid, one_line=(kind == "one line"))
        print(f"export ({kind}): {path}, {args.n:,} evaluations, {size_mb:,.1f} MB, "
              f"generated in {time.perf_counter() - start:.1f} s")
    print(f"{harness.machine()}, best of {args.repeat}\n")
    inputs = {"json.load": exports["indented"], "convert": exports["indented"],
              "validate": exports["indented"], "convert (one line)": exports["one line"]}
    outs = {phase: work / ("out-" + phase.replace(" ", "-").replace("(", "").replace(")", ""))
            for phase in PHASES}
    results = {phase: measure(phase, inputs[phase], outs[phase], args.repeat) for phase in PHASES}
    print_table(results)
    checks = []
    for phase in ("convert", "convert (one line)"):
        checks += check_counts(phase, results[phase]["summary"], outs[phase], args.n)
    indented, one_line = results["convert"]["summary"], results["convert (one line)"]["summary"]
    buckets = ("read", "written", "excluded_consent", "excluded_demo", "rejected", "skipped", "outputs")
    validate = results["validate"]
    checks += [
        ("both exports: the same counts in every bucket and file",
         all(indented[b] == one_line[b] for b in buckets)),
        (f"both exports: validate: {validate['rows']:,} rows, {validate['rows_with_problems']:,} "
         f"with problems == rejected by convert {indented['rejected']:,}",
         validate["rows"] == args.n and validate["rows_with_problems"] == indented["rejected"])]
    failures = harness.report_checks(checks, heading="\ncounts:")
    if args.profile:
        print("\ncProfile of one conversion (indented export):")
        spawn("convert", exports["indented"], outs["convert"], profile=True)
    return harness.finish(failures)


def main(argv: list[str] | None = None) -> int:
    return harness.run_bench(parse_args(argv), bench, "bench-convert-", child=run_child)


if __name__ == "__main__":
    sys.exit(main())
