"""The tiny offline model: it loads like a hub checkpoint, is reproducible, and trains with LoRA."""

import hashlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it, when this file runs first

import huggingface_hub.constants
import pytest
import torch
from jinja2.exceptions import TemplateError
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from slurmtune.train import tiny_model

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}

CHAT = [
    {"role": "system", "content": "You grade speeches."},
    {"role": "user", "content": [{"type": "text", "text": "Score this: "}, {"type": "video"}]},
    {"role": "assistant", "content": '{"score": 4, "feedback": "Clear thesis."}'},
    {"role": "user", "content": "Why not 5?"},
    {"role": "assistant", "content": [{"type": "text", "text": "The ending was rushed."}]},
]


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """Any attempt to reach the hub raises, even if transformers was imported before HF_HUB_OFFLINE was set."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_model.make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_writes_a_hub_style_directory(llama_dir):
    assert EXPECTED_FILES <= {p.name for p in llama_dir.iterdir()}
    info = tiny_model.describe(llama_dir)
    assert info["arch"] == "llama"
    assert info["vocab_size"] == 2048
    assert (info["hidden_size"], info["num_layers"], info["num_heads"]) == (64, 2, 4)


def test_reloads_offline_runs_forward_and_generate(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert model.dtype == torch.float32
    assert len(tokenizer) == model.config.vocab_size == 2048
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
    assert sum(p.numel() for p in model.parameters()) == tiny_model.describe(llama_dir)["num_params"]

    text = 'Tutor: {"score": 3} for delivery.'
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == text  # byte-level: lossless

    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 2048)
    assert torch.isfinite(logits).all()

    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    assert torch.equal(out[:, : ids.shape[1]], ids)


def test_same_seed_gives_identical_bytes(tmp_path, llama_dir):
    again = tiny_model.make_tiny_model(tmp_path / "again", seed=0)
    other = tiny_model.make_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json"):
        assert sha256(again / name) == sha256(llama_dir / name), name
    assert sha256(other / "model.safetensors") != sha256(llama_dir / "model.safetensors")
    assert sha256(other / "tokenizer.json") == sha256(llama_dir / "tokenizer.json")  # seed is weights only


def test_build_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model.make_tiny_model(tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_chat_template_renders_roles_parts_and_generation_prompt(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    text = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|system|>\nYou grade speeches.</s>\n"
        "<|user|>\nScore this: <video></s>\n"
        "<|assistant|>\n"
    )
    with pytest.raises(TemplateError, match="unknown role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_assistant_mask_covers_exactly_the_assistant_replies(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    out = tokenizer.apply_chat_template(
        CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    # Each masked run decodes to one reply plus its </s>; everything else stays unmasked.
    runs, current = [], []
    for token, flag in zip(ids, mask):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    assert current == []  # the trailing newline after the last </s> is not trained on
    assert [tokenizer.decode(run) for run in runs] == [
        '{"score": 4, "feedback": "Clear thesis."}</s>',
        "The ending was rushed.</s>",
    ]


@pytest.mark.parametrize("arch", tiny_model.TINY_ARCHES)
def test_each_arch_builds_with_its_module_names(tmp_path, arch):
    model_dir = tiny_model.make_tiny_model(tmp_path / arch, arch=arch)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == arch
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if arch == "phi3":
        assert {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} <= leaf_names
        assert "q_proj" not in leaf_names
    else:
        assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"} <= leaf_names


def test_unknown_arch_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="valid arches: llama, mistral, phi3"):
        tiny_model.make_tiny_model(tmp_path / "x", arch="gpt2")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "arch, targets",
    [("llama", ["q_proj", "v_proj"]), ("phi3", ["qkv_proj", "o_proj", "gate_up_proj"])],
)
def test_one_lora_step_on_assistant_tokens_lowers_the_loss(tmp_path, arch, targets):
    model_dir = tiny_model.make_tiny_model(tmp_path / arch, arch=arch)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    frozen_before = base.get_output_embeddings().weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))

    batch = tokenizer.apply_chat_template(
        CHAT, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    labels = batch["input_ids"].masked_fill(batch["assistant_masks"] == 0, -100)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)

    def loss():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss

    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()
    assert torch.equal(base.get_output_embeddings().weight, frozen_before)  # only the adapter moved
