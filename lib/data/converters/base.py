"""The conversion loop shared by every format: counting, consent, errors, split, atomic output.

A converter only says how one source record becomes output records::

    class Trigger(Converter):
        name = "trigger-qa"
        outputs = ("train.jsonl",)

        def convert(self, value, where):
            ...                      # raise Rejected / Excluded / Skipped, or
            yield "train.jsonl", rec  # one or more (output file, record)

and :func:`run_conversion` does the rest. Every input row ends in exactly one
bucket, so ``read == accepted + excluded_consent + excluded_demo + rejected +
skipped`` always holds (``written`` counts output records, which may differ
from ``accepted`` when one row yields several records or pairs).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

import jsonlines

from slurmtune.data.consent import exclusion_reason
from slurmtune.data.jsonio import (AtomicFiles, Item, check_input_file, check_input_path, dumps, iter_records,
                                   non_blank, write_json_atomic)
from slurmtune.data.outputs import prepare_out_dir, previous_outputs
from slurmtune.data.records import json_type
from slurmtune.data.split import assign_groups, field_value
from slurmtune.errors import DataError, SlurmtuneError, UsageError, format_location
from slurmtune.progress import progress


class Rejected(Exception):
    """The row is invalid: ``field`` and what was expected (the first of ``problems``)."""

    def __init__(self, field: str, message: str, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.field, self.message = field, message
        self.problems = problems or [(field, message)]

    @classmethod
    def of(cls, problems: list[tuple[str, str]]) -> "Rejected":
        return cls(problems[0][0], problems[0][1], problems)


class Excluded(Exception):
    """The row may not train: ``reason`` is 'consent' or 'demo'."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Skipped(Exception):
    """The row is valid but has nothing this output needs (e.g. no instructor correction)."""


@dataclass(frozen=True, slots=True)
class Where:
    """Where a source row came from, for messages and lineage: its file and line, and in
    a JSON document its place in the list (several records may share a line)."""

    path: Path
    line: int
    index: int | None = None
    key: str | None = None

    @classmethod
    def of(cls, path: Path, item: Item) -> "Where":
        return cls(path, item.line, item.index, item.key)

    @property
    def record(self) -> str | None:
        """The record's place in its JSON document as jq writes it (``evaluations[3]``, ``[3]``)."""
        return None if self.index is None else f"{self.key or ''}[{self.index}]"

    def field(self, name: str | None) -> str | None:
        """``name`` inside this record, for messages: ``evaluations[3].transcript``."""
        if self.record is None:
            return name or None
        return f"{self.record}.{name}" if name else self.record

    @property
    def place(self) -> str:
        """``file:line`` (``file:line: evaluations[3]`` in a JSON document), as messages name the row."""
        return format_location(self.path, self.line, None, self.record) if self.record else f"{self.path}:{self.line}"

    def location(self, field: str | None, message: str) -> str:
        """The one-line message ``file:line: field: message`` about this row."""
        return format_location(self.path, self.line, self.field(field), message)

    def seen_from(self, other: "Where") -> str:
        """This row's place as a message about ``other`` names it."""
        here = f"line {self.line}" if self.record is None else f"{self.record} (line {self.line})"
        return here if other.path == self.path else f"{self.path}: {here}"

    def meta(self) -> dict:
        meta = {"file": self.path.name, "line": self.line}
        if self.index is not None:
            meta["index"] = self.index
        return meta


@dataclass(frozen=True)
class Option:
    """A format option (``--clean-replacement`` ...)."""

    name: str
    help: str
    required: bool = False
    default: str | None = None
    flag: bool = False  # an on/off switch (``--chat``) rather than ``--name VALUE``


FLAG_TEXT = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def flag_value(value: str | bool | None) -> bool:
    """An on/off option's value; raises UsageError for text that is neither."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if str(value).strip().lower() not in FLAG_TEXT:
        raise UsageError(f"{value!r} is not on or off; expected true or false")
    return FLAG_TEXT[str(value).strip().lower()]


class Converter:
    """One source format. Subclasses set the class attributes and implement ``convert``."""

    name: ClassVar[str]
    help: ClassVar[str]
    outputs: ClassVar[tuple[str, ...]] = ("train.jsonl",)
    list_keys: ClassVar[tuple[str, ...]] = ()  # keys of a .json document holding the rows
    options: ClassVar[tuple[Option, ...]] = ()
    group_field: ClassVar[str | None] = None  # --split never separates rows sharing this field
    row_kind: ClassVar[str] = "a JSON object"  # what a row must be, in messages
    consent_required: ClassVar[bool] = False  # True: a row without a consent object may not train
    id_field: ClassVar[str | None] = "id"  # the source id: two rows with one id are an error

    def __init__(self, **options: str | bool | None):
        # A switch comes as True/False from the command line and as text from a manifest.
        self.opts = {name: flag_value(value) if self._is_flag(name) else value for name, value in options.items()}
        self._seen: dict[str, Where] = {}  # source id -> the row that had it first

    @classmethod
    def _is_flag(cls, name: str) -> bool:
        return any(opt.flag and opt.name == name for opt in cls.options)

    def rows(self, paths: list[Path]) -> Iterator[tuple[Where, Item]]:
        for path in paths:
            count = 0
            for item in non_blank(iter_records(path, self.list_keys)):
                count += 1
                yield Where.of(path, item), item
            if count == 0:
                raise DataError(path, None, "no records (the file holds only whitespace or an empty "
                                            f"list); expected {self.row_kind} per row")

    def convert(self, value: Any, where: Where) -> Iterable[tuple[str, dict]]:
        raise NotImplementedError

    def finish(self) -> Iterable[tuple[str, dict]]:
        """Records that need every row first (pairs); called once after the last row."""
        return ()

    def check_row(self, row: dict, where: Where) -> list[tuple[str, str]]:
        """Every problem of a row that may train ([] when it is valid)."""
        return []

    def admit(self, value: Any, where: Where) -> dict:
        """The row, if it may train and is valid: consent first (a refused row is never
        inspected further), then its shape. Raises Excluded or Rejected."""
        if not isinstance(value, dict):
            raise Rejected("", f"expected {self.row_kind}, got {json_type(value)}")
        reason = exclusion_reason(value, required=self.consent_required)
        if reason:
            raise Excluded(reason)
        problems = self.check_row(value, where) + self.duplicate(value, where)
        if problems:
            raise Rejected.of(problems)
        return value

    def problems(self, value: Any, where: Where) -> list[tuple[str, str]]:
        """Every problem of one row that may train (for `slurmtune validate`); raises
        Excluded for a row that may not, which is counted and never inspected."""
        if not isinstance(value, dict):
            return [("", f"expected {self.row_kind}, got {json_type(value)}")]
        reason = exclusion_reason(value, required=self.consent_required)
        if reason:
            raise Excluded(reason)
        return self.check_row(value, where) + self.duplicate(value, where)

    def duplicate(self, row: dict, where: Where) -> list[tuple[str, str]]:
        """A problem when the row's source id was seen before, in any input of this run.
        Only rows that may train get here, so no message names an excluded row."""
        value = row.get(self.id_field) if self.id_field else None
        if value is None or isinstance(value, (dict, list, bool)):
            return []  # no usable id: check_row says so where the format requires one
        first = self._seen.setdefault(dumps(value), where)
        if first is where:
            return []
        return [(self.id_field, f"duplicate: {value!r} is also the {self.id_field} of "
                                f"{first.seen_from(where)}; expected each id once")]


@dataclass
class Summary:
    format: str
    inputs: list[str]
    read: int = 0
    written: int = 0
    accepted: int = 0
    excluded_consent: int = 0
    excluded_demo: int = 0
    rejected: int = 0
    skipped: int = 0
    outputs: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # the output set this conversion wrote
    removed: list[str] = field(default_factory=list)  # files of the previous set not written again
    rejected_reasons: list[str] = field(default_factory=list)
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    seed: int = 42
    split: float | None = None
    ok: bool = True
    error: str | None = None  # why reading stopped early, if it did

    def balanced(self) -> bool:
        return self.read == (self.accepted + self.excluded_consent + self.excluded_demo
                             + self.rejected + self.skipped)

    def line(self) -> str:
        parts = [f"read {self.read}", f"written {self.written}",
                 f"excluded (consent) {self.excluded_consent}", f"excluded (demo) {self.excluded_demo}",
                 f"rejected {self.rejected}"]
        if self.skipped:
            parts.append(f"skipped {self.skipped}")
        return ", ".join(parts)


MAX_REASONS_KEPT = 1000


def run_conversion(converter: Converter, inputs: list[str | os.PathLike], out_dir: str | os.PathLike,
                   split: float | None = None, seed: int = 42, on_error: str = "fail") -> Summary:
    """Convert ``inputs`` into ``out_dir``, replacing the output set there as a whole.

    On success the data files, ``rejected.jsonl`` (with ``on_error == "skip"``) and
    ``summary.json`` replace every file of the previous conversion at once. On failure
    (unreadable input, rejected rows with ``on_error == "fail"``, nothing to write) the
    previous set stays as it was, this attempt's counts go to ``summary.failed.json``
    beside it (or to ``summary.json`` in a folder without one), and the error says so."""
    paths = [check_input_path(p) for p in inputs]  # a mistyped path creates nothing
    names = output_names(converter, split)
    out_dir = prepare_out_dir(out_dir, paths, names)
    previous = previous_outputs(out_dir, SUMMARY, names)
    summary = Summary(converter.name, [str(p) for p in paths], seed=seed, split=split)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".spool-") as spool_dir:
        spool = _Spool(Path(spool_dir), converter, split)
        try:
            for path in paths:
                check_input_file(path, allow_empty=True)
            rejected_rows = _convert_all(converter, paths, summary, spool, keep_rejected=(on_error == "skip"))
            assert summary.balanced(), f"conversion lost rows: {summary}"
            if summary.rejected and on_error != "skip":
                raise InvalidInput(_rejected_message(summary))
            if spool.records == 0:
                raise InvalidInput(f"no records to write: {summary.line()}; expected at least one "
                                   "row that may train")
            _publish(spool, out_dir, summary, rejected_rows, seed, previous)
        except SlurmtuneError as e:
            spool.close()
            summary.ok, summary.error = False, str(e)
            raise type(e)(*_failure_args(e, _keep_failed(out_dir, summary, previous))) from None
    return summary


SUMMARY, FAILED_SUMMARY = "summary.json", "summary.failed.json"


def output_names(converter: Converter, split: float | None) -> list[str]:
    """Every file a conversion with this converter may write into its folder."""
    names = list(converter.outputs)
    if split is not None:
        names.insert(1, validation_name(names[0]))
    return [*names, "rejected.jsonl", SUMMARY, FAILED_SUMMARY]


def _rejected_message(summary: Summary) -> str:
    reasons = summary.rejected_reasons
    more = f"\n  ... {len(reasons) - 5} more problem(s) in the summary" if len(reasons) > 5 else ""
    return (f"{summary.rejected} invalid row(s) (--on-error skip writes the valid rows and "
            "rejected.jsonl):\n  " + "\n  ".join(reasons[:5]) + more)


def _keep_failed(out_dir: Path, summary: Summary, previous: set[str]) -> str:
    """Write a failed attempt's counts without touching the previous output set; the
    line that says where things stand."""
    data = sorted(previous - {SUMMARY, FAILED_SUMMARY})
    if SUMMARY not in previous and not data:
        write_json_atomic(out_dir / SUMMARY, asdict(summary))
        return f"nothing written to {out_dir}; counts in {out_dir / SUMMARY}"
    write_json_atomic(out_dir / FAILED_SUMMARY, asdict(summary))
    kept = data or [SUMMARY]
    are = "is" if len(kept) == 1 else "are"
    return (f"nothing written: {', '.join(kept)} in {out_dir} {are} from the previous conversion, "
            f"left as {'it was' if len(kept) == 1 else 'they were'}; this attempt's counts: "
            f"{out_dir / FAILED_SUMMARY}")


def _failure_args(e: SlurmtuneError, line: str) -> tuple:
    if isinstance(e, DataError):
        return e.path, e.line, f"{e.reason}\n{line}", e.field
    return (f"{e}\n{line}",)


class InvalidInput(SlurmtuneError):
    """Rows were rejected and the run was asked to fail on them, or none may train."""


def _convert_all(converter, paths, summary, spool, keep_rejected) -> list[dict]:
    rejected_rows = []
    for where, item in progress(converter.rows(paths), desc=f"convert {converter.name}", unit="rows"):
        summary.read += 1
        try:
            if item.error:
                raise Rejected("", item.error)
            records = list(converter.convert(item.value, where))
        except Rejected as r:
            summary.rejected += 1
            for name, message in r.problems:
                if len(summary.rejected_reasons) < MAX_REASONS_KEPT:
                    summary.rejected_reasons.append(where.location(name or None, message))
            if keep_rejected:
                rejected_rows.append(_rejected_row(where, r, item))
            continue
        except Excluded as e:
            if e.reason == "demo":
                summary.excluded_demo += 1
            else:
                summary.excluded_consent += 1
            continue
        except Skipped as s:
            summary.skipped += 1
            reason = str(s)
            summary.skipped_reasons[reason] = summary.skipped_reasons.get(reason, 0) + 1
            continue
        summary.accepted += 1
        spool.add(records)
    spool.add(list(converter.finish()))
    return rejected_rows


def _rejected_row(where: Where, r: Rejected, item: Item) -> dict:
    # The row itself is kept only when it passed the consent check: a row is
    # rejected for its content only after consent was established, and rows that
    # could not be parsed carry no content at all.
    row = {"file": str(where.path), "line": where.line, **({"index": where.index} if where.index is not None else {}),
           "field": where.field(r.field or None) or "", "reason": r.message,
           "problems": [{"field": where.field(name or None) or "", "message": message}
                        for name, message in r.problems]}
    if item.error is None and not any(name == "consent" for name, _ in r.problems):
        row["record"] = item.value
    return row


class _Spool:
    """Converted records held on disk until the run is known to succeed."""

    def __init__(self, directory: Path, converter: Converter, split: float | None):
        self.directory, self.converter, self.split = directory, converter, split
        self.files = {name: open(directory / name, "w", encoding="utf-8") for name in converter.outputs}
        self.group_rows: Counter[str] = Counter()
        self.records = 0
        # The split group of each spooled record, one per line beside the records, so the
        # split pass need not decode every record again.
        self.groups = open(directory / ".groups", "w", encoding="utf-8") if split is not None else None

    def add(self, records: list[tuple[str, dict]]) -> None:
        for name, record in records:
            if self.groups is not None and name == self.converter.outputs[0]:
                group = self.group_of(record, len(self.group_rows))
                self.group_rows[group] += 1
                self.groups.write(json.dumps(group) + "\n")
            self.files[name].write(dumps(record) + "\n")
            self.records += 1

    def group_of(self, record: dict, position: int) -> str:
        """The split group of a record; a record without a group id is a group of its own."""
        gf = self.converter.group_field
        value = field_value(record, gf) if gf else None
        return f"g:{value}" if value is not None else f"row:{position}"

    def close(self) -> None:
        for f in [*self.files.values(), *([self.groups] if self.groups else [])]:
            f.close()

    def reopen(self, name: str):
        return open(self.directory / name, encoding="utf-8")


def _publish(spool: _Spool, out_dir: Path, summary: Summary, rejected_rows: list[dict], seed: int,
             previous: set[str]) -> None:
    spool.close()
    with AtomicFiles(out_dir, replaces=previous) as files:
        for name in spool.converter.outputs:
            if spool.split is not None and name == spool.converter.outputs[0]:
                _write_split(spool, name, files, summary, seed)
            else:
                summary.outputs[name] = _copy(spool.reopen(name), files.open(name))
        if rejected_rows:
            with jsonlines.Writer(files.open("rejected.jsonl"), dumps=dumps) as w:
                w.write_all(rejected_rows)
        summary.written = sum(summary.outputs.values())
        summary.files = [*files.names, SUMMARY]
        summary.removed = sorted(previous - set(summary.files))
        files.write_json(SUMMARY, asdict(summary))


def _write_split(spool: _Spool, name: str, files: AtomicFiles, summary: Summary, seed: int) -> None:
    assignment = assign_groups(spool.group_rows, [spool.split, 1 - spool.split], seed)
    val_name = validation_name(name)
    outs = [files.open(name), files.open(val_name)]
    counts = [0, 0]
    with spool.reopen(name) as records, spool.reopen(".groups") as groups:
        for line, group in zip(records, groups):
            index = assignment[json.loads(group)]
            outs[index].write(line)
            counts[index] += 1
    summary.outputs[name], summary.outputs[val_name] = counts


def validation_name(name: str) -> str:
    """train.jsonl -> validation.jsonl, train_qwen.jsonl -> validation_qwen.jsonl."""
    return name.replace("train", "validation", 1) if "train" in name else f"validation_{name}"


def _copy(src, dst) -> int:
    n = 0
    with src:
        for line in src:
            dst.write(line)
            n += 1
    return n
