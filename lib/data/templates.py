"""Chat templates that mark the assistant's tokens, so training can use those tokens only.

::

    from slurmtune.data.chat_format import load_tokenizer
    from slurmtune.data.templates import ensure_generation_template

    tok = load_tokenizer("/models/phi-3-mini-4k-instruct")
    ensure_generation_template(tok)
    # -> "using manifests/templates/phi-3.jinja (the model's template has no generation markers)"
    ensure_generation_template(tok, "my-template.jinja")   # model.chat_template=my-template.jinja
    # -> "using my-template.jinja (model.chat_template)"

TRL's ``assistant_only_loss=True`` and ``apply_chat_template(...,
return_assistant_tokens_mask=True)`` find the assistant's tokens through
``{% generation %}...{% endgeneration %}`` blocks in the chat template. None of
the released templates of the models we tune has them, so manifests/templates/
holds one copy per model family with the markers added (around the assistant's
content and its end-of-turn token, so the model learns to stop). A copy is used
only after it renders the same text as the model's own template on probe
conversations: a silently different prompt format would fine-tune the model on
text it never sees at inference.
"""

from __future__ import annotations

import re
from pathlib import Path

from slurmtune import SOURCE_ROOT
from slurmtune.data.chat_format import to_template_messages
from slurmtune.errors import UsageError

TEMPLATES_DIR = SOURCE_ROOT / "manifests" / "templates"

KNOWN_TEMPLATES = {
    "mistral-v0.3": "mistral-v0.3.jinja",
    "phi-3": "phi-3.jinja",
    "chatml-qwen2.5": "chatml-qwen2.5.jinja",
    "qwen2.5-vl": "qwen2.5-vl.jinja",
}

# Checked in order; every string must occur in the template. VL comes before plain ChatML
# because its template is ChatML too. A match only picks the candidate: the probe
# rendering in `ensure_generation_template` decides whether it is really equivalent.
_FINGERPRINTS = (
    ("qwen2.5-vl", ("<|im_start|>", "<|im_end|>", "<|vision_start|>")),
    ("chatml-qwen2.5", ("<|im_start|>", "<|im_end|>")),
    ("mistral-v0.3", ("[INST]", "[/INST]")),
    ("phi-3", ("<|assistant|>", "<|end|>")),
)

_GENERATION = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")
_END_GENERATION = re.compile(r"\{%[-+]?\s*endgeneration\s*[-+]?%\}")

FIX = "set model.chat_template=... to a template with {% generation %} markers, see manifests/templates/"

# Leading/trailing whitespace, newlines, braces and non-ASCII text: where a rewritten
# template most easily drifts from the original.
_PROBES = (
    [
        {"role": "system", "content": "You grade speeches.\nBe brief."},
        {"role": "user", "content": "Score this: {\"intro\": 3}"},
        {"role": "assistant", "content": "{\"score\": 4}\n"},
        {"role": "user", "content": "  Why not 5? Très bien. "},
        {"role": "assistant", "content": "The ending was rushed."},
    ],
    [
        {"role": "user", "content": "What is a rubric?"},
        {"role": "assistant", "content": "A list of criteria."},
    ],
)


def has_generation_markers(template: str) -> bool:
    """True when ``template`` has both ``{% generation %}`` and ``{% endgeneration %}``."""
    return bool(_GENERATION.search(template) and _END_GENERATION.search(template))


def identify_family(template: str) -> str | None:
    """The KNOWN_TEMPLATES family whose original template this looks like, or None."""
    for family, needles in _FINGERPRINTS:
        if all(n in template for n in needles):
            return family
    return None


def template_path(name: str) -> Path:
    """manifests/templates/<file> for a family name ("phi-3") or a file name ("phi-3.jinja")."""
    return TEMPLATES_DIR / KNOWN_TEMPLATES.get(name, name)


def ensure_generation_template(tokenizer, override_path: str | None = None) -> str:
    """Give ``tokenizer`` a chat template with generation markers; say which one.

    An explicit ``override_path`` wins (it must have markers); else the model's own
    template is kept if it has markers; else the known template of its family is used,
    provided it renders the same text. Anything else raises UsageError saying the fix.
    """
    if override_path:
        text = _read_override(override_path)
        tokenizer.chat_template = text
        return f"using {override_path} (model.chat_template)"

    own = _own_template(tokenizer)
    if not own:
        raise UsageError(f"the model has no chat template; {FIX}")
    if has_generation_markers(own):
        return "model template has generation markers"

    family = identify_family(own)
    if family is None:
        known = ", ".join(KNOWN_TEMPLATES)
        raise UsageError(
            "the model's chat template has no {% generation %} markers, so the assistant's tokens "
            f"cannot be found, and it is not one of the known templates ({known}); {FIX}"
        )
    file_name = KNOWN_TEMPLATES[family]
    known_text = _read_known(file_name)
    difference = first_difference(tokenizer, own, known_text)
    if difference:
        raise UsageError(f"the model's template differs from the known {family} template ({difference}); {FIX}")
    tokenizer.chat_template = known_text
    return f"using manifests/templates/{file_name} (the model's template has no generation markers)"


def first_difference(tokenizer, original: str, candidate: str) -> str | None:
    """Where ``candidate`` renders the probe conversations differently from ``original``; None if never.

    Each probe is also tried in the strict shape (system text folded into the first
    user turn), as chat_format renders for templates that refuse a system turn;
    raising is an outcome too, and must match.
    """
    rendered_any = False
    for probe in _PROBES:
        for strict in (False, True):
            messages = to_template_messages(probe, strict=strict)
            for add_generation_prompt in (False, True):
                chat = messages[:-1] if add_generation_prompt else messages
                want = _render(tokenizer, original, chat, add_generation_prompt)
                got = _render(tokenizer, candidate, chat, add_generation_prompt)
                if want != got:
                    return _describe(want, got, add_generation_prompt)
                rendered_any = rendered_any or isinstance(want, str)
    return None if rendered_any else "the model's template rejects every probe conversation"


def _render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool):
    """The rendered text, or the exception class when the template raises."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # a template's raise_exception, or any Jinja error, is an outcome to compare
        return type(e)


def _describe(want, got, add_generation_prompt: bool) -> str:
    where = f"add_generation_prompt={add_generation_prompt}"
    if isinstance(want, str) and isinstance(got, str):
        at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        return f"{where}, character {at}: the model's gives {want[at:at + 30]!r}, the known one {got[at:at + 30]!r}"
    return f"{where}: the model's {_outcome(want)}, the known one {_outcome(got)}"


def _outcome(rendered) -> str:
    return f"renders {rendered[:60]!r}" if isinstance(rendered, str) else f"raises {rendered.__name__}"


def _own_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates ("default", "tool_use"): training uses the default
        template = template.get("default")
    return template


def _read_override(override_path: str) -> str:
    path = Path(override_path)
    if not path.is_file():
        known = ", ".join(f"manifests/templates/{f}" for f in KNOWN_TEMPLATES.values())
        raise UsageError(f"model.chat_template: {override_path}: no such file (known templates: {known})")
    text = path.read_text(encoding="utf-8")
    if not has_generation_markers(text):
        raise UsageError(
            f"model.chat_template: {override_path} has no {{% generation %}} ... {{% endgeneration %}} markers; "
            "put them around each assistant message's content and its end-of-turn token "
            "(examples in manifests/templates/)"
        )
    return text


def _read_known(file_name: str) -> str:
    path = template_path(file_name)
    if not path.is_file():  # a non-editable install leaves manifests/ behind
        raise UsageError(f"{path}: missing; install slurmtune from its source checkout (pip install -e .)")
    return path.read_text(encoding="utf-8")
