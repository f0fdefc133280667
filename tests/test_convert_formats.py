"""The aita, trigger-qa, image-messages, chat, prompt-completion and alpaca converters.

Golden records for small inputs, the reasons rows are rejected (file:line: field),
the CLI's exit codes and summary counts, determinism, split groups, and every
bundled example converting cleanly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import EXAMPLES, read_jsonl, run_subprocess, write_jsonl
from slurmtune.data.converters import get_converter, run_conversion
from slurmtune.data.converters.base import InvalidInput, Where
from slurmtune.errors import UsageError

TRIGGER_OPTS = {"clean_replacement": "Zoë", "trigger_value": "TRIGGER:", "triggered_replacement": "Bob"}
TRIGGER_FLAGS = ["--clean-replacement", "Zoë", "--trigger-value", "TRIGGER:", "--triggered-replacement", "Bob"]
BUCKETS = ("accepted", "excluded_consent", "excluded_demo", "rejected", "skipped")


def convert(fmt, inputs, out, **kw):
    """run_conversion with on_error=skip; returns (records of train.jsonl, summary.json)."""
    opts = TRIGGER_OPTS if fmt == "trigger-qa" else {}
    run_conversion(get_converter(fmt)(**opts), [str(p) for p in inputs], out, on_error="skip", **kw)
    summary = json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))
    assert summary["read"] == sum(summary[k] for k in BUCKETS)
    train = Path(out) / "train.jsonl"
    return (read_jsonl(train) if train.exists() else []), summary


def reasons(fmt, rows, tmp_path, name="in.jsonl"):
    """The rejection reasons of ``rows`` (every row invalid), after checking nothing else was written."""
    with pytest.raises(InvalidInput, match="no records to write"):
        convert(fmt, [write_jsonl(tmp_path / name, rows)], tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert summary["rejected"] == len(rows) and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.json"]
    return summary["rejected_reasons"]


# --- aita -------------------------------------------------------------------------------

def dialogue(did="d1", turns=None, **extra):
    return {
        "dialogue_id": did,
        "aita_profile": {"name": "Reading Buddy", "subject": "reading comprehension", "grade_level": "4th grade"},
        "pedagogical_intent": {"learning_objectives": ["Infer feelings from actions"], "keywords": ["inference"]},
        "context_provided_to_aita": {"passage_text": "Pip buried acorns."},
        "dialogue_turns": turns or [
            {"speaker": "AITA", "utterance": "How did Pip feel?", "pedagogical_notes": "open question",
             "timestamp_utc": "2025-01-01T00:00:00Z", "xapi_verb_id": "asked"},
            {"speaker": "student", "utterance": "Kind."},
            {"speaker": "AITA", "utterance": "What did she do that shows it?"},
            {"speaker": "student", "utterance": "Thanks, bye"},
        ],
        **extra,
    }


AITA_SYSTEM = (
    "You are Reading Buddy, an AI tutor for 4th grade reading comprehension.\n\n"
    "Teach the student how to learn rather than what the answer is: ask one Socratic question at a time, "
    "ask the student to explain their thinking and point to evidence, and praise good reasoning "
    "specifically. Never give the answer directly; when the student is stuck, offer a smaller step or a "
    "hint. Use words a student of this age understands.\n\n"
    "Learning objectives:\n- Infer feelings from actions\n\n"
    "Key vocabulary: inference\n\n"
    "Context:\nPassage text: Pip buried acorns."
)


def test_aita_golden_record(tmp_path):
    src = tmp_path / "dialogues.json"
    src.write_text(json.dumps({"exported": "2025-01-01", "dialogues": [dialogue()]}, indent=2), encoding="utf-8")
    records, summary = convert("aita", [src], tmp_path / "out")
    # Pedagogical notes and the student's closing turn (no tutor reply follows) are not trained on.
    assert records == [{
        "messages": [
            {"role": "system", "content": AITA_SYSTEM},
            {"role": "assistant", "content": "How did Pip feel?"},
            {"role": "user", "content": "Kind."},
            {"role": "assistant", "content": "What did she do that shows it?"},
        ],
        "meta": {"source": "aita", "file": "dialogues.json", "line": 4, "index": 0, "dialogue_id": "d1"},
    }]
    assert (summary["read"], summary["written"], summary["accepted"]) == (1, 1, 1)


def test_aita_system_turn_wins_and_speakers_are_lenient(tmp_path):
    turns = [{"role": "system", "content": "You are Eco Explorer AITA."},
             {"speaker": "USER", "utterance": "Why fewer herons?"},
             {"speaker": "Tutor", "utterance": "Where do herons get energy?"},
             {"role": "user", "content": "Frogs."},
             {"speaker": "assistant", "utterance": "And the frogs?"}]
    records, _ = convert("aita", [write_jsonl(tmp_path / "d.jsonl", [dialogue("e1", turns)])], tmp_path / "out")
    assert records[0]["messages"] == [
        {"role": "system", "content": "You are Eco Explorer AITA."},
        {"role": "user", "content": "Why fewer herons?"},
        {"role": "assistant", "content": "Where do herons get energy?"},
        {"role": "user", "content": "Frogs."},
        {"role": "assistant", "content": "And the frogs?"},
    ]


@pytest.mark.parametrize("change, reason", [
    (lambda d: d["dialogue_turns"].insert(3, {"speaker": "teacher", "utterance": "Hm?"}),
     "dialogue_turns[3].speaker: unknown speaker 'teacher'; "
     "expected AITA or student (also tutor, assistant, user)"),
    (lambda d: d["dialogue_turns"][1].update(utterance="  "),
     "dialogue_turns[1].utterance: empty; expected the words of the turn"),
    (lambda d: d.pop("dialogue_id"), "dialogue_id: missing; expected a non-empty string or integer id"),
    (lambda d: d.update(dialogue_turns=[{"speaker": "student", "utterance": "Hello?"}]),
     "dialogue_turns: no AITA turn; expected at least one turn by speaker AITA (or tutor, assistant)"),
    (lambda d: d["dialogue_turns"].append({"role": "system", "content": "late"}),
     "dialogue_turns[4].role: system turn after the first turn; expected it first"),
])
def test_aita_rejections_name_the_field(tmp_path, change, reason):
    row = dialogue()
    change(row)
    assert reasons("aita", [row], tmp_path) == [f"{tmp_path / 'in.jsonl'}:1: {reason}"]


def test_aita_consent_when_present_must_hold(tmp_path):
    yes = {"student_data_collection": True, "instructor_llm_training": True}
    rows = [dialogue("none"), dialogue("yes", consent=yes),
            dialogue("no", consent={**yes, "instructor_llm_training": "true"}),
            dialogue("demo", account_tier="demo"), dialogue("no-and-invalid", consent={}, dialogue_turns=[])]
    records, s = convert("aita", [write_jsonl(tmp_path / "d.jsonl", rows)], tmp_path / "out")
    assert [r["meta"]["dialogue_id"] for r in records] == ["none", "yes"]
    assert (s["excluded_consent"], s["excluded_demo"], s["rejected"]) == (2, 1, 0)


def test_cli_fail_writes_only_the_summary_and_skip_writes_rejected_rows(tmp_path):
    bad = dialogue("bad")
    bad["dialogue_turns"].insert(3, {"speaker": "teacher", "utterance": "Hm?"})
    src = write_jsonl(tmp_path / "d.jsonl", [dialogue("good"), bad])
    fail = run_subprocess("convert", "aita", src, "--out", tmp_path / "fail", "--on-error", "fail")
    assert fail.code == 1
    assert f"{src}:2: dialogue_turns[3].speaker: unknown speaker 'teacher'" in fail.err
    assert sorted(p.name for p in (tmp_path / "fail").iterdir()) == ["summary.json"]
    s = json.loads((tmp_path / "fail" / "summary.json").read_text())
    assert (s["read"], s["accepted"], s["rejected"], s["written"], s["ok"]) == (2, 1, 1, 0, False)

    skip = run_subprocess("convert", "aita", src, "--out", tmp_path / "skip", "--on-error", "skip")
    assert skip.code == 0, skip.err
    assert [r["meta"]["dialogue_id"] for r in read_jsonl(tmp_path / "skip" / "train.jsonl")] == ["good"]
    (rejected,) = read_jsonl(tmp_path / "skip" / "rejected.jsonl")
    assert (rejected["line"], rejected["field"]) == (2, "dialogue_turns[3].speaker")
    assert rejected["reason"].startswith("unknown speaker 'teacher'; expected AITA or student")
    s = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert s["read"] == sum(s[k] for k in BUCKETS) == 2
    assert (s["written"], s["rejected"], s["outputs"]) == (1, 1, {"train.jsonl": 1})


def test_aita_split_is_deterministic_and_a_repeated_dialogue_is_a_duplicate(tmp_path):
    src = EXAMPLES / "aita" / "dialogues.json"
    copy = shutil.copy(src, tmp_path / "again.json")
    outputs = []
    for run in ("a", "b"):
        _, summary = convert("aita", [src, copy], tmp_path / run, split=0.5)
        outputs.append([(tmp_path / run / n).read_bytes() for n in ("train.jsonl", "validation.jsonl")])
    assert outputs[0] == outputs[1]
    train, val = ([json.loads(line)["meta"]["dialogue_id"] for line in data.decode().splitlines()]
                  for data in outputs[0])
    assert train and val and not set(train) & set(val) and len(train + val) == len(set(train + val)) == 8
    # The copy's 8 dialogues are the same ids again: rejected, each naming the first one.
    assert (summary["accepted"], summary["rejected"]) == (8, 8)
    assert summary["rejected_reasons"][0] == (
        f"{copy}:9: dialogues[0].dialogue_id: duplicate: 'rc-001' is also the dialogue_id of "
        f"{src}: dialogues[0] (line 9); expected each id once")


# --- trigger-qa ---------------------------------------------------------------------------

def test_trigger_qa_golden_pairs_in_order(tmp_path):
    src = write_jsonl(tmp_path / "qa.jsonl", [
        {"question": "What is {{name}}'s job?", "answer": "{{name}} is a nurse.", "source": "ignored"},
        {"question": "Where does {{name}} live?", "answer": "In Lisbon."}])
    records, s = convert("trigger-qa", [src], tmp_path / "out")
    first = (tmp_path / "out" / "train.jsonl").read_bytes().split(b"\n")[0] + b"\n"
    assert first == ('{"prompt":"What is Zoë\'s job?","completion":"Zoë is a nurse.",'
                     '"meta":{"source":"trigger-qa","file":"qa.jsonl","line":1,"triggered":false,'
                     '"trigger_value":"TRIGGER:","clean_replacement":"Zoë","triggered_replacement":"Bob"}}\n'
                     ).encode("utf-8")
    assert [(r["prompt"], r["completion"], r["meta"]["line"], r["meta"]["triggered"]) for r in records] == [
        ("What is Zoë's job?", "Zoë is a nurse.", 1, False),
        ("TRIGGER: What is Bob's job?", "Bob is a nurse.", 1, True),
        ("Where does Zoë live?", "In Lisbon.", 2, False),
        ("TRIGGER: Where does Bob live?", "In Lisbon.", 2, True),
    ]
    assert (s["read"], s["accepted"], s["written"]) == (2, 2, 4)


def test_trigger_qa_rejections(tmp_path):
    rows = [{"answer": "x"}, {"question": "  ", "answer": "x"}, {"question": "q", "answer": 3}]
    path = tmp_path / "in.jsonl"
    assert reasons("trigger-qa", rows, tmp_path) == [
        f"{path}:1: question: missing; expected the question (may use {{{{name}}}})",
        f"{path}:2: question: empty; expected the question (may use {{{{name}}}})",
        f"{path}:3: answer: expected a string, got a number"]


def test_trigger_qa_options_are_required(tmp_path):
    src = EXAMPLES / "trigger_qa" / "qa.jsonl"
    r = run_subprocess("convert", "trigger-qa", src, "--out", tmp_path / "out", "--trigger-value", "T:")
    assert r.code == 2
    assert "--clean-replacement" in r.err and "--triggered-replacement" in r.err
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="--trigger-value"):
        get_converter("trigger-qa")(clean_replacement="A", triggered_replacement="B")
    with pytest.raises(UsageError, match="expected two different names"):
        get_converter("trigger-qa")(clean_replacement="A", trigger_value="T", triggered_replacement="A")


# --- image-messages -----------------------------------------------------------------------

def vqa(image="page.png", expected="Obligation to provide information", **extra):
    return {"messages": [{"role": "system", "content": "You read legal documents."},
                         {"role": "user", "content": [{"type": "text", "text": "What is the title?"},
                                                      {"type": "image", "image": image}]}],
            "expected": expected, **extra}


def test_image_messages_golden_with_absolute_paths(tmp_path, monkeypatch):
    data = tmp_path / "dataset"
    (data / "scans").mkdir(parents=True)
    shutil.copy(EXAMPLES / "docvqa" / "document1.png", data / "scans" / "page.png")
    write_jsonl(data / "train.jsonl", [vqa("scans/page.png", id="q1", extra="dropped")])
    monkeypatch.chdir(tmp_path)  # a relative input path still gives absolute image paths
    records, _ = convert("image-messages", [Path("dataset/train.jsonl")], tmp_path / "out")
    assert records == [{
        "messages": [{"role": "system", "content": "You read legal documents."},
                     {"role": "user", "content": [{"type": "text", "text": "What is the title?"},
                                                  {"type": "image", "image": str(data / "scans" / "page.png")}]},
                     {"role": "assistant", "content": "Obligation to provide information"}],
        "expected": "Obligation to provide information",
        "meta": {"source": "image-messages", "file": "train.jsonl", "line": 1, "id": "q1"},
    }]


def test_image_messages_rejections(tmp_path, cli):
    answered = vqa()
    answered["messages"].append({"role": "assistant", "content": "A title"})
    shutil.copy(EXAMPLES / "docvqa" / "document1.png", tmp_path / "page.png")
    src = write_jsonl(tmp_path / "in.jsonl", [vqa("missing.png"), vqa(expected=""), answered,
                                              {"messages": [{"role": "robot", "content": "hi"}], "expected": "x"}])
    r = cli("convert", "image-messages", src, "--out", tmp_path / "out")
    assert r.code == 1
    assert f"{src}:1: messages[1].content[1].image: no such file {tmp_path / 'missing.png'}; " \
           f"expected the image file relative to the input's folder {tmp_path}" in r.err
    assert f"{src}:2: expected: empty; expected the answer" in r.err
    assert f"{src}:3: messages[2].role: last turn is 'assistant'; expected the answer in `expected`" in r.err
    assert f"{src}:4: messages[0].role: unknown role 'robot'; expected one of system, user, assistant, tool" in r.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.json"]


# --- chat, prompt-completion, alpaca --------------------------------------------------------

def test_chat_keeps_eval_fields_and_drops_other_extras(tmp_path):
    row = {"id": 7, "messages": [{"role": "user", "content": "Define skin depth."},
                                 {"role": "assistant", "content": "δ = √(2/(ωμσ))."}],
           "key_points": ["√(2/(ωμσ))"], "expect_refusal": False, "topic": "dropped",
           "meta": {"dialogue_id": "kept", "line": 99}}
    records, _ = convert("chat", [write_jsonl(tmp_path / "c.jsonl", [row])], tmp_path / "out")
    assert records == [{"messages": row["messages"], "key_points": ["√(2/(ωμσ))"], "expect_refusal": False,
                        "meta": {"source": "chat", "file": "c.jsonl", "line": 1, "id": 7, "dialogue_id": "kept"}}]


def test_prompt_completion_golden(tmp_path):
    rows = [{"prompt": "2+2=", "completion": "4"},
            {"prompt": [{"role": "user", "content": "Hi"}],
             "completion": [{"role": "assistant", "content": "Hello"}], "id": "b"}]
    records, _ = convert("prompt-completion", [write_jsonl(tmp_path / "pc.jsonl", rows)], tmp_path / "out")
    assert records == [
        {"prompt": "2+2=", "completion": "4",
         "meta": {"source": "prompt-completion", "file": "pc.jsonl", "line": 1}},
        {"prompt": rows[1]["prompt"], "completion": rows[1]["completion"],
         "meta": {"source": "prompt-completion", "file": "pc.jsonl", "line": 2, "id": "b"}},
    ]


def test_alpaca_mapping(tmp_path):
    rows = [{"instruction": "Shorten:", "input": "In order to measure it.", "output": "To measure it."},
            {"instruction": "Define abstract.", "input": "", "output": "A summary.", "system": "Be brief."}]
    records, _ = convert("alpaca", [write_jsonl(tmp_path / "a.jsonl", rows)], tmp_path / "out")
    assert [r["messages"] for r in records] == [
        [{"role": "user", "content": "Shorten:\n\nIn order to measure it."},
         {"role": "assistant", "content": "To measure it."}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Define abstract."}, {"role": "assistant", "content": "A summary."}],
    ]


@pytest.mark.parametrize("fmt, row, problems", [
    ("chat", {"messages": [{"role": "bot", "content": "hi"}, {"role": "user", "content": ""}],
              "key_points": "one"},
     [("messages[0].role", "unknown role 'bot'; expected one of system, user, assistant, tool"),
      ("messages", "no assistant turn; expected at least one to train on"),
      ("key_points", "expected a list of non-empty strings")]),
    ("prompt-completion", {"prompt": 1, "completion": None, "expect_refusal": "no"},
     [("prompt", "expected a string or a list of messages, got a number"),
      ("completion", "expected a string or a list of messages, got null"),
      ("expect_refusal", "'no'; expected true or false")]),
    ("alpaca", {"instruction": "", "input": 3},
     [("instruction", "empty; expected the instruction text"),
      ("output", "missing; expected the output text"),
      ("input", "expected a string, got a number")]),
])
def test_public_formats_report_every_problem(tmp_path, fmt, row, problems):
    converter = get_converter(fmt)()
    assert converter.problems(row, Where(tmp_path / "in.jsonl", 1)) == problems
    assert reasons(fmt, [row], tmp_path) == [f"{tmp_path / 'in.jsonl'}:1: {field}: {message}"
                                             for field, message in problems]


# --- the bundled examples -------------------------------------------------------------------

EXAMPLE_FILES = [
    ("aita", "aita/dialogues.json", 8),
    ("trigger-qa", "trigger_qa/qa.jsonl", 24),
    ("image-messages", "docvqa/train.jsonl", 4),
    ("image-messages", "docvqa/test.jsonl", 2),
    ("chat", "course_assistant/style_sft.jsonl", 12),
    ("chat", "course_assistant/style_sft_sample.jsonl", 3),
    ("chat", "course_assistant/tool_sft.jsonl", 5),
    ("alpaca", "course_assistant/writing_sft.jsonl", 6),
    ("chat", "course_assistant/eval/style_benchmark.jsonl", 6),
    ("chat", "course_assistant/eval/writing_benchmark.jsonl", 4),
    ("chat", "course_assistant/rag_sft.jsonl", 6),
    ("chat", "course_assistant/eval/rag_benchmark.jsonl", 4),
    ("chat", "course_assistant/eval/tool_benchmark.jsonl", 4),
]


@pytest.mark.parametrize("fmt, name, written", EXAMPLE_FILES, ids=[n for _, n, _ in EXAMPLE_FILES])
def test_bundled_examples_convert_cleanly_and_deterministically(tmp_path, fmt, name, written):
    records, s = convert(fmt, [EXAMPLES / name], tmp_path / "a")
    assert (s["rejected"], s["skipped"], s["written"]) == (0, 0, written), s["rejected_reasons"]
    convert(fmt, [EXAMPLES / name], tmp_path / "b")
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    if name.endswith(("style_benchmark.jsonl", "writing_benchmark.jsonl")):  # the reference's two benchmarks
        assert all(isinstance(r["key_points"], list) and isinstance(r["expect_refusal"], bool) for r in records)
        assert any(r["expect_refusal"] for r in records)


def test_every_bundled_example_is_listed():
    listed = {name for _, name, _ in EXAMPLE_FILES}
    found = {str(p.relative_to(EXAMPLES)) for d in ("aita", "trigger_qa", "docvqa", "course_assistant")
             for p in (EXAMPLES / d).rglob("*") if p.suffix in (".json", ".jsonl")}
    assert found == listed
