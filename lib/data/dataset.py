"""Training files -> canonical records -> one ``datasets.Dataset``, the way the trainer sees them.

::

    data = read_train_files(["data/train.jsonl", "extra_alpaca.jsonl"])
    data.kind                      # 'chat' or 'prompt-completion'
    data.files                     # [DataFile(path, format, rows, sha256, excluded), ...]
    dataset = to_dataset(data, tokenizer)   # a `messages` column, or `prompt` and `completion`

    ids, trained = encode(tokenizer, data.records[0], data.kind, loss_on="assistant", max_length=1024)

    tokenizer, template = prepare_tokenizer(cfg, data.kind)   # with the template training uses
    count_trained_tokens(cfg, tokenizer, data)   # {'tokens': 812, 'trained_tokens': 203, ...}

Each file may be chat, prompt-completion or alpaca JSONL; its format is detected
from its first record and every row goes through that format's converter, so
training reads exactly what ``slurmtune convert`` would have written. One run
trains one kind of record: chat and prompt-completion files cannot be mixed
(their losses are masked differently).

Chat messages keep string contents. They are reshaped for strict templates
(Mistral's refuses a system turn) only when the model's template rejects them
as they are, decided once per sequence of roles.

:func:`encode` mirrors TRL 1.16's SFT preprocessing (tokenize with the chat
template, assistant or completion mask, EOS after a plain completion, truncation
to ``max_length``), so the login-node preflight counts the tokens training will
train on without importing TRL (~8 s). :func:`count_trained_tokens` is the
preflight's check: no trained token at all (no generation markers, or the
answer cut off by ``max_length``) or every token trained although only the
assistant's were asked for are errors that say the fix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slurmtune.data.chat_format import to_template_messages
from slurmtune.data.converters import get_converter
from slurmtune.data.converters.base import Excluded, Rejected, Where
from slurmtune.errors import DataError, UsageError, format_location
from slurmtune.data.jsonio import check_input_file, is_json_document, iter_records, non_blank
from slurmtune.data.validate import detect_format

TRAINABLE_FORMATS = ("chat", "prompt-completion", "alpaca")
# What each format becomes once converted.
KIND_OF_FORMAT = {"chat": "chat", "alpaca": "chat", "prompt-completion": "prompt-completion"}
MAX_PROBLEMS_SHOWN = 10


@dataclass(frozen=True)
class DataFile:
    """One training file, as lineage records it."""

    path: str
    format: str
    rows: int  # records in the file
    sha256: str | None  # None when only the first rows were read (preflight)
    excluded: int = 0  # rows whose consent/demo flags keep them out of training


@dataclass
class TrainRecords:
    kind: str  # 'chat' or 'prompt-completion'
    records: list[dict] = field(default_factory=list)  # canonical bodies, without meta
    files: list[DataFile] = field(default_factory=list)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def count_rows(path: str | Path) -> int:
    """Records in a JSONL file or JSON document (blank lines are not rows)."""
    return sum(1 for _ in non_blank(iter_records(path)))


def read_train_files(paths: list[str], limit: int | None = None) -> TrainRecords:
    """Canonical records of ``paths`` in file order; with ``limit``, only the first rows
    (no hashing: the preflight must stay fast). Every bad row is reported at once."""
    if not paths:
        raise UsageError("no training files given; set data.train_files (or run the convert step first)")
    kinds: dict[str, str] = {}
    out = TrainRecords(kind="")
    problems: list[str] = []
    for name in paths:
        if limit is not None and len(out.records) >= limit:
            break
        budget = None if limit is None else limit - len(out.records)
        fmt, records, data_file = _read_file(name, budget, problems)
        if fmt is None:
            continue
        kinds[name] = KIND_OF_FORMAT[fmt]
        out.records += records
        out.files.append(data_file)
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise UsageError(f"{len(problems)} problem(s) in the training data:\n  " + "\n  ".join(shown) + more)
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{Path(p).name} ({k})" for p, k in kinds.items())
        raise UsageError(f"training files mix chat and prompt-completion records: {listing}; "
                         "fix: train one kind per run, or convert the prompt-completion rows to chat")
    out.kind = next(iter(kinds.values()), "chat")
    if not out.records:
        raise UsageError(f"no trainable rows in {', '.join(paths)}")
    _check_prompt_shapes(out)
    return out


def _read_file(name: str, budget: int | None, problems: list[str]):
    try:
        path = check_input_file(name)
    except DataError as e:
        problems.append(str(e))
        return None, [], None
    converter, fmt = None, None
    records: list[dict] = []
    rows = excluded = 0
    for item in non_blank(iter_records(path)):
        if budget is not None and rows >= budget:
            break
        rows += 1
        if item.error:
            problems.append(format_location(path, item.line, None, item.error))
            continue
        if converter is None:
            fmt = detect_format(item.value, is_json_document(path))
            if fmt not in TRAINABLE_FORMATS:
                raise UsageError(f"{path}: looks like {fmt!r} data, not chat, prompt-completion or alpaca; "
                                 f"fix: run `slurmtune convert {fmt} {path} --out DIR` and train on DIR/train.jsonl")
            converter = get_converter(fmt)()
        try:
            for _, record in converter.convert(item.value, Where(path, item.line)):
                records.append(_body(record))
        except Rejected as r:
            problems.append(format_location(path, item.line, r.field or None, r.message))
        except Excluded:
            excluded += 1
    if fmt is None:
        problems.append(f"{path}: no records")
        return None, [], None
    sha = file_sha256(path) if budget is None else None
    return fmt, records, DataFile(str(path), fmt, rows, sha, excluded)


def _body(record: dict) -> dict:
    """Only what trains: eval fields and meta stay out of the dataset (mixed types break Arrow)."""
    if "messages" in record:
        return {"messages": record["messages"]}
    return {"prompt": record["prompt"], "completion": record["completion"]}


def _check_prompt_shapes(data: TrainRecords) -> None:
    if data.kind != "prompt-completion":
        return
    shapes = {isinstance(r["prompt"], list) for r in data.records}
    if len(shapes) > 1:
        raise UsageError("prompt-completion rows mix plain-text prompts and message-list prompts; "
                         "fix: use one form in all training files")


# --- the dataset the trainer reads ------------------------------------------------------

def to_dataset(data: TrainRecords, tokenizer=None):
    """A ``datasets.Dataset`` of the records, messages fitted to ``tokenizer``'s template."""
    from datasets import Dataset

    fit = TemplateFit(tokenizer)
    if data.kind == "chat":
        rows = [{"messages": fit.messages(r["messages"])} for r in data.records]
    else:
        rows = [fit.prompt_completion(r) for r in data.records]
    return Dataset.from_list(rows)


class TemplateFit:
    """Messages with string contents, folded for strict templates only when needed.

    Whether a template accepts a conversation depends on its sequence of roles, so
    the answer is remembered per sequence (one render per shape, not per row)."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self._strict: dict[tuple, bool] = {}

    def messages(self, messages: list[dict]) -> list[dict]:
        return to_template_messages(messages, strict=self.needs_strict(messages))

    def prompt_completion(self, record: dict) -> dict:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, list):
            return {"prompt": prompt, "completion": completion}
        completion = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        strict = self.needs_strict(prompt + completion)
        # Folding happens in the prompt (system turn, merged user turns); the completion stays as it is.
        return {"prompt": to_template_messages(prompt, strict=strict),
                "completion": to_template_messages(completion, strict=False)}

    def needs_strict(self, messages: list[dict]) -> bool:
        if self.tokenizer is None or getattr(self.tokenizer, "chat_template", None) is None:
            return False
        roles = tuple(m.get("role") for m in messages)
        if roles not in self._strict:
            self._strict[roles] = not self._renders(to_template_messages(messages, strict=False))
        return self._strict[roles]

    def _renders(self, messages: list[dict]) -> bool:
        try:
            self.tokenizer.apply_chat_template(messages, tokenize=False)
            return True
        except Exception:  # jinja2 TemplateError raised by the model's own template
            return False


# --- tokens the loss falls on ----------------------------------------------------------

def encode(tokenizer, record: dict, kind: str, loss_on: str, max_length: int | None) -> tuple[list[int], list[bool]]:
    """(input ids, trained flags) of one fitted record, as TRL 1.16's SFTTrainer prepares it."""
    if kind == "chat":
        ids, trained = _encode_chat(tokenizer, record["messages"], loss_on == "assistant")
    else:
        ids, trained = _encode_prompt_completion(tokenizer, record, loss_on == "assistant")
    if max_length is not None:  # truncation keeps the start, as TRL's default truncation_mode
        ids, trained = ids[:max_length], trained[:max_length]
    return ids, trained


def _encode_chat(tokenizer, messages: list[dict], assistant_only: bool):
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=assistant_only)
    ids = list(out["input_ids"])
    if not assistant_only:
        return ids, [True] * len(ids)
    return ids, [bool(m) for m in out["assistant_masks"]]


def _encode_prompt_completion(tokenizer, record: dict, completion_only: bool):
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list):
        prompt_ids = _ids(tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                                        add_generation_prompt=True))
        ids = _ids(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True))
    else:
        eos = tokenizer.eos_token or ""
        if not completion.endswith(eos):
            completion += eos  # TRL appends EOS to plain-text completions
        prompt_ids = _ids(tokenizer(text=prompt))
        ids = _ids(tokenizer(text=prompt + completion))
    start = _common_prefix(prompt_ids, ids)  # the completion starts where the two diverge
    if not completion_only:
        return ids, [True] * len(ids)
    return ids, [i >= start for i in range(len(ids))]


def _ids(out: Any) -> list[int]:
    return list(out["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --- the preflight: what would be trained ---------------------------------------------

def count_trained_tokens(cfg, tokenizer, data: TrainRecords, template: str = "") -> dict:
    """Tokens and trained tokens of ``data`` as training prepares them (the preflight's numbers).
    Raises UsageError when nothing, or everything despite loss_on=assistant, would be trained."""
    loss_on, max_length = cfg.train.loss_on, cfg.train.max_length
    fit = TemplateFit(tokenizer)
    rows = [{"messages": fit.messages(r["messages"])} if data.kind == "chat" else fit.prompt_completion(r)
            for r in data.records]
    encoded = [encode(tokenizer, r, data.kind, loss_on, None) for r in rows]
    total = trained = truncated = empty = 0
    for _, flags in encoded:
        kept = flags[:max_length]
        total += len(kept)
        trained += sum(kept)
        truncated += len(flags) > max_length
        empty += not any(kept)
    report = {"rows": len(rows), "tokens": total, "trained_tokens": trained,
              "trained_share": trained / total if total else 0.0, "rows_truncated": truncated,
              "rows_without_trained_tokens": empty, "max_length": max_length, "kind": data.kind,
              "loss_on": loss_on, "template": template}
    if trained == 0:
        raise UsageError(_nothing_trained(data, encoded, max_length))
    if loss_on == "assistant" and trained == total:
        raise UsageError(_everything_trained(data.kind, len(rows)))
    return report


def _nothing_trained(data, encoded, max_length: int) -> str:
    part = "assistant turn" if data.kind == "chat" else "completion"
    first = [flags.index(True) for _, flags in encoded if True in flags]
    if not first:
        why = ("the chat template has no {% generation %} markers around assistant turns"
               if data.kind == "chat" else "every completion is empty")
        fix = ("fix: set model.chat_template to a template with {% generation %} markers "
               "(see manifests/templates/), or train.loss_on=all" if data.kind == "chat"
               else "fix: check the completions of the training files")
        return f"zero trained tokens in the first {len(encoded)} rows: {why}; {fix}"
    return (f"zero trained tokens in the first {len(encoded)} rows: the {part} is truncated by max_length "
            f"{max_length} (it starts at token {min(first)} or later); fix: raise train.max_length above "
            f"{max(first)}, or shorten the prompts")


def _everything_trained(kind: str, rows: int) -> str:
    if kind == "chat":
        return (f"every token of the first {rows} rows would be trained although train.loss_on=assistant: "
                "the chat template's {% generation %} markers wrap more than the assistant turns; fix: use a "
                "template that marks only assistant content (see manifests/templates/), or set "
                "train.loss_on=all if training on prompts is intended")
    return (f"every token of the first {rows} rows would be trained although train.loss_on=assistant: the "
            "prompts are empty; fix: put the input in `prompt`, or set train.loss_on=all")


# --- the tokenizer training uses --------------------------------------------------------

def prepare_tokenizer(cfg, kind: str):
    """The model's tokenizer with the chat template training uses; (tokenizer, description)."""
    from slurmtune.data.chat_format import load_tokenizer

    ensure_model(cfg)
    tokenizer = load_tokenizer(cfg.model.path)
    override = cfg.model.chat_template
    if kind == "chat" and cfg.train.loss_on == "assistant":
        from slurmtune.data.templates import ensure_generation_template
        description = ensure_generation_template(tokenizer, override)
    elif override:
        tokenizer.chat_template = Path(override).read_text(encoding="utf-8")
        description = f"chat template from {override}"
    else:
        description = "the model's chat template"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # what TRL would pick; set here so preflight agrees
    return tokenizer, description


def ensure_model(cfg) -> None:
    """The model folder exists (a tiny demo model is built when ``model.tiny_arch`` asks for it)."""
    path = Path(cfg.model.path)
    if (path / "config.json").is_file():
        return
    if cfg.model.tiny_arch:
        from slurmtune.train.tiny_model import make_tiny_model
        make_tiny_model(path, arch=cfg.model.tiny_arch)
        return
    raise UsageError(f"model.path: {path} is not a model folder (no config.json); expected a local folder "
                     "or Hugging Face cache snapshot: compute nodes cannot download")
