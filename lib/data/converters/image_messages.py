"""Document-image question answering (messages + ``expected``) -> chat records with absolute image paths.

::

    slurmtune convert image-messages dataset/train.jsonl --out data/train/
    slurmtune convert image-messages dataset/test.jsonl --out data/test/

Input is JSONL, one question per line, images named relative to the file's folder::

    {"messages": [{"role": "user", "content": [
                      {"type": "text", "text": "What is the title of the document?"},
                      {"type": "image", "image": "document1.png"}]}],
     "expected": "Obligation to provide information"}

The output adds the answer as the final assistant turn (the training target)
and keeps ``expected`` beside it, which evaluation compares predictions with.
Image paths are made absolute because training runs from another folder (a
SLURM job's working directory), and a missing image is an error here, on the
login node, rather than hours later on a GPU node.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from slurmtune.data.converters.base import Converter, Where
from slurmtune.data.records import PART_TYPES, check_message, text_problem

Problems = list[tuple[str, str]]
MEDIA = ("image", "video")


def check_row(row: dict) -> Problems:
    """Every problem of one row, except missing image files (see :func:`resolve_media`)."""
    problems: Problems = []
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        problems.append(("messages", "expected a non-empty list of {role, content} objects"))
    else:
        for i, message in enumerate(messages):
            problems += check_message(message, f"messages[{i}]", first=(i == 0))
        role = messages[-1].get("role") if isinstance(messages[-1], dict) else None
        if role != "user" and not problems:
            what = ("the answer in `expected`, not as a final assistant turn" if role == "assistant"
                    else "the question as the last (user) turn")
            problems.append((f"messages[{len(messages) - 1}].role", f"last turn is {role!r}; expected {what}"))
    problem = text_problem(row.get("expected"), "the answer", "expected" in row)
    if problem:
        problems.append(("expected", problem))
    return problems


def resolve_media(messages: list[dict], folder: Path) -> tuple[list[dict], Problems]:
    """Copies of ``messages`` with image/video paths made absolute, and each missing file."""
    resolved, problems = [], []
    for i, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, list):
            content = [_resolve_part(part, f"messages[{i}].content[{j}]", folder, problems)
                       for j, part in enumerate(content)]
        resolved.append({"role": message["role"], "content": content})
    return resolved, problems


def _resolve_part(part: dict, at: str, folder: Path, problems: Problems) -> dict:
    if part["type"] not in MEDIA:
        return part
    key = PART_TYPES[part["type"]]
    # normpath, not resolve(): keep the user's folder names even when they are symlinks.
    path = Path(os.path.normpath(folder / part[key]))
    if not path.is_file():
        problems.append((f"{at}.{key}", f"no such file {path}; expected the {key} file "
                                        f"relative to the input's folder {folder}"))
    return {**part, key: str(path)}


class ImageMessages(Converter):
    name = "image-messages"
    help = "JSONL {messages with image parts, expected} -> chat records with absolute image paths (train.jsonl)"
    outputs = ("train.jsonl",)

    row_kind = "an object with messages and expected"

    def check_row(self, row: dict, where: Where) -> Problems:
        return check_row(row) or resolve_media(row["messages"], _folder(where))[1]

    def convert(self, value: Any, where: Where) -> Iterable[tuple[str, dict]]:
        value = self.admit(value, where)
        messages, _ = resolve_media(value["messages"], _folder(where))
        meta = {"source": self.name, **where.meta()}
        if value.get("id") is not None:
            meta["id"] = value["id"]
        yield self.outputs[0], {
            "messages": messages + [{"role": "assistant", "content": value["expected"]}],
            "expected": value["expected"],
            "meta": meta,
        }


def _folder(where: Where) -> Path:
    return Path(os.path.abspath(where.path.parent))
