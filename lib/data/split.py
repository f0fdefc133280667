"""Deterministic train/validation/test splits that never cut a group in two.

::

    slurmtune split data.jsonl --ratios 0.8,0.1,0.1 --group-by meta.student_id --seed 42

Groups (a student, a dialogue, ...) are shuffled with the seed and dealt one
at a time to the split furthest below its target row count, so the row
ratios come out as close as whole groups allow. The file is read twice
(count, then write); memory grows with the number of groups, not of rows.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

from slurmtune.errors import DataError, UsageError
from slurmtune.data.jsonio import AtomicFiles, dumps, iter_records, non_blank
from slurmtune.data.outputs import prepare_out_dir, previous_outputs

SPLIT_NAMES = ("train", "validation", "test")
SPLIT_SUMMARY = "split_summary.json"


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--ratios {text!r}: expected numbers like 0.8,0.1,0.1") from None
    if not 2 <= len(ratios) <= 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise UsageError(f"--ratios {text!r}: expected 2 or 3 non-negative numbers that sum to 1")
    return ratios


def assign_groups(group_rows: dict[str, int], ratios: list[float], seed: int) -> dict[str, int]:
    """Map each group to a split index; same groups, ratios and seed give the same map."""
    groups = sorted(group_rows)
    random.Random(seed).shuffle(groups)
    total = sum(group_rows.values())
    targets = [r * total for r in ratios]
    filled = [0] * len(ratios)
    assignment = {}
    for group in groups:
        deficits = [t - f for t, f in zip(targets, filled)]
        best = max(range(len(ratios)), key=lambda i: (deficits[i], -i))
        assignment[group] = best
        filled[best] += group_rows[group]
    return assignment


def field_value(record: Any, dotted: str) -> Any:
    """``record["meta"]["student_id"]`` for ``dotted="meta.student_id"``; None if absent."""
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def split_file(path: str | Path, ratios: list[float], out_dir: str | Path,
               group_by: str | None = None, seed: int = 42) -> dict:
    """Write train/validation[/test].jsonl and split_summary.json into ``out_dir``, replacing
    the split there as a whole (a 2-way split removes an earlier split's test.jsonl);
    returns the summary."""
    path = Path(path)
    every = [f"{name}.jsonl" for name in SPLIT_NAMES] + [SPLIT_SUMMARY]
    out_dir = prepare_out_dir(out_dir, [path], every)
    previous = previous_outputs(out_dir, SPLIT_SUMMARY, every)
    rows_per_group: Counter[str] = Counter()
    problems = []
    for n, item in enumerate(non_blank(iter_records(path))):
        if item.error:
            problems.append(f"{path}:{item.line}: {item.error}")
            continue
        rows_per_group[_group_key(item.value, group_by, n, path, item.line)] += 1
    if problems:
        raise DataError(path, None, f"{len(problems)} unreadable row(s); first: {problems[0]}; "
                                    "nothing written")
    if not rows_per_group:
        raise DataError(path, None, "no records; expected one JSON record per line")
    assignment = assign_groups(rows_per_group, ratios, seed)
    names = SPLIT_NAMES[: len(ratios)]
    counts = Counter()
    with AtomicFiles(out_dir, replaces=previous) as files:
        outs = [files.open(f"{name}.jsonl") for name in names]
        for n, item in enumerate(non_blank(iter_records(path))):
            index = assignment[_group_key(item.value, group_by, n, path, item.line)]
            outs[index].write(dumps(item.value) + "\n")
            counts[names[index]] += 1
        summary = {
            "input": str(path), "seed": seed, "ratios": ratios, "group_by": group_by,
            "read": sum(rows_per_group.values()), "groups": len(rows_per_group),
            "rows": {name: counts[name] for name in names},
            "groups_per_split": dict(Counter(names[i] for i in assignment.values())),
            "files": [*files.names, SPLIT_SUMMARY],
        }
        files.write_json(SPLIT_SUMMARY, summary)
    return summary


def _group_key(record: Any, group_by: str | None, n: int, path: Path, line: int) -> str:
    if group_by is None:
        return f"row:{n}"
    value = field_value(record, group_by)
    if value is None or isinstance(value, (dict, list)):
        raise DataError(path, line, "missing or not a plain value; expected a group id "
                        "(every row needs one with --group-by)", field=group_by)
    return f"{type(value).__name__}:{value}"
