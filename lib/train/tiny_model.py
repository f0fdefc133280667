"""Build a tiny random-weight causal LM, with its own tokenizer, entirely offline.

Tests and dry runs need a real model directory that `from_pretrained` can load, and nothing
may come from the model hub. This module trains a byte-level BPE tokenizer on a built-in
English corpus (~0.05 s), initialises a 2-layer model from a seed, and saves both
the way a hub checkpoint looks::

    from slurmtune.train.tiny_model import make_tiny_model, describe

    model_dir = make_tiny_model("/tmp/tiny-llama")              # -> Path("/tmp/tiny-llama")
    make_tiny_model("/tmp/tiny-phi3", arch="phi3", seed=1)      # fused qkv_proj / gate_up_proj
    describe(model_dir)   # {'arch': 'llama', 'num_params': ..., 'vocab_size': 2048, ...}

    # then, with HF_HUB_OFFLINE=1:
    AutoTokenizer.from_pretrained(model_dir); AutoModelForCausalLM.from_pretrained(model_dir)

The same arguments always give byte-identical `model.safetensors` and `tokenizer.json`.
The tokenizer does not depend on `seed`: models built with different seeds share it.

The chat format (see `CHAT_TEMPLATE`) is::

    <s><|system|>\\nYou grade speeches.</s>\\n<|user|>\\nScore this.</s>\\n<|assistant|>\\n{"score": 4}</s>\\n

Assistant content and its closing `</s>` sit inside `{% generation %}`, so
`apply_chat_template(..., return_assistant_tokens_mask=True)` and TRL's
`assistant_only_loss=True` train on exactly those tokens.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
)

from slurmtune.errors import UsageError

TINY_ARCHES = ("llama", "mistral", "phi3")

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
MEDIA_TOKENS = ("<image>", "<video>")
# Order fixes the ids: <pad>=0, <s>=1, </s>=2, then roles and media placeholders.
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS, *MEDIA_TOKENS)

MAX_POSITIONS = 2048

CHAT_TEMPLATE = """\
{%- macro render(content) -%}
  {%- if content is string -%}
    {{- content -}}
  {%- else -%}
    {%- for part in content -%}
      {%- if part.type == 'text' -%}{{- part.text -}}
      {%- elif part.type == 'image' -%}{{- '<image>' -}}
      {%- elif part.type == 'video' -%}{{- '<video>' -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- for message in messages -%}
  {%- if message.role not in ['system', 'user', 'assistant'] -%}
    {{- raise_exception('unknown role ' ~ message.role ~ '; valid: system, user, assistant') -}}
  {%- endif -%}
  {{- '<|' ~ message.role ~ '|>\\n' -}}
  {%- if message.role == 'assistant' -%}
    {%- generation -%}{{- render(message.content) ~ eos_token -}}{%- endgeneration -%}
  {%- else -%}
    {{- render(message.content) ~ eos_token -}}
  {%- endif -%}
  {{- '\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|assistant|>\\n' -}}
{%- endif -%}
"""


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 2048,
) -> Path:
    """Write a tiny `arch` model, its tokenizer and generation config into `out_dir`.

    `vocab_size` is the BPE target; the model's embedding matches the trained tokenizer
    exactly (`len(tokenizer)`), which is `vocab_size` unless the built-in corpus runs out
    of merges first (it holds about 2260 tokens). Example::

        path = make_tiny_model(tmp_path / "tiny", arch="mistral", seed=3)
    """
    if arch not in TINY_ARCHES:
        raise ValueError(f"unknown arch {arch!r}; valid arches: {', '.join(TINY_ARCHES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(vocab_size)
    config = _model_config(arch, tokenizer, hidden_size, num_layers, num_heads)
    # fork_rng keeps the caller's global RNG untouched while the seed fixes the init.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # transformers 5 writes safetensors only (safe_serialization is gone).
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_config(arch: str = "llama", hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4):
    """The config `make_tiny_model` gives the model it builds (no weights, no files)."""
    return _model_config(arch, build_tokenizer(), hidden_size, num_layers, num_heads)


def ensure_model(model) -> Path:
    """The folder of ``model`` (a manifest's ModelConfig), with a tiny model built there first
    when ``model.tiny_arch`` asks for one and none is there yet (demos, tests)."""
    path = Path(model.path)
    if not (path / "config.json").is_file():
        if not model.tiny_arch:
            raise UsageError(f"model.path: {path}: no such model folder (no config.json); expected a local "
                             "folder or Hugging Face cache snapshot: compute nodes cannot download")
        make_tiny_model(path, arch=model.tiny_arch)
    return path


def build_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on `tiny_corpus()` and attach the chat template."""
    bpe = Tokenizer(models.BPE())
    # Byte-level: every string encodes without an unknown token, as in GPT-2/Llama-3.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tiny_corpus(), trainer=trainer)
    # Plain text gets a leading <s>, like Llama; apply_chat_template passes
    # add_special_tokens=False, so chats carry only the template's own <s>.
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bpe.token_to_id(BOS))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[*ROLE_TOKENS, *MEDIA_TOKENS],
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _model_config(arch, tokenizer, hidden_size, num_layers, num_heads):
    """Pick the config class for `arch`; only the sizes and token ids are set by hand."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        # Mistral defaults to 8 KV heads, which a 4-head model cannot have.
        num_key_value_heads=num_heads,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    # Phi-3 otherwise assumes a 4096-token original context for its rope scaling.
    return Phi3Config(**common, original_max_position_embeddings=MAX_POSITIONS)


def describe(out_dir: str | Path) -> dict:
    """Summarise a model directory from its config and safetensors header, without loading it.

        describe(make_tiny_model(tmp_path / "tiny"))
        # {'arch': 'llama', 'num_params': 344384, 'vocab_size': 2048, 'hidden_size': 64, ...}
    """
    from safetensors import safe_open

    out_dir = Path(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    with safe_open(out_dir / "model.safetensors", framework="pt") as weights:
        shapes = [weights.get_slice(name).get_shape() for name in weights.keys()]
    num_params = sum(_product(shape) for shape in shapes)
    return {
        "arch": config["model_type"],
        "num_params": num_params,
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "num_layers": config["num_hidden_layers"],
        "num_heads": config["num_attention_heads"],
    }


def _product(shape) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


# Words the fine-tuning data is made of: speeches, rubrics, tutoring, scores, JSON.
_TOPICS = (
    "climate policy", "school uniforms", "space exploration", "public libraries", "renewable energy",
    "social media", "city transit", "healthy eating", "volunteer work", "online learning",
    "ocean pollution", "local elections", "homework limits", "four day weeks", "museum funding",
)
_CRITERIA = (
    "delivery", "structure", "evidence", "clarity", "eye contact", "pacing", "vocal variety",
    "introduction", "conclusion", "persuasion", "organization", "audience awareness",
)
_FEEDBACK = (
    "Strong opening hook that grabbed attention.",
    "The thesis was clear but the evidence felt thin.",
    "Slow down during the statistics so the audience can follow.",
    "Good use of transitions between the main points.",
    "The conclusion restated the argument without a call to action.",
    "Vary your tone to keep listeners engaged.",
    "Cite a source for each claim you make.",
    "Excellent pacing and confident posture throughout.",
    "Too many filler words such as um and like.",
    "The counterargument was addressed respectfully and well.",
)
_QUESTIONS = (
    ("What is a rubric?", "A rubric lists the criteria and the score levels for each one."),
    ("How long should an introduction be?", "About ten to fifteen percent of the whole speech."),
    ("Why does eye contact matter?", "It builds trust and shows confidence to the audience."),
    ("How can I reduce filler words?", "Pause silently instead, and practise with a recording."),
    ("What makes evidence convincing?", "Recent, relevant sources that the audience can check."),
    ("How do I end a persuasive speech?", "Summarise the main points and give a clear call to action."),
    ("What does a score of 3 mean?", "It means the speech meets expectations on that criterion."),
    ("Can you explain the feedback?", "Sure. Each comment points to one moment in the transcript."),
)


_TRANSCRIPT = (
    "Good morning everyone, thank you for having me here this afternoon.",
    "Imagine waking up tomorrow in a neighbourhood without a single tree.",
    "Last summer our volunteers planted three hundred saplings along the river.",
    "Critics argue the budget is too small, yet the results speak for themselves.",
    "Research published recently shows attendance rose by twelve percent.",
    "My grandmother taught me that patience is a quiet kind of courage.",
    "Let me share a brief story about a student named Priya and her bicycle.",
    "First, consider the cost; second, the benefits; finally, the risks involved.",
    "According to the survey, most families support longer library hours.",
    "Some people believe technology distracts children, but I disagree strongly.",
    "We should invest in cleaner buses, safer crosswalks and wider bike lanes.",
    "Honestly, I was nervous, so I practised in front of a mirror every evening.",
    "In conclusion, small daily habits create remarkable long term change.",
    "Thank you, and I would be happy to answer any questions you might have.",
    "The committee will vote next Thursday after reviewing every proposal.",
    "Every great speech balances emotion, logic and genuine credibility.",
    "Teachers noticed students asked deeper questions during group discussions.",
    "Rehearse aloud, record yourself, then listen carefully for rushed sentences.",
    "Breathing slowly before you begin calms the voice and steadies the hands.",
    "Gestures should feel natural, purposeful and never distracting.",
    "A memorable example beats a long paragraph of abstract statistics.",
    "Your slides were readable, although the charts needed clearer labels.",
    "Try projecting your voice toward the back row of the auditorium.",
    "The judges awarded bonus points for originality and humour.",
    "Please upload the video, the transcript and the self assessment form.",
    "Feedback arrives within two weeks; revisions are due shortly afterwards.",
    "Pronunciation improved noticeably between the first and second drafts.",
    "Humour works best when it supports your message instead of replacing it.",
    "Why should the audience care? Answer that question in your first minute.",
    "Objection handled gracefully: you acknowledged the concern, then responded.",
    "Overall, this was a thoughtful, well organised and engaging presentation.",
    "Weaknesses included monotone delivery, unclear signposting and weak sources.",
)


def tiny_corpus() -> list[str]:
    """A few hundred deterministic lines: transcripts, rubric JSON, tutoring Q&A, digits."""
    lines = []
    for i, (topic, criterion) in enumerate(itertools.product(_TOPICS, _CRITERIA)):
        feedback = _FEEDBACK[i % len(_FEEDBACK)]
        score = i % 5 + 1
        lines.append(f"Speaker {i % 30 + 1}: Today I want to talk about {topic}, and why it matters to you.")
        lines.append(json.dumps({"criterion": criterion, "score": score, "feedback": feedback}))
        lines.append(f"Tutor: Your {criterion} earned a {score} out of 5. {feedback}")
    for question, answer in _QUESTIONS:
        lines.append(f"Student: {question}\nTutor: {answer}")
    scores = {c.replace(" ", "_"): (n * 7) % 10 + 0.5 for n, c in enumerate(_CRITERIA)}
    lines.append(json.dumps({"scores": scores, "total": round(sum(scores.values()), 1)}, indent=2))
    lines.extend(f"{n} {n * 3 % 100}.{n % 10} [{n}, {n + 1}] {{\"id\": {n}}}" for n in range(400))
    lines.extend(f"[{m:02d}:{(7 * m) % 60:02d}] {_TRANSCRIPT[m % len(_TRANSCRIPT)]}" for m in range(60))
    lines.append("0 1 2 3 4 5 6 7 8 9 0123456789 {}[]\":,.!?'-()")
    return lines


# --- a tiny vision-language model --------------------------------------------------------

VLM_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.json",
             "preprocessor_config.json", "generation_config.json")


def make_tiny_vlm(out_dir: str | Path, source: str | Path, seed: int = 0) -> Path:
    """A random 2-layer Qwen2.5-VL with a 2-block vision tower, with the real tokenizer, chat
    template and image processor config of ``source`` (a Qwen2.5-VL model folder without
    weights, e.g. ../shared/models/qwen2.5-vl-instruct)::

        path = make_tiny_vlm(tmp_path / "tiny-vl", "../shared/models/qwen2.5-vl-instruct")
        AutoModelForImageTextToText.from_pretrained(path)    # about 10 M parameters, mostly embeddings

    The token ids (image, video, vision start/end) and the vision geometry (14-pixel patches,
    2x2 merge, 2 frames per temporal patch) are the source's; only the widths and depths shrink.
    """
    import shutil

    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    source, out_dir = Path(source), Path(out_dir)
    real = json.loads((source / "config.json").read_text(encoding="utf-8"))
    if real.get("model_type") != "qwen2_5_vl":
        raise UsageError(f"{source}: model_type {real.get('model_type')!r}; expected a Qwen2.5-VL folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in VLM_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)
    ids = {k: real[k] for k in ("bos_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id",
                                "vision_token_id", "image_token_id", "video_token_id")}
    vision = real["vision_config"]
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": real["vocab_size"], "max_position_embeddings": 4096,
                     "rope_theta": real["rope_theta"], "rms_norm_eps": real["rms_norm_eps"],
                     "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, **ids},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                       "patch_size": vision["patch_size"], "spatial_merge_size": vision["spatial_merge_size"],
                       "temporal_patch_size": vision["temporal_patch_size"], "window_size": vision["window_size"],
                       "fullatt_block_indexes": [1], "tokens_per_second": vision["tokens_per_second"]},
        tie_word_embeddings=True, **ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    return out_dir


# --- a tiny Mistral3 (Mistral-Small-3.1-shaped) -------------------------------------------

# Mistral-Small-3.1's media and system tokens take the ids its tokenizer gives them; the
# Mistral-7B-v0.3 tokenizer has unused control tokens at those ids, renamed here.
MISTRAL3_TOKENS = {10: "[IMG]", 12: "[IMG_BREAK]", 13: "[IMG_END]", 17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]"}

# In the manner of Mistral-Small-3.1's template: a system turn in [SYSTEM_PROMPT]...[/SYSTEM_PROMPT],
# user turns in [INST]...[/INST] with one [IMG] per image part where it stands, an answer ended by
# </s>. Written for the tiny model; no default system message.
MISTRAL3_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
  {%- if message['content'] is string %}
    {%- set parts = [{'type': 'text', 'text': message['content']}] %}
  {%- else %}
    {%- set parts = message['content'] %}
  {%- endif %}
  {%- if message['role'] == 'system' %}
    {{- '[SYSTEM_PROMPT]' }}{% for part in parts %}{{ part['text'] }}{% endfor %}{{ '[/SYSTEM_PROMPT]' }}
  {%- elif message['role'] == 'user' %}
    {{- '[INST]' }}
    {%- for part in parts %}
      {%- if part['type'] == 'text' %}{{ part['text'] }}
      {%- elif part['type'] == 'image' %}{{ '[IMG]' }}
      {%- else %}{{ raise_exception('Mistral3 takes text and image parts only, not ' + part['type']) }}
      {%- endif %}
    {%- endfor %}
    {{- '[/INST]' }}
  {%- elif message['role'] == 'assistant' %}
    {%- generation %}{% for part in parts %}{{ part['text'] }}{% endfor %}{{ eos_token }}{% endgeneration %}
  {%- else %}
    {{- raise_exception('Only system, user and assistant turns are supported') }}
  {%- endif %}
{%- endfor %}"""

# Pixtral's image processing as Mistral-Small-3.1 ships it (CLIP's mean and std, 14-pixel patches).
PIXTRAL_PREPROCESSOR = {
    "image_processor_type": "PixtralImageProcessor", "patch_size": 14, "size": {"longest_edge": 1540},
    "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3}


def make_tiny_mistral3(out_dir: str | Path, source: str | Path, seed: int = 0) -> Path:
    """A random 2-layer Mistral3 with a 2-layer Pixtral tower (14-pixel patches merged 2x2, as
    Mistral-Small-3.1), with ``source``'s tokenizer (a Mistral-7B-v0.3 folder, e.g.
    ../shared/models/mistral-7b-instruct-v0.3) given Mistral-Small-3.1's media and system tokens,
    a template in its manner and a Pixtral image processor config::

        path = make_tiny_mistral3(tmp_path / "tiny-m3", "../shared/models/mistral-7b-instruct-v0.3")
        AutoModelForImageTextToText.from_pretrained(path)    # Mistral3ForConditionalGeneration
    """
    from transformers import AutoModelForImageTextToText, Mistral3Config

    source, out_dir = Path(source), Path(out_dir)
    real = json.loads((source / "config.json").read_text(encoding="utf-8"))
    if real.get("model_type") != "mistral":
        raise UsageError(f"{source}: model_type {real.get('model_type')!r}; expected a Mistral folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    _renamed_tokenizer(source, out_dir, MISTRAL3_TOKENS)
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": MISTRAL3_TEMPLATE}), encoding="utf-8")
    (out_dir / "preprocessor_config.json").write_text(json.dumps(PIXTRAL_PREPROCESSOR, indent=2), encoding="utf-8")
    (out_dir / "processor_config.json").write_text(json.dumps({
        "processor_class": "PixtralProcessor", "patch_size": 14, "spatial_merge_size": 2, "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}, indent=2), encoding="utf-8")
    config = Mistral3Config(
        text_config={"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                     "vocab_size": real["vocab_size"], "max_position_embeddings": 4096,
                     "rope_theta": real["rope_theta"], "rms_norm_eps": real["rms_norm_eps"],
                     "bos_token_id": real["bos_token_id"], "eos_token_id": real["eos_token_id"]},
        vision_config={"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "patch_size": 14, "image_size": 1540},
        image_token_index=10, spatial_merge_size=2, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    return out_dir


def _renamed_tokenizer(source: Path, out_dir: Path, names: dict[int, str]) -> None:
    """``source``'s fast tokenizer with the special tokens at ``names``' ids renamed (and no chat
    template of its own: the model folder's chat_template.json is its template)."""
    tokenizer = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    old = {t["id"]: t["content"] for t in tokenizer["added_tokens"] if t["id"] in names}
    for token in tokenizer["added_tokens"]:
        token["content"] = names.get(token["id"], token["content"])
    vocab = tokenizer["model"]["vocab"]
    for token_id, name in old.items():
        vocab[names[token_id]] = vocab.pop(name)
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
        entry["content"] = names.get(int(token_id), entry["content"])
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    for name in ("special_tokens_map.json", "generation_config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)
