"""Retrieved passages attached to a user turn (the course assistant's ``rag`` stage).

::

    {"messages": [
        {"role": "system", "content": "Answer from the course material; cite passages as [id]."},
        {"role": "user", "content": "When is the lab report due?",
         "context": [{"id": "syllabus-4", "text": "Lab reports are due one week after the lab."},
                     {"id": "faq-2", "text": "Late work loses 10% per day."}]},
        {"role": "assistant", "content": "One week after the lab [syllabus-4]."}]}

One rendering, for training, evaluation and serving alike (:func:`with_context`): the
passages open the user turn, one per line as ``[id] text`` under a ``Passages:`` line, then a
blank line and the user's own words (whitespace runs inside a passage become one space)::

    Passages:
    [syllabus-4] Lab reports are due one week after the lab.
    [faq-2] Late work loses 10% per day.

    When is the lab report due?

The passages are prompt: they never carry loss. A row with passages is never truncated:
``train.max_length`` cutting it would cut the answer (it comes last), so such a row over
the limit is an error that names it (slurmtune.data.dataset). An answer cites a passage by
writing its id in square brackets; :func:`cited_ids` reads them back for the eval report's
citation check.
"""

from __future__ import annotations

import re
from typing import Any

from slurmtune.data.records import Problem, json_type

HEADING = "Passages:"
# An id: letters, digits and . _ : / - (what document and chunk ids are made of), no spaces.
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:/-]*"
_CITATION = re.compile(rf"\[({ID_PATTERN})\]")


def context_problems(context: Any, where: str) -> list[Problem]:
    """Every problem of one turn's ``context``: a non-empty list of {id, text}, ids unique."""
    if not isinstance(context, list) or not context:
        got = "an empty list" if context == [] else json_type(context)
        return [(where, f"expected a non-empty list of {{id, text}} passages, got {got}")]
    problems, seen = [], set()
    for k, passage in enumerate(context):
        at = f"{where}[{k}]"
        if not isinstance(passage, dict):
            problems.append((at, f"expected an object {{id, text}}, got {json_type(passage)}"))
            continue
        pid, text = passage.get("id"), passage.get("text")
        if not isinstance(pid, str) or not re.fullmatch(ID_PATTERN, pid):
            problems.append((f"{at}.id", f"{pid!r} is not a passage id; expected a string of letters, digits "
                                         "and . _ : / - (no spaces: answers cite it as [id])"))
        elif pid in seen:
            problems.append((f"{at}.id", f"{pid!r} is given twice in this turn; expected unique ids"))
        seen.add(pid)
        if not isinstance(text, str) or not text.strip():
            got = "an empty string" if isinstance(text, str) else json_type(text)
            problems.append((f"{at}.text", f"expected the passage's text, got {got}"))
    return problems


def with_context(text: str, context: list[dict] | None) -> str:
    """The user turn's text as the model sees it: its passages first (see the module)."""
    if not context:
        return text
    passages = "\n".join(f"[{p['id']}] {' '.join(p['text'].split())}" for p in context)
    return f"{HEADING}\n{passages}\n\n{text}"


def has_context(record: dict) -> bool:
    messages = record.get("messages")
    return isinstance(messages, list) and any(isinstance(m, dict) and m.get("context") for m in messages)


def given_ids(record: dict) -> list[str]:
    """The ids of every passage the record's prompt gives (all its user turns)."""
    return [p["id"] for m in record.get("messages") or [] if isinstance(m, dict)
            for p in m.get("context") or [] if isinstance(p, dict) and isinstance(p.get("id"), str)]


def cited_ids(answer: str) -> list[str]:
    """The passage ids an answer cites (``[id]``), in order, each once."""
    return list(dict.fromkeys(_CITATION.findall(answer)))
