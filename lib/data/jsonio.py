"""Reading JSON/JSONL input record by record, and writing outputs atomically.

Every input problem is reported with its file and line, and reading goes on
past a bad record where the format allows it (the caller decides whether to
stop)::

    for item in iter_records("exported.json", list_keys=("evaluations",)):
        if item.error:
            print(f"exported.json:{item.line}: {item.error}")
        else:
            use(item.value)

Memory is bounded by the largest single record, never by the file: a JSON
document is decoded one element of its top-level list at a time, and a JSONL
line longer than ``MAX_RECORD_BYTES`` is reported and skipped without being
held in memory.

Outputs are written under a temporary name and renamed into place only when
the whole job succeeded (:class:`AtomicFiles`), so a failed or killed run never
leaves a half-written file behind.
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from slurmtune.errors import DataError

MAX_RECORD_BYTES = 64 * 1024 * 1024
_CHUNK_CHARS = 1 << 20
_DECODER = json.JSONDecoder()
_WS = " \t\n\r"


@dataclass(frozen=True)
class Item:
    """One record of an input file: its 1-based line, and its value or what was wrong.

    Records of a JSON document also carry their place in it: ``index`` in the list, and
    ``key``, the object key holding that list ('' for a top-level list), since several
    records may share one line (a one-line export puts every record on line 1).
    """

    line: int
    value: Any = None
    error: str | None = None
    index: int | None = None
    key: str | None = None


def check_input_path(path: str | os.PathLike) -> Path:
    """Fail with one clear line unless ``path`` names a file."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, "no such file")
    if path.is_dir():
        raise DataError(path, None, "is a directory, expected a JSON or JSONL file")
    return path


def check_input_file(path: str | os.PathLike, allow_empty: bool = False) -> Path:
    """Fail with one clear line unless ``path`` is a readable, non-empty, UTF-8 file."""
    path = check_input_path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as e:
        raise DataError(path, None, f"cannot be read ({e.strerror})") from None
    if not head:
        if allow_empty:
            return path
        raise DataError(path, None, "file is empty; expected JSON records")
    encoding = sniff_wide_encoding(head)
    if encoding:
        name, _, bom = encoding.partition(" ")
        raise DataError(path, 1, f"file is {name}-encoded{' ' + bom if bom else ''}; expected UTF-8 "
                                 f"(re-save it as UTF-8, e.g. iconv -f {name} -t UTF-8)")
    return path


_SNIFF_BYTES = 4096


def sniff_wide_encoding(head: bytes) -> str | None:
    """'UTF-16LE', 'UTF-32BE (no byte-order mark)', ... for a file of 16/32-bit code units, else None.

    JSON text starts with an ASCII character and UTF-8 JSON holds no NUL byte, so the
    NULs among the first bytes give the unit size and byte order even without a BOM
    (the method of RFC 4627, section 3)."""
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32LE"), (codecs.BOM_UTF32_BE, "UTF-32BE"),
                      (codecs.BOM_UTF16_LE, "UTF-16LE"), (codecs.BOM_UTF16_BE, "UTF-16BE")):
        if head.startswith(bom):
            return name
    head = head[: len(head) - len(head) % 4]
    if b"\0" not in head or not head.strip(b"\0"):
        return None  # no NUL: UTF-8 or ASCII; only NULs: not text (a sparse or binary file)
    nul = [i % 4 for i, b in enumerate(head) if b == 0]
    share = len(nul) / len(head)
    if share > 0.6:  # three of four bytes of ASCII text are NUL in UTF-32
        name = "UTF-32BE" if head[:3] == b"\0\0\0" else "UTF-32LE"
    elif share > 0.3:
        odd = sum(1 for i in nul if i % 2 == 1)
        name = "UTF-16LE" if odd > len(nul) / 2 else "UTF-16BE"
    else:
        return None  # a stray NUL: the JSON parser reports it where it is
    return f"{name} (no byte-order mark)"


def is_json_document(path: str | os.PathLike) -> bool:
    """True for a single JSON document (``.json``), False for JSON Lines (anything else)."""
    return Path(path).suffix.lower() == ".json"


def iter_records(path, list_keys: tuple[str, ...] = ()) -> Iterator[Item]:
    """Records of a ``.json`` document (its top-level list, or the list under one of
    ``list_keys``) or of a JSONL file, one :class:`Item` each."""
    path = check_input_file(path)
    if is_json_document(path):
        yield from iter_json_document(path, list_keys)
    else:
        yield from iter_jsonl(path)


# --- JSON Lines -----------------------------------------------------------------------

def iter_jsonl(path, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[Item]:
    """Each non-blank line of a JSONL file as an :class:`Item`."""
    with open(path, "rb") as f:
        number = 0
        while True:
            raw = f.readline(max_record_bytes + 1)
            if not raw:
                return
            number += 1
            if len(raw) > max_record_bytes and not raw.endswith(b"\n"):
                _skip_rest_of_line(f)
                yield Item(number, error=f"line is longer than {max_record_bytes // 2**20} MiB; "
                                         "expected one JSON record per line")
                continue
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            yield _parse_line(number, raw, last=not raw.endswith(b"\n"))


def _skip_rest_of_line(f: IO[bytes]) -> None:
    while True:
        part = f.readline(1 << 20)
        if not part or part.endswith(b"\n"):
            return


def _parse_line(number: int, raw: bytes, last: bool) -> Item:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Item(number, error=f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                  f"{e.start + 1}){_legacy_hint(raw)}; expected UTF-8 text")
    text = text.rstrip("\r\n")
    if not text.strip():
        return Item(number, value=_BLANK)
    try:
        return Item(number, value=json.loads(text))
    except json.JSONDecodeError as e:
        ends_early = e.pos >= len(text.rstrip())
        hint = " (the file looks truncated)" if last and ends_early else " (the record ends early)" if ends_early else ""
        return Item(number, error=f"invalid JSON: {e.msg} at column {e.colno}{hint}")


def _legacy_hint(raw: bytes) -> str:
    """Most non-UTF-8 text in Western course data is Windows-1252 (a superset of Latin-1)."""
    try:
        raw.decode("cp1252")
    except UnicodeDecodeError:
        return ""
    return "; it looks like Windows-1252/Latin-1 (iconv -f CP1252 -t UTF-8 converts it)"


class _Blank:
    """Marker for a blank JSONL line: not a record, so never counted."""


_BLANK = _Blank()


def non_blank(items: Iterator[Item]) -> Iterator[Item]:
    return (item for item in items if item.value is not _BLANK)


# --- JSON documents -------------------------------------------------------------------

class _DocumentReader:
    """Decodes a JSON document incrementally: structure by hand, values with the C decoder.

    Only the top level (a list, or an object holding a list) is walked by this
    class; each element is handed whole to ``json.JSONDecoder.raw_decode``,
    which is as fast as ``json.load``. The buffer holds one element at a time.
    """

    def __init__(self, path: Path, max_record_bytes: int):
        self.path = path
        self.max_chars = max_record_bytes
        self.file = open(path, "rb")
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf = ""
        self.pos = 0
        self.line = 1  # line number at self.pos
        self.eof = False

    def close(self) -> None:
        self.file.close()

    def fail(self, message: str, line: int | None = None) -> DataError:
        return DataError(self.path, line or self.line, message)

    def _fill(self) -> bool:
        if self.eof:
            return False
        raw = self.file.read(_CHUNK_CHARS)
        try:
            text = self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            seen = self.buf[self.pos:] + raw[: e.start].decode("utf-8", "replace")
            raise self.fail(f"not valid UTF-8 (byte 0x{raw[e.start]:02x}){_legacy_hint(raw)}; "
                            "expected UTF-8 text", self.line + seen.count("\n")) from None
        self.buf = self.buf[self.pos:] + text
        self.pos = 0
        self.eof = not raw
        return True

    def advance(self, new_pos: int) -> None:
        self.line += self.buf.count("\n", self.pos, new_pos)
        self.pos = new_pos

    def peek(self) -> str:
        """Next non-whitespace character ('' at end of file), without consuming it."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                if self.buf[self.pos] == "\n":
                    self.line += 1
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def expect(self, chars: str, what: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            found = "end of file (the file looks truncated)" if not c else repr(c)
            raise self.fail(f"invalid JSON: expected {what}, found {found}")
        self.advance(self.pos + 1)
        return c

    def value(self) -> Any:
        """Decode the value at the cursor, reading more of the file as needed."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if self._grow():
                    continue
                line = self.line + self.buf.count("\n", self.pos, e.pos)
                raise self.fail(f"invalid JSON: {e.msg}" + self._truncation_hint(e), line) from None
            if end == len(self.buf) and self._grow():
                continue  # a number may go on in the next chunk
            self.advance(end)
            return value

    def _grow(self) -> bool:
        if len(self.buf) - self.pos > self.max_chars:
            return False
        return self._fill()

    def _truncation_hint(self, e: json.JSONDecodeError) -> str:
        if self.eof and len(self.buf) - e.pos < 2:
            return " (the file looks truncated)"
        if len(self.buf) - self.pos > self.max_chars:
            return f" (or the record is larger than {self.max_chars // 2**20} MiB)"
        return ""

    def skip_value(self) -> bool:
        """Move past a malformed list element by bracket matching; False if impossible."""
        depth = 0
        token = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]')
        while True:
            for m in token.finditer(self.buf, self.pos):
                c = m.group()
                if c in "[{":
                    depth += 1
                elif c in "]}":
                    depth -= 1
                if depth < 0 or (depth == 0 and c in ",]}"):
                    self.advance(m.start() if depth < 0 or c == "," else m.end())
                    return True
            if not self._grow():
                return False


def iter_json_document(path, list_keys: tuple[str, ...] = (),
                       max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[Item]:
    """Elements of a document's top-level list, or of the list under one of ``list_keys``."""
    reader = _DocumentReader(Path(path), max_record_bytes)
    try:
        first = reader.peek()
        if first == "[":
            yield from _iter_list(reader)
        elif first == "{" and list_keys:
            yield from _iter_object_list(reader, list_keys)
        else:
            wanted = "a JSON list" + (f" or an object with key '{list_keys[0]}'" if list_keys else "")
            raise reader.fail(f"expected {wanted} at the top level")
    finally:
        reader.close()


def _iter_object_list(reader: _DocumentReader, list_keys: tuple[str, ...]) -> Iterator[Item]:
    reader.expect("{", "'{'")
    found = False
    if reader.peek() == "}":
        reader.advance(reader.pos + 1)
    else:
        while True:
            key = reader.value()
            reader.expect(":", "':' after an object key")
            if key in list_keys and reader.peek() == "[" and not found:
                found = True
                yield from _iter_list(reader, key)
            else:
                reader.value()  # export metadata: not records
            if reader.expect(",}", "',' or '}'") == "}":
                break
    if not found:
        raise reader.fail(f"expected key '{list_keys[0]}' holding a list of records", 1)


def _iter_list(reader: _DocumentReader, key: str = "") -> Iterator[Item]:
    reader.expect("[", "'['")
    if reader.peek() == "]":
        reader.advance(reader.pos + 1)
        return
    for index in itertools.count():
        reader.peek()
        line = reader.line
        try:
            value = reader.value()
        except DataError as e:
            yield Item(e.line or line, error=e.reason, index=index, key=key)
            if not reader.skip_value():
                raise reader.fail("cannot read past the malformed record above "
                                  "(the file looks truncated)", line) from None
        else:
            yield Item(line, value=value, index=index, key=key)
        if reader.expect(",]", "',' or ']' between records") == "]":
            return


# --- atomic outputs -------------------------------------------------------------------

def dumps(record: Any) -> str:
    """The one JSON encoding of output records: compact, UTF-8, key order as built."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


class AtomicFiles:
    """A set of output files that appear together, or not at all.

    ::

        with AtomicFiles(out_dir, replaces={"validation.jsonl"}) as files:
            files.open("train.jsonl").write(...)
        # renamed into place here, and the files named in ``replaces`` that this
        # set did not write again are removed; on an exception the temporaries are
        # removed and the folder is as it was
    """

    def __init__(self, directory: str | os.PathLike, replaces: Iterable[str] = ()):
        self.directory = Path(directory)
        self.replaces = set(replaces)
        self.removed: list[str] = []  # files of the replaced set this one did not write again
        self._open: dict[str, IO[str]] = {}

    def __enter__(self) -> "AtomicFiles":
        self.directory.mkdir(parents=True, exist_ok=True)
        return self

    def _tmp(self, name: str) -> Path:
        return self.directory / f".{name}.tmp-{os.getpid()}"

    def open(self, name: str) -> IO[str]:
        if name not in self._open:
            self._open[name] = open(self._tmp(name), "w", encoding="utf-8", newline="\n")
        return self._open[name]

    def write_json(self, name: str, obj: Any) -> None:
        self.open(name).write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    @property
    def names(self) -> list[str]:
        """The files of this set, in the order they were opened."""
        return list(self._open)

    def __exit__(self, exc_type, exc, tb) -> None:
        for f in self._open.values():
            if exc_type is None:
                f.flush()
                os.fsync(f.fileno())
            f.close()
        for name in self._open:
            if exc_type is None:
                os.replace(self._tmp(name), self.directory / name)
            else:
                self._tmp(name).unlink(missing_ok=True)
        if exc_type is None:
            for name in sorted(self.replaces - set(self._open)):
                (self.directory / name).unlink(missing_ok=True)
                self.removed.append(name)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write one JSON file atomically (temporary name, fsync, rename)."""
    path = Path(path)
    with AtomicFiles(path.parent) as files:
        files.write_json(path.name, obj)
