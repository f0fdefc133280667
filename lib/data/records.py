"""The canonical training record, and the checks every record must pass.

Two shapes, in TRL's vocabulary:

* conversational: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...],
  "meta": {...}}`` where ``content`` is a string or a list of parts
  ``{"type": "text", "text": ...}``, ``{"type": "image", "image": PATH}``,
  ``{"type": "video", "video": PATH}``; the loss falls on assistant turns. With tool use
  (``data/tools.py``): a record-level ``tools`` list, assistant turns with ``tool_calls``
  and ``tool`` turns holding their results (never trained). With retrieved passages
  (``data/context.py``): a user turn's ``context: [{"id", "text"}, ...]``.
* prompt-completion: ``{"prompt": ..., "completion": ..., "meta": {...}}``; the loss
  falls on the completion.

``meta`` is optional and free-form: source ids for lineage (``evaluation_id``,
``student_id``, ``line``, ...). An eval record is the same record: the prompt is
everything before the final assistant turn (or ``prompt``), the expected answer
is that turn (or ``completion``), and fields such as ``expected``,
``key_points`` or ``expect_refusal`` may sit beside them.

Each check returns problems as ``(field, what was expected)`` pairs so callers
can report every problem of a row at once.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool")
PART_TYPES = {"text": "text", "image": "image", "video": "video"}

Problem = tuple[str, str]


def json_type(value: Any) -> str:
    """The JSON name of a value's type, as messages say it: 'a string', 'a number', 'null'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def text_problem(value: Any, expected: str, present: bool = True) -> str | None:
    """What is wrong with a field that must hold non-empty text (``expected`` names it), or None."""
    if not present:
        return f"missing; expected {expected}"
    if not isinstance(value, str):
        return f"expected a string, got {json_type(value)}"
    if not value.strip():
        return f"empty; expected {expected}"
    return None


def kind_of(record: Any) -> str | None:
    """'chat', 'prompt-completion', or None when the record is neither."""
    if isinstance(record, dict):
        if "messages" in record:
            return "chat"
        if "prompt" in record and "completion" in record:
            return "prompt-completion"
    return None


def check_record(record: Any) -> list[Problem]:
    kind = kind_of(record)
    if kind == "chat":
        return check_chat(record)
    if kind == "prompt-completion":
        return check_prompt_completion(record)
    if not isinstance(record, dict):
        return [("record", f"expected a JSON object, got {json_type(record)}")]
    return [("messages", "missing; expected 'messages' (chat) or 'prompt' and 'completion'")]


def check_chat(record: dict) -> list[Problem]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return [("messages", "expected a non-empty list of {role, content} objects")]
    problems: list[Problem] = []
    for i, message in enumerate(messages):
        problems += check_message(message, f"messages[{i}]", first=(i == 0))
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    if "assistant" not in roles:
        problems.append(("messages", "no assistant turn; expected at least one to train on"))
    elif roles[-1] != "assistant":
        problems.append((f"messages[{len(messages) - 1}].role",
                         f"last turn is '{roles[-1]}'; expected the conversation to end with an assistant turn"))
    from slurmtune.data.tools import tool_problems, uses_tools
    if uses_tools(record):
        problems += tool_problems(record)
    problems += _check_meta(record)
    return problems


def check_message(message: Any, where: str, first: bool = False) -> list[Problem]:
    if not isinstance(message, dict):
        return [(where, f"expected an object with role and content, got {json_type(message)}")]
    role = message.get("role")
    problems: list[Problem] = []
    if role not in ROLES:
        problems.append((f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}"))
    elif role == "system" and not first:
        problems.append((f"{where}.role", "system turn after the first turn; expected it first"))
    if "context" in message:
        problems += _context_problems(message, role, where)
    content = message.get("content")
    if role == "assistant" and message.get("tool_calls"):  # a call: the words are optional
        return problems + ([] if content in (None, "") else check_content(content, f"{where}.content"))
    problems += check_content(content, f"{where}.content")
    if role == "assistant" and not problems and not content_text(content).strip():
        problems.append((f"{where}.content", "empty assistant turn; expected the answer to train on"))
    return problems


def _context_problems(message: dict, role: Any, where: str) -> list[Problem]:
    from slurmtune.data.context import context_problems
    if role != "user":
        return [(f"{where}.context", f"passages on a {role!r} turn; expected them on the user turn they answer")]
    return context_problems(message["context"], f"{where}.context")


def check_content(content: Any, where: str) -> list[Problem]:
    if isinstance(content, str):
        return []
    if not isinstance(content, list) or not content:
        got = "an empty list" if content == [] else ("nothing" if content is None else json_type(content))
        return [(where, f"expected a string or a non-empty list of parts, got {got}")]
    problems = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
            problems.append((f"{at}.type", "expected a part of type text, image or video"))
            continue
        key = PART_TYPES[part["type"]]
        if not isinstance(part.get(key), str) or not part[key]:
            problems.append((f"{at}.{key}", f"expected a non-empty string in a {part['type']} part"))
    return problems


def check_prompt_completion(record: dict) -> list[Problem]:
    problems: list[Problem] = []
    for key in ("prompt", "completion"):
        value = record.get(key)
        if isinstance(value, list):
            for i, message in enumerate(value):
                problems += check_message(message, f"{key}[{i}]", first=(i == 0))
        elif not isinstance(value, str):
            got = "nothing" if key not in record else json_type(value)
            problems.append((key, f"expected a string or a list of messages, got {got}"))
    if not problems and not content_text(_last_content(record["completion"])).strip():
        problems.append(("completion", "empty completion; expected the text to train on"))
    return problems + _check_meta(record)


def _check_meta(record: dict) -> list[Problem]:
    if "meta" in record and not isinstance(record["meta"], dict):
        return [("meta", f"expected an object, got {json_type(record['meta'])}")]
    return []


def _last_content(value: Any) -> Any:
    if isinstance(value, list):
        return value[-1].get("content", "") if value else ""
    return value


def content_text(content: Any) -> str:
    """The text of a message's content, parts joined by newlines (media parts omitted)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content
                         if isinstance(p, dict) and p.get("type") == "text")
    return ""


def media_paths(record: dict) -> list[tuple[str, str]]:
    """(field, path) of every image/video part of a record."""
    found = []
    for key in ("messages", "prompt", "completion"):
        turns = record.get(key)
        if not isinstance(turns, list):
            continue
        for i, message in enumerate(turns):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                continue
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") in ("image", "video"):
                    media = PART_TYPES[part["type"]]
                    if isinstance(part.get(media), str):
                        found.append((f"{key}[{i}].content[{j}].{media}", part[media]))
    return found


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}
