"""The one discipline of every command that writes data files into a folder.

::

    out = prepare_out_dir(args.out, inputs, names)       # one-line errors; inputs never outputs
    previous = previous_outputs(out, "summary.json", names)
    with AtomicFiles(out, replaces=previous) as files:   # the new set replaces the old one whole
        ...
    write_json_atomic(out / "summary.json", {..., "files": files.names})   # the index, last

A folder holds one output set, listed in its index file (``summary.json`` for
convert, ``split_summary.json`` for split). A new set replaces the previous one
whole: no file of an earlier run stays beside the new ones (a ``validation.jsonl``
of last week beside today's ``train.jsonl`` would train on the wrong rows). A
failed run touches none of them. Files the folder holds that are not outputs (the
user's own data) are never removed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from slurmtune.errors import UsageError


def prepare_out_dir(out: str | os.PathLike, inputs: Iterable[str | os.PathLike],
                    names: Iterable[str], flag: str = "--out") -> Path:
    """``out`` as an existing, writable folder; one line if it cannot be, or if writing
    any of ``names`` there would overwrite one of the ``inputs``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out}: is a file; expected a folder for the outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {out}: cannot create the folder ({e.strerror}); "
                         "expected a folder you can write to") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {out}: not writable; expected a folder you can write to")
    for source in inputs:
        for name in names:
            target = out / name
            if target.exists() and Path(source).exists() and os.path.samefile(source, target):
                raise UsageError(f"{source}: is an input and would be overwritten by the output "
                                 f"{name}; expected {flag} to name another folder")
    return out


def previous_outputs(out_dir: Path, index: str, names: Iterable[str]) -> set[str]:
    """Names of the files of the output set ``out_dir`` holds now: those its index lists,
    and any of ``names`` (what this command may write) present without one."""
    listed: set[str] = set()
    path = out_dir / index
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        if isinstance(data, dict):
            listed = _listed_files(data)
    return {name for name in listed | set(names) if _is_plain_name(name) and (out_dir / name).is_file()}


def _listed_files(index: dict) -> set[str]:
    files = index.get("files")
    if isinstance(files, list):
        return {f for f in files if isinstance(f, str)}
    # Indexes written before the "files" list: the data files they counted.
    counted = index.get("outputs") or index.get("rows") or {}
    names = {n if n.endswith(".jsonl") else f"{n}.jsonl" for n in counted if isinstance(n, str)}
    return names | {"rejected.jsonl"}


def _is_plain_name(name: str) -> bool:
    """A file directly in the folder: an index cannot make us remove anything else."""
    return bool(name) and name == Path(name).name and name not in (".", "..")
