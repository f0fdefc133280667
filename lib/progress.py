"""Progress people can follow: a bar on a terminal, plain periodic lines in a SLURM log.

::

    for row in progress(rows, desc="convert", unit="rows"):
        ...

On a terminal this is a tqdm bar on stderr. In a batch job (stderr is a file)
a bar would fill the log with carriage returns, so instead one line is printed
every ``every_s`` seconds and a last one at the end::

    convert: 120000 rows, 41000 rows/s, 2.9 s

Other libraries' bars (transformers, datasets, the hub) never reach a batch log:
slurmtune.logs turns them off, and on a terminal too unless ``slurmtune --verbose``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None,
             every_s: float | None = None) -> Iterator[T]:
    if os.environ.get("SLURMTUNE_QUIET"):
        yield from items
        return
    if on_terminal():
        from tqdm import tqdm
        yield from tqdm(items, desc=desc, unit=f" {unit}", total=total, leave=False)
        return
    yield from _plain_lines(items, desc, unit, total,
                            every_s if every_s is not None else float(os.environ.get("SLURMTUNE_PROGRESS_EVERY_S", 30)))


def on_terminal() -> bool:
    """Whether a bar can be drawn: stderr is a terminal, not a batch log (a file)."""
    return sys.stderr.isatty()


def _plain_lines(items: Iterable[T], desc: str, unit: str, total: int | None, every_s: float) -> Iterator[T]:
    start = last = time.monotonic()
    n = 0
    for n, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            print(_line(desc, unit, n, total, now - start), file=sys.stderr, flush=True)
    elapsed = time.monotonic() - start
    if elapsed >= every_s:
        print(_line(desc, unit, n, total, elapsed), file=sys.stderr, flush=True)


def _line(desc: str, unit: str, n: int, total: int | None, elapsed: float) -> str:
    of = f"/{total}" if total else ""
    rate = n / elapsed if elapsed > 0 else 0.0
    return f"{desc}: {n}{of} {unit}, {rate:.0f} {unit}/s, {elapsed:.1f} s"
