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

from slurmtune.data.context import has_context
from slurmtune.data.converters import FORMATS, get_converter
from slurmtune.data.converters.base import Excluded, Where
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
    """Row checks for one format; ``check`` returns (field, message) problems, or raises
    Excluded for a row that may not train (counted, never inspected or shown)."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.converter = None
        if fmt not in CANONICAL and fmt not in QWEN_MANIFESTS:
            self.converter = get_converter(fmt)(**_PLACEHOLDER_OPTIONS.get(fmt, {}))
        self.seen: dict[str, Where] = {}  # content hash or meta id -> first row with it

    def check(self, value: Any, where: Where) -> list[tuple[str, str]]:
        if self.converter is not None:  # the format's own checks, its source id included
            return self.converter.problems(value, where)
        problems = check_qwen_manifest(value, self.fmt) if self.fmt in QWEN_MANIFESTS else check_record(value)
        return problems + self.duplicate(value, where)

    def duplicate(self, value: Any, where: Where) -> list[tuple[str, str]]:
        """A converted record seen before: the same source id in its meta, or the same content."""
        if not isinstance(value, dict):
            return []
        meta_id = _meta_id(value)
        if meta_id is not None:
            first = self.seen.setdefault(f"id:{dumps(meta_id)}", where)
            if first is not where:
                field, key = meta_id[1], meta_id[2]
                return [(field, f"duplicate: {key!r} is also the {field} of {first.seen_from(where)}; "
                                "expected each source row once")]
        content = hashlib.sha1(dumps({k: v for k, v in value.items() if k != "meta"}).encode()).hexdigest()
        first = self.seen.setdefault(f"content:{content}", where)
        if first is where:
            return []
        return [("", f"duplicate of {first.seen_from(where)} (the same record); expected each row once")]


# Formats whose conversion writes one record per source row, so a source id twice is a duplicate.
_ONE_RECORD_PER_ROW = {"speechgradebook": "evaluation_id", "qwen-single": "evaluation_id",
                       "qwen-corrections": "evaluation_id", "aita": "dialogue_id"}


def _meta_id(value: dict) -> tuple[str, str, Any] | None:
    meta = value.get("meta")
    if not isinstance(meta, dict):
        return None
    key = _ONE_RECORD_PER_ROW.get(meta.get("source"))
    if key is None or meta.get(key) is None or isinstance(meta[key], (dict, list)):
        return None
    return meta["source"], f"meta.{key}", meta[key]


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


def media_of(value: Any, fmt: str) -> list[tuple[str, str]]:
    """(field, path) of every image or video a row of format ``fmt`` names."""
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
                   tokenizer: str | None = None, max_length: int | None = None, on_row=None) -> dict:
    """The report: files, rows, excluded, problems (file, line, field, message) and stats.
    ``on_row(where, value, fmt)`` is called after each row is checked (``value`` None for one that
    could not be read), never for a row excluded by consent."""
    if fmt != "auto" and fmt not in FORMATS and fmt not in CANONICAL:
        raise UsageError(f"unknown format {fmt!r}")
    run = _Validation(fmt, check_paths, _TokenLengths(tokenizer, max_length) if tokenizer else None)
    run.on_row = on_row
    for name in files:
        try:
            path = check_input_file(name)
        except DataError as e:
            run.report["problems"].append({"file": e.path, "line": e.line, "field": None, "message": e.reason})
            continue
        run.file(path)
    if run.lengths:
        run.report["stats"]["tokens"] = run.lengths.summary()
    return run.report


class _Validation:
    """The state shared by the files of one `slurmtune validate`: one checker per format
    (ids and content seen in any file), and each student's first file (splits)."""

    def __init__(self, fmt: str, check_paths: bool, lengths: "_TokenLengths | None"):
        self.fmt, self.check_paths, self.lengths = fmt, check_paths, lengths
        self.report: dict = {"files": [], "rows": 0, "excluded": 0, "problems": [], "stats": {}}
        self.checkers: dict[str, _Checker] = {}
        self.group_file: dict[tuple[str, Any], Where] = {}
        self.on_row = None

    def problem(self, where: Where, field: str | None, message: str) -> None:
        entry = {"file": str(where.path), "line": where.line, "field": where.field(field or None),
                 "message": message}
        if where.index is not None:
            entry["index"] = where.index
        self.report["problems"].append(entry)

    def file(self, path: Path) -> None:
        entry = {"file": str(path), "format": "unknown" if self.fmt == "auto" else self.fmt,
                 "rows": 0, "excluded": 0}
        self.report["files"].append(entry)
        reported: set = set()
        try:
            for item in progress(non_blank(iter_records(path, ("evaluations", "dialogues"))),
                                 desc=f"validate {path.name}", unit="rows"):
                entry["rows"] += 1
                self.report["rows"] += 1
                where = Where.of(path, item)
                self.checked(entry, item, where, reported)
        except DataError as e:
            self.report["problems"].append({"file": e.path, "line": e.line, "field": e.field, "message": e.reason})

    def checked(self, entry: dict, item, where: Where, reported: set) -> None:
        value, fmt = None, entry["format"]
        if item.error:
            self.problem(where, None, item.error)
        else:
            checker = self.checker(entry, item.value, where.path)
            fmt = checker.fmt
            try:
                problems = checker.check(item.value, where)
            except Excluded:  # consent first: never inspected, never shown
                entry["excluded"] += 1
                self.report["excluded"] += 1
                return
            value = item.value
            for field, message in problems:
                self.problem(where, field, message)
            self.row(item.value, where, fmt, reported)
        if self.on_row is not None:
            self.on_row(where, value, fmt)

    def checker(self, entry: dict, value: Any, path: Path) -> _Checker:
        if entry["format"] == "unknown":
            entry["format"] = detect_format(value, is_json_document(path))
        fmt = entry["format"]
        if fmt not in self.checkers:
            self.checkers[fmt] = _Checker(fmt)
        return self.checkers[fmt]

    def row(self, value: Any, where: Where, fmt: str, reported: set) -> None:
        """The checks across rows and files, and of what a row points at, for a row that may train."""
        group = _group_of(value)
        if group is not None:
            # Files of one format given together are taken as splits of one set.
            first = self.group_file.setdefault((fmt, dumps(group)), where)
            if first.path != where.path and dumps(group) not in reported:
                reported.add(dumps(group))
                self.problem(where, "student_id", f"student {group!r} is also in {first.seen_from(where)}; "
                             "expected each student in one split only")
        if self.check_paths:
            for field, media in media_of(value, fmt):
                problem = row_media_problem(media, field, where.path)
                if problem:
                    self.problem(where, field, problem)
        if self.lengths and fmt in CANONICAL:
            self.lengths.add(value, where, self.problem)


def row_media_problem(media: str, field: str, data_file: Path) -> str | None:
    """Why the image or video a row names cannot be used: missing, empty, unreadable, no pixels
    or no frames (slurmtune.data.media); relative paths are relative to the data file's folder."""
    from slurmtune.data.media import IMAGE, VIDEO, media_problem

    if media.startswith(("http://", "https://")):
        return None  # remote media cannot be checked from an offline node
    p = Path(media)
    p = p if p.is_absolute() else data_file.parent / p
    if not p.is_file():
        return f"file not found: {media}"
    kind = IMAGE if "image" in field.rsplit(".", 1)[-1] else VIDEO
    problem = media_problem(p, kind)
    return f"{problem}; expected a readable {kind}" if problem else None


class _TokenLengths:
    """Token counts of canonical records under a model's chat template."""

    def __init__(self, tokenizer_dir: str, max_length: int):
        from slurmtune.data.chat_format import load_tokenizer
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.max_length = max_length
        self.totals: list[int] = []
        self.truncated = 0
        self.cut_off = 0

    def add(self, record: dict, where: Where, problem) -> None:
        from slurmtune.data.chat_format import token_counts
        try:
            prompt_len, total = token_counts(self.tokenizer, record)
        except ValueError as e:
            problem(where, "messages", str(e))
            return
        self.totals.append(total)
        if total > self.max_length:
            self.truncated += 1
        if total > self.max_length and prompt_len < self.max_length and has_context(record):
            problem(where, None, f"{total} tokens with its passages, over --max-length {self.max_length}: "
                    "training would cut the answer (raise max_length or give fewer or shorter passages)")
        if prompt_len >= self.max_length:
            self.cut_off += 1
            problem(where, None, f"the trained part starts at token {prompt_len}, at or beyond "
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
        excluded = f", {f['excluded']} excluded for consent or demo (not checked, not shown)" if f["excluded"] else ""
        print(f"{f['file']}: {f['rows']} rows ({f['format']}){excluded}")
    tokens = report["stats"].get("tokens")
    if tokens and tokens.get("rows"):
        print(f"tokens per row: min {tokens['min']}, median {tokens['median']:g}, p95 {tokens['p95']}, "
              f"max {tokens['max']}; {tokens['truncated']} row(s) longer than {tokens['max_length']}, "
              f"{tokens['cut_off']} with nothing left to train on")
    n = len(report["problems"])
    print(f"checked {report['rows']} rows in {len(report['files'])} file(s): "
          + ("no problems" if n == 0 else f"{n} problem(s)"))
