"""AITA tutoring dialogues -> chat records that teach a model to tutor.

::

    slurmtune convert aita dialogues.json --out data/ --split 0.9

The input is a ``.json`` document (a list of dialogues, or ``{"dialogues": [...]}``)
or JSONL, one dialogue per line::

    {"dialogue_id": "rc-001",
     "aita_profile": {"name": "Reading Buddy", "subject": "reading comprehension", "grade_level": "4th grade"},
     "pedagogical_intent": {"learning_objectives": ["..."], "keywords": ["..."]},
     "context_provided_to_aita": {"passage_text": "..."},
     "dialogue_turns": [{"speaker": "AITA", "utterance": "...", "pedagogical_notes": "..."},
                        {"speaker": "student", "utterance": "..."}]}

Each dialogue becomes one record: a system prompt written from the profile,
intent and context (unless the dialogue's first turn is already a
``{"role": "system", "content": ...}`` turn, which then wins), student turns
as ``user`` and tutor turns as ``assistant``. Pedagogical notes explain the
tutor's move to humans; they are not what the model should say, so they are
left out. Rows split by ``meta.dialogue_id``.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from slurmtune.data.converters.base import Converter, Where
from slurmtune.data.records import check_content, content_text, json_type, text_problem

SPEAKER_ROLES = {"aita": "assistant", "tutor": "assistant", "assistant": "assistant",
                 "student": "user", "user": "user"}
TURN_ROLES = ("system", "user", "assistant")
EXPECTED_SPEAKERS = "AITA or student (also tutor, assistant, user)"

TUTOR_STYLE = (
    "Teach the student how to learn rather than what the answer is: ask one Socratic question "
    "at a time, ask the student to explain their thinking and point to evidence, and praise "
    "good reasoning specifically. Never give the answer directly; when the student is stuck, "
    "offer a smaller step or a hint. Use words a student of this age understands."
)

Problems = list[tuple[str, str]]


def _is_id(x: Any) -> bool:
    return (isinstance(x, str) and x.strip() != "") or (isinstance(x, int) and not isinstance(x, bool))


def _turn_message(turn: Any, at: str) -> tuple[dict | None, Problems]:
    """One turn as a chat message, or the turn's problems."""
    if not isinstance(turn, dict):
        return None, [(at, f"expected a turn object with speaker and utterance, got {json_type(turn)}")]
    if "speaker" not in turn and "role" in turn:  # already in chat form (e.g. a system turn)
        role, content = turn["role"], turn.get("content")
        if role not in TURN_ROLES:
            return None, [(f"{at}.role", f"unknown role {role!r}; expected one of {', '.join(TURN_ROLES)}")]
        problems = check_content(content, f"{at}.content")
        if not problems and not content_text(content).strip():
            problems = [(f"{at}.content", "empty; expected the text of the turn")]
        return ({"role": role, "content": content} if not problems else None), problems
    speaker, utterance = turn.get("speaker"), turn.get("utterance")
    role = SPEAKER_ROLES.get(speaker.strip().lower()) if isinstance(speaker, str) else None
    if role is None:
        found = "missing" if speaker is None else f"unknown speaker {speaker!r}"
        return None, [(f"{at}.speaker", f"{found}; expected {EXPECTED_SPEAKERS}")]
    problem = text_problem(utterance, "the words of the turn", "utterance" in turn)
    if problem:
        return None, [(f"{at}.utterance", problem)]
    return {"role": role, "content": utterance}, []


def dialogue_messages(turns: Any) -> tuple[list[dict], Problems]:
    """The chat messages of ``dialogue_turns`` (trailing student turns dropped), and every problem."""
    if not isinstance(turns, list) or not turns:
        return [], [("dialogue_turns", "expected a non-empty list of turns")]
    messages, problems = [], []
    for i, turn in enumerate(turns):
        message, found = _turn_message(turn, f"dialogue_turns[{i}]")
        problems += found
        if message is not None and message["role"] == "system" and i > 0:
            problems.append((f"dialogue_turns[{i}].role", "system turn after the first turn; expected it first"))
        if message is not None:
            messages.append(message)
    if problems:
        return [], problems
    # Student turns after the tutor's last word have no tutor reply to learn from.
    while messages and messages[-1]["role"] == "user":
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        return [], [("dialogue_turns", "no AITA turn; expected at least one turn by speaker AITA "
                                       "(or tutor, assistant)")]
    return messages, []


def check_dialogue(d: dict) -> Problems:
    """Every problem of one dialogue (turns included)."""
    problems: Problems = []
    if not _is_id(d.get("dialogue_id")):
        found = "missing" if d.get("dialogue_id") is None else repr(d["dialogue_id"])
        problems.append(("dialogue_id", f"{found}; expected a non-empty string or integer id"))
    _, turn_problems = dialogue_messages(d.get("dialogue_turns"))
    problems += turn_problems
    turns = d.get("dialogue_turns")
    has_system = isinstance(turns, list) and bool(turns) and _first_is_system(turns)
    profile = d.get("aita_profile")
    if profile is None and not has_system:
        problems.append(("aita_profile", "missing; expected an object with the tutor's name, subject and "
                                         "grade_level (or a system turn first in dialogue_turns)"))
    elif profile is not None and not isinstance(profile, dict):
        problems.append(("aita_profile", f"expected an object, got {json_type(profile)}"))
    intent = d.get("pedagogical_intent")
    if intent is not None and not isinstance(intent, dict):
        problems.append(("pedagogical_intent", f"expected an object, got {json_type(intent)}"))
    return problems


def _first_is_system(turns: list) -> bool:
    return isinstance(turns[0], dict) and "speaker" not in turns[0] and turns[0].get("role") == "system"


def system_prompt(profile: dict, intent: dict, context: Any) -> str:
    """The tutor's instructions, written from the dialogue's profile, intent and context."""
    name = _text(profile.get("name") or profile.get("aita_name") or profile.get("persona_name"))
    grade, subject = _grade(profile.get("grade_level")), _text(profile.get("subject"))
    focus = " ".join(x for x in (grade, subject) if x)
    lines = [(f"You are {name}, an AI tutor" if name else "You are an AI tutor")
             + (f" for {focus}." if focus else ".")]
    for key in ("persona", "persona_description", "tone"):
        if _text(profile.get(key)):
            lines.append(_text(profile[key]))
    lines += ["", TUTOR_STYLE]
    objectives = _items(intent.get("learning_objectives"))
    if objectives:
        lines += ["", "Learning objectives:"] + [f"- {o}" for o in objectives]
    thinking = _items(intent.get("expected_student_thinking"))
    if thinking:
        lines += ["", "Expected student thinking: " + " ".join(thinking)]
    keywords = _items(intent.get("keywords"))
    if keywords:
        lines += ["", "Key vocabulary: " + ", ".join(keywords)]
    rendered = _context(context)
    if rendered:
        lines += ["", "Context:", rendered]
    return "\n".join(lines)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.strip() if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _grade(value: Any) -> str:
    # A bare number reads badly in a sentence ("for 7 ecology"): say "grade 7".
    text = _text(value)
    return f"grade {text}" if text.isdigit() else text


def _items(value: Any) -> list[str]:
    if isinstance(value, list):
        return [_text(v) for v in value if _text(v)]
    return [_text(value)] if _text(value) else []


def _context(context: Any) -> str:
    """``{"passage_text": ..., "student_info": {...}}`` as labelled lines; long text on its own lines."""
    if not isinstance(context, dict):
        return _text(context)
    lines = []
    for key, value in context.items():
        if isinstance(value, dict):
            text = "; ".join(f"{_label(k).lower()}: {_text(v)}" for k, v in value.items() if _text(v))
        else:
            text = ", ".join(_items(value)) if isinstance(value, list) else _text(value)
        if text:
            long = "\n" in text or len(text) > 100
            lines.append(f"{_label(key)}:\n{text}" if long else f"{_label(key)}: {text}")
    return "\n".join(lines)


def _label(key: str) -> str:
    return str(key).replace("_", " ").capitalize()


class Aita(Converter):
    name = "aita"
    help = "AITA tutor dialogues (.json or JSONL) -> chat records (train.jsonl [+ validation.jsonl])"
    outputs = ("train.jsonl",)
    list_keys = ("dialogues",)
    group_field = "meta.dialogue_id"
    id_field = "dialogue_id"

    row_kind = "a dialogue object"  # synthetic dialogues carry no consent object; one that does must satisfy it

    def check_row(self, row: dict, where: Where) -> Problems:
        return check_dialogue(row)

    def convert(self, value: Any, where: Where) -> Iterable[tuple[str, dict]]:
        value = self.admit(value, where)
        messages, _ = dialogue_messages(value["dialogue_turns"])
        if messages[0]["role"] != "system":
            prompt = system_prompt(value.get("aita_profile") or {}, value.get("pedagogical_intent") or {},
                                   value.get("context_provided_to_aita"))
            messages.insert(0, {"role": "system", "content": prompt})
        yield self.outputs[0], {
            "messages": messages,
            "meta": {"source": self.name, **where.meta(), "dialogue_id": value["dialogue_id"]},
        }
