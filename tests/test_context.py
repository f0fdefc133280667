"""Retrieval-context records: every malformed passage list is one line, passages render one
documented way and never carry loss (Qwen2.5's real template), and a row whose answer
``max_length`` would cut is refused, never truncated."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from conftest import EXAMPLES, REPO, read_jsonl, write_jsonl
from slurmtune.data.chat_format import load_tokenizer, render, to_template_messages
from slurmtune.data.context import cited_ids, given_ids
from slurmtune.data.dataset import _encode_chat, count_trained_tokens, read_train_files
from slurmtune.errors import UsageError

MODELS = REPO.parent / "shared" / "models"
GOOD = read_jsonl(EXAMPLES / "course_assistant" / "rag_sft.jsonl")[0]


def with_context(context, role="user"):
    row = copy.deepcopy(GOOD)
    turn = next(m for m in row["messages"] if m["role"] == role)
    turn["context"] = context
    return row


def test_every_malformed_passage_list_is_one_line(cli, tmp_path):
    passage = {"id": "syl-3", "text": "Lab reports are due one week after the lab."}
    rows = [with_context([]),
            with_context([passage, {"id": "syl-3", "text": "again"}]),
            with_context([{"id": "syl 3", "text": "x"}, {"id": "n-1", "text": " "}]),
            with_context(["syl-3"]),
            with_context([passage], role="assistant")]
    src = write_jsonl(tmp_path / "rag.jsonl", rows)
    r = cli("validate", src)
    assert r.code == 1
    at = "messages[1].context"
    assert r.out.splitlines()[:-2] == [
        f"{src}:1: {at}: expected a non-empty list of {{id, text}} passages, got an empty list",
        f"{src}:2: {at}[1].id: 'syl-3' is given twice in this turn; expected unique ids",
        f"{src}:3: {at}[0].id: 'syl 3' is not a passage id; expected a string of letters, digits and "
        ". _ : / - (no spaces: answers cite it as [id])",
        f"{src}:3: {at}[1].text: expected the passage's text, got an empty string",
        f"{src}:4: {at}[0]: expected an object {{id, text}}, got a string",
        f"{src}:5: messages[2].context: passages on a 'assistant' turn; expected them on the user turn they answer",
    ]
    r = cli("convert", "chat", src, "--out", tmp_path / "out")
    assert r.code == 1 and f"  {src}:2: {at}[1].id: 'syl-3' is given twice" in r.err


def test_passages_open_the_user_turn_in_the_documented_shape():
    user = to_template_messages(GOOD["messages"])[1]
    assert user == {"role": "user", "content": (
        "Passages:\n"
        "[syl-3] Lab reports are due at 23:59 one week after the lab session, submitted as a PDF on the course site.\n"
        "[syl-7] The final exam is closed book; one handwritten A4 formula sheet (both sides) is allowed.\n"
        "\n"
        "When is my lab report due?")}
    assert given_ids(GOOD) == ["syl-3", "syl-7"]
    assert cited_ids("Due in a week [syl-3], see [syl-3] and [notes-5.2]; [not an id]") == ["syl-3", "notes-5.2"]


@pytest.fixture(scope="module")
def qwen():
    assert MODELS.is_dir(), f"{MODELS} is missing: the tests need ../shared/models beside the clone"
    return load_tokenizer(MODELS / "qwen2.5-instruct")


def test_only_the_answer_is_trained_never_the_passages(qwen):
    ids, flags, _ = _encode_chat(qwen, to_template_messages(GOOD["messages"]), True)
    trained = [t for t, f in zip(ids, flags) if f]
    assert qwen.decode(trained) == GOOD["messages"][2]["content"] + "<|im_end|>"
    assert "Passages:\n[syl-3] Lab reports" in qwen.decode(ids)


def _cfg(max_length):
    return SimpleNamespace(train=SimpleNamespace(loss_on="assistant", max_length=max_length))


def test_a_row_whose_answer_max_length_would_cut_is_refused(qwen, cli):
    src = EXAMPLES / "course_assistant" / "rag_sft.jsonl"
    rows = read_jsonl(src)
    data = read_train_files([str(src)])
    lengths = [len(render(qwen, r["messages"])) for r in rows]
    assert count_trained_tokens(_cfg(max(lengths)), qwen, data)["rows_truncated"] == 0
    limit = sorted(lengths)[-3]  # the two longest rows are over it
    over = sorted((n, t) for n, t in enumerate(lengths, 1) if t > limit)
    with pytest.raises(UsageError) as e:
        count_trained_tokens(_cfg(limit), qwen, data)
    assert str(e.value) == (
        f"train.max_length {limit} would cut the answer of 2 row(s) with passages ({src}:{over[0][0]}: "
        f"{over[0][1]} tokens, {src}:{over[1][0]}: {over[1][1]} tokens); fix: raise train.max_length to at least "
        f"{max(lengths)}, or give those rows fewer or shorter passages")
    # validate over every row says the same, per row
    r = cli("validate", src, "--tokenizer", MODELS / "qwen2.5-instruct", "--max-length", limit)
    assert r.code == 1
    assert [line for line in r.out.splitlines() if "passages" in line] == [
        f"{src}:{n}: {t} tokens with its passages, over --max-length {limit}: training would cut the answer "
        "(raise max_length or give fewer or shorter passages)" for n, t in over]


def test_the_rag_stage_is_refused_on_the_login_node_before_anything_is_created(cli, tmp_path):
    manifest = REPO / "manifests" / "course-assistant-rag.yaml"
    runs = tmp_path / "runs"
    r = cli("run", manifest, "--dry-run", f"model.path={MODELS / 'qwen2.5-instruct'}", f"output_dir={runs}")
    assert r.code == 0 and "preflight:" in r.err, r.err
    r = cli("run", manifest, "--dry-run", f"model.path={MODELS / 'qwen2.5-instruct'}", f"output_dir={runs}",
            "train.max_length=170")
    src = EXAMPLES / "course_assistant" / "rag_sft.jsonl"
    assert r.code == 1
    assert (f"  train: train.max_length 170 would cut the answer of 2 row(s) with passages ({src}:3: 182 tokens, "
            f"{src}:4: 179 tokens)") in r.err
    assert len(list(runs.iterdir())) == 1  # the first dry run's folder; the refused run left nothing
