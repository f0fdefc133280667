"""Bad input: one clear line naming file and line, no traceback, nothing half-written."""

from __future__ import annotations

import json
import os

import pytest

from conftest import read_jsonl, run_subprocess, write_jsonl
from factories import evaluation, write_export
from slurmtune.data.jsonio import AtomicFiles, Item, iter_records

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def only_summary(out_dir) -> bool:
    return sorted(os.listdir(out_dir)) == ["summary.json"]


def test_malformed_jsonl_line_is_named(cli, tmp_path):
    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps(GOOD) + "\n" + '{"messages": [oops]}\n' + json.dumps(GOOD) + "\n")
    r = cli("convert", "chat", src, "--out", tmp_path / "out")
    assert r.code == 1
    assert f"{src}:2: invalid JSON: Expecting value at column 15" in r.err
    assert only_summary(tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["read"], summary["rejected"], summary["ok"]) == (3, 1, False)


def test_skip_keeps_the_good_rows_and_explains_the_bad(cli, tmp_path):
    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps(GOOD) + "\n{bad\n" + json.dumps(GOOD) + "\n")
    r = cli("convert", "chat", src, "--out", tmp_path / "out", "--on-error", "skip")
    assert r.code == 0
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 2
    (rejected,) = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert rejected["line"] == 2 and rejected["reason"].startswith("invalid JSON") and "record" not in rejected


def test_truncated_export_names_the_line(cli, tmp_path):
    src = write_export(tmp_path / "exported.json", [evaluation(1), evaluation(2)])
    text = src.read_text()
    src.write_text(text[: text.index('"transcript"', text.index('"e2"'))])  # cut inside row 2 (line 4)
    r = cli("convert", "speechgradebook", src, "--out", tmp_path / "out")
    assert r.code == 1
    assert f"{src}:4:" in r.err and "truncated" in r.err
    assert only_summary(tmp_path / "out")
    r = cli("convert", "speechgradebook", src, "--out", tmp_path / "skip", "--on-error", "skip")
    assert r.code != 0 and "cannot read past" in r.err  # nothing after the cut can be trusted
    assert not (tmp_path / "skip" / "train.jsonl").exists()


def test_a_malformed_evaluation_in_the_middle_is_skipped_alone(cli, tmp_path):
    src = write_export(tmp_path / "exported.json", [evaluation(1), evaluation(2), evaluation(3)])
    lines = src.read_text().splitlines()
    lines[3] = lines[3].replace('"transcript":', '"transcript" ')  # row 2: missing colon
    src.write_text("\n".join(lines) + "\n")
    r = cli("convert", "speechgradebook", src, "--out", tmp_path / "out", "--on-error", "skip")
    assert r.code == 0, r.err
    ids = [row["meta"]["evaluation_id"] for row in read_jsonl(tmp_path / "out" / "train.jsonl")]
    assert ids == ["e1", "e3"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["read"], summary["written"], summary["rejected"]) == (3, 2, 1)
    assert summary["rejected_reasons"][0].startswith(f"{src}:4: evaluations[1]: invalid JSON: Expecting ':' delimiter")


def test_wrong_encodings(cli, tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"messages": "caf\u00e9"}'.encode("latin-1") + b"\n")
    r = cli("convert", "chat", latin, "--out", tmp_path / "o1")
    assert r.code == 1 and f"{latin}:2: not valid UTF-8 (byte 0xe9 at column 18)" in r.err
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_text(json.dumps(GOOD) + "\n", encoding="utf-16")
    r = cli("convert", "chat", utf16, "--out", tmp_path / "o2")
    assert r.code == 1 and f"{utf16}:1: file is UTF-16LE-encoded; expected UTF-8" in r.err
    bom = tmp_path / "bom.jsonl"
    bom.write_text(json.dumps(GOOD) + "\n", encoding="utf-8-sig")  # a BOM is harmless
    assert cli("convert", "chat", bom, "--out", tmp_path / "o3").code == 0


def test_directory_empty_and_missing_files(cli, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for path, message in [(tmp_path, "is a directory, expected a JSON or JSONL file"),
                          (tmp_path / "nope.jsonl", "no such file")]:
        r = cli("convert", "chat", path, "--out", tmp_path / "out")
        assert r.code == 1 and f"{path}: {message}" in r.err, r.err
        assert not (tmp_path / "out").exists()
    # An empty file is a conversion that found nothing: its counts are written.
    r = cli("convert", "chat", empty, "--out", tmp_path / "out")
    assert r.code == 1 and r.err == (f"slurmtune: error: {empty}: file is empty; expected JSON records\n"
                                     f"nothing written to {tmp_path / 'out'}; counts in {tmp_path / 'out' / 'summary.json'}\n")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["ok"], summary["read"], summary["files"]) == (False, 0, [])
    assert sorted(os.listdir(tmp_path / "out")) == ["summary.json"]


def test_wrong_types_and_missing_fields_list_the_field(cli, tmp_path):
    rows = [GOOD, {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
            {"text": "no messages"}, [1, 2]]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    r = cli("convert", "chat", src, "--out", tmp_path / "out")
    assert r.code == 1
    assert f"{src}:2: messages[0].content: expected a string or a non-empty list of parts" in r.err
    assert f"{src}:3: messages: expected a non-empty list of {{role, content}} objects" in r.err
    assert f"{src}:4: expected a JSON object, got a list" in r.err


def test_a_2gb_single_line_is_reported_not_loaded(tmp_path):
    """A sparse 2 GiB line: reported as too long in bounded memory, the next line still read."""
    src = tmp_path / "huge.jsonl"
    with open(src, "wb") as f:
        f.seek(2 * 1024**3)
        f.write(b"\n" + json.dumps(GOOD).encode() + b"\n")
    items = list(iter_records(src))
    assert items[0] == Item(1, error="line is longer than 64 MiB; expected one JSON record per line")
    assert items[1].line == 2 and items[1].value == GOOD
    r = run_subprocess("convert", "chat", src, "--out", tmp_path / "out")
    assert r.code == 1 and "Traceback" not in r.err
    assert f"{src}:1: line is longer than 64 MiB" in r.err


def test_atomic_files_leave_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with AtomicFiles(tmp_path) as files:
            files.open("train.jsonl").write("partial\n")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    with AtomicFiles(tmp_path) as files:
        files.open("train.jsonl").write("whole\n")
        assert not (tmp_path / "train.jsonl").exists()  # not visible until the end
    assert (tmp_path / "train.jsonl").read_text() == "whole\n" and len(os.listdir(tmp_path)) == 1


def test_unknown_extra_fields_are_tolerated(cli, tmp_path):
    src = write_export(tmp_path / "exported.json", [evaluation(1, new_field={"x": 1}, speech_label="P1")])
    assert cli("convert", "speechgradebook", src, "--out", tmp_path / "out").code == 0
