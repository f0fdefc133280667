"""Training files -> canonical records -> one ``datasets.Dataset``, the way the trainer sees them.

::

    data = read_train_files(["data/train.jsonl", "extra_alpaca.jsonl"])
    data.kind                      # 'chat' or 'prompt-completion'
    data.files                     # [DataFile(path, format, rows, sha256, excluded), ...]
    dataset = to_dataset(data, tokenizer, loss_on="assistant")
    # chat: `input_ids` + `assistant_masks` (tokenized here); prompt-completion: `prompt`, `completion`

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
as they are, or, when the assistant's tokens are found by rendering each turn
(slurmtune.data.templates), when only the reshaped conversation renders each
turn's prompt as the start of the conversation; decided once per sequence of roles.

Chat rows are tokenized here, not by TRL: :func:`to_dataset` writes each row's
``input_ids`` and, for ``train.loss_on=assistant``, its ``assistant_masks``,
from :func:`encode` — the function the login-node preflight counts with, so the
two agree token for token. TRL 1.16's SFTTrainer takes a dataset with an
``input_ids`` column as tokenized: it turns ``assistant_masks`` into ``labels``
(-100 elsewhere), truncates to ``max_length`` keeping the start, and packs
(``packing``, padding-free) the same columns. Prompt-completion rows are left
to TRL; :func:`encode` mirrors its preprocessing for them (template, completion
mask from where prompt and prompt+completion diverge, EOS after a plain
completion), so the preflight counts without importing TRL (~8 s).
:func:`count_trained_tokens` is the preflight's check: no trained token at all
(the answer cut off by ``max_length``, markers that enclose nothing), every
token trained although only the assistant's were asked for, or a template whose
renderings do not show where the assistant's tokens are, are errors that say the fix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slurmtune.data.chat_format import to_template_messages
from slurmtune.data.templates import (
    FIX, TurnNotFound, assistant_mask, choose_chat_template, common_prefix, has_generation_markers, own_template,
)
from slurmtune.data.converters import get_converter
from slurmtune.data.converters.base import Excluded, Rejected, Where
from slurmtune.data.tools import refuse_tools_without_template
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
    where: list[str] = field(default_factory=list)  # each record's "file:line" (when read from files)

    def row(self, number: int) -> str:
        """Record ``number`` (from 1) as messages name it: its file and line when known."""
        return self.where[number - 1] if len(self.where) == len(self.records) else f"record {number}"


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
        out.records += [record for record, _ in records]
        out.where += [where for _, where in records]
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
    records: list[tuple[dict, str]] = []  # (record, its file:line)
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
        where = Where.of(path, item)
        try:
            for _, record in converter.convert(item.value, where):
                records.append((trainable_body(record), where.place))
        except Rejected as r:
            problems += [where.location(name or None, message) for name, message in r.problems]
        except Excluded:
            excluded += 1
    if fmt is None:
        problems.append(f"{path}: no records")
        return None, [], None
    sha = file_sha256(path) if budget is None else None
    return fmt, records, DataFile(str(path), fmt, rows, sha, excluded)


def trainable_body(record: dict) -> dict:
    """Only what trains: eval fields and meta stay out of the dataset (mixed types break Arrow)."""
    if "messages" in record:
        return {"messages": record["messages"], **({"tools": record["tools"]} if record.get("tools") else {})}
    return {"prompt": record["prompt"], "completion": record["completion"]}


def _check_prompt_shapes(data: TrainRecords) -> None:
    if data.kind != "prompt-completion":
        return
    shapes = {isinstance(r["prompt"], list) for r in data.records}
    if len(shapes) > 1:
        raise UsageError("prompt-completion rows mix plain-text prompts and message-list prompts; "
                         "fix: use one form in all training files")


# --- the dataset the trainer reads ------------------------------------------------------

def to_dataset(data: TrainRecords, tokenizer, loss_on: str, max_length: int | None = None):
    """A ``datasets.Dataset`` the way TRL 1.16's SFTTrainer takes it. Chat rows are tokenized
    here: ``input_ids``, and with ``loss_on="assistant"`` an ``assistant_masks`` column (the
    tokens :func:`count_trained_tokens` counts, one for one). Prompt-completion rows stay
    ``prompt`` and ``completion``, fitted to the template, for TRL to tokenize. With
    ``max_length``, rows with passages that it would cut are refused (:func:`refuse_cut_passages`)."""
    from datasets import Dataset

    refuse_media_rows(data)
    if data.kind == "chat":
        encoded = encode_records(tokenizer, data, loss_on)
        if max_length is not None:
            refuse_cut_passages(data, encoded, max_length)
        rows = [{"input_ids": ids, "assistant_masks": [int(t) for t in flags]} if loss_on == "assistant"
                else {"input_ids": ids} for ids, flags in encoded.rows]
    else:
        fit = TemplateFit(tokenizer)
        rows = [fit.prompt_completion(r) for r in data.records]
    return Dataset.from_list(rows)


class TemplateFit:
    """Messages with string contents, folded for strict templates only when needed.

    Folded when the template rejects the conversation as it is, and, with
    ``computed_masks``, when only the folded shape renders each assistant turn's
    prompt as the start of the conversation (Mistral's later template shows the
    system prompt only with the last user turn). Both depend on the sequence of
    roles, so the answer is remembered per sequence (renders per shape, not per row)."""

    def __init__(self, tokenizer=None, computed_masks: bool = False):
        self.tokenizer = tokenizer
        self.computed_masks = computed_masks
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
            self._strict[roles] = self._strict_shape_needed(messages)
        return self._strict[roles]

    def _strict_shape_needed(self, messages: list[dict]) -> bool:
        as_is = to_template_messages(messages, strict=False)
        if not self._renders(as_is):
            return True
        if not self.computed_masks or self._lines_up(as_is):
            return False
        strict = to_template_messages(messages, strict=True)
        # Folded only if that helps; otherwise encoding reports the shape the data has.
        return strict != as_is and self._renders(strict) and self._lines_up(strict)

    def _renders(self, messages: list[dict]) -> bool:
        try:
            self.tokenizer.apply_chat_template(messages, tokenize=False)
            return True
        except Exception:  # jinja2 TemplateError raised by the model's own template
            return False

    def _lines_up(self, messages: list[dict]) -> bool:
        try:
            assistant_mask(self.tokenizer, messages)
            return True
        except TurnNotFound:
            return False


# --- tokens the loss falls on ----------------------------------------------------------

@dataclass
class Encoded:
    rows: list[tuple[list[int], list[bool]]]  # (input ids, trained flags) per record, untruncated
    merged: int = 0  # assistant-turn boundaries inside a token (computed masks; that token is trained)


def encode_records(tokenizer, data: TrainRecords, loss_on: str) -> Encoded:
    """Every record fitted and encoded as training sees it, before truncation. Raises one
    UsageError, with the fix, when the template's renderings do not show the assistant's tokens."""
    computed = data.kind == "chat" and loss_on == "assistant" and not has_generation_markers(own_template(tokenizer))
    fit = TemplateFit(tokenizer, computed_masks=computed)
    out, problems = Encoded([]), []
    if data.kind == "chat":
        refuse_tools_without_template(tokenizer, data.records)
    for number, record in enumerate(data.records, 1):
        row = ({"messages": fit.messages(record["messages"]), "tools": record.get("tools")} if data.kind == "chat"
               else fit.prompt_completion(record))
        try:
            ids, flags, merged = _encode(tokenizer, row, data.kind, loss_on)
        except TurnNotFound as e:
            problems.append(f"record {number}, {e}")
            continue
        out.rows.append((ids, flags))
        out.merged += merged
    if problems:
        raise UsageError(
            "train.loss_on=assistant: the assistant's tokens cannot be found with this chat template: it has no "
            "{% generation %} markers, and the prompt of an assistant turn rendered alone (add_generation_prompt="
            "True, as at inference) is not the start of the conversation rendered with the turn, in "
            f"{len(problems)} of {len(data.records)} records (first: {problems[0]}; also tried with the system "
            f"text folded into the first user turn); {FIX}")
    return out


def encode(tokenizer, record: dict, kind: str, loss_on: str, max_length: int | None) -> tuple[list[int], list[bool]]:
    """(input ids, trained flags) of one fitted record, as TRL 1.16's SFTTrainer trains on it."""
    ids, trained, _ = _encode(tokenizer, record, kind, loss_on)
    if max_length is not None:  # truncation keeps the start, as TRL's default truncation_mode
        ids, trained = ids[:max_length], trained[:max_length]
    return ids, trained


def refuse_media_rows(data: TrainRecords) -> None:
    """The text recipe sees an image or a video only as a placeholder word: trained on such a row,
    the model learns answers about media it never saw. Refused, naming the rows."""
    from slurmtune.data.records import media_paths
    rows = [(n, media_paths(r)) for n, r in enumerate(data.records, 1)]
    rows = [(n, found) for n, found in rows if found]
    if rows:
        named = ", ".join(f"{data.row(n)}: {found[0][0]}" for n, found in rows[:5])
        more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        raise UsageError(f"{len(rows)} row(s) have image or video parts ({named}{more}), and the text recipe would "
                         "train on placeholder words instead of the media; fix: model.path = a vision-language "
                         "model (Qwen2.5-VL: the vision recipe), or train on text-only rows")


def _encode(tokenizer, record: dict, kind: str, loss_on: str) -> tuple[list[int], list[bool], int]:
    if kind == "chat":
        return _encode_chat(tokenizer, record["messages"], loss_on == "assistant", record.get("tools"))
    return (*_encode_prompt_completion(tokenizer, record, loss_on == "assistant"), 0)


def _encode_chat(tokenizer, messages: list[dict], assistant_only: bool, tools: list[dict] | None = None):
    kwargs = {"tools": tools} if tools else {}
    if assistant_only and not has_generation_markers(own_template(tokenizer)):
        turn = assistant_mask(tokenizer, messages, **kwargs)
        return turn.ids, [bool(m) for m in turn.mask], turn.merged
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=assistant_only, **kwargs)
    ids = list(out["input_ids"])
    if not assistant_only:
        return ids, [True] * len(ids), 0
    return ids, [bool(m) for m in out["assistant_masks"]], 0


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
    start = common_prefix(prompt_ids, ids)  # the completion starts where the two diverge
    if not completion_only:
        return ids, [True] * len(ids)
    return ids, [i >= start for i in range(len(ids))]


def _ids(out: Any) -> list[int]:
    return list(out["input_ids"])


# --- the preflight: what would be trained ---------------------------------------------

def count_trained_tokens(cfg, tokenizer, data: TrainRecords, template: str = "") -> dict:
    """Tokens and trained tokens of ``data`` as training prepares them (the preflight's numbers).
    Raises UsageError when nothing, or everything despite loss_on=assistant, would be trained,
    when the template's renderings do not show the assistant's tokens, or when rows carry
    media the text recipe cannot see (:func:`refuse_media_rows`)."""
    loss_on, max_length = cfg.train.loss_on, cfg.train.max_length
    refuse_media_rows(data)
    encoded = encode_records(tokenizer, data, loss_on)
    refuse_cut_passages(data, encoded, max_length)
    total = trained = truncated = empty = 0
    for _, flags in encoded.rows:
        kept = flags[:max_length]  # TRL keeps the start, with and without packing ('bfd' truncates)
        total += len(kept)
        trained += sum(kept)
        truncated += len(flags) > max_length
        empty += not any(kept)
    report = {"rows": len(encoded.rows), "tokens": total, "trained_tokens": trained,
              "trained_share": trained / total if total else 0.0, "rows_truncated": truncated,
              "rows_without_trained_tokens": empty, "max_length": max_length, "kind": data.kind,
              "loss_on": loss_on, "template": template, "boundaries_merged": encoded.merged}
    if trained == 0:
        raise UsageError(_nothing_trained(data, encoded.rows, max_length))
    if loss_on == "assistant" and trained == total:
        raise UsageError(_everything_trained(data.kind, len(encoded.rows)))
    return report


def refuse_cut_passages(data: TrainRecords, encoded: Encoded, max_length: int) -> None:
    """Rows with retrieved passages are never truncated: the answer comes last, so cutting
    the row cuts the answer (or all of it), and the model learns to stop mid-sentence."""
    from slurmtune.data.context import has_context
    if data.kind != "chat":
        return
    over = [(number, len(ids)) for number, (record, (ids, _)) in enumerate(zip(data.records, encoded.rows), 1)
            if len(ids) > max_length and has_context(record)]
    if over:
        rows = ", ".join(f"{data.row(n)}: {tokens} tokens" for n, tokens in over[:5])
        more = f" and {len(over) - 5} more" if len(over) > 5 else ""
        raise UsageError(f"train.max_length {max_length} would cut the answer of {len(over)} row(s) with passages "
                         f"({rows}{more}); fix: raise train.max_length to at least {max(t for _, t in over)}, "
                         "or give those rows fewer or shorter passages")


def _nothing_trained(data, encoded, max_length: int) -> str:
    part = "assistant turn" if data.kind == "chat" else "completion"
    first = [flags.index(True) for _, flags in encoded if True in flags]
    if not first:
        why = ("the chat template's {% generation %} markers enclose no token of the assistant turns"
               if data.kind == "chat" else "every completion is empty")
        fix = ("fix: set model.chat_template to a template whose markers enclose each assistant message and its "
               "end-of-turn token (or a template without markers: the assistant's tokens are then found by "
               "rendering each turn), or train.loss_on=all" if data.kind == "chat"
               else "fix: check the completions of the training files")
        return f"zero trained tokens in the first {len(encoded)} rows: {why}; {fix}"
    return (f"zero trained tokens in the first {len(encoded)} rows: the {part} is truncated by max_length "
            f"{max_length} (it starts at token {min(first)} or later); fix: raise train.max_length above "
            f"{max(first)}, or shorten the prompts")


def _everything_trained(kind: str, rows: int) -> str:
    if kind == "chat":
        return (f"every token of the first {rows} rows would be trained although train.loss_on=assistant: "
                "the chat template's {% generation %} markers wrap more than the assistant turns; fix: use a "
                "template that marks only assistant content and its end-of-turn token (or no markers at all: "
                "the assistant's tokens are then found by rendering each turn), or set train.loss_on=all if "
                "training on prompts is intended")
    return (f"every token of the first {rows} rows would be trained although train.loss_on=assistant: the "
            "prompts are empty; fix: put the input in `prompt`, or set train.loss_on=all")


# --- the tokenizer training uses --------------------------------------------------------

def prepare_tokenizer(cfg, kind: str, tokenizer=None):
    """The model's tokenizer (or ``tokenizer``, e.g. a tiny model's not built yet) with the chat
    template training uses; (tokenizer, description)."""
    from slurmtune.data.chat_format import load_tokenizer

    if tokenizer is None:
        if not (Path(cfg.model.path) / "config.json").is_file():
            raise UsageError(f"model.path: {cfg.model.path}: no such model folder (no config.json); expected a "
                             "local folder or Hugging Face cache snapshot: compute nodes cannot download")
        tokenizer = load_tokenizer(cfg.model.path)
    if kind == "chat" or cfg.model.chat_template:
        description = choose_chat_template(tokenizer, cfg.model.chat_template,
                                           assistant_only=kind == "chat" and cfg.train.loss_on == "assistant")
    else:
        description = "the model's chat template"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # what TRL would pick; set here so preflight agrees
    return tokenizer, description
