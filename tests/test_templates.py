"""Known chat templates: the same text as each real model's own template, and masks on the assistant's tokens.

Uses the real tokenizers and templates in ../shared/models (data files only, no weights).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it, when this file runs first

from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from slurmtune.data import templates
from slurmtune.data.chat_format import to_template_messages
from slurmtune.errors import UsageError
from slurmtune.data.templates import ensure_generation_template, has_generation_markers, identify_family
from slurmtune.train.tiny_model import CHAT_TEMPLATE as TINY_TEMPLATE
from slurmtune.train.tiny_model import make_tiny_model

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"

# family -> (model folder, end-of-turn token inside the markers, template accepts a system turn)
REAL = {
    "mistral-v0.3": ("mistral-7b-instruct-v0.3", "</s>", False),
    "phi-3": ("phi-3-mini-4k-instruct", "<|end|>", True),
    "chatml-qwen2.5": ("qwen2.5-instruct", "<|im_end|>", True),
    "qwen2.5-vl": ("qwen2.5-vl-instruct", "<|im_end|>", True),
}
FAMILIES = list(REAL)

SYSTEM = {"role": "system", "content": "You grade speeches.\nBe brief."}
# Assistant text with a trailing newline, JSON braces and non-ASCII; none starts with
# whitespace (see test_phi3_tokenizer_drops_whitespace_after_the_assistant_tag).
TURNS = [
    {"role": "user", "content": "Score this: {\"intro\": 3}"},
    {"role": "assistant", "content": "{\"score\": 4, \"feedback\": \"Clear thesis.\"}\n"},
    {"role": "user", "content": "  Why not 5? Très bien. "},
    {"role": "assistant", "content": "The ending was rushed — 4/5."},
]
CONVERSATIONS = {
    "single-turn": TURNS[:2],
    "multi-turn": TURNS,
    "system-multi-turn": [SYSTEM, *TURNS],
}


@pytest.fixture(scope="module")
def tokenizers():
    """One tokenizer per real model, loaded once; tests that change chat_template restore it."""
    assert MODELS.is_dir(), f"{MODELS} is missing: the tests need ../shared/models beside the clone"
    return {family: AutoTokenizer.from_pretrained(MODELS / folder, local_files_only=True)
            for family, (folder, _, _) in REAL.items()}


@pytest.fixture
def tokenizer_of(tokenizers):
    """``tokenizer_of(family)``: the shared tokenizer, with its original template put back afterwards."""
    saved = {}

    def get(family):
        tok = tokenizers[family]
        saved.setdefault(family, tok.chat_template)
        return tok

    yield get
    for family, template in saved.items():
        tokenizers[family].chat_template = template


def known(family: str) -> str:
    return templates.template_path(family).read_text(encoding="utf-8")


def messages_for(family: str, conversation: list[dict]) -> list[dict]:
    """The conversation as slurmtune passes it: system folded into the user turn where refused."""
    return to_template_messages(conversation, strict=not REAL[family][2])


def render(tok, template, messages, **kw) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)


def masked_runs(tok, template, messages, **kw) -> tuple[list[str], list[int]]:
    """The decoded runs of consecutive masked tokens, and the mask."""
    out = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True, **kw)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(ids)
    runs, run = [], []
    for token_id, marked in zip([*ids, None], [*mask, 0]):
        if marked:
            run.append(token_id)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs, mask


# --- same text as the original ---------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_known_template_renders_the_original_text(tokenizers, family, name, add_generation_prompt):
    tok = tokenizers[family]
    messages = messages_for(family, CONVERSATIONS[name])
    if add_generation_prompt:
        messages = messages[:-1]
    original = render(tok, tok.chat_template, messages, add_generation_prompt=add_generation_prompt)
    assert render(tok, known(family), messages, add_generation_prompt=add_generation_prompt) == original


def test_mistral_template_keeps_the_original_errors(tokenizers):
    tok = tokenizers["mistral-v0.3"]
    for messages, error in [
        ([SYSTEM, *TURNS], "Conversation roles must alternate"),  # system first: not a user turn
        ([TURNS[0], TURNS[0]], "Conversation roles must alternate"),
        ([TURNS[0], {"role": "tool", "content": "x"}], "Only user and assistant roles are supported"),
    ]:
        for template in (tok.chat_template, known("mistral-v0.3")):
            with pytest.raises(TemplateError, match=error):
                render(tok, template, messages)


def test_qwen_template_keeps_tools_and_tool_calls(tokenizers):
    tok = tokenizers["chatml-qwen2.5"]
    schema = {"type": "object", "properties": {"id": {"type": "string"}}}
    function = {"name": "get_score", "description": "A stored score.", "parameters": schema}
    tools = [{"type": "function", "function": function}]

    def call(i):
        return {"type": "function", "function": {"name": "get_score", "arguments": {"id": i}}}

    chat = [
        SYSTEM,
        {"role": "user", "content": "Scores of 7 and 8?"},
        {"role": "assistant", "content": "", "tool_calls": [call("7"), call("8")]},
        {"role": "tool", "content": "{\"score\": 4}"},
        {"role": "tool", "content": "{\"score\": 5}"},
        {"role": "assistant", "content": "And 9:", "tool_calls": [call("9")]},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "4, 5 and 3."},
    ]
    for messages in (chat, chat[1:]):  # with a system turn, and with the default system prompt
        for kw in ({}, {"tools": tools}):
            original = render(tok, tok.chat_template, messages, **kw)
            assert render(tok, known("chatml-qwen2.5"), messages, **kw) == original

    runs, _ = masked_runs(tok, known("chatml-qwen2.5"), chat, tools=tools)
    assert runs == [
        '<tool_call>\n{"name": "get_score", "arguments": {"id": "7"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_score", "arguments": {"id": "8"}}\n</tool_call><|im_end|>',
        'And 9:\n<tool_call>\n{"name": "get_score", "arguments": {"id": "9"}}\n</tool_call><|im_end|>',
        "4, 5 and 3.<|im_end|>",
    ]


def test_qwen_vl_template_keeps_images_videos_and_vision_ids(tokenizers):
    tok = tokenizers["qwen2.5-vl"]
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}, {"type": "video"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A speaker at a lectern."}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": "b.png"}, {"type": "text", "text": "And?"}]},
        {"role": "assistant", "content": "The same speaker."},
    ]
    for add_vision_id in (False, True):
        kw = {"add_vision_id": add_vision_id}
        assert render(tok, known("qwen2.5-vl"), chat, **kw) == render(tok, tok.chat_template, chat, **kw)
    runs, _ = masked_runs(tok, known("qwen2.5-vl"), chat, add_vision_id=True)
    assert runs == ["A speaker at a lectern.<|im_end|>", "The same speaker.<|im_end|>"]


# --- the assistant mask ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_mask_covers_assistant_content_and_end_of_turn_only(tokenizers, family, name):
    tok, end_of_turn = tokenizers[family], REAL[family][1]
    messages = messages_for(family, CONVERSATIONS[name])
    runs, mask = masked_runs(tok, known(family), messages)
    assert runs == [m["content"] + end_of_turn for m in messages if m["role"] == "assistant"]

    # The prompt of the last turn is exactly the unmasked tokens before its content.
    prompt = tok.apply_chat_template(messages[:-1], chat_template=known(family), tokenize=True,
                                     add_generation_prompt=True, return_dict=True)["input_ids"]
    assert mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_with_generation_prompt_stops_before_the_open_turn(tokenizers, family):
    tok = tokenizers[family]
    messages = messages_for(family, TURNS[:3])
    runs, mask = masked_runs(tok, known(family), messages, add_generation_prompt=True)
    assert runs == [TURNS[1]["content"] + REAL[family][1]]
    assert mask[-1] == 0


def test_phi3_tokenizer_drops_whitespace_after_the_assistant_tag(tokenizers):
    """Phi-3's <|assistant|> token swallows the whitespace after it, so the mask of an answer that starts
    with a space begins on <|assistant|> itself. Stripping that whitespace changes no token id: data
    converters can strip it and get an exact mask."""
    tok = tokenizers["phi-3"]
    spaced = [TURNS[0], {"role": "assistant", "content": " Four."}]
    stripped = [TURNS[0], {"role": "assistant", "content": "Four."}]

    def ids(messages):
        return tok.apply_chat_template(messages, chat_template=known("phi-3"), return_dict=True)["input_ids"]

    assert ids(spaced) == ids(stripped)
    assert masked_runs(tok, known("phi-3"), stripped)[0] == ["Four.<|end|>"]
    _, mask = masked_runs(tok, known("phi-3"), spaced)
    marked = [t for t, m in zip(tok.convert_ids_to_tokens(ids(spaced)), mask) if m]
    assert marked == ["<|assistant|>", "▁Four", ".", "<|end|>"]


# --- fingerprints and markers ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_real_templates_are_identified_and_have_no_markers(tokenizers, family):
    original = tokenizers[family].chat_template
    assert not has_generation_markers(original)
    assert identify_family(original) == family
    assert has_generation_markers(known(family))
    assert identify_family(known(family)) == family


def test_known_template_files_say_what_they_are():
    files = sorted(p.name for p in templates.TEMPLATES_DIR.glob("*.jinja"))
    assert files == sorted(templates.KNOWN_TEMPLATES.values())
    for family in FAMILIES:
        text = known(family)
        assert text.startswith("{#-")
        assert "generation" in text[: text.index("#}")]


def test_marker_detection():
    assert has_generation_markers(TINY_TEMPLATE)
    assert has_generation_markers("{%- generation -%}{{ m }}{%- endgeneration -%}")
    assert not has_generation_markers("{% generation %}{{ m }}")  # never closed
    assert not has_generation_markers("{{ 'generation' }}")
    assert identify_family(TINY_TEMPLATE) is None
    assert identify_family("{% for m in messages %}{{ m.content }}{% endfor %}") is None


# --- ensure_generation_template --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_ensure_picks_the_known_template_of_each_real_model(tokenizer_of, family):
    tok = tokenizer_of(family)
    file_name = templates.KNOWN_TEMPLATES[family]
    note = ensure_generation_template(tok)
    assert note == f"using manifests/templates/{file_name} (the model's template has no generation markers)"
    assert tok.chat_template == known(family)
    assert ensure_generation_template(tok) == "model template has generation markers"  # a second call keeps it


def test_ensure_keeps_the_tiny_models_own_template(tmp_path):
    tok = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "tiny"), local_files_only=True)
    assert ensure_generation_template(tok) == "model template has generation markers"
    assert tok.chat_template == TINY_TEMPLATE


def test_ensure_honours_an_override_file(tokenizer_of, tmp_path):
    tok = tokenizer_of("phi-3")
    override = tmp_path / "my template.jinja"
    override.write_text(TINY_TEMPLATE, encoding="utf-8")
    assert ensure_generation_template(tok, str(override)) == f"using {override} (model.chat_template)"
    assert tok.chat_template == TINY_TEMPLATE


def test_ensure_rejects_an_override_without_markers(tokenizer_of, tmp_path):
    tok = tokenizer_of("phi-3")
    original = tok.chat_template
    override = tmp_path / "plain.jinja"
    override.write_text(original, encoding="utf-8")
    with pytest.raises(UsageError) as e:
        ensure_generation_template(tok, str(override))
    assert str(e.value).startswith(f"model.chat_template: {override} has no {{% generation %}}")
    assert "manifests/templates/" in str(e.value)
    with pytest.raises(UsageError, match="no such file"):
        ensure_generation_template(tok, str(tmp_path / "missing.jinja"))
    assert tok.chat_template == original


def test_ensure_errors_with_the_fix_for_an_unknown_template(tokenizer_of):
    tok = tokenizer_of("phi-3")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UsageError) as e:
        ensure_generation_template(tok)
    assert str(e.value) == (
        "the model's chat template has no {% generation %} markers, so the assistant's tokens cannot be found, "
        "and it is not one of the known templates (mistral-v0.3, phi-3, chatml-qwen2.5, qwen2.5-vl); "
        "set model.chat_template=... to a template with {% generation %} markers, see manifests/templates/"
    )


def test_ensure_errors_when_the_template_differs_from_its_family(tokenizer_of):
    tok = tokenizer_of("chatml-qwen2.5")
    original = tok.chat_template
    tok.chat_template = original.replace("You are Qwen, created by Alibaba Cloud.", "You are a tutor.")
    with pytest.raises(UsageError) as e:
        ensure_generation_template(tok)
    message = str(e.value)
    assert message.startswith("the model's template differs from the known chatml-qwen2.5 template (")
    assert "character 27: the model's gives 'a tutor. You are" in message
    assert "the known one 'Qwen, created by" in message
    assert message.endswith("set model.chat_template=... to a template with {% generation %} markers, "
                            "see manifests/templates/")


def test_ensure_errors_without_any_template(tokenizer_of):
    tok = tokenizer_of("mistral-v0.3")
    tok.chat_template = None
    with pytest.raises(UsageError, match=r"the model has no chat template; set model.chat_template="):
        ensure_generation_template(tok)
