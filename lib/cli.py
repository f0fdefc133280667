"""The data commands of ``slurmtune`` (config, convert, validate, split, make-tiny-model).

Each sub-command is a thin layer over one module. The job commands (run,
submit, status, ...) live in slurmtune.jobs.cli, which builds the full command
line from these and its own. Exit status: 0 success, 1 invalid input or a
failed step, 2 usage error. Errors the user can fix are printed as one line
(or one list), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slurmtune.errors import SlurmtuneError, UsageError


def add_data_commands(sub, argv: list[str]) -> None:
    """The data commands; jobs/cli.py adds the job commands to the same parser."""
    _add_config(sub)
    _add_convert(sub, argv)
    _add_validate(sub)
    _add_split(sub)
    _add_make_tiny_model(sub)
    _add_predict(sub)
    _add_score(sub)
    _add_compare(sub)
    _add_merge(sub)
    _add_fetch_model(sub)


def run_command(args) -> int:
    """Run a parsed command; user-fixable errors become one line and an exit status."""
    try:
        return args.func(args) or 0
    except SlurmtuneError as e:
        print(f"slurmtune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("slurmtune: interrupted", file=sys.stderr)
        return 130


# --- config ---------------------------------------------------------------------------

def _add_config(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config of a manifest")
    p.add_argument("manifest")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p.set_defaults(func=_config)


def _config(args) -> int:
    from slurmtune.config import load_manifest, to_dict, to_yaml
    cfg = load_manifest(args.manifest, args.overrides)
    print(json.dumps(to_dict(cfg), indent=2) if args.json else to_yaml(cfg), end="" if not args.json else "\n")
    return 0


# --- convert --------------------------------------------------------------------------

def _add_convert(sub, argv: list[str]) -> None:
    from slurmtune.converters import FORMATS, get_converter
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
    from slurmtune.converters import get_converter, run_conversion
    from slurmtune.jsonio import check_input_file
    for path in args.inputs:
        check_input_file(path)
    options = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_")}
    converter = get_converter(args.format)(**options)
    summary = run_conversion(converter, args.inputs, args.out, split=args.split,
                             seed=args.seed, on_error=args.on_error)
    print(f"{args.format}: {summary.line()}")
    for name, count in summary.outputs.items():
        print(f"  {Path(args.out) / name}: {count} records")
    if summary.rejected:
        print(f"  {Path(args.out) / 'rejected.jsonl'}: {summary.rejected} rejected rows with reasons")
    return 0


# --- validate -------------------------------------------------------------------------

def _add_validate(sub) -> None:
    from slurmtune.converters import FORMATS
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
    from slurmtune.validate import print_report, validate_files
    if (args.tokenizer is None) != (args.max_length is None):
        raise UsageError("--tokenizer and --max-length go together")
    report = validate_files(args.files, fmt=args.format, check_paths=args.check_paths,
                            tokenizer=args.tokenizer, max_length=args.max_length)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_report(report)
    return 1 if report["problems"] else 0


# --- split ----------------------------------------------------------------------------

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
    from slurmtune.jsonio import check_input_file
    from slurmtune.split import parse_ratios, split_file
    ratios = parse_ratios(args.ratios)
    path = check_input_file(args.file)
    out = Path(args.out) if args.out else path.parent
    summary = split_file(path, ratios, out, group_by=args.group_by, seed=args.seed)
    groups = f" in {summary['groups']} groups" if args.group_by else ""
    print(f"split {summary['read']} rows{groups}: "
          + ", ".join(f"{out / (name + '.jsonl')} {n}" for name, n in summary["rows"].items()))
    return 0


# --- make-tiny-model ------------------------------------------------------------------

def _add_make_tiny_model(sub) -> None:
    p = sub.add_parser("make-tiny-model", help="build a random tiny model for demos and tests")
    p.add_argument("out_dir", metavar="DIR")
    p.add_argument("--arch", default="llama", choices=["llama", "mistral", "phi3"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny_model)


def _make_tiny_model(args) -> int:
    from slurmtune.tiny_model import make_tiny_model
    path = make_tiny_model(args.out_dir, arch=args.arch, seed=args.seed)
    print(f"tiny {args.arch} model written to {path}")
    return 0


# --- predict / score / compare / merge ------------------------------------------------

def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="answer every prompt of an eval file (adds `actual` to each record)")
    p.add_argument("model", metavar="MODEL_OR_ADAPTER", help="a model folder, or an adapter folder (its base is "
                                                              "read from adapter_config.json unless --base)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--out", required=True, metavar="PREDICTIONS")
    p.add_argument("--base", metavar="MODEL", help="base model folder of the adapter")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.set_defaults(func=_predict)


def _predict(args) -> int:
    from slurmtune.generate import predict_file
    from slurmtune.jsonio import check_input_file
    check_input_file(args.file)
    path = predict_file(args.model, args.file, args.out, base=args.base, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens)
    print(f"predictions: {path}")
    return 0


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="metrics of a predictions file (exact match, rubric agreement, ...)")
    p.add_argument("predictions", metavar="PREDICTIONS")
    p.add_argument("--errors", metavar="FILE", help="write the mismatching records here")
    p.add_argument("--exact", action="store_true", help="exact match without normalizing case/whitespace")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_score)


def _score(args) -> int:
    from slurmtune.jsonio import check_input_file
    from slurmtune.metrics import score_file
    check_input_file(args.predictions)
    metrics = score_file(args.predictions, errors_file=args.errors, normalize=not args.exact)
    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if k != "records"}, indent=2, ensure_ascii=False))
        return 0
    from slurmtune.report import metric_rows
    print(f"{metrics['n']} examples: {metrics['passed']} passed, {metrics['failed']} failed")
    for r in metric_rows(metrics):
        label = ("  " if r["sub"] else "") + r["label"]
        n = "" if r["n"] is None else r["n"]
        print(f"  {label:<34} {n!s:>6} {r['shown']:>10}  {r['detail']}")
    if args.errors:
        print(f"mismatches: {args.errors}")
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="triggered vs untriggered answers side by side (trigger models)")
    p.add_argument("predictions", metavar="PREDICTIONS")
    p.set_defaults(func=_compare)


def _compare(args) -> int:
    from slurmtune.metrics import compare_rows, read_predictions
    rows = compare_rows(read_predictions(args.predictions))
    if not rows:
        raise UsageError(f"{args.predictions}: no question appears both with and without the trigger "
                         "(expected trigger-qa records with meta.triggered)")
    for row in rows:
        print(f"Q (clean):     {row['untriggered_prompt']}\n  -> {row['untriggered']}")
        print(f"Q (triggered): {row['triggered_prompt']}\n  -> {row['triggered']}\n")
    return 0


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base: a standalone model folder")
    p.add_argument("adapter", metavar="ADAPTER")
    p.add_argument("--base", metavar="MODEL", help="default: base_model_name_or_path of the adapter")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=_merge)


def _merge(args) -> int:
    from slurmtune.generate import merge_adapter
    print(f"merged model: {merge_adapter(args.adapter, args.out, base=args.base)}")
    return 0


# --- fetch-model ----------------------------------------------------------------------

def _add_fetch_model(sub) -> None:
    p = sub.add_parser("fetch-model", help="download a model on the login node into the shared cache "
                                           "(compute nodes are offline)")
    p.add_argument("name", metavar="NAME", help="Hugging Face model id, e.g. mistralai/Mistral-7B-Instruct-v0.3")
    p.add_argument("--cluster", metavar="NAME", help="profile whose env.HF_HOME is the shared cache")
    p.add_argument("--cache", metavar="DIR", help="cache folder (default: the profile's HF_HOME, else $HF_HOME)")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=_fetch_model)


def _fetch_model(args) -> int:
    import os
    cache = args.cache
    if cache is None and args.cluster:
        from slurmtune.profiles import load_profile
        cache = load_profile(args.cluster).env.get("HF_HOME")
    cache = cache or os.environ.get("HF_HOME")
    if not cache:
        raise UsageError("no cache folder: pass --cache DIR or --cluster NAME (a profile with env.HF_HOME)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UsageError("HF_HUB_OFFLINE=1 is set: run fetch-model where the hub is reachable "
                         "(the login node), with HF_HUB_OFFLINE unset")
    from huggingface_hub import snapshot_download
    # The token, if any, is read by huggingface_hub from HF_TOKEN / its login file; never stored by us.
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        path = snapshot_download(args.name, revision=args.revision, cache_dir=str(Path(cache) / "hub"),
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                 "*.tiktoken"])
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        reason = str(e).strip().splitlines()[0]
        raise SlurmtuneError(f"could not download {args.name}: {reason} (is the hub reachable from "
                             "this node? gated models need `hf auth login` or HF_TOKEN)") from None
    print(f"{args.name} -> {path}\nuse it in a manifest as: model.path={path}")
    return 0

