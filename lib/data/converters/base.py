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
from slurmtune.errors import SlurmtuneError, format_location
from slurmtune.data.jsonio import AtomicFiles, Item, dumps, iter_records, non_blank, write_json_atomic
from slurmtune.progress import progress
from slurmtune.data.split import assign_groups, field_value


class Rejected(Exception):
    """The row is invalid: ``field`` and what was expected."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


class Excluded(Exception):
    """The row may not train: ``reason`` is 'consent' or 'demo'."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Skipped(Exception):
    """The row is valid but has nothing this output needs (e.g. no instructor correction)."""


@dataclass(frozen=True)
class Where:
    """Where a source row came from, for messages and lineage."""

    path: Path
    line: int

    def meta(self) -> dict:
        return {"file": self.path.name, "line": self.line}


@dataclass(frozen=True)
class Option:
    """A format option (``--clean-replacement`` ...)."""

    name: str
    help: str
    required: bool = False
    default: str | None = None
    flag: bool = False  # an on/off switch (``--chat``) rather than ``--name VALUE``


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

    def __init__(self, **options: str | None):
        self.opts = options

    def rows(self, paths: list[Path]) -> Iterator[tuple[Where, Item]]:
        for path in paths:
            for item in non_blank(iter_records(path, self.list_keys)):
                yield Where(path, item.line), item

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
            raise Rejected("", f"expected {self.row_kind}, got {type(value).__name__}")
        reason = exclusion_reason(value, required=self.consent_required)
        if reason:
            raise Excluded(reason)
        problems = self.check_row(value, where)
        if problems:
            field, message = problems[0]
            more = f" (+{len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise Rejected(field, message + more)
        return value

    def problems(self, value: Any, where: Where) -> list[tuple[str, str]]:
        """Every problem of one row (for `slurmtune validate`)."""
        if not isinstance(value, dict):
            return [("", f"expected {self.row_kind}, got {type(value).__name__}")]
        if exclusion_reason(value, required=self.consent_required):
            return []  # excluded rows are counted, not checked: they never train
        return self.check_row(value, where)


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
    """Convert ``inputs`` into ``out_dir``. Data files appear only if the run succeeded;
    ``summary.json`` is always written. Raises DataError (after writing the summary) when
    rows were rejected and ``on_error == "fail"``."""
    paths = [Path(p) for p in inputs]
    out_dir = Path(out_dir)
    summary = Summary(converter.name, [str(p) for p in paths], seed=seed, split=split)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".spool-") as spool_dir:
        spool = _Spool(Path(spool_dir), converter, split)
        try:
            rejected_rows = _convert_all(converter, paths, summary, spool, keep_rejected=(on_error == "skip"))
        except SlurmtuneError as e:  # the input cannot be read any further
            spool.close()
            summary.ok, summary.error = False, str(e)
            _write_summary(out_dir, summary)
            raise
        summary.ok = summary.rejected == 0 or on_error == "skip"
        assert summary.balanced(), f"conversion lost rows: {summary}"
        if summary.ok:
            _publish(spool, out_dir, summary, rejected_rows, seed)
        else:
            spool.close()
        _write_summary(out_dir, summary)
    if not summary.ok:
        more = f"\n  ... {summary.rejected - 5} more in {out_dir / 'summary.json'}" if summary.rejected > 5 else ""
        raise InvalidInput(f"{summary.rejected} invalid row(s), nothing written "
                           "(--on-error skip writes the valid rows and rejected.jsonl):\n  "
                           + "\n  ".join(summary.rejected_reasons[:5]) + more)
    return summary


class InvalidInput(SlurmtuneError):
    """Rows were rejected and the run was asked to fail on them."""


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
            reason = format_location(where.path, where.line, r.field or None, r.message)
            if len(summary.rejected_reasons) < MAX_REASONS_KEPT:
                summary.rejected_reasons.append(reason)
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
    row = {"file": str(where.path), "line": where.line, "field": r.field, "reason": r.message}
    if item.error is None and r.field != "consent":
        row["record"] = item.value
    return row


class _Spool:
    """Converted records held on disk until the run is known to succeed."""

    def __init__(self, directory: Path, converter: Converter, split: float | None):
        self.directory, self.converter, self.split = directory, converter, split
        self.files = {name: open(directory / name, "w", encoding="utf-8") for name in converter.outputs}
        self.group_rows: Counter[str] = Counter()
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


def _publish(spool: _Spool, out_dir: Path, summary: Summary, rejected_rows: list[dict], seed: int) -> None:
    spool.close()
    with AtomicFiles(out_dir) as files:
        for name in spool.converter.outputs:
            if spool.split is not None and name == spool.converter.outputs[0]:
                _write_split(spool, name, files, summary, seed)
            else:
                summary.outputs[name] = _copy(spool.reopen(name), files.open(name))
        if rejected_rows:
            with jsonlines.Writer(files.open("rejected.jsonl"), dumps=dumps) as w:
                w.write_all(rejected_rows)
    summary.written = sum(summary.outputs.values())


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


def _write_summary(out_dir: Path, summary: Summary) -> None:
    write_json_atomic(out_dir / "summary.json", asdict(summary))
