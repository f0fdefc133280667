"""Tool use in chat records: the declared tools, the calls the assistant makes, their results.

::

    {"tools": [{"type": "function", "function": {"name": "check_plagiarism",
                "description": "...", "parameters": {"type": "object", "properties": {...},
                                                     "required": ["text"]}}}],
     "messages": [{"role": "user", "content": "Is this paragraph original? ..."},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "check_plagiarism",
                                                        "arguments": {"text": "..."}}}]},
                  {"role": "tool", "content": "{\\"similarity\\": 0.12}"},
                  {"role": "assistant", "content": "It is original: 12% overlap, all quotations."}]}

The shape is the one Hugging Face chat templates take (``apply_chat_template(messages,
tools=...)``): ``arguments`` is an object (a JSON string is accepted and parsed). Every call
must name a declared tool and its arguments must match that tool's ``parameters`` (JSON
Schema, checked with the ``jsonschema`` library); every ``tool`` turn must answer a call of
the assistant turn before it. The loss falls on the assistant's words and calls, never on the
tool results or the tools block (they are not assistant turns).
"""

from __future__ import annotations

import json
import re
from typing import Any

from slurmtune.data.records import Problem, json_type
from slurmtune.errors import UsageError


def uses_tools(record: dict) -> bool:
    """Whether a chat record declares tools, makes calls or carries tool results."""
    messages = record.get("messages") if isinstance(record.get("messages"), list) else []
    return "tools" in record or any(isinstance(m, dict) and ("tool_calls" in m or m.get("role") == "tool")
                                    for m in messages)


def tool_problems(record: dict) -> list[Problem]:
    """Every problem of the tools, calls and results of one chat record."""
    validators, problems = _declared(record.get("tools"), "tools" in record)
    pending = 0  # calls of the last assistant turn not answered yet
    for i, message in enumerate(record["messages"]):
        if not isinstance(message, dict):
            continue
        role, at = message.get("role"), f"messages[{i}]"
        if role == "assistant" and "tool_calls" in message:
            calls, found = _calls(message["tool_calls"], f"{at}.tool_calls", validators)
            problems += found
            pending = calls
        elif role == "tool":
            if pending == 0:
                problems.append((f"{at}.role", "a tool result with no call before it; expected it right "
                                               "after the assistant turn whose tool_calls it answers"))
            pending = max(pending - 1, 0)
        else:
            pending = 0
    return problems


def _declared(tools: Any, present: bool) -> tuple[dict[str, Any] | None, list[Problem]]:
    """{tool name: its arguments' validator} and the problems of the tools list (None: no list)."""
    from jsonschema import Draft202012Validator, SchemaError
    if not present:
        return None, []
    if not isinstance(tools, list) or not tools:
        return {}, [("tools", "expected a non-empty list of {type: function, function: {name, parameters}}")]
    validators, problems = {}, []
    for j, tool in enumerate(tools):
        at = f"tools[{j}]"
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            problems.append((f"{at}.function.name", "missing; expected the tool's name"))
            continue
        schema = fn.get("parameters", {"type": "object"})
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as e:
            problems.append((f"{at}.function.parameters", f"not a valid JSON Schema ({e.message}); "
                                                          "expected the arguments' schema"))
            continue
        validators[name] = Draft202012Validator(schema)
    return validators, problems


def _calls(calls: Any, at: str, validators: dict[str, Any] | None) -> tuple[int, list[Problem]]:
    """(number of calls, their problems)."""
    if not isinstance(calls, list) or not calls:
        return 0, [(at, "expected a non-empty list of {type: function, function: {name, arguments}}")]
    problems = []
    for k, call in enumerate(calls):
        problems += _call_problems(call, f"{at}[{k}]", validators)
    return len(calls), problems


def _call_problems(call: Any, at: str, validators: dict[str, Any] | None) -> list[Problem]:
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        return [(at, "expected {type: function, function: {name, arguments}}")]
    prefix = f"{at}.function" if "function" in call else at
    name = fn.get("name")
    if validators is None:
        return [(f"{prefix}.name", f"{name!r} is called but the record declares no tools; expected a "
                                   "record-level tools list with its definition")]
    if name not in validators:
        known = ", ".join(sorted(validators)) or "none"
        return [(f"{prefix}.name", f"{name!r} is not a declared tool; expected one of: {known}")]
    arguments, problem = parse_arguments(fn.get("arguments", {}))
    if problem:
        return [(f"{prefix}.arguments", problem)]
    return [(f"{prefix}.arguments" + "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in e.absolute_path),
             f"{e.message}; expected the arguments {name!r} declares")
            for e in sorted(validators[name].iter_errors(arguments), key=lambda e: list(map(str, e.absolute_path)))]


def parse_arguments(arguments: Any) -> tuple[dict | None, str | None]:
    """A call's arguments as an object, or what is wrong with them."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as e:
            return None, (f"not JSON ({e.msg.removesuffix(' at')} at column {e.colno}); expected an object "
                          "of the tool's parameters")
    if not isinstance(arguments, dict):
        return None, f"expected an object of the tool's parameters, got {json_type(arguments)}"
    return arguments, None


def template_calls(calls: list) -> list[dict]:
    """A turn's calls as chat templates render them: arguments as objects (Qwen's template writes
    ``arguments | tojson``; a string would be quoted twice)."""
    return [{"type": "function", "function": call} for call in normalize_calls(calls)]


TOOL_FAMILIES = "Qwen2.5-Instruct (its template declares tools in the system turn)"

# How the templates of TOOL_FAMILIES write a call, and so how a model trained with them answers:
# <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>, one block per call (Hermes' format).
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(" + re.escape(CALL_CLOSE) + r"|\Z)", re.DOTALL)


def normalize_calls(calls: list) -> list[dict]:
    """A turn's tool_calls as ``[{"name", "arguments"}]`` (arguments parsed; {} when unusable)."""
    out = []
    for call in calls:
        fn = call.get("function", call)
        arguments, _ = parse_arguments(fn.get("arguments", {}))
        out.append({"name": fn.get("name"), "arguments": arguments if arguments is not None else {}})
    return out


def calls_text(calls: list) -> str:
    """The calls as the model writes them (the expected answer of a call turn, for reports)."""
    return "\n".join(f"{CALL_OPEN}\n{json.dumps(c, ensure_ascii=False)}\n{CALL_CLOSE}"
                     for c in normalize_calls(calls))


def parse_calls(answer: str) -> tuple[list[dict], int]:
    """(the calls an answer makes as ``[{"name", "arguments"}]``, the number of call blocks that are
    not a JSON object with a name and object arguments: unclosed ones included)."""
    calls, malformed = [], 0
    for body, closed in _CALL_BLOCK.findall(answer):
        try:
            value = json.loads(body) if closed else None
        except ValueError:
            value = None
        name = value.get("name") if isinstance(value, dict) else None
        arguments, problem = parse_arguments(value.get("arguments", {})) if isinstance(value, dict) else (None, "")
        if not isinstance(name, str) or problem is not None:
            malformed += 1
            continue
        calls.append({"name": name, "arguments": arguments})
    return calls, malformed


def expected_calls(record: dict) -> list[dict] | None:
    """The calls an eval record's final assistant turn makes ([] for a plain answer), or None
    when the record declares no tools (the tool-call metrics do not apply)."""
    messages = record.get("messages")
    if "tools" not in record or not isinstance(messages, list) or not messages:
        return None
    final = messages[-1] if isinstance(messages[-1], dict) else {}
    if final.get("role") != "assistant":
        return None
    calls = final.get("tool_calls")
    return normalize_calls(calls) if isinstance(calls, list) else []


def refuse_tools_without_template(tokenizer, records: list[dict]) -> None:
    """Records with tools need a template that renders them: silently dropping the tools
    block would train (or ask for) calls of tools the prompt never declares."""
    from slurmtune.data.templates import own_template
    with_tools = sum(1 for r in records if uses_tools(r))
    if with_tools and not template_takes_tools(own_template(tokenizer)):
        raise UsageError(f"{with_tools} record(s) use tools, but this model's chat template does not render "
                         f"a tools list; fix: a model whose template does ({TOOL_FAMILIES}), or "
                         "model.chat_template=FILE with one that does")


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template renders a ``tools`` list (its source reads the variable)."""
    return bool(template) and "tools" in template
