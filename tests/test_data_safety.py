"""Data safety: outputs never destroy or mix data, duplicates are caught where they are,
nothing excluded for consent is ever shown, and messages say what is wrong.

Every test checks the file-system state before and after (input bytes, the set of
output files, summary.json) and the exact line the user sees.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import read_jsonl, write_jsonl
from factories import evaluation

ALPACA = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)]
NO = {"student_data_collection": False, "instructor_llm_training": True}


def snapshot(folder):
    """Every file in ``folder`` and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def export_one_line(path, evaluations):
    """A SpeechGradebook export on one line, as a web app's JSON download writes it."""
    path.write_text(json.dumps({"exported_at": "2026-11-01", "evaluations": evaluations}), encoding="utf-8")
    return path


# --- outputs: inputs are never outputs, a new set replaces the old one whole -------------------

def test_an_input_is_never_overwritten_by_an_output(cli, tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", ALPACA)
    before = snapshot(tmp_path)
    r = cli("convert", "alpaca", src, "--out", tmp_path)
    assert r.code == 2 and r.out == ""
    assert r.err == (f"slurmtune: error: {src}: is an input and would be overwritten by the output "
                     "train.jsonl; expected --out to name another folder\n")
    assert snapshot(tmp_path) == before
    # split writes beside its input by default: the same rule
    r = cli("split", src, "--ratios", "0.5,0.5")
    assert r.code == 2 and "is an input and would be overwritten by the output train.jsonl" in r.err
    assert snapshot(tmp_path) == before


def test_out_problems_are_one_line(cli, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for out, message in [(a_file, "is a file; expected a folder for the outputs"),
                         (a_file / "sub", "cannot create the folder (Not a directory); "
                                          "expected a folder you can write to")]:
        r = cli("convert", "alpaca", src, "--out", out)
        assert r.code == 2 and r.err == f"slurmtune: error: --out {out}: {message}\n"
    assert a_file.read_text() == "not a folder"


def test_a_new_conversion_replaces_the_whole_previous_set(cli, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    out = tmp_path / "out"
    assert cli("convert", "alpaca", src, "--out", out, "--split", "0.5").code == 0
    (out / "notes.txt").write_text("mine")  # the user's own file: never touched
    assert sorted(snapshot(out)) == ["notes.txt", "summary.json", "train.jsonl", "validation.jsonl"]
    r = cli("convert", "alpaca", src, "--out", out)
    assert r.code == 0
    assert f"  {out / 'validation.jsonl'}: removed (from the previous conversion, not written this time)" \
        in r.out.splitlines()
    assert sorted(snapshot(out)) == ["notes.txt", "summary.json", "train.jsonl"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"] == ["train.jsonl", "summary.json"] and summary["removed"] == ["validation.jsonl"]
    assert len(read_jsonl(out / "train.jsonl")) == 6


def test_a_failed_conversion_leaves_the_previous_outputs_untouched(cli, tmp_path):
    out = tmp_path / "out"
    assert cli("convert", "alpaca", write_jsonl(tmp_path / "good.jsonl", ALPACA), "--out", out,
               "--split", "0.5").code == 0
    before = snapshot(out)
    bad = write_jsonl(tmp_path / "bad.jsonl", [ALPACA[0], {"instruction": 3, "output": ""}])
    r = cli("convert", "alpaca", bad, "--out", out)
    assert r.code == 1
    assert r.err.splitlines() == [
        "slurmtune: error: 1 invalid row(s) (--on-error skip writes the valid rows and rejected.jsonl):",
        f"  {bad}:2: instruction: expected a string, got a number",
        f"  {bad}:2: output: empty; expected the output text",
        f"nothing written: train.jsonl, validation.jsonl in {out} are from the previous conversion, "
        f"left as they were; this attempt's counts: {out / 'summary.failed.json'}"]
    failed = json.loads((out / "summary.failed.json").read_text())
    assert (failed["ok"], failed["read"], failed["rejected"], failed["files"]) == (False, 2, 1, [])
    assert {k: v for k, v in snapshot(out).items() if k != "summary.failed.json"} == before
    # the next good conversion clears the failed attempt's counts too
    assert cli("convert", "alpaca", tmp_path / "good.jsonl", "--out", out).code == 0
    assert sorted(snapshot(out)) == ["summary.json", "train.jsonl"]


@pytest.mark.parametrize("content, line", [
    (b"", "{src}: file is empty; expected JSON records"),
    (b"  \n\n \n", "{src}: no records (the file holds only whitespace or an empty list); "
                   "expected a JSON object per row"),
])
def test_an_empty_input_fails_and_writes_its_counts(cli, tmp_path, content, line):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    out = tmp_path / "out"
    r = cli("convert", "alpaca", src, "--out", out)
    assert r.code == 1
    assert r.err.splitlines() == [f"slurmtune: error: {line.format(src=src)}",
                                  f"nothing written to {out}; counts in {out / 'summary.json'}"]
    assert sorted(snapshot(out)) == ["summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ok"], summary["read"], summary["written"]) == (False, 0, 0)


def test_skip_with_every_row_rejected_writes_no_empty_training_file(cli, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "q"}, {"output": "a"}])
    r = cli("convert", "alpaca", src, "--out", tmp_path / "out", "--on-error", "skip")
    assert r.code == 1 and "no records to write: read 2, written 0" in r.err
    assert sorted(snapshot(tmp_path / "out")) == ["summary.json"]


def test_split_replaces_its_previous_split_whole(cli, tmp_path):
    src = write_jsonl(tmp_path / "all.jsonl", ALPACA)
    out = tmp_path / "splits"
    assert cli("split", src, "--ratios", "0.5,0.25,0.25", "--out", out).code == 0
    assert sorted(snapshot(out)) == ["split_summary.json", "test.jsonl", "train.jsonl", "validation.jsonl"]
    assert cli("split", src, "--ratios", "0.5,0.5", "--out", out).code == 0
    assert sorted(snapshot(out)) == ["split_summary.json", "train.jsonl", "validation.jsonl"]
    summary = json.loads((out / "split_summary.json").read_text())
    assert summary["files"] == ["train.jsonl", "validation.jsonl", "split_summary.json"]
    assert sum(summary["rows"].values()) == 6


# --- duplicates, where they are ---------------------------------------------------------------

def test_duplicates_in_a_one_line_export_name_their_records(cli, tmp_path):
    src = export_one_line(tmp_path / "exported.json", [evaluation(1), evaluation(2), evaluation(1)])
    message = (f"{src}:1: evaluations[2].evaluation_id: duplicate: 'e1' is also the evaluation_id of "
               "evaluations[0] (line 1); expected each id once")
    r = cli("convert", "speechgradebook", src, "--out", tmp_path / "fail")
    assert r.code == 1 and f"  {message}" in r.err.splitlines()
    assert sorted(snapshot(tmp_path / "fail")) == ["summary.json"]
    r = cli("convert", "speechgradebook", src, "--out", tmp_path / "skip", "--on-error", "skip")
    assert r.code == 0
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert (summary["read"], summary["written"], summary["rejected"]) == (3, 2, 1)
    assert summary["rejected_reasons"] == [message]
    (rejected,) = read_jsonl(tmp_path / "skip" / "rejected.jsonl")
    assert (rejected["line"], rejected["index"], rejected["field"]) == (1, 2, "evaluations[2].evaluation_id")
    assert [r["meta"]["index"] for r in read_jsonl(tmp_path / "skip" / "train.jsonl")] == [0, 1]
    r = cli("validate", src)
    assert r.code == 1 and message in r.out.splitlines()


def test_duplicates_in_jsonl_and_across_files(cli, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": 1, **ALPACA[0]}, {"id": 2, **ALPACA[1]}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": 3, **ALPACA[2]}, {"id": 1, **ALPACA[3]}])
    r = cli("convert", "alpaca", a, b, "--out", tmp_path / "out")
    assert r.code == 1
    assert (f"  {b}:2: id: duplicate: 1 is also the id of {a}: line 1; expected each id once"
            in r.err.splitlines())


def test_pairs_never_pair_an_evaluation_with_itself(cli, tmp_path):
    rows = [evaluation(1, created_at="2026-01-01T10:00:00Z"), evaluation(2, created_at="2026-02-01T10:00:00Z"),
            evaluation(1, created_at="2026-01-01T10:00:00Z")]
    src = export_one_line(tmp_path / "exported.json", rows)
    r = cli("convert", "qwen-pairs", src, "--out", tmp_path / "out", "--on-error", "skip")
    assert r.code == 0, r.err
    (pair,) = read_jsonl(tmp_path / "out" / "train_qwen_pairs.jsonl")
    assert (pair["evaluation_id_1"], pair["evaluation_id_2"]) == ("e1", "e2")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rejected"] == 1


# --- consent first, everywhere ----------------------------------------------------------------

def test_rows_refused_for_consent_are_never_shown(cli, tmp_path):
    secret = [evaluation(90, student="stu-SECRET", evaluation_id="ev-SECRET", consent=NO,
                         transcript="SECRET-TRANSCRIPT"),
              # the same id again, and the student of a.json: a duplicate and a cross-split
              # student only if these rows could train
              evaluation(91, student="s1", evaluation_id="ev-SECRET", consent=NO, transcript=7),
              evaluation(92, student="s1", evaluation_id="e1", account_tier="demo")]
    a = export_one_line(tmp_path / "a.json", [evaluation(1, student="s1"), evaluation(2, student="s2")])
    b = export_one_line(tmp_path / "b.json", [*secret, evaluation(3, student="s3")])
    outputs = []
    for args in (["validate", a, b], ["validate", a, b, "--json"],
                 ["convert", "speechgradebook", b, "--out", tmp_path / "c1"],
                 ["convert", "speechgradebook", b, "--out", tmp_path / "c2", "--on-error", "skip"],
                 ["convert", "qwen-pairs", b, "--out", tmp_path / "c3", "--on-error", "skip"]):
        r = cli(*args)
        outputs += [r.out, r.err]
    assert outputs[0].splitlines()[-3:] == [
        f"{a}: 2 rows (speechgradebook)",
        f"{b}: 4 rows (speechgradebook), 3 excluded for consent or demo (not checked, not shown)",
        "checked 6 rows in 2 file(s): no problems"]
    report = json.loads(outputs[2])
    assert (report["problems"], report["excluded"], report["files"][1]["excluded"]) == ([], 3, 3)
    files = [p.read_text() for p in tmp_path.glob("c*/*") if p.is_file()]
    for text in outputs + files:
        for word in ("SECRET", "e90", "e91", "e92", "v90.mp4", "v91.mp4", "v92.mp4"):
            assert word not in text
    assert {json.loads((tmp_path / c / "summary.json").read_text())["excluded_demo"] for c in ("c1", "c2")} == {1}


# --- messages that say what is wrong ----------------------------------------------------------

@pytest.mark.parametrize("codec, name", [("utf-16-le", "UTF-16LE"), ("utf-16-be", "UTF-16BE"),
                                         ("utf-32-le", "UTF-32LE"), ("utf-16", "UTF-16LE")])
def test_wide_encodings_are_named_with_or_without_a_byte_order_mark(cli, tmp_path, codec, name):
    src = tmp_path / "in.jsonl"
    src.write_bytes((json.dumps(ALPACA[0]) + "\n").encode(codec))
    r = cli("convert", "alpaca", src, "--out", tmp_path / "out")
    bom = "" if codec == "utf-16" else " (no byte-order mark)"
    assert r.code == 1 and r.err.splitlines()[0] == (
        f"slurmtune: error: {src}:1: file is {name}-encoded{bom}; expected UTF-8 "
        f"(re-save it as UTF-8, e.g. iconv -f {name} -t UTF-8)")
    r = cli("validate", src)
    assert r.code == 1 and f"{src}:1: file is {name}-encoded{bom}; expected UTF-8" in r.out


def test_windows_1252_is_named(cli, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes('{"instruction": "caf\u00e9", "output": "x"}\n'.encode("cp1252"))
    r = cli("convert", "alpaca", src, "--out", tmp_path / "out")
    assert r.code == 1 and (f"{src}:1: not valid UTF-8 (byte 0xe9 at column 21); it looks like "
                            "Windows-1252/Latin-1 (iconv -f CP1252 -t UTF-8 converts it); expected UTF-8 text") in r.err


def test_every_problem_of_a_row_is_recorded_with_its_type(cli, tmp_path):
    row = evaluation(1, transcript=123, video_notes=5)
    row["evaluation_data"]["sections"]["Delivery"]["score"] = 31
    src = export_one_line(tmp_path / "exported.json", [row, evaluation(2)])
    r = cli("convert", "speechgradebook", src, "--out", tmp_path / "out", "--on-error", "skip")
    assert r.code == 0
    (rejected,) = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert rejected["problems"] == [
        {"field": "evaluations[0].transcript", "message": "expected a string, got a number"},
        {"field": "evaluations[0].video_notes", "message": "expected a string, got a number"},
        {"field": "evaluations[0].evaluation_data.sections.Delivery.score", "message": "31 is outside 0..30"}]
    assert rejected["record"]["evaluation_id"] == "e1"
    report = json.loads(cli("validate", src, "--json").out)
    assert [(p["field"], p["message"]) for p in report["problems"]] == [
        (p["field"], p["message"]) for p in rejected["problems"]]
    assert all(p["line"] == 1 and p["index"] == 0 for p in report["problems"])


def test_no_traceback_and_counts_add_up_for_a_mixed_bag(cli, tmp_path):
    rows = [ALPACA[0], "text", [1], {"instruction": None, "output": "x"}, ALPACA[1]]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    r = cli("convert", "alpaca", src, "--out", tmp_path / "out", "--on-error", "skip")
    assert r.code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["read"] == summary["accepted"] + summary["rejected"] == 5 and summary["written"] == 2
    assert summary["rejected_reasons"] == [
        f"{src}:2: expected a JSON object, got a string",
        f"{src}:3: expected a JSON object, got a list",
        f"{src}:4: instruction: expected a string, got null"]
    assert os.listdir(tmp_path / "out").count("rejected.jsonl") == 1
