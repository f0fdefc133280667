"""The chat template training uses: the model's own (any revision), or model.chat_template; generation
markers detected. The masks themselves are tested in tests/test_assistant_masks.py.

Uses the real tokenizers and templates in ../shared/models (data files only, no weights).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it, when this file runs first

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from slurmtune import SOURCE_ROOT
from slurmtune.config import RunConfig
from slurmtune.data.dataset import TrainRecords, count_trained_tokens, prepare_tokenizer
from slurmtune.data.templates import choose_chat_template, has_generation_markers
from slurmtune.errors import UsageError
from slurmtune.train.tiny_model import CHAT_TEMPLATE as TINY_TEMPLATE
from slurmtune.train.tiny_model import make_tiny_model

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
FOLDERS = ["mistral-7b-instruct-v0.3", "phi-3-mini-4k-instruct", "qwen2.5-instruct", "qwen2.5-vl-instruct"]
COMPUTED = "the model's chat template; assistant tokens found by rendering each turn"
CHAT = [{"role": "system", "content": "You grade speeches."},
        {"role": "user", "content": "Score this."},
        {"role": "assistant", "content": "A 4 out of 5."}]


@pytest.fixture(scope="module")
def tokenizers():
    assert MODELS.is_dir(), f"{MODELS} is missing: the tests need ../shared/models beside the clone"
    return {folder: AutoTokenizer.from_pretrained(MODELS / folder, local_files_only=True) for folder in FOLDERS}


@pytest.fixture
def tokenizer_of(tokenizers):
    """``tokenizer_of(folder)``: the shared tokenizer, with its original template put back afterwards."""
    saved = {}

    def get(folder):
        tok = tokenizers[folder]
        saved.setdefault(folder, tok.chat_template)
        return tok

    yield get
    for folder, template in saved.items():
        tokenizers[folder].chat_template = template


def cfg_for(model: Path, loss_on: str = "assistant", chat_template: str | None = None) -> RunConfig:
    cfg = RunConfig(name="templates")
    cfg.model.path, cfg.model.chat_template = str(model), chat_template
    cfg.train.loss_on, cfg.train.max_length = loss_on, 256
    return cfg


# --- which template -----------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", FOLDERS)
def test_real_templates_have_no_markers_and_are_used_as_they_are(tokenizer_of, folder):
    tok = tokenizer_of(folder)
    original = tok.chat_template
    assert not has_generation_markers(original)
    assert choose_chat_template(tok, assistant_only=True) == COMPUTED
    assert choose_chat_template(tok) == "the model's chat template"
    assert tok.chat_template == original


def test_a_changed_template_revision_is_used_as_it_is(tokenizer_of):
    """Once a stop ("the model's template differs from the known chatml-qwen2.5 template"), now a run."""
    tok = tokenizer_of("qwen2.5-instruct")
    changed = tok.chat_template.replace("You are Qwen, created by Alibaba Cloud.", "You are a tutor.")
    assert changed != tok.chat_template
    tok.chat_template = changed
    assert choose_chat_template(tok, assistant_only=True) == COMPUTED
    assert tok.chat_template == changed


def test_the_tiny_models_markers_are_used(tmp_path):
    tok = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "tiny"), local_files_only=True)
    assert choose_chat_template(tok, assistant_only=True) == \
        "the model's chat template; assistant tokens from its {% generation %} markers"
    assert tok.chat_template == TINY_TEMPLATE


@pytest.mark.parametrize("markers", [True, False])
def test_an_override_file_is_used_with_or_without_markers(tokenizer_of, tmp_path, markers):
    tok = tokenizer_of("phi-3-mini-4k-instruct")
    override = tmp_path / "my template.jinja"
    text = TINY_TEMPLATE if markers else tok.chat_template.replace("<|end|>", "<|end|>\n")
    override.write_text(text, encoding="utf-8")
    how = "from its {% generation %} markers" if markers else "found by rendering each turn"
    assert choose_chat_template(tok, str(override), assistant_only=True) == \
        f"chat template {override} (model.chat_template); assistant tokens {how}"
    assert tok.chat_template == text


def test_a_missing_override_or_no_template_at_all_says_the_fix(tokenizer_of, tmp_path):
    tok = tokenizer_of("mistral-7b-instruct-v0.3")
    original = tok.chat_template
    with pytest.raises(UsageError, match=r"model.chat_template: .*missing.jinja: no such file; expected a Jinja"):
        choose_chat_template(tok, str(tmp_path / "missing.jinja"), assistant_only=True)
    assert tok.chat_template == original
    tok.chat_template = None
    with pytest.raises(UsageError, match=r"^the model has no chat template, so chat records cannot be rendered; "
                                         r"fix: set model.chat_template=FILE"):
        choose_chat_template(tok)


def test_marker_detection():
    assert has_generation_markers(TINY_TEMPLATE)
    assert has_generation_markers("{%- generation -%}{{ m }}{%- endgeneration -%}")
    assert not has_generation_markers("{% generation %}{{ m }}")  # never closed
    assert not has_generation_markers("{{ 'generation' }}")
    assert not has_generation_markers(None)


def test_no_marked_copies_are_kept_in_manifests():
    """The computed masks made manifests/templates/ redundant (slurmtune.data.templates says why)."""
    assert not list((SOURCE_ROOT / "manifests").glob("templates/*.jinja"))


# --- prepare_tokenizer and the preflight's numbers, on a real tokenizer -------------------------------


def test_prepare_tokenizer_on_a_real_model_folder():
    model = MODELS / "mistral-7b-instruct-v0.3"
    tok, description = prepare_tokenizer(cfg_for(model), "chat")
    assert description == COMPUTED and tok.pad_token == tok.eos_token == "</s>"
    assert prepare_tokenizer(cfg_for(model, "all"), "chat")[1] == "the model's chat template"
    assert prepare_tokenizer(cfg_for(model), "prompt-completion")[1] == "the model's chat template"


def test_count_trained_tokens_with_computed_masks():
    model = MODELS / "mistral-7b-instruct-v0.3"
    cfg = cfg_for(model)
    tok, description = prepare_tokenizer(cfg, "chat")
    report = count_trained_tokens(cfg, tok, TrainRecords("chat", [{"messages": CHAT}] * 3), description)
    answer = len(tok("A 4 out of 5.</s>", add_special_tokens=False)["input_ids"])
    assert report["trained_tokens"] == 3 * answer and report["rows"] == 3 and report["boundaries_merged"] == 0
    assert report["template"] == COMPUTED and 0 < report["trained_share"] < 1
    cfg.train.max_length = 8  # the answer starts after the folded system prompt
    with pytest.raises(UsageError, match=r"zero trained tokens .* truncated by max_length 8"):
        count_trained_tokens(cfg, tok, TrainRecords("chat", [{"messages": CHAT}]), description)
