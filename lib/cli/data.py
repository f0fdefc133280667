"""The data commands: config, convert, validate, review, split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slurmtune.errors import UsageError


def add_commands(sub, argv: list[str]) -> None:
    _add_config(sub)
    _add_convert(sub, argv)
    _add_validate(sub)
    _add_review(sub)
    _add_split(sub)


# --- config ---------------------------------------------------------------------------

def _add_config(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config of a manifest, or explain its keys",
                       description="slurmtune config MANIFEST [key.sub=value ...]: the manifest as resolved. "
                                   "slurmtune config --explain [KEY]: each key's type, default, constraint "
                                   "and meaning (KEY: a section such as train, or a key such as train.lr)")
    p.add_argument("manifest", nargs="?")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--explain", nargs="?", const="", metavar="KEY",
                   help="document every key, one section or one key, from the schema")
    p.add_argument("--explain-profile", nargs="?", const="", metavar="KEY",
                   help="the same for the keys of a cluster profile (slurm/*.yaml)")
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML (or text)")
    p.set_defaults(func=_config)


def _config(args) -> int:
    from slurmtune.config import load_manifest
    from slurmtune.schema import to_dict, to_yaml
    if args.explain is not None or args.explain_profile is not None:
        return _explain(args)
    if not args.manifest:
        raise UsageError("config: give a MANIFEST (or --explain [KEY] for the keys it may set)")
    cfg = load_manifest(args.manifest, args.overrides)
    print(json.dumps(to_dict(cfg), indent=2) if args.json else to_yaml(cfg), end="" if not args.json else "\n")
    return 0


def _explain(args) -> int:
    from slurmtune.config import RunConfig
    from slurmtune.schema import explain, explained_json, format_explained
    if args.manifest or args.overrides:
        raise UsageError("config --explain documents the schema, not a manifest; run it without "
                         "MANIFEST and overrides (or `slurmtune config MANIFEST` for resolved values)")
    if args.explain is not None and args.explain_profile is not None:
        raise UsageError("config: --explain (manifest keys) or --explain-profile (cluster profile keys), not both")
    if args.explain_profile is not None:
        from slurmtune.cluster.profiles import ClusterProfile
        groups = explain(ClusterProfile, args.explain_profile or None)
    else:
        groups = explain(RunConfig, args.explain or None)
    print(explained_json(groups) if args.json else format_explained(groups), end="\n" if args.json else "")
    return 0


def _add_convert(sub, argv: list[str]) -> None:
    from slurmtune.data.converters import FORMATS, get_converter
    p = sub.add_parser("convert", help="convert source data into training records",
                       description="Formats: " + ", ".join(FORMATS))
    p.add_argument("format", choices=list(FORMATS), metavar="FORMAT")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--split", type=_fraction, metavar="FRACTION",
                   help="share of rows for train.jsonl; the rest goes to validation.jsonl, "
                        "never splitting a student (or other group)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="fail: write nothing if any row is invalid (default); "
                        "skip: write valid rows and rejected.jsonl")
    # Only the chosen format's options exist on the command line, so a typo in
    # one is a usage error rather than a silently ignored flag.
    fmt = argv[1] if len(argv) > 1 and argv[0] == "convert" else None
    if fmt in FORMATS:
        group = p.add_argument_group(f"{fmt} options")
        for opt in get_converter(fmt).options:
            flag = "--" + opt.name.replace("_", "-")
            if opt.flag:
                group.add_argument(flag, dest=f"opt_{opt.name}", action="store_true", help=opt.help)
            else:
                group.add_argument(flag, dest=f"opt_{opt.name}", required=opt.required,
                                   default=opt.default, help=opt.help, metavar="VALUE")
    p.set_defaults(func=_convert)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1 (e.g. 0.9)")
    return value


def _convert(args) -> int:
    from slurmtune.data.converters import get_converter, run_conversion
    options = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_")}
    converter = get_converter(args.format)(**options)
    summary = run_conversion(converter, args.inputs, args.out, split=args.split,
                             seed=args.seed, on_error=args.on_error)
    print(f"{args.format}: {summary.line()}")
    for name, count in summary.outputs.items():
        print(f"  {Path(args.out) / name}: {count} records")
    if summary.rejected:
        print(f"  {Path(args.out) / 'rejected.jsonl'}: {summary.rejected} rejected rows with reasons")
    for name in summary.removed:
        print(f"  {Path(args.out) / name}: removed (from the previous conversion, not written this time)")
    return 0


def _add_validate(sub) -> None:
    from slurmtune.data.converters import FORMATS
    p = sub.add_parser("validate", help="check every row of data files and report all problems")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--format", choices=["auto", *FORMATS], default="auto",
                   help="how to read the files (default: detect from the first record)")
    p.add_argument("--check-paths", action="store_true", help="check that image/video files exist")
    p.add_argument("--tokenizer", metavar="DIR", help="model or tokenizer folder for token statistics")
    p.add_argument("--max-length", type=int, metavar="N", help="tokens per row in training")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_validate)


def _validate(args) -> int:
    from slurmtune.data.validate import print_report, validate_files
    if (args.tokenizer is None) != (args.max_length is None):
        raise UsageError("--tokenizer and --max-length go together")
    report = validate_files(args.files, fmt=args.format, check_paths=args.check_paths,
                            tokenizer=args.tokenizer, max_length=args.max_length)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_report(report)
    return 1 if report["problems"] else 0


def _add_review(sub) -> None:
    from slurmtune.data.converters import FORMATS
    from slurmtune.data.review import MAX_ROWS
    p = sub.add_parser("review", help="one offline page to look through data files before training",
                       description="slurmtune review FILE... --out PAGE.html: every row with its images or "
                                   "video frames and the problems validate finds in it, filtered and searched "
                                   "in the page (PAGE.html#filter=problem&q=text)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--out", required=True, metavar="PAGE.html")
    p.add_argument("--format", choices=["auto", *FORMATS], default="auto",
                   help="how to read the files (default: detect from the first record)")
    p.add_argument("--tokenizer", metavar="DIR", help="model or tokenizer folder: flag rows over --max-length")
    p.add_argument("--max-length", type=int, metavar="N", help="tokens per row in training")
    p.add_argument("--max-rows", type=int, default=MAX_ROWS, metavar="N",
                   help=f"rows put on the page (default {MAX_ROWS}; the rest are counted)")
    p.set_defaults(func=_review)


def _review(args) -> int:
    from slurmtune.data.review import write_review
    if (args.tokenizer is None) != (args.max_length is None):
        raise UsageError("--tokenizer and --max-length go together")
    if args.max_rows < 1:
        raise UsageError(f"--max-rows {args.max_rows}: expected a positive number")
    s = write_review(args.files, args.out, fmt=args.format, tokenizer=args.tokenizer,
                     max_length=args.max_length, max_rows=args.max_rows)
    print(f"{args.out}: {s['shown']} rows shown, {s['with_problems']} with problems "
          f"({s['problems']} problem{'' if s['problems'] == 1 else 's'}), "
          f"{s['excluded']} excluded by consent" + (f", {s['left_out']} left out" if s["left_out"] else ""))
    return 0


def _add_split(sub) -> None:
    p = sub.add_parser("split", help="deterministic train/validation/test split by group")
    p.add_argument("file")
    p.add_argument("--ratios", default="0.8,0.1,0.1", help="2 or 3 shares summing to 1")
    p.add_argument("--group-by", metavar="FIELD", help="dotted field never split across files, "
                                                       "e.g. meta.student_id")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", metavar="DIR", help="output folder (default: the file's folder)")
    p.set_defaults(func=_split)


def _split(args) -> int:
    from slurmtune.data.jsonio import check_input_file
    from slurmtune.data.split import parse_ratios, split_file
    ratios = parse_ratios(args.ratios)
    path = check_input_file(args.file)
    out = Path(args.out) if args.out else path.parent
    summary = split_file(path, ratios, out, group_by=args.group_by, seed=args.seed)
    groups = f" in {summary['groups']} groups" if args.group_by else ""
    print(f"split {summary['read']} rows{groups}: "
          + ", ".join(f"{out / (name + '.jsonl')} {n}" for name, n in summary["rows"].items()))
    return 0
