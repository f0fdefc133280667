"""The chat template training uses, and which of its tokens are the assistant's.

::

    from slurmtune.data.chat_format import load_tokenizer
    from slurmtune.data.templates import assistant_mask, choose_chat_template

    tok = load_tokenizer("/models/mistral-7b-instruct-v0.3")
    choose_chat_template(tok, assistant_only=True)
    # -> "the model's chat template; assistant tokens found by rendering each turn"
    choose_chat_template(tok, "my-template.jinja", assistant_only=True)   # model.chat_template=...
    # -> "chat template my-template.jinja (model.chat_template); assistant tokens found by rendering each turn"

    turn = assistant_mask(tok, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    turn.ids, turn.mask    # [1, 3, ..., 4, 29549, 2], [0, 0, ..., 0, 1, 1]: "4</s>" is trained

Training on the assistant's tokens only needs to know where each assistant turn
starts and ends. A template with ``{% generation %}`` ... ``{% endgeneration %}``
markers says so itself (``apply_chat_template(..., return_assistant_tokens_mask=True)``)
and its markers are used. None of the released templates of the models we tune
has them, so :func:`assistant_mask` finds the turns from the model's own template:
for assistant turn i it renders the conversation before the turn with
``add_generation_prompt=True`` (the prompt exactly as inference will show it)
and the conversation through the turn; the tokens between the two are the
answer. Of those, the mask keeps the assistant's content and the first special
token after it (``</s>``, ``<|end|>``, ``<|im_end|>``: the token generation stops
on, so the model learns to stop); what a template writes after it (Qwen's and
Phi-3's ``"\\n"``, Phi-3's conversation-closing eos) is never generated and is
not trained. A template without special tokens has its whole turn trained.

Where the renderings do not line up:

- The prompt's text is a prefix of the conversation but its tokens are not (BPE
  merges a token across the boundary, e.g. Qwen's ``"\\n"`` with an answer that
  starts with one): the straddling token is trained with the answer, as Hugging
  Face's generation markers and TRL's prompt-completion masks do; counted in
  ``TurnMask.merged``.
- The prompt's text is not a prefix at all (a template that renders the system
  prompt only with the last user turn, as Mistral-7B-v0.3's later template
  revision does; one whose generation prompt differs from the turn it opens):
  :class:`TurnNotFound`. slurmtune.data.dataset then tries the strict shape
  (system text folded into the first user turn), and if that does not line up
  either, stops with one error saying the fix (``model.chat_template=...`` or
  ``train.loss_on=all``).

manifests/templates/ used to hold a marked copy of each real template
(mistral-v0.3, phi-3, chatml-qwen2.5, qwen2.5-vl), swapped in only when the
model's template rendered the same text, so any later revision of a template
stopped the run. On every real template in ../shared/models the masks computed
here were the copies' masks token for token (multi-turn, system turns, Qwen's
tool calls, Qwen-VL's images), except Phi-3 answers that start with whitespace,
where the copy also marked the ``<|assistant|>`` prompt token and these do not.
The copies added only maintenance and were removed; tests/test_assistant_masks.py
pins the masks themselves. Any template, with or without markers, can still be
given with ``model.chat_template``.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from pathlib import Path

from slurmtune.errors import UsageError

_GENERATION = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")
_END_GENERATION = re.compile(r"\{%[-+]?\s*endgeneration\s*[-+]?%\}")

FIX = ("fix: set model.chat_template=FILE to a template that renders each prompt (add_generation_prompt=True) as "
       "the start of the conversation that follows, or marks the assistant's tokens with {% generation %} ... "
       "{% endgeneration %}; or set train.loss_on=all to train on every token")


def has_generation_markers(template: str | None) -> bool:
    """True when ``template`` has both ``{% generation %}`` and ``{% endgeneration %}``."""
    return bool(template and _GENERATION.search(template) and _END_GENERATION.search(template))


def own_template(tokenizer) -> str | None:
    """The template ``apply_chat_template`` uses by default (of named templates, "default")."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template


def choose_chat_template(tokenizer, override_path: str | None = None, assistant_only: bool = False) -> str:
    """Put the chat template training uses on ``tokenizer`` (``override_path`` wins over the
    model's own) and say which it is and, with ``assistant_only``, how the assistant's tokens are found."""
    source = "the model's chat template"
    if override_path:
        tokenizer.chat_template = _read_override(override_path)
        source = f"chat template {override_path} (model.chat_template)"
    template = own_template(tokenizer)
    if not template:
        raise UsageError("the model has no chat template, so chat records cannot be rendered; "
                         "fix: set model.chat_template=FILE (a Jinja chat template)")
    if not assistant_only:
        return source
    if has_generation_markers(template):
        return f"{source}; assistant tokens from its {{% generation %}} markers"
    return f"{source}; assistant tokens found by rendering each turn"


def _read_override(override_path: str) -> str:
    path = Path(override_path)
    if not path.is_file():
        raise UsageError(f"model.chat_template: {override_path}: no such file; expected a Jinja chat template file")
    return path.read_text(encoding="utf-8")


# --- masks computed from the template's renderings ---------------------------------------

@dataclass(frozen=True)
class TurnMask:
    ids: list[int]  # the conversation's tokens, as apply_chat_template(..., tokenize=True) gives them
    mask: list[int]  # 1 on each assistant turn's content and end-of-turn token
    merged: int = 0  # turn boundaries that fall inside a token (that token is trained)


class TurnNotFound(ValueError):
    """An assistant turn's tokens cannot be told from the template's renderings."""

    def __init__(self, message: int, reason: str):
        self.message = message  # counted from 1
        super().__init__(f"message {message} (assistant): {reason}")


def _differs(message: int, what: str, alone: str, whole: str) -> TurnNotFound:
    at = common_prefix(alone, whole)
    return TurnNotFound(message, f"character {at}: {what} renders {alone[at:at + 30]!r}, "
                              f"the whole conversation {whole[at:at + 30]!r}")


def assistant_mask(tokenizer, messages: list[dict], **template_kwargs) -> TurnMask:
    """Tokens of ``messages`` and the mask of each assistant turn's content and end-of-turn
    token, from the tokenizer's own renderings (no generation markers needed).
    Raises TurnNotFound where a turn's prompt is not the start of the conversation."""
    full = _render(tokenizer, messages, False, template_kwargs)
    ids = _tokens(tokenizer, full)
    specials = _special_pattern(tokenizer)
    mask, merged = [0] * len(ids), 0
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start_char, end_char = _answer_span(tokenizer, messages, i, full, specials, template_kwargs)
        start, exact_start = _boundary(tokenizer, full[:start_char], ids, straddler=0)
        end, exact_end = _boundary(tokenizer, full[:end_char], ids, straddler=1)
        mask[start:end] = [1] * (end - start)
        merged += (not exact_start) + (not exact_end)
    return TurnMask(ids, mask, merged)


def _answer_span(tokenizer, messages, i, full, specials, template_kwargs) -> tuple[int, int]:
    """Characters of ``full`` that turn ``i`` trains: its content through its end-of-turn token."""
    try:
        prompt = _render(tokenizer, messages[:i], True, template_kwargs)
        through = _render(tokenizer, messages[:i + 1], False, template_kwargs)
    except Exception as e:  # the template's raise_exception (or a Jinja error) on the shorter conversation
        raise TurnNotFound(i + 1, f"the template rejects the conversation up to it ({e})") from None
    for rendering in (full, through):
        if not rendering.startswith(prompt):
            raise _differs(i + 1, "its prompt alone", prompt, rendering)
    turn = through[len(prompt):]
    end = _end_of_answer(turn, messages[i].get("content"), specials)
    start = len(prompt)
    if full[start:start + end] != turn[:end]:  # the turn renders differently once later turns follow
        raise _differs(i + 1, "the conversation through it", through[:start + end], full)
    return start, start + end


def _end_of_answer(turn: str, content, specials: re.Pattern | None) -> int:
    """Where the answer ends in the text ``turn`` writes: after the first special token that
    follows its content (templates may trim or reformat content: then after the first one at all)."""
    after = 0
    if isinstance(content, str):
        for text in (content, content.strip()):
            found = turn.find(text) if text else -1
            if found >= 0:
                after = found + len(text)
                break
    hit = specials.search(turn, after) if specials else None
    return hit.end() if hit else len(turn)


def _boundary(tokenizer, prefix: str, ids: list[int], straddler: int) -> tuple[int, bool]:
    """The token index where the text ``prefix`` ends in ``ids``, and whether it ends on a token
    boundary. If not, the token across it is trained: ``straddler`` 0 at an answer's start, 1 at its end."""
    head = _tokens(tokenizer, prefix)
    if ids[:len(head)] == head:
        return len(head), True
    return min(common_prefix(head, ids) + straddler, len(ids)), False


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, template_kwargs: dict) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)


def _tokens(tokenizer, text: str) -> list[int]:
    # What apply_chat_template(tokenize=True) does with the rendered text: the template wrote the specials.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_SPECIALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _special_pattern(tokenizer) -> re.Pattern | None:
    """A regex of the tokenizer's special tokens, longest first; kept per tokenizer (Mistral has
    771 of them: rebuilding it per row would cost more than rendering the row)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    cached = _SPECIALS.get(tokenizer)
    if cached and cached[0] == len(added):
        return cached[1]
    names = {t.content for t in added.values() if getattr(t, "special", False)} | set(tokenizer.all_special_tokens)
    pattern = re.compile("|".join(re.escape(t) for t in sorted(names, key=len, reverse=True))) if names else None
    _SPECIALS[tokenizer] = (len(added), pattern)
    return pattern


def common_prefix(a, b) -> int:
    """How many leading items ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
