"""Tool-calling records: every malformed call or result is one line, the tools block and the
tool results never carry loss (Qwen2.5's real template), and a template without tool support
is refused before anything trains."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import EXAMPLES, REPO, read_jsonl, write_jsonl
from slurmtune.data.chat_format import load_tokenizer, to_template_messages
from slurmtune.data.dataset import _encode_chat
from slurmtune.data.tools import refuse_tools_without_template
from slurmtune.errors import UsageError
from slurmtune.evaluate.generate import predict

MODELS = REPO.parent / "shared" / "models"
GOOD = read_jsonl(EXAMPLES / "course_assistant" / "tool_sft.jsonl")[0]


def with_change(change):
    row = copy.deepcopy(GOOD)
    change(row)
    return row


def call_of(row):
    return row["messages"][2]["tool_calls"][0]["function"]


def test_every_malformed_tool_record_is_one_line(cli, tmp_path):
    rows = [
        with_change(lambda r: call_of(r).update(name="grade_essay")),
        with_change(lambda r: call_of(r).update(arguments={"text": 7, "extra": 1})),
        with_change(lambda r: r["messages"].pop(2)),  # the result, with no call before it
        with_change(lambda r: call_of(r).update(arguments='{"text": "unterminated')),
        with_change(lambda r: r.pop("tools")),
        with_change(lambda r: r["tools"][1]["function"].update(parameters={"type": "objekt"})),
    ]
    src = write_jsonl(tmp_path / "tools.jsonl", rows)
    r = cli("validate", src)
    assert r.code == 1
    at = "messages[2].tool_calls[0].function"
    assert r.out.splitlines()[:-2] == [
        f"{src}:1: {at}.name: 'grade_essay' is not a declared tool; expected one of: check_plagiarism, validate_format",
        f"{src}:2: {at}.arguments: Additional properties are not allowed ('extra' was unexpected); "
        "expected the arguments 'check_plagiarism' declares",
        f"{src}:2: {at}.arguments.text: 7 is not of type 'string'; expected the arguments 'check_plagiarism' declares",
        f"{src}:3: messages[2].role: a tool result with no call before it; expected it right after the "
        "assistant turn whose tool_calls it answers",
        f"{src}:4: {at}.arguments: not JSON (Unterminated string starting at column 10); expected an object "
        "of the tool's parameters",
        f"{src}:5: {at}.name: 'check_plagiarism' is called but the record declares no tools; expected a "
        "record-level tools list with its definition",
        f"{src}:6: tools[1].function.parameters: not a valid JSON Schema ('objekt' is not valid under any of "
        "the given schemas); expected the arguments' schema",
    ]
    # convert refuses the same rows with the same lines, and writes nothing
    r = cli("convert", "chat", src, "--out", tmp_path / "out")
    assert r.code == 1 and f"  {src}:1: {at}.name: 'grade_essay' is not a declared tool" in r.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.json"]


def test_convert_keeps_the_tools_and_validate_passes(cli, tmp_path):
    src = EXAMPLES / "course_assistant" / "tool_sft.jsonl"
    assert cli("convert", "chat", src, "--out", tmp_path).code == 0
    out = read_jsonl(tmp_path / "train.jsonl")
    assert [r["tools"] for r in out] == [r["tools"] for r in read_jsonl(src)]
    assert cli("validate", tmp_path / "train.jsonl").code == 0


@pytest.fixture(scope="module")
def qwen():
    assert MODELS.is_dir(), f"{MODELS} is missing: the tests need ../shared/models beside the clone"
    return load_tokenizer(MODELS / "qwen2.5-instruct")


def _trained_spans(tokenizer, ids, flags) -> list[str]:
    spans, current = [], []
    for token, trained in zip(ids, flags):
        if trained:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


def test_loss_falls_on_the_calls_and_words_never_on_results_or_the_tools_block(qwen):
    ids, flags, merged = _encode_chat(qwen, to_template_messages(GOOD["messages"]), True, GOOD["tools"])
    arguments = json.dumps(call_of(GOOD)["arguments"], ensure_ascii=False)
    assert _trained_spans(qwen, ids, flags) == [
        f'<tool_call>\n{{"name": "check_plagiarism", "arguments": {arguments}}}\n</tool_call><|im_end|>',
        GOOD["messages"][4]["content"] + "<|im_end|>"]
    text = qwen.decode(ids)
    assert "# Tools" in text and '"name": "validate_format"' in text  # rendered, untrained
    assert "<tool_response>\n" + GOOD["messages"][3]["content"] in text and merged == 0


def test_a_template_without_tools_is_refused(qwen):
    phi3 = load_tokenizer(MODELS / "phi-3-mini-4k-instruct")
    refuse_tools_without_template(qwen, [GOOD])  # Qwen2.5's template renders them
    with pytest.raises(UsageError, match="1 record.s. use tools"):
        predict(None, phi3, [GOOD])  # refused before any model is asked
    with pytest.raises(UsageError) as e:
        refuse_tools_without_template(phi3, [GOOD, {"messages": GOOD["messages"][:2]}])
    assert str(e.value) == (
        "1 record(s) use tools, but this model's chat template does not render a tools list; fix: a model "
        "whose template does (Qwen2.5-Instruct (its template declares tools in the system turn)), or "
        "model.chat_template=FILE with one that does")
