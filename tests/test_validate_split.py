"""`slurmtune validate` reports every problem at once; `slurmtune split` never cuts a group."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import read_jsonl, write_jsonl
from factories import evaluation, write_export


def chat(q="q", a="a", student=None):
    row = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    if student:
        row["meta"] = {"student_id": student}
    return row


def test_validate_reports_all_problems_with_file_line_field(cli, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    rows = [chat(student="s1"),
            {"messages": [{"role": "teacher", "content": "x"}, {"role": "assistant", "content": "y"}]},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
            chat(student="s1"),
            {"messages": [{"role": "user", "content": [{"type": "image", "image": "img.png"},
                                                       {"type": "image", "image": "missing.png"}]},
                          {"role": "assistant", "content": "ok"}]}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with open(train, "a") as f:
        f.write('{"messages": \n')
    val = write_jsonl(tmp_path / "validation.jsonl", [chat("other", "x", student="s1")])
    r = cli("validate", train, val, "--check-paths")
    assert r.code == 1
    lines = r.out.splitlines()
    expected = [
        f"{train}:2: messages[0].role: unknown role 'teacher'; expected one of system, user, assistant, tool",
        f"{train}:3: messages[1].content: empty assistant turn; expected the answer to train on",
        f"{train}:4: duplicate of line 1 (the same record); expected each row once",
        f"{train}:5: messages[0].content[1].image: file not found: missing.png",
        f"{train}:6: invalid JSON: Expecting value at column 14 (the record ends early)",
        f"{val}:1: student_id: student 's1' is also in {train}: line 1; expected each student in one split only",
    ]
    for line in expected:
        assert line in lines, line
    assert lines[-1] == "checked 7 rows in 2 file(s): 6 problem(s)"
    report = json.loads(cli("validate", train, val, "--check-paths", "--json").out)
    assert len(report["problems"]) == 6 and report["rows"] == 7


def test_validate_export_and_clean_files(cli, tmp_path):
    bad = evaluation(2)
    bad["evaluation_data"]["sections"]["Delivery"]["score"] = 31
    src = write_export(tmp_path / "exported.json", [evaluation(1), bad, evaluation(1)])
    r = cli("validate", src)
    assert r.code == 1
    assert f"{src}:4: evaluations[1].evaluation_data.sections.Delivery.score: 31 is outside 0..30" in r.out
    assert (f"{src}:5: evaluations[2].evaluation_id: duplicate: 'e1' is also the evaluation_id of "
            "evaluations[0] (line 3); expected each id once") in r.out
    assert "(speechgradebook)" in r.out
    clean = write_jsonl(tmp_path / "clean.jsonl", [chat(), chat("q2", "a2")])
    r = cli("validate", clean)
    assert r.code == 0 and r.out.splitlines()[-1] == "checked 2 rows in 1 file(s): no problems"
    assert cli("validate", clean, "--tokenizer", tmp_path).code == 2  # --max-length goes with it


def test_validate_with_a_tokenizer_counts_tokens_and_cut_off_rows(cli, tmp_path):
    from slurmtune.train.tiny_model import make_tiny_model
    model = make_tiny_model(tmp_path / "tiny")
    rows = [chat("short question", "short answer"), chat("word " * 200, "answer"), chat("q " * 5, "a " * 80)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    r = cli("validate", data, "--tokenizer", model, "--max-length", "64", "--json")
    report = json.loads(r.out)
    tokens = report["stats"]["tokens"]
    assert tokens["rows"] == 3 and tokens["min"] < 64 < tokens["max"]
    assert tokens["truncated"] == 2 and tokens["cut_off"] == 1
    (problem,) = report["problems"]
    assert problem["line"] == 2 and "zero trained tokens" in problem["message"]


def test_split_is_grouped_deterministic_and_near_the_ratios(cli, tmp_path):
    rows = [chat(f"q{i}", f"a{i}", student=f"s{i % 17}") for i in range(200)]
    src = write_jsonl(tmp_path / "all.jsonl", rows)
    r = cli("split", src, "--ratios", "0.8,0.1,0.1", "--group-by", "meta.student_id", "--out", tmp_path / "a")
    assert r.code == 0, r.err
    parts = {n: read_jsonl(tmp_path / "a" / f"{n}.jsonl") for n in ("train", "validation", "test")}
    assert sum(map(len, parts.values())) == 200
    students = {n: {row["meta"]["student_id"] for row in rows} for n, rows in parts.items()}
    assert students["train"].isdisjoint(students["validation"]) and students["train"].isdisjoint(students["test"])
    assert students["validation"].isdisjoint(students["test"])
    assert 140 <= len(parts["train"]) <= 180 and parts["validation"] and parts["test"]
    cli("split", src, "--ratios", "0.8,0.1,0.1", "--group-by", "meta.student_id", "--out", tmp_path / "b")
    for n in parts:
        assert (tmp_path / "a" / f"{n}.jsonl").read_bytes() == (tmp_path / "b" / f"{n}.jsonl").read_bytes()
    ungrouped = cli("split", src, "--ratios", "0.5,0.5", "--out", tmp_path / "c")
    assert ungrouped.code == 0 and len(read_jsonl(tmp_path / "c" / "train.jsonl")) == 100


@pytest.mark.parametrize("args, message", [
    (["--ratios", "0.8,0.3"], "expected 2 or 3 non-negative numbers that sum to 1"),
    (["--ratios", "a,b"], "expected numbers like 0.8,0.1,0.1"),
    (["--group-by", "meta.nope"], "meta.nope: missing or not a plain value"),
])
def test_split_errors(cli, tmp_path, args, message):
    src = write_jsonl(tmp_path / "all.jsonl", [chat(student="s1")])
    r = cli("split", src, *args, "--out", tmp_path / "o")
    assert r.code in (1, 2) and message in r.err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
