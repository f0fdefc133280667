"""Answers from a fine-tuned model for every eval record: the ``predict`` step of the eval array.

::

    from slurmtune.evaluate.generate import predict_file, merge_shards, merge_adapter

    # one array task: shard 2 of 4 of the eval set, base model + LoRA adapter
    predict_file("models/mistral-7b", "data/eval.jsonl", "eval/shard-2.jsonl",
                 adapter="runs/r1/final", shard=(2, 4))
    # the report job, once every task finished
    merge_shards([f"eval/shard-{i}.jsonl" for i in range(4)], "eval/predictions.jsonl")
    # a standalone model for serving, loadable without peft
    merge_adapter("runs/r1/final", "runs/r1/merged")

Each output record is the input record plus ``actual`` (the model's answer) and
``meta.eval_index`` (its 0-based position in the whole eval file), in input order.
An eval record's prompt is everything before its final assistant turn (or ``prompt``);
the expected answer is ``expected``, else that turn, else ``completion``
(:func:`eval_prompt`, :func:`expected_answer`).

Decoding is greedy, so answers are reproducible and batching must not change them:
prompts are sorted by length and batched with left padding (the answer grows at the
right edge of every row), then put back in input order. Outputs are written
atomically, so an existing output file is a finished shard; a requeued or re-run
task returns at once without loading the model.

torch and transformers are imported inside the functions that need them, so the
metrics and the report can use :func:`eval_prompt` and :func:`expected_answer` cheaply.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from slurmtune.errors import DataError, UsageError
from slurmtune.data.jsonio import AtomicFiles, dumps, iter_records
from slurmtune.data.context import with_context
from slurmtune.data.records import content_text
from slurmtune.data.tools import calls_text, refuse_tools_without_template
from slurmtune.data.adapter_keys import ADAPTER_WEIGHTS

ADAPTER_CONFIG = "adapter_config.json"


# --- what an eval record asks and expects ---------------------------------------------

def eval_prompt(record: dict) -> list[dict] | str:
    """The turns before the final assistant turn (chat), or ``prompt`` (a string or turns)."""
    if "messages" in record:
        messages = record["messages"]
        if messages and messages[-1].get("role") == "assistant":
            return messages[:-1]
        return messages
    return record.get("prompt", "")


def expected_answer(record: dict) -> str | None:
    """``expected``, else the final assistant turn (its tool calls written as the model writes
    them), else ``completion``; None if there is none."""
    if isinstance(record.get("expected"), str):
        return record["expected"]
    messages = record.get("messages")
    if isinstance(messages, list) and messages and messages[-1].get("role") == "assistant":
        final = messages[-1]
        text = content_text(final.get("content"))
        if isinstance(final.get("tool_calls"), list):  # a call turn: the calls as the model writes them
            return "\n".join(t for t in (text, calls_text(final["tool_calls"])) if t)
        return text
    completion = record.get("completion")
    if isinstance(completion, list):
        return content_text(completion[-1].get("content")) if completion else None
    return completion if isinstance(completion, str) else None


def prompt_text(record: dict) -> str:
    """The prompt as plain text (for reports): each turn's text, oldest first, passages included."""
    prompt = eval_prompt(record)
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(with_context(content_text(m.get("content")), m.get("context"))
                       for m in prompt if isinstance(m, dict))


def _check_eval_record(record: Any) -> str | None:
    """Why ``record`` cannot be asked (None when it can)."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "meta" in record and not isinstance(record["meta"], dict):
        return "meta: expected an object"
    prompt = eval_prompt(record)
    if isinstance(prompt, str):
        return None if prompt.strip() else "no prompt; expected 'messages' or 'prompt'"
    if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
        return "no prompt; expected 'messages' with a turn before the final assistant turn"
    return None


def prompt_ids(tokenizer, record: dict) -> list[int]:
    """Token ids the model continues from: the chat template with the assistant's opening
    (turns), or the tokenizer's plain encoding as in training (a string ``prompt``)."""
    from slurmtune.data.chat_format import render

    prompt = eval_prompt(record)
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    return render(tokenizer, prompt, add_generation_prompt=True, tools=record.get("tools"))


# --- loading ----------------------------------------------------------------------------

def resolve_model_paths(model_path, adapter=None, base=None) -> tuple[str, str | None]:
    """(base model, adapter or None). ``model_path`` may be an adapter folder itself; its base is
    then ``base`` or the adapter's ``base_model_name_or_path``."""
    model_path = str(model_path)
    if (Path(model_path) / ADAPTER_CONFIG).is_file():
        if adapter is not None:
            raise UsageError(f"{model_path} is a LoRA adapter, and adapter={adapter} was given too; "
                             "pass the base model folder as the model, or leave adapter out")
        adapter, model_path = model_path, base or _adapter_base(model_path)
    elif base is not None:
        raise UsageError(f"base={base} applies only when the model path is an adapter folder; "
                         f"{model_path} has no {ADAPTER_CONFIG}")
    if adapter is not None and not (Path(adapter) / ADAPTER_CONFIG).is_file():
        raise UsageError(f"{adapter}: no {ADAPTER_CONFIG}; expected a LoRA adapter folder "
                         "(the train step's final/ or a checkpoints/step-NNNNNN/)")
    return model_path, (str(adapter) if adapter is not None else None)


def _adapter_base(adapter_dir) -> str:
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{adapter_dir}/{ADAPTER_CONFIG} names no base_model_name_or_path; "
                         "pass the base model folder explicitly")
    return base


def load_for_generation(model_path, adapter=None, base=None):
    """(model, tokenizer) in eval mode, from local files only: bf16 on a GPU, float32 on CPU.

    ``model_path`` is a model folder (plus an optional ``adapter`` folder), or an adapter
    folder whose base is ``base`` or the one recorded in its ``adapter_config.json``. The
    tokenizer comes from the adapter folder when training saved one there (it may carry a
    chat template the base lacks), else from the base.
    """
    import torch

    from slurmtune.data.chat_format import load_tokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base_path, adapter = resolve_model_paths(model_path, adapter, base)
    cuda = torch.cuda.is_available()
    model = _load_base(base_path, torch.bfloat16 if cuda else torch.float32)
    has_tokenizer = adapter is not None and any(
        (Path(adapter) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(adapter if has_tokenizer else base_path)
    if adapter is not None:
        model = load_adapter(model, adapter)
    if cuda:
        model = model.to("cuda")
    model.eval()
    return model, tokenizer


def load_adapter(model, adapter_dir):
    """``model`` with the LoRA adapter of ``adapter_dir`` (a PeftModel), refusing an adapter whose
    weights do not all land in the model: peft loads a weight whose name matches no module as
    nothing, without an error, and the model then answers as its base does."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    problem = adapter_key_problem(peft_model, adapter_dir)
    if problem:
        raise UsageError(problem)
    return peft_model


def adapter_key_problem(peft_model, adapter_dir) -> str | None:
    """What is wrong when the weights in ``adapter_dir`` are not exactly those ``peft_model`` holds."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not file.is_file():
        return f"{adapter_dir}: no {ADAPTER_WEIGHTS}; expected the adapter's weights (safetensors)"
    saved = load_file(str(file))
    held = get_peft_model_state_dict(peft_model)
    stray = sorted(set(saved) - set(held))
    if stray:
        like = next((k for k in sorted(held) if k.rsplit(".", 3)[-3:] == stray[0].rsplit(".", 3)[-3:]),
                    next(iter(sorted(held)), "none"))
        return (f"{adapter_dir}: {len(stray)} of {len(saved)} adapter weights match no module of the base model, "
                f"e.g. {stray[0]} (the base's own name for such a weight: {like}); the adapter would "
                "change nothing; fix: use the adapter trained on this base, or rename its keys to the base's")
    changed = [k for k, v in saved.items() if not torch.equal(v.to(held[k].dtype), held[k].detach().cpu())]
    if changed:
        return f"{adapter_dir}: {len(changed)} adapter weights did not load as saved, e.g. {changed[0]}"
    return None


def _load_base(path: str, dtype):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from slurmtune.data.vision import is_vision_model

    auto = AutoModelForImageTextToText if is_vision_model(path) else AutoModelForCausalLM
    try:
        return auto.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot load a model from this folder or the local cache ({e}); "
                         "nothing is downloaded on compute nodes: copy the model there first") from None


# --- generating -------------------------------------------------------------------------

def predict(model, tokenizer, records: list[dict], batch_size: int = 8,
            max_new_tokens: int = 256) -> list[str]:
    """Greedy answers to ``records``, in their order (surrounding whitespace stripped)."""
    from slurmtune.progress import progress

    if batch_size < 1:
        raise UsageError(f"batch_size={batch_size}; expected at least 1")
    refuse_tools_without_template(tokenizer, records)  # a prompt without its tools asks another question
    prompts = [prompt_ids(tokenizer, r) for r in records]
    # Similar lengths together: a batch pads only up to its own longest prompt.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    answers: list[str] = [""] * len(records)
    for batch in progress(batches, desc="predict", unit="batches"):
        for i, answer in zip(batch, _generate(model, tokenizer, [prompts[i] for i in batch],
                                              max_new_tokens)):
            answers[i] = answer
    return answers


def _generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    import torch

    config = _greedy_config(model, tokenizer, max_new_tokens)
    width = max(len(p) for p in prompts)
    pad = config.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return _answers(model, tokenizer, {"input_ids": input_ids, "attention_mask": attention_mask}, config)


def predict_vision(model, encoder, records: list[dict], batch_size: int = 8, max_new_tokens: int = 256,
                   source: str = "eval") -> list[str]:
    """Greedy answers of a vision-language model to ``records`` (their images and videos read as
    training read them: slurmtune.data.vision), in their order."""
    from slurmtune.data.vision import with_absolute_media
    from slurmtune.progress import progress

    rows = [encoder.prompt(with_absolute_media({"messages": eval_prompt(r)}, f"{source}:{i}")["messages"],
                           f"{source}:{i}") for i, r in enumerate(records, 1)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    answers: list[str] = [""] * len(records)
    config = _greedy_config(model, encoder.tokenizer, max_new_tokens)
    for batch in progress([order[i:i + batch_size] for i in range(0, len(order), batch_size)],
                          desc="predict", unit="batches"):
        inputs = encoder.collate([rows[i] for i in batch], left=True)
        for i, answer in zip(batch, _answers(model, encoder.tokenizer, inputs, config)):
            answers[i] = answer
    return answers


def _answers(model, tokenizer, inputs: dict, config) -> list[str]:
    """Greedy continuations of a left-padded batch, each up to its first end-of-sequence token."""
    import torch

    width = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(**{k: v.to(model.device) for k, v in inputs.items()}, generation_config=config)
    stops = set(_as_list(config.eos_token_id))
    answers = []
    for row in out[:, width:].tolist():
        end = next((k for k, t in enumerate(row) if t in stops), len(row))
        answers.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return answers


def _greedy_config(model, tokenizer, max_new_tokens: int):
    from transformers import GenerationConfig

    config = GenerationConfig.from_dict(model.generation_config.to_dict())
    # Greedy, whatever sampling the checkpoint's generation_config suggests.
    config.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                  max_new_tokens=max_new_tokens, max_length=None)
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    if eos is None:
        raise UsageError("the model has no end-of-sequence token (generation_config.eos_token_id "
                         "and tokenizer.eos_token are both unset); answers could not stop")
    config.eos_token_id = eos
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else _as_list(eos)[0]
    return config


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


# --- files and shards -------------------------------------------------------------------

def shard_range(total: int, index: int, count: int) -> range:
    """Positions of shard ``index`` of ``count``: contiguous, sizes differ by at most one."""
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"shard=({index}, {count}); expected 0 <= index < count")
    return range(index * total // count, (index + 1) * total // count)


def read_eval_records(path) -> list[dict]:
    """Every record of an eval file; every bad one is reported at once (file:line: why)."""
    records, problems = [], []
    for item in iter_records(path):
        why = item.error or _check_eval_record(item.value)
        if why:
            problems.append((item.line, why))
        else:
            records.append(item.value)
    if problems:
        line, why = problems[0]
        more = "".join(f"\n  line {ln}: {w}" for ln, w in problems[1:10])
        extra = f"\n  ... {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(path, line, f"{why} ({len(problems)} bad record(s)){more}{extra}")
    if not records:
        raise DataError(path, None, "no records; expected eval records to answer")
    return records


def predict_file(model_path, in_file, out_file, adapter=None, base=None,
                 shard: tuple[int, int] | None = None, batch_size: int = 8,
                 max_new_tokens: int = 256, client=None, vision=None, cache_dir=None) -> Path:
    """Answer shard ``index`` of ``count`` of ``in_file`` (all of it without ``shard``) into
    ``out_file``; with ``client`` (slurmtune.evaluate.endpoint.EndpointClient) a running server
    answers instead of a model loaded here; a vision-language model reads its media with the
    ``vision`` settings (slurmtune.data.vision.VisionSettings), frames cached in ``cache_dir``.
    Returns at once, loading nothing, when ``out_file`` already exists: it is written atomically,
    so it exists only once complete."""
    out_file = Path(out_file)
    if out_file.is_file():
        return out_file
    records = read_eval_records(in_file)
    index, count = shard or (0, 1)
    positions = shard_range(len(records), index, count)
    # Media paths made absolute (they were relative to the eval file), so the report finds them.
    mine = [_with_index(_media_absolute(records[i], f"{in_file}:{i + 1}"), i) for i in positions]
    answers: list[str] = []
    if mine and client is not None:
        answers = client.answers(mine, max_new_tokens)
    elif mine:  # more shards than records leaves some empty: nothing to load
        model, tokenizer = load_for_generation(model_path, adapter, base)
        from slurmtune.data.vision import VisionSettings, is_vision_model, load_encoder

        base_path, _ = resolve_model_paths(model_path, adapter, base)
        if is_vision_model(base_path):
            encoder = load_encoder(base_path, vision or VisionSettings(), cache_dir or Path(out_file).parent / "frames")
            answers = predict_vision(model, encoder, mine, batch_size, max_new_tokens, str(in_file))
        else:
            answers = predict(model, tokenizer, mine, batch_size, max_new_tokens)
    _write_jsonl(out_file, ({**r, "actual": a} for r, a in zip(mine, answers)))
    return out_file


def _media_absolute(record: dict, where: str) -> dict:
    from slurmtune.data.vision import with_absolute_media

    return with_absolute_media(record, where) if isinstance(record.get("messages"), list) else record


def _with_index(record: dict, index: int) -> dict:
    return {**record, "meta": {**record.get("meta", {}), "eval_index": index}}


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with AtomicFiles(path.parent) as files:
        out = files.open(path.name)
        for row in rows:
            out.write(dumps(row) + "\n")


def merge_shards(shard_files: list, out_file, total: int | None = None) -> Path:
    """All shards' records in input order (by ``meta.eval_index``) into ``out_file``.
    Fails, naming the indices, when one is missing or appears twice (``total``, when
    given, is the eval file's record count)."""
    rows: dict[int, dict] = {}
    duplicates = []
    for path in shard_files:
        for item in iter_records(path):
            if item.error:
                raise DataError(path, item.line, item.error)
            index = item.value.get("meta", {}).get("eval_index") if isinstance(item.value, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise DataError(path, item.line, "no meta.eval_index; expected the output of predict_file",
                                field="meta.eval_index")
            if index in rows:
                duplicates.append(index)
            rows[index] = item.value
    size = total if total is not None else (max(rows) + 1 if rows else 0)
    missing = [i for i in range(size) if i not in rows]
    extra = [i for i in rows if i >= size]
    if duplicates or missing or extra:
        raise DataError(out_file, None, "cannot merge the shards: "
                        + "; ".join(f"{what} eval_index {_few(ids)}" for what, ids in
                                    (("duplicate", duplicates), ("missing", missing),
                                     ("out-of-range", extra)) if ids)
                        + " (re-run the shards that produced them, or delete stale shard files)")
    _write_jsonl(Path(out_file), (rows[i] for i in range(size)))
    return Path(out_file)


def _few(ids: list[int]) -> str:
    ids = sorted(set(ids))
    return ", ".join(map(str, ids[:10])) + (f" (+{len(ids) - 10} more)" if len(ids) > 10 else "")


# --- merging ----------------------------------------------------------------------------

def merge_adapter(adapter_dir, out_dir, base=None) -> Path:
    """Fold a LoRA adapter into its base and save a standalone model + tokenizer in ``out_dir``,
    loadable with plain ``AutoModelForCausalLM.from_pretrained`` (no peft).

    The base loads in its checkpoint's own dtype (what the adapter trained against); the
    folder appears only when complete (written beside it, then renamed).
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise UsageError(f"{out_dir} already exists; choose a new folder for the merged model")
    model, tokenizer = load_to_merge(adapter_dir, base)
    return save_merged(model, tokenizer, out_dir, media_files(adapter_dir, base))


def load_to_merge(adapter_dir, base=None):
    """(the base with the adapter, as a PeftModel, in the base checkpoint's dtype; the tokenizer
    training saved beside the adapter, else the base's)."""
    from slurmtune.data.chat_format import load_tokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    adapter_dir = Path(adapter_dir)
    base_path, _ = resolve_model_paths(adapter_dir, base=base)
    model = _load_base(base_path, "auto")
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    return load_adapter(model, adapter_dir), load_tokenizer(str(adapter_dir) if has_tokenizer else base_path)


def media_files(adapter_dir, base=None) -> list[Path]:
    """A vision model's image processor config and media chat template: the adapter's (training
    copies them beside it), else its base's; [] for a text model."""
    from slurmtune.data.vision import PROCESSOR_FILES

    base_path, _ = resolve_model_paths(adapter_dir, base=base)
    found = []
    for name in PROCESSOR_FILES:
        source = next((f for f in (Path(adapter_dir) / name, Path(base_path) / name) if f.is_file()), None)
        found += [source] if source else []
    return found


def save_merged(peft_model, tokenizer, out_dir, also: list[Path] = ()) -> Path:
    """The adapter folded into its base, saved with the tokenizer (and the files ``also`` names,
    e.g. media_files); ``out_dir`` appears only complete."""
    out_dir = Path(out_dir)
    merged = peft_model.merge_and_unload()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for source in also:
            shutil.copy2(source, tmp / Path(source).name)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir

