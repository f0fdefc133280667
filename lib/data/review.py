"""A dataset as one page to look through before training: `slurmtune review`.

::

    slurmtune review converted/train.jsonl converted/validation.jsonl --out review.html
    summary = write_review(["train.jsonl"], "review.html")   # {"rows": 120, "shown": 120, "with_problems": 3, ...}

Every row that `slurmtune validate --check-paths` reads is one row of the page: its turns (or,
for a raw source format, its JSON), each image as a thumbnail and each video as a strip of
frames over its length, and the problems validate finds in that row, highlighted. The page is
report.html's type (slurmtune.page): one file, offline, filtered to the rows with problems and
searched from its toolbar or its URL (``review.html#filter=problem&q=thesis``). Rows excluded by
consent are counted and never shown.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from slurmtune.data.jsonio import AtomicFiles
from slurmtune.data.media import IMAGE, VIDEO, MediaError, thumbnail
from slurmtune.data.records import PART_TYPES
from slurmtune.errors import UsageError
from slurmtune.page import render_page

MAX_ROWS = 1000


class MediaViews:
    """The thumbnails of a page, each file made once however many rows show it; relative paths
    are relative to ``folder``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._made: dict[tuple[str, str], str] = {}

    def figure(self, kind: str, media: str, folder: Path | None = None) -> str:
        path = Path(media)
        path = path if path.is_absolute() or media.startswith(("http://", "https://")) else (folder or self.folder) / path
        key = (kind, str(path))
        if key not in self._made:
            self._made[key] = self._make(kind, media, path)
        return self._made[key]

    @staticmethod
    def _make(kind: str, media: str, path: Path) -> str:
        if media.startswith(("http://", "https://")):
            return f'<figure class="media missing">{escape(kind)} not shown (remote): {escape(media)}</figure>'
        try:
            thumb = thumbnail(path, kind)
        except MediaError as e:
            return f'<figure class="media missing">{escape(kind)} cannot be shown: {escape(str(e))}</figure>'
        return (f'<figure class="media" data-kind="{kind}"><img src="{thumb.uri}" alt="{escape(kind)} {escape(media)}">'
                f'<figcaption>{escape(media)} ({escape(thumb.caption)})</figcaption></figure>')

    def html(self, messages: list, folder: Path | None = None) -> str:
        """The figures of every image and video part of chat ``messages``, in order."""
        return "".join(self.figure(kind, media, folder) for kind, media in _parts(messages))


def _parts(messages: Any) -> list[tuple[str, str]]:
    found = []
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") in (IMAGE, VIDEO) and isinstance(
                    part.get(PART_TYPES[part["type"]]), str):
                found.append((part["type"], part[PART_TYPES[part["type"]]]))
    return found


def write_review(files: list[str], out: str | Path, fmt: str = "auto", tokenizer: str | None = None,
                 max_length: int | None = None, max_rows: int = MAX_ROWS) -> dict:
    """Write the review page of ``files`` to ``out`` atomically; returns its counts."""
    from slurmtune.data.validate import media_of, validate_files

    out = Path(out)
    if any(Path(f).resolve() == out.resolve() for f in files):
        raise UsageError(f"--out {out} is one of the inputs; expected a new file")
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out {out}: expected a page name ending in .html")
    rows: list[tuple[Any, Any, str]] = []
    report = validate_files(files, fmt=fmt, check_paths=True, tokenizer=tokenizer, max_length=max_length,
                            on_row=lambda *row: rows.append(row) if len(rows) < max_rows else None)
    problems: dict[tuple, list[dict]] = {}
    for p in report["problems"]:
        problems.setdefault((p["file"], p["line"], p.get("index")), []).append(p)
    media = MediaViews(".")  # each row's media are relative to its own file's folder (passed per row)
    shown, flagged = [], 0
    for position, (where, value, row_fmt) in enumerate(rows):
        mine = problems.pop((str(where.path), where.line, where.index), [])
        flagged += bool(mine)
        shown.append(_row(position, where, value, row_fmt, mine, media, media_of))
    summary = {"rows": report["rows"], "excluded": report["excluded"], "shown": len(shown),
               "with_problems": flagged, "problems": len(report["problems"]),
               "left_out": max(0, report["rows"] - report["excluded"] - len(rows))}
    html = render_page(
        title=f"Review: {', '.join(Path(f).name for f in files)}",
        subtitle=" ".join(str(f) for f in files), sections=_summary_section(summary, problems),
        rows_title="Rows", filters=[("problem", "with problems"), ("ok", "no problem")],
        search_hint="Search messages, fields and problems", head=["Row", "Record", "Problems"], rows=shown)
    with AtomicFiles(out.parent) as atomic:
        atomic.open(out.name).write(html)
    return summary


def _summary_section(summary: dict, leftover: dict[tuple, list[dict]]) -> str:
    cards = [(summary["rows"], "rows"), (summary["with_problems"], "rows with problems"),
             (summary["problems"], "problems"), (summary["excluded"], "excluded by consent (not shown)")]
    html = '<div class="cards">' + "".join(f'<div class="card"><b>{v}</b><span>{escape(label)}</span></div>'
                                           for v, label in cards) + "</div>"
    if summary["left_out"]:
        html += (f'<p class="sub">The first {summary["shown"]} rows are shown; '
                 f'{summary["left_out"]} more are left out (raise --max-rows).</p>')
    # Problems of no row shown: a missing file, a problem across files, or rows past --max-rows.
    others = [p for found in leftover.values() for p in found]
    if others:
        items = "".join(f"<li>{escape(_line(p))}</li>" for p in others[:200])
        html += f'<h2>Other problems</h2><ul class="problems" id="other-problems">{items}</ul>'
    return html


def _line(p: dict) -> str:
    where = f"{p['file']}:{p['line']}" if p.get("line") is not None else p["file"]
    return f"{where}: {p['field']}: {p['message']}" if p.get("field") else f"{where}: {p['message']}"


def _row(position: int, where, value: Any, fmt: str, problems: list[dict], media: MediaViews, media_of) -> str:
    status = "problem" if problems else "ok"
    place = f"{where.path.name}:{where.line}" + (f" {where.record}" if where.record else "")
    folder = where.path.parent
    if value is None:
        body = '<p class="empty">This row could not be read.</p>'
    elif isinstance(value, dict) and isinstance(value.get("messages"), list):
        body = _turns(value["messages"], media, folder)
    elif isinstance(value, dict) and "prompt" in value and "completion" in value:
        body = "".join(_turns(v, media, folder) if isinstance(v, list) else _turn(k, v)
                       for k, v in (("prompt", value["prompt"]), ("completion", value["completion"])))
    else:  # a source format: its fields as they are, and the media it names
        body = (f"<pre>{escape(json.dumps(value, indent=1, ensure_ascii=False)[:4000])}</pre>"
                + "".join(media.figure(VIDEO if "video" in field else IMAGE, path, folder)
                          for field, path in media_of(value, fmt)))
    listed = "".join(f"<li>{escape(_line(p))}</li>" for p in problems)
    return (f'<tr data-status="{status}" data-index="{position}">'
            f'<td class="idx">{escape(place)}</td><td class="text">{body}</td>'
            f'<td>{f"<ul class=problems>{listed}</ul>" if listed else "ok"}</td></tr>')


def _turns(messages: list, media: MediaViews, folder: Path) -> str:
    out = []
    for m in messages:
        if not isinstance(m, dict):
            out.append(_turn("?", m))
            continue
        content = m.get("content")
        text = content if isinstance(content, str) else "\n".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text") \
            if isinstance(content, list) else json.dumps(content)
        out.append(_turn(str(m.get("role", "?")), text) + media.html([m], folder))
    return "".join(out)


def _turn(role: str, text: Any) -> str:
    text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
    return f'<div class="turn"><b>{escape(role)}</b><div>{escape(text)}</div></div>'
