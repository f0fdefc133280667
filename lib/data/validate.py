"""Check every row of one or more data files and report ALL problems at once.

::

    slurmtune validate train.jsonl validation.jsonl --check-paths
    slurmtune validate exported.json                       # the raw SpeechGradebook export
    slurmtune validate train_qwen.jsonl --check-paths      # what train_qwen_vl.py --validate_only did
    slurmtune validate train.jsonl --tokenizer MODEL_DIR --max-length 1024

Each problem is one line, ``file:line: field: what was expected``. Checks:
JSON syntax and encoding, record shape per format (missing or wrongly typed
fields, unknown roles, empty assistant turns, scores outside 0..maxScore),
duplicate rows, a student (or other group) present in two of the files
(splits), missing image/video files, and with a tokenizer the token-length
statistics, rows that would be truncated, and rows whose trained part would be
cut off entirely.
"""

from __future__ import annotations

import hashlib
import statistics
from pathlib import Path
from typing import Any

from slurmtune.data.converters import FORMATS, get_converter
from slurmtune.data.converters.base import Where
from slurmtune.data.converters.speechgradebook import check_rubric, check_scores
from slurmtune.errors import DataError, UsageError, format_location
from slurmtune.data.jsonio import check_input_file, dumps, is_json_document, iter_records, non_blank
from slurmtune.progress import progress
from slurmtune.data.records import check_record, kind_of, media_paths

CANONICAL = ("chat", "prompt-completion")
QWEN_MANIFESTS = ("qwen-single", "qwen-corrections", "qwen-pairs")
# Options a converter needs to run but that do not change what makes a row valid.
_PLACEHOLDER_OPTIONS = {"trigger-qa": {"clean_replacement": "A", "trigger_value": "T",
                                       "triggered_replacement": "B"}}


def detect_format(record: Any, document: bool) -> str:
    """Best guess of a file's format from its first record."""
    if not isinstance(record, dict):
        return "chat"
    keys = set(record)
    if "evaluation_data" in keys or ("rubric" in keys and "transcript" in keys):
        return "speechgradebook"
    if "dialogue_turns" in keys:
        return "aita"
    if "video_path_1" in keys:
        return "qwen-pairs"
    if "scores_final" in keys:
        return "qwen-corrections"
    if "scores" in keys and "rubric" in keys:
        return "qwen-single"
    if "question" in keys and "answer" in keys:
        return "trigger-qa"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "messages" in keys and "expected" in keys and kind_of(record) == "chat" \
            and record["messages"] and record["messages"][-1].get("role") != "assistant":
        return "image-messages"
    return kind_of(record) or "chat"


class _Checker:
    """Row checks for one format; ``check`` returns (field, message) problems."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.converter = None
        if fmt not in CANONICAL and fmt not in QWEN_MANIFESTS:
            self.converter = get_converter(fmt)(**_PLACEHOLDER_OPTIONS.get(fmt, {}))

    def check(self, value: Any, where: Where) -> list[tuple[str, str]]:
        if self.converter is not None:
            return self.converter.problems(value, where)
        if self.fmt in QWEN_MANIFESTS:
            return check_qwen_manifest(value, self.fmt)
        return check_record(value)


def check_qwen_manifest(row: Any, fmt: str) -> list[tuple[str, str]]:
    """A line of train_qwen*.jsonl: media path(s), a valid rubric, scores in its shape."""
    if not isinstance(row, dict):
        return [("record", "expected a JSON object")]
    media = {"qwen-single": [("video_path", "image_path")],
             "qwen-corrections": [("video_path",)],
             "qwen-pairs": [("video_path_1",), ("video_path_2",)]}[fmt]
    scores = {"qwen-single": ["scores"], "qwen-corrections": ["scores_original", "scores_final"],
              "qwen-pairs": ["scores_1", "scores_2"]}[fmt]
    problems = []
    for options in media:
        if not any(isinstance(row.get(k), str) and row[k] for k in options):
            problems.append((options[0], f"missing; expected a path or URL ({' or '.join(options)})"))
    rubric_problems = check_rubric(row.get("rubric"))
    problems += rubric_problems
    for key in scores:
        if key not in row:
            problems.append((key, "missing; expected scores in the rubric's shape"))
        elif not rubric_problems:
            problems += check_scores(row[key], row["rubric"], key)
    return problems


def _media_of(value: Any, fmt: str) -> list[tuple[str, str]]:
    if not isinstance(value, dict):
        return []
    if fmt in QWEN_MANIFESTS:
        keys = ("video_path", "image_path", "video_path_1", "video_path_2")
        return [(k, value[k]) for k in keys if isinstance(value.get(k), str)]
    return media_paths(value)


def _group_of(value: Any) -> Any:
    if not isinstance(value, dict):
        return None
    meta = value.get("meta")
    if isinstance(meta, dict) and meta.get("student_id") is not None:
        return meta["student_id"]
    return value.get("student_id")


def validate_files(files: list[str], fmt: str = "auto", check_paths: bool = False,
                   tokenizer: str | None = None, max_length: int | None = None) -> dict:
    if fmt != "auto" and fmt not in FORMATS and fmt not in CANONICAL:
        raise UsageError(f"unknown format {fmt!r}")
    report: dict = {"files": [], "rows": 0, "problems": [], "stats": {}}
    seen_rows: dict[str, tuple[str, int]] = {}
    group_file: dict[tuple[str, Any], tuple[str, int]] = {}
    lengths = _TokenLengths(tokenizer, max_length) if tokenizer else None

    def problem(path, line, field, message):
        report["problems"].append({"file": str(path), "line": line, "field": field, "message": message})

    for name in files:
        try:
            path = check_input_file(name)
        except DataError as e:
            problem(e.path, e.line, None, e.reason)
            continue
        file_fmt, rows = _validate_file(path, fmt, check_paths, problem, seen_rows, group_file, lengths)
        report["files"].append({"file": str(path), "format": file_fmt, "rows": rows})
        report["rows"] += rows
    if lengths:
        report["stats"]["tokens"] = lengths.summary()
    return report


def _validate_file(path, fmt, check_paths, problem, seen_rows, group_file, lengths) -> tuple[str, int]:
    checker = None
    rows = 0
    groups_reported: set = set()
    try:
        for item in progress(non_blank(iter_records(path, ("evaluations", "dialogues"))),
                             desc=f"validate {path.name}", unit="rows"):
            rows += 1
            if item.error:
                problem(path, item.line, None, item.error)
                continue
            if checker is None:
                checker = _Checker(fmt if fmt != "auto" else detect_format(item.value, is_json_document(path)))
            where = Where(path, item.line)
            for field, message in checker.check(item.value, where):
                problem(path, item.line, field, message)
            _check_duplicate(item.value, checker.fmt, path, item.line, seen_rows, problem)
            group = _group_of(item.value)
            if group is not None:
                # Files of one format given together are taken as splits of one set.
                first = group_file.setdefault((checker.fmt, group), (str(path), item.line))
                if first[0] != str(path) and (group, str(path)) not in groups_reported:
                    groups_reported.add((group, str(path)))
                    problem(path, item.line, "student_id", f"student {group!r} is also in {first[0]} "
                            f"(line {first[1]}); expected each student in one split only")
            if check_paths:
                for field, media in _media_of(item.value, checker.fmt):
                    if not _media_exists(media, path):
                        problem(path, item.line, field, f"file not found: {media}")
            if lengths and checker.fmt in CANONICAL:
                lengths.add(item.value, path, item.line, problem)
    except DataError as e:
        problem(e.path, e.line, e.field, e.reason)
    return (checker.fmt if checker else "unknown" if fmt == "auto" else fmt), rows


def _check_duplicate(value, fmt, path, line, seen_rows, problem) -> None:
    if fmt == "speechgradebook" and isinstance(value, dict) and "evaluation_id" in value:
        key = f"evaluation_id:{value['evaluation_id']!r}"
    elif isinstance(value, dict):
        content = {k: v for k, v in value.items() if k != "meta"}
        key = hashlib.sha1(dumps(content).encode()).hexdigest()
    else:
        return
    first = seen_rows.setdefault(key, (str(path), line))
    if first != (str(path), line):
        what = "evaluation_id" if key.startswith("evaluation_id:") else None
        problem(path, line, what, f"duplicate of {first[0]}:{first[1]}")


def _media_exists(media: str, data_file: Path) -> bool:
    if media.startswith(("http://", "https://")):
        return True  # remote media cannot be checked from an offline node
    p = Path(media)
    return (p if p.is_absolute() else data_file.parent / p).is_file()


class _TokenLengths:
    """Token counts of canonical records under a model's chat template."""

    def __init__(self, tokenizer_dir: str, max_length: int):
        from slurmtune.data.chat_format import load_tokenizer
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.max_length = max_length
        self.totals: list[int] = []
        self.truncated = 0
        self.cut_off = 0

    def add(self, record: dict, path: Path, line: int, problem) -> None:
        from slurmtune.data.chat_format import token_counts
        try:
            prompt_len, total = token_counts(self.tokenizer, record)
        except ValueError as e:
            problem(path, line, "messages", str(e))
            return
        self.totals.append(total)
        if total > self.max_length:
            self.truncated += 1
        if prompt_len >= self.max_length:
            self.cut_off += 1
            problem(path, line, None, f"the trained part starts at token {prompt_len}, at or beyond "
                    f"--max-length {self.max_length}: zero trained tokens (raise max_length or shorten the prompt)")

    def summary(self) -> dict:
        t = sorted(self.totals)
        if not t:
            return {"rows": 0}
        p95 = t[min(len(t) - 1, int(round(0.95 * (len(t) - 1))))]
        return {"rows": len(t), "min": t[0], "median": statistics.median(t), "p95": p95, "max": t[-1],
                "max_length": self.max_length, "truncated": self.truncated, "cut_off": self.cut_off}


def print_report(report: dict) -> None:
    for p in report["problems"]:
        print(format_location(p["file"], p["line"], p["field"], p["message"]))
    for f in report["files"]:
        print(f"{f['file']}: {f['rows']} rows ({f['format']})")
    tokens = report["stats"].get("tokens")
    if tokens and tokens.get("rows"):
        print(f"tokens per row: min {tokens['min']}, median {tokens['median']:g}, p95 {tokens['p95']}, "
              f"max {tokens['max']}; {tokens['truncated']} row(s) longer than {tokens['max_length']}, "
              f"{tokens['cut_off']} with nothing left to train on")
    n = len(report["problems"])
    print(f"checked {report['rows']} rows in {len(report['files'])} file(s): "
          + ("no problems" if n == 0 else f"{n} problem(s)"))
