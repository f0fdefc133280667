"""Evaluation commands: predict, score, compare, merge, and report (a run's reports again)."""

from __future__ import annotations

import json

from slurmtune.errors import UsageError
from slurmtune.runs.folder import Run
from slurmtune.cli.status import add_run_command


def add_commands(sub, argv: list[str]) -> None:
    _add_predict(sub)
    _add_score(sub)
    _add_compare(sub)
    _add_merge(sub)
    _add_report(sub)


def _add_report(sub) -> None:
    add_run_command(sub, "report", "(re)write a run's eval reports from its prediction shards", _report)


def _report(args) -> int:
    from slurmtune.jobs.report import ReportJob
    run = Run.open(args.run, args.root)
    paths = ReportJob(run.dir)()
    for kind in ("json", "md", "html"):
        print(f"{kind}: {paths[kind]}")
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="answer every prompt of an eval file (adds `actual` to each record)")
    p.add_argument("model", metavar="MODEL_OR_ADAPTER", help="a model folder, or an adapter folder (its base is "
                                                              "read from adapter_config.json unless --base)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--out", required=True, metavar="PREDICTIONS")
    p.add_argument("--base", metavar="MODEL", help="base model folder of the adapter")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--endpoint", metavar="URL|RUN", help="ask a running server instead (a URL, or a run whose "
                                                         "`slurmtune serve` is up); MODEL is then its model name; "
                                                         "a key comes from $SLURMTUNE_API_KEY or the run's serve/")
    p.add_argument("--concurrency", type=int, default=4, help="--endpoint: requests in flight at once")
    p.set_defaults(func=_predict)


def _predict(args) -> int:
    from slurmtune.evaluate.generate import predict_file
    from slurmtune.data.jsonio import check_input_file
    check_input_file(args.file)
    client = _endpoint_client(args.endpoint, args.model, args.concurrency) if args.endpoint else None
    path = predict_file(args.model, args.file, args.out, base=args.base, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, client=client)
    print(f"predictions: {path}")
    return 0


def _endpoint_client(where: str, model: str, concurrency: int):
    """The client of a server given as a URL, or as a run (or adapter) whose server is up (asked
    of the scheduler too: a server killed outright cannot say it is gone)."""
    from slurmtune.serve.server import endpoint_client

    if where.startswith(("http://", "https://")):
        return endpoint_client(where, model, concurrency)
    from slurmtune.cli.serve import endpoint_of, read_job, serve_dir_of

    serve_dir, _ = serve_dir_of(where, "runs")
    job = read_job(serve_dir)
    status = endpoint_of(serve_dir, job) if job else {"state": "never started"}
    if status["state"] != "up":
        raise UsageError(f"--endpoint {where}: its server is {status['state']}; start it with: slurmtune serve {where}")
    return endpoint_client(str(serve_dir), model, concurrency)


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="metrics of a predictions file (exact match, rubric agreement, ...)")
    p.add_argument("predictions", metavar="PREDICTIONS")
    p.add_argument("--errors", metavar="FILE", help="write the mismatching records here")
    p.add_argument("--exact", action="store_true", help="exact match without normalizing case/whitespace")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_score)


def _score(args) -> int:
    from slurmtune.data.jsonio import check_input_file
    from slurmtune.evaluate.metrics import score_file
    check_input_file(args.predictions)
    metrics = score_file(args.predictions, errors_file=args.errors, normalize=not args.exact)
    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if k != "records"}, indent=2, ensure_ascii=False))
        return 0
    from slurmtune.evaluate.report import metric_rows
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
    from slurmtune.evaluate.metrics import compare_rows, read_predictions
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
    from slurmtune.evaluate.generate import merge_adapter
    print(f"merged model: {merge_adapter(args.adapter, args.out, base=args.base)}")
    return 0
