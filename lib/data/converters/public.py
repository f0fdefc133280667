"""Public dataset formats, in TRL's vocabulary: chat, prompt-completion and alpaca.

::

    slurmtune convert chat style_sft.jsonl --out data/style/
    slurmtune convert chat eval/style_benchmark.jsonl --out data/eval/    # keeps key_points ...
    slurmtune convert prompt-completion pairs.jsonl --out data/pc/
    slurmtune convert alpaca writing_sft.jsonl --out data/writing/

* ``chat``: ``{"messages": [{"role", "content"}, ...]}`` -> the same messages.
* ``prompt-completion``: ``{"prompt", "completion"}`` (strings or message lists) -> the same.
* ``alpaca``: ``{"instruction", "input"?, "output", "system"?}`` -> chat: the optional
  system turn, then ``instruction`` (plus a blank line and ``input`` when there is
  one) as the user turn and ``output`` as the assistant turn.

Eval fields (``expected``, ``key_points``, ``expect_refusal``, ``reference``) are
kept when present, so a benchmark converts like training data; every other
extra field is dropped. ``meta`` gets source, file, line and the row's ``id``;
keys of an input ``meta`` that do not clash are kept for lineage.
"""

from __future__ import annotations

from typing import Any, Iterable

from slurmtune.data.converters.base import Converter, Where
from slurmtune.data.records import check_chat, check_prompt_completion, json_type, text_problem

Problems = list[tuple[str, str]]
EVAL_FIELDS = ("expected", "key_points", "expect_refusal", "reference")


def check_eval_fields(row: dict) -> Problems:
    """Problems of the eval fields a row carries (absent or null fields are fine)."""
    problems: Problems = []
    for key in ("expected", "reference"):
        if row.get(key) is not None and not isinstance(row[key], str):
            problems.append((key, f"expected a string, got {json_type(row[key])}"))
    points = row.get("key_points")
    if points is not None and (not isinstance(points, list)
                               or not all(isinstance(p, str) and p.strip() for p in points)):
        problems.append(("key_points", "expected a list of non-empty strings"))
    refusal = row.get("expect_refusal")
    if refusal is not None and not isinstance(refusal, bool):
        problems.append(("expect_refusal", f"{refusal!r}; expected true or false"))
    return problems


class _PublicFormat(Converter):
    """Shared shape: check every problem of a row, then build the record body."""

    outputs = ("train.jsonl",)

    def check(self, row: dict) -> Problems:
        raise NotImplementedError

    def body(self, row: dict) -> dict:
        raise NotImplementedError

    def check_row(self, row: dict, where: Where) -> Problems:
        # Public data carries no consent object; student data that does must satisfy it.
        return self.check(row) + check_eval_fields(row)

    def convert(self, value: Any, where: Where) -> Iterable[tuple[str, dict]]:
        value = self.admit(value, where)
        record = self.body(value)
        record.update({key: value[key] for key in EVAL_FIELDS if value.get(key) is not None})
        record["meta"] = self.meta(value, where)
        yield self.outputs[0], record

    def meta(self, row: dict, where: Where) -> dict:
        meta = {"source": self.name, **where.meta()}
        if row.get("id") is not None:
            meta["id"] = row["id"]
        given = row.get("meta")
        if isinstance(given, dict):
            meta.update({k: v for k, v in given.items() if k not in meta})
        return meta


class Chat(_PublicFormat):
    name = "chat"
    help = "JSONL {messages: [{role, content}], tools?} (+ eval fields) -> chat records (train.jsonl)"

    def check(self, row: dict) -> Problems:
        return check_chat(row)

    def body(self, row: dict) -> dict:
        return {"messages": row["messages"], **({"tools": row["tools"]} if "tools" in row else {})}


class PromptCompletion(_PublicFormat):
    name = "prompt-completion"
    help = "JSONL {prompt, completion} (strings or message lists) -> prompt/completion records (train.jsonl)"

    def check(self, row: dict) -> Problems:
        return check_prompt_completion(row)

    def body(self, row: dict) -> dict:
        return {"prompt": row["prompt"], "completion": row["completion"]}


class Alpaca(_PublicFormat):
    name = "alpaca"
    help = "JSONL {instruction, input?, output, system?} -> chat records (train.jsonl)"

    def check(self, row: dict) -> Problems:
        problems: Problems = []
        for key in ("instruction", "output"):
            problem = text_problem(row.get(key), f"the {key} text", key in row)
            if problem:
                problems.append((key, problem))
        for key in ("input", "system"):
            if row.get(key) is not None and not isinstance(row[key], str):
                problems.append((key, f"expected a string, got {json_type(row[key])}"))
        return problems + _check_meta(row)

    def body(self, row: dict) -> dict:
        user = row["instruction"]
        if (row.get("input") or "").strip():
            user += "\n\n" + row["input"]
        messages = [{"role": "system", "content": row["system"]}] if (row.get("system") or "").strip() else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        return {"messages": messages}


def _check_meta(row: dict) -> Problems:
    if "meta" in row and not isinstance(row["meta"], dict):
        return [("meta", "expected an object")]
    return []
