"""Rendering canonical records with a model's own chat template.

::

    tok = load_tokenizer("models/mistral-7b")
    prompt_len, total = token_counts(tok, record)   # tokens before the trained part, all tokens

Real templates differ: Mistral's raises on a system turn and on turns that do
not alternate user/assistant, most expect string content.
:func:`to_template_messages` adapts a record to what the template accepts
(media parts rendered as placeholders; for strict templates the system text
opens the first user turn and same-role neighbours are joined) so the same
data works with every model.
"""

from __future__ import annotations

import os
from typing import Any

from slurmtune.data.context import with_context
from slurmtune.data.records import content_text
from slurmtune.data.tools import template_calls


def load_tokenizer(path: str):
    """A tokenizer from a local folder; never touches the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        from slurmtune.errors import UsageError
        raise UsageError(f"{path}: cannot load a tokenizer from this folder ({e})") from None


def _flatten(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for p in content or []:
        kind = p.get("type") if isinstance(p, dict) else None
        parts.append(p.get("text", "") if kind == "text" else f"<{kind}>")
    return "\n".join(parts)


def to_template_messages(messages: list[dict], strict: bool = False) -> list[dict]:
    """String contents (a user turn's passages rendered into it: slurmtune.data.context) and
    tool calls as templates take them; with ``strict``, the shape strict templates (Mistral) demand:
    no system turn (its text opens the first user turn), user first, roles alternating
    (consecutive turns of one role are joined)."""
    out = [{"role": m["role"], "content": with_context(_flatten(m.get("content")), m.get("context")),
            **({"tool_calls": template_calls(m["tool_calls"])} if m.get("tool_calls") else {})} for m in messages]
    if not strict:
        return out
    system = out.pop(0)["content"] if out and out[0]["role"] == "system" else None
    if not out or out[0]["role"] != "user":
        out.insert(0, {"role": "user", "content": ""})
    merged: list[dict] = []
    for m in out:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": f"{merged[-1]['content']}\n\n{m['content']}"}
        else:
            merged.append(dict(m))
    if system is not None:
        first = merged[0]["content"]
        merged[0]["content"] = f"{system}\n\n{first}" if first else system
    return merged


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
           tools: list[dict] | None = None) -> list[int]:
    """Token ids of ``messages`` (and the ``tools`` they may call) under the tokenizer's template
    (system folded in if refused)."""
    last_error = None
    for strict in (False, True):
        msgs = to_template_messages(messages, strict)
        try:
            ids = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=add_generation_prompt,
                                                **({"tools": tools} if tools else {}))
        except Exception as e:  # jinja2 TemplateError from the model's own template
            last_error = e
            continue
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    raise ValueError(f"the model's chat template rejects this conversation: {last_error}")


def token_counts(tokenizer, record: dict) -> tuple[int, int]:
    """(tokens before the trained part, total tokens) of a chat or prompt-completion record."""
    if "messages" in record:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        tools = record.get("tools")
        prompt = render(tokenizer, messages[:last], add_generation_prompt=True, tools=tools)
        return len(prompt), len(render(tokenizer, messages, tools=tools))
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list):
        p_ids = render(tokenizer, prompt, add_generation_prompt=True)
        c_text = content_text(completion[-1]["content"]) if isinstance(completion, list) else completion
        return len(p_ids), len(p_ids) + len(tokenizer(c_text, add_special_tokens=False)["input_ids"]) + 1
    p_ids = tokenizer(prompt)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return len(p_ids), len(p_ids) + len(c_ids) + 1  # + eos
