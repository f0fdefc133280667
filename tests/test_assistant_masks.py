"""Assistant masks computed from the model's own chat template, token by token, on the real tokenizers
in ../shared/models and on changed revisions of their templates; and the "template trap": a tiny model
with the Mistral tokenizer and a later template revision trains with train.loss_on=assistant.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it, when this file runs first

import json
import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from slurmtune.data.chat_format import to_template_messages
from slurmtune.data.dataset import TemplateFit, TrainRecords, encode, encode_records, to_dataset
from slurmtune.data.templates import TurnNotFound, assistant_mask
from slurmtune.errors import UsageError
from slurmtune.train.tiny_model import CHAT_TEMPLATE as TINY_TEMPLATE

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"

# family -> (model folder, end-of-turn token the model stops on)
REAL = {
    "mistral": ("mistral-7b-instruct-v0.3", "</s>"),
    "phi-3": ("phi-3-mini-4k-instruct", "<|end|>"),
    "qwen2.5": ("qwen2.5-instruct", "<|im_end|>"),
    "qwen2.5-vl": ("qwen2.5-vl-instruct", "<|im_end|>"),
}

# In the manner of Mistral-7B-Instruct-v0.3's later template revision: a system turn is accepted but
# shown only with the last user turn, no space before [/INST], and the answer trimmed after a space.
MISTRAL_LATER = (
    '{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}'
    '{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}'
    '{{- bos_token }}{%- for message in loop_messages %}'
    '{%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}'
    '{{- raise_exception("After the optional system message, conversation roles must alternate '
    'user/assistant/user/assistant/...") }}{%- endif %}'
    '{%- if message["role"] == "user" %}{%- if loop.last and system_message is defined %}'
    '{{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}'
    '{%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{%- endif %}'
    '{%- elif message["role"] == "assistant" %}{{- " " + message["content"]|trim + eos_token }}'
    '{%- else %}{{- raise_exception("Only user and assistant roles are supported, with the exception of an '
    'initial optional system message!") }}{%- endif %}{%- endfor %}'
)


def changed(family: str, original: str) -> str:
    """A changed revision of each real template: another system-turn rendering, extra newlines."""
    if family == "mistral":
        return MISTRAL_LATER
    edits = {
        # A bos token first, and a blank line after every turn.
        "phi-3": [("{% for message", "{{ bos_token }}{% for message"), ("<|end|>\n", "<|end|>\n\n")],
        # Another default system prompt, and a system turn followed by a blank line.
        "qwen2.5": [("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "You are a tutor."),
                    ("messages[0]['content'] + '<|im_end|>\\n'", "messages[0]['content'] + '<|im_end|>\\n\\n'")],
        "qwen2.5-vl": [("You are a helpful assistant.<|im_end|>\n", "You describe speeches.<|im_end|>\n\n")],
    }[family]
    text = original
    for old, new in edits:
        assert old in text, (family, old)
        text = text.replace(old, new)
    return text


def shown(family: str, revision: str, content: str) -> str:
    """The answer as the template writes it (the later Mistral revision trims it)."""
    return content.strip() if (family, revision) == ("mistral", "changed") else content


SYSTEM = {"role": "system", "content": "You grade speeches.\nBe brief."}
TURNS = [
    {"role": "user", "content": "Score this: {\"intro\": 3}"},
    {"role": "assistant", "content": "{\"score\": 4, \"feedback\": \"Clear thesis.\"}\n"},
    {"role": "user", "content": "  Why not 5? Très bien. "},
    {"role": "assistant", "content": "The ending was rushed — 4/5."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "Good luck with the next speech."},
]
CONVERSATIONS = {
    "single-turn": TURNS[:2],
    "multi-turn": TURNS,
    "system-multi-turn": [SYSTEM, *TURNS],
}


@pytest.fixture(scope="module")
def tokenizers():
    assert MODELS.is_dir(), f"{MODELS} is missing: the tests need ../shared/models beside the clone"
    return {family: AutoTokenizer.from_pretrained(MODELS / folder, local_files_only=True)
            for family, (folder, _) in REAL.items()}


@pytest.fixture
def tokenizer_of(tokenizers):
    """``tokenizer_of(family, revision)``: the shared tokenizer with the original or a changed template;
    the original is put back afterwards."""
    saved = {}

    def get(family, revision="original"):
        tok = tokenizers[family]
        original = saved.setdefault(family, tok.chat_template)
        tok.chat_template = original if revision == "original" else changed(family, original)
        assert revision == "original" or tok.chat_template != original
        return tok

    yield get
    for family, template in saved.items():
        tokenizers[family].chat_template = template


def masked_runs(tok, ids, mask) -> list[list[int]]:
    runs, run = [], []
    for token_id, marked in zip([*ids, None], [*mask, 0]):
        if marked:
            run.append(token_id)
        elif run:
            runs.append(run)
            run = []
    return runs


def prompt_tokens(tok, messages) -> int:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False)["input_ids"])


# --- token by token, on every real template and a changed revision of each ------------------------------


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("revision", ["original", "changed"])
@pytest.mark.parametrize("family", list(REAL))
def test_masks_are_each_answer_and_its_end_of_turn_token(tokenizer_of, family, revision, name):
    tok, end_of_turn = tokenizer_of(family, revision), REAL[family][1]
    messages = TemplateFit(tok, computed_masks=True).messages(CONVERSATIONS[name])  # the shape training uses
    turn = assistant_mask(tok, messages)
    assert turn.ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert len(turn.mask) == len(turn.ids) and turn.merged == 0

    answers = [(i, m) for i, m in enumerate(messages) if m["role"] == "assistant"]
    runs = masked_runs(tok, turn.ids, turn.mask)
    assert [tok.decode(run) for run in runs] == [shown(family, revision, m["content"]) + end_of_turn
                                                 for _, m in answers]
    # Each run starts right after its prompt, as inference tokenizes it, and ends on the end-of-turn
    # token: nothing of a prompt (nor what a template writes after the stop token) is masked in.
    starts = [k for k in range(len(turn.mask)) if turn.mask[k] and (k == 0 or not turn.mask[k - 1])]
    assert starts == [prompt_tokens(tok, messages[:i]) for i, _ in answers]
    assert all(run[-1] == tok.convert_tokens_to_ids(end_of_turn) for run in runs)
    assert sum(turn.mask) == sum(len(run) for run in runs)


@pytest.mark.parametrize("revision", ["original", "changed"])
@pytest.mark.parametrize("family", list(REAL))
def test_text_after_the_last_turn_is_not_trained(tokenizer_of, family, revision):
    tok = tokenizer_of(family, revision)
    messages = TemplateFit(tok, computed_masks=True).messages(TURNS[:2])
    turn = assistant_mask(tok, messages)
    last = max(k for k, m in enumerate(turn.mask) if m)
    after = tok.convert_ids_to_tokens(turn.ids[last + 1:])
    # Phi-3 closes a conversation with "\n" (its <|end|> swallows it) and its eos, Qwen with "\n";
    # Mistral stops at </s>.
    assert after == {"mistral": [], "phi-3": ["<|endoftext|>"], "qwen2.5": ["Ċ"], "qwen2.5-vl": ["Ċ"]}[family]


def test_strict_mistral_shape_folds_the_system_turn_into_the_first_user_turn(tokenizer_of):
    tok = tokenizer_of("mistral")  # the original template raises on a system turn
    messages = TemplateFit(tok, computed_masks=True).messages([SYSTEM, *TURNS])
    assert messages == to_template_messages([SYSTEM, *TURNS], strict=True)
    assert messages[0] == {"role": "user", "content": f"{SYSTEM['content']}\n\n{TURNS[0]['content']}"}
    turn = assistant_mask(tok, messages)
    text = tok.decode([t for t, m in zip(turn.ids, turn.mask) if not m])
    assert text == f"<s>[INST] {SYSTEM['content']}\n\n{TURNS[0]['content']} [/INST][INST] {TURNS[2]['content']} " \
                   f"[/INST][INST] {TURNS[4]['content']} [/INST]"


def test_a_system_prompt_shown_only_with_the_last_user_turn_is_folded(tokenizer_of):
    tok = tokenizer_of("mistral", "changed")
    as_is = to_template_messages([SYSTEM, *TURNS], strict=False)
    tok.apply_chat_template(as_is, tokenize=False)  # accepted as it is...
    with pytest.raises(TurnNotFound, match=r"message 3 \(assistant\): character 10: its prompt alone "
                                           r"renders 'You grade speeches"):
        assistant_mask(tok, as_is)  # ...but the system prompt vanishes once a turn follows the prompt
    fit = TemplateFit(tok, computed_masks=True)
    assert fit.messages([SYSTEM, *TURNS]) == to_template_messages([SYSTEM, *TURNS], strict=True)
    assert TemplateFit(tok).messages([SYSTEM, *TURNS]) == as_is  # without computed masks nothing changes
    assert fit.messages(TURNS) == to_template_messages(TURNS)


def test_a_token_merged_across_the_boundary_is_trained_with_the_answer(tokenizer_of):
    tok = tokenizer_of("qwen2.5")
    messages = [TURNS[0], {"role": "assistant", "content": "\nFour.\n"}]  # "assistant\n" + "\n" -> one "\n\n"
    turn = assistant_mask(tok, messages)
    assert turn.merged == 1
    (run,) = masked_runs(tok, turn.ids, turn.mask)
    assert tok.decode(run) == "\n\nFour.\n<|im_end|>"
    assert turn.mask.index(1) == prompt_tokens(tok, messages[:1]) - 1  # the prompt's last "\n" is in the token


def test_phi3_answer_starting_with_a_space_does_not_train_the_assistant_tag(tokenizer_of):
    """Phi-3's <|assistant|> swallows the whitespace after it; the mask starts after the tag."""
    tok = tokenizer_of("phi-3")
    turn = assistant_mask(tok, [TURNS[0], {"role": "assistant", "content": " Four."}])
    marked = [t for t, m in zip(tok.convert_ids_to_tokens(turn.ids), turn.mask) if m]
    assert marked == ["▁Four", ".", "<|end|>"]


def test_qwen_tool_calls_and_results(tokenizer_of):
    tok = tokenizer_of("qwen2.5")
    schema = {"type": "object", "properties": {"id": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": "get_score", "description": "A stored score.",
                                               "parameters": schema}}]

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
    for kw in ({}, {"tools": tools}):
        turn = assistant_mask(tok, chat, **kw)
        assert [tok.decode(run) for run in masked_runs(tok, turn.ids, turn.mask)] == [
            '<tool_call>\n{"name": "get_score", "arguments": {"id": "7"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_score", "arguments": {"id": "8"}}\n</tool_call><|im_end|>',
            'And 9:\n<tool_call>\n{"name": "get_score", "arguments": {"id": "9"}}\n</tool_call><|im_end|>',
            "4, 5 and 3.<|im_end|>",
        ]


def test_qwen_vl_images_and_vision_ids(tokenizer_of):
    tok = tokenizer_of("qwen2.5-vl")
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}, {"type": "video"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A speaker at a lectern."}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": "b.png"}, {"type": "text", "text": "And?"}]},
        {"role": "assistant", "content": "The same speaker."},
    ]
    for add_vision_id in (False, True):
        turn = assistant_mask(tok, chat, add_vision_id=add_vision_id)
        runs = [tok.decode(run) for run in masked_runs(tok, turn.ids, turn.mask)]
        assert runs == ["A speaker at a lectern.<|im_end|>", "The same speaker.<|im_end|>"]
        assert ("Picture 1: " in tok.decode(turn.ids)) == add_vision_id


# --- where the renderings do not line up ------------------------------------------------------------------


def test_a_prompt_that_is_not_the_start_of_the_conversation_is_one_error_with_the_fix(tokenizer_of):
    tok = tokenizer_of("phi-3")
    # The generation prompt opens the turn with "<|assistant|>\n", the turn itself without the newline.
    tok.chat_template = tok.chat_template.replace("{{'<|assistant|>\n' + message['content']",
                                                  "{{'<|assistant|>' + message['content']")
    with pytest.raises(TurnNotFound, match=r"message 2 \(assistant\): character 54: its prompt alone renders "
                                           r"'\\n', the whole conversation '\{\"score\": 4"):
        assistant_mask(tok, TURNS[:2])
    data = TrainRecords("chat", [{"messages": [SYSTEM, *TURNS]}, {"messages": TURNS[:2]}])
    with pytest.raises(UsageError) as e:
        encode_records(tok, data, "assistant")
    message = str(e.value)
    assert message.startswith("train.loss_on=assistant: the assistant's tokens cannot be found with this chat "
                              "template: it has no {% generation %} markers")
    assert "in 2 of 2 records (first: record 1, message 3 (assistant): character" in message
    assert message.endswith("fix: set model.chat_template=FILE to a template that renders each prompt "
                            "(add_generation_prompt=True) as the start of the conversation that follows, or marks "
                            "the assistant's tokens with {% generation %} ... {% endgeneration %}; or set "
                            "train.loss_on=all to train on every token")
    assert len(encode_records(tok, data, "all").rows) == 2  # training on every token needs no turns


# --- markers win; the rows the trainer gets ------------------------------------------------------------


def test_generation_markers_are_used_when_the_template_has_them(tokenizer_of):
    tok = tokenizer_of("mistral")
    messages = [{"role": "user", "content": "Score this."}, {"role": "assistant", "content": "A 4 out of 5."}]
    # Markers around the content only, </s> left out: the markers decide, not the renderings.
    tok.chat_template = TINY_TEMPLATE.replace("render(message.content) ~ eos_token -}}{%- endgeneration -%}",
                                              "render(message.content) -}}{%- endgeneration -%}{{- eos_token -}}")
    assert tok.chat_template != TINY_TEMPLATE
    ids, trained = encode(tok, {"messages": messages}, "chat", "assistant", None)
    assert tok.decode([t for t, m in zip(ids, trained) if m]) == "A 4 out of 5."
    tok.chat_template = TINY_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    ids, trained = encode(tok, {"messages": messages}, "chat", "assistant", None)
    assert tok.decode([t for t, m in zip(ids, trained) if m]) == "A 4 out of 5.</s>"


def test_to_dataset_tokenizes_chat_rows_as_the_preflight_encodes_them(tokenizer_of):
    tok = tokenizer_of("mistral", "changed")
    data = TrainRecords("chat", [{"messages": [SYSTEM, *TURNS[:2]]}, {"messages": TURNS}])
    rows = to_dataset(data, tok, "assistant").to_list()
    assert list(rows[0]) == ["input_ids", "assistant_masks"]
    fit = TemplateFit(tok, computed_masks=True)
    for row, record in zip(rows, data.records):
        ids, trained = encode(tok, {"messages": fit.messages(record["messages"])}, "chat", "assistant", None)
        assert (row["input_ids"], row["assistant_masks"]) == (ids, [int(t) for t in trained])
    assert [list(r) for r in to_dataset(data, tok, "all").to_list()] == [["input_ids"]] * 2
    pc = TrainRecords("prompt-completion", [{"prompt": "2+2=", "completion": " 4"}])
    assert to_dataset(pc, tok, "assistant").to_list() == [{"prompt": "2+2=", "completion": " 4"}]


# --- the template trap trains -----------------------------------------------------------------------------


def make_mistral_tiny(out_dir: Path, template: str) -> Path:
    """A 2-layer Mistral with the real Mistral tokenizer (32768 tokens) and ``template``."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    tok = AutoTokenizer.from_pretrained(MODELS / REAL["mistral"][0], local_files_only=True)
    tok.chat_template = template
    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, sliding_window=None,
                           tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def test_mistral_with_a_later_template_revision_trains_on_the_assistant_tokens(tmp_path):
    from slurmtune.train.recipe import TrainingRecipe, preflight
    from train_helpers import chat_rows, logged_losses, make_cfg, write_jsonl

    model = make_mistral_tiny(tmp_path / "tiny-mistral", MISTRAL_LATER)
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))  # a system turn in every row
    cfg = make_cfg(model, max_steps=2, grad_accum=1, save_steps=2, loss_on="assistant")
    report = preflight(cfg, [train])
    assert report["template"] == "the model's chat template; assistant tokens found by rendering each turn"

    recipe = TrainingRecipe(cfg, tmp_path / "run", [train], None)
    try:
        recipe.setup()
        trainer, tok = recipe.trainer, recipe.tokenizer
        trained = total = 0
        for batch in trainer.get_train_dataloader():  # one epoch: every row once
            for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
                kept = labels[labels != -100]
                answer = tok.decode(kept)
                assert answer.startswith("Your ") and answer.endswith(" out of 5.</s>") and "[INST]" not in answer
                assert (kept == ids[labels != -100]).all() and (labels[attention == 0] == -100).all()
                trained, total = trained + len(kept), total + int(attention.sum())
        outcome = recipe.train()
    finally:
        recipe.cleanup()
    assert (report["trained_tokens"], report["tokens"]) == (trained, total)
    assert report["trained_share"] == trained / total and 0 < trained < total
    assert (outcome.status, outcome.step) == ("completed", 2)
    losses = logged_losses(outcome.checkpoint)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses.values())
    log = (tmp_path / "run" / "training.log").read_text(encoding="utf-8")
    assert "assistant tokens found by rendering each turn" in log
    assert json.loads((outcome.final_dir / "adapter_config.json").read_text())["r"] == 8
