"""SpeechGradebook export -> text tier and Qwen manifests: golden output, consent, split, pairs."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLES, read_jsonl
from factories import evaluation, write_export
from slurmtune.data.converters import get_converter, run_conversion
from slurmtune.data.converters.base import InvalidInput, Summary

GOLDEN_FIRST_LINE = (
    '{"messages":[{"role":"system","content":"You are an experienced public-speaking instructor. '
    'Grade the speech against the rubric. Reply with JSON only: an object with one key per rubric '
    "category, each holding its score, maxScore, an optional comment and its subcategories' scores. "
    'Every score lies between 0 and its maxScore."},{"role":"user","content":"Rubric: Informative\\n'
    '- Content (max 40)\\n  - Thesis (max 10)\\n- Delivery (max 30)\\n\\nTranscript:\\nSpeech number 1.'
    '\\n\\nVideo notes:\\nLooks down often."},{"role":"assistant","content":"{\\"Content\\": {\\"score\\": 35, '
    '\\"maxScore\\": 40, \\"comment\\": \\"clear\\", \\"subcategories\\": [{\\"name\\": \\"Thesis\\", '
    '\\"score\\": 9, \\"maxScore\\": 10}]}, \\"Delivery\\": {\\"score\\": 25, \\"maxScore\\": 30, '
    '\\"subcategories\\": []}}"}],"meta":{"source":"speechgradebook","file":"exported.json","line":3,'
    '"index":0,"evaluation_id":"e1","student_id":"s1","course_id":"c1"}}\n'
)


def test_golden_text_tier_record(cli, tmp_path):
    src = write_export(tmp_path / "exported.json", [evaluation(1, video_notes="Looks down often.")])
    r = cli("convert", "speechgradebook", src, "--out", tmp_path / "out")
    assert r.code == 0, r.err
    assert (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8") == GOLDEN_FIRST_LINE
    (record,) = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert json.loads(record["messages"][2]["content"]) == evaluation(1)["evaluation_data"]["sections"]
    assert r.out.startswith("speechgradebook: read 1, written 1, excluded (consent) 0, excluded (demo) 0, rejected 0")


def test_consent_is_enforced_literally(cli, tmp_path):
    yes = {"student_data_collection": True, "instructor_llm_training": True}
    rows = [evaluation(1),
            evaluation(2, consent={**yes, "student_data_collection": "true"}),
            evaluation(3, consent={**yes, "instructor_llm_training": 1}),
            evaluation(4, consent={"student_data_collection": True}),
            evaluation(5, consent=None),
            evaluation(6, account_tier="demo"),
            evaluation(7, account_tier="Demo ", consent={**yes, "instructor_llm_training": False})]
    del rows[4]["consent"]
    src = write_export(tmp_path / "exported.json", rows, wrapped=False)
    assert cli("convert", "speechgradebook", src, "--out", tmp_path / "out").code == 0
    assert [r["meta"]["evaluation_id"] for r in read_jsonl(tmp_path / "out" / "train.jsonl")] == ["e1"]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {k: s[k] for k in ("read", "written", "excluded_consent", "excluded_demo", "rejected")} == \
        {"read": 7, "written": 1, "excluded_consent": 5, "excluded_demo": 1, "rejected": 0}


def test_invalid_scores_name_the_field(cli, tmp_path):
    bad_score = evaluation(2)
    bad_score["evaluation_data"]["sections"]["Content"]["subcategories"][0]["score"] = 11
    unknown_cat = evaluation(3)
    unknown_cat["evaluation_data"]["sections"]["Style"] = {"score": 1, "maxScore": 5}
    not_consented_garbage = {"evaluation_id": "e9", "consent": {"student_data_collection": False}}
    src = write_export(tmp_path / "exported.json", [evaluation(1), bad_score, unknown_cat, not_consented_garbage])
    r = cli("convert", "speechgradebook", src, "--out", tmp_path / "out", "--on-error", "skip")
    assert r.code == 0
    reasons = json.loads((tmp_path / "out" / "summary.json").read_text())["rejected_reasons"]
    assert reasons == [
        f"{src}:4: evaluations[1].evaluation_data.sections.Content.subcategories[0].score: 11 is outside 0..10",
        f"{src}:5: evaluations[2].evaluation_data.sections.Style: not a category of rubric 'Informative'; "
        "expected one of Content, Delivery"]
    rejected = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert [row["record"]["evaluation_id"] for row in rejected] == ["e2", "e3"]  # e9: excluded, never echoed


def test_split_keeps_each_student_on_one_side_and_is_deterministic(cli, tmp_path):
    src = EXAMPLES / "speechgradebook" / "exported.json"
    digests = []
    for run in ("a", "b"):
        assert cli("convert", "speechgradebook", src, "--out", tmp_path / run, "--split", "0.8").code == 0
        digests.append([hashlib.sha256((tmp_path / run / n).read_bytes()).hexdigest()
                        for n in ("train.jsonl", "validation.jsonl")])
    assert digests[0] == digests[1]
    train = read_jsonl(tmp_path / "a" / "train.jsonl")
    val = read_jsonl(tmp_path / "a" / "validation.jsonl")
    assert {r["meta"]["student_id"] for r in train}.isdisjoint({r["meta"]["student_id"] for r in val})
    assert 0.7 <= len(train) / (len(train) + len(val)) <= 0.9 and val
    assert cli("validate", tmp_path / "a" / "train.jsonl", tmp_path / "a" / "validation.jsonl").code == 0
    assert cli("convert", "speechgradebook", src, "--out", tmp_path / "c", "--split", "0.8", "--seed", "1").code == 0
    assert (tmp_path / "c" / "train.jsonl").read_bytes() != (tmp_path / "a" / "train.jsonl").read_bytes()


def test_qwen_manifests(cli, tmp_path):
    rows = [evaluation(1, created_at="2026-02-01T10:00:00Z"),
            evaluation(2, created_at="2026-01-01T10:00:00Z", scores_original={
                "Content": {"score": 30, "maxScore": 40, "subcategories": []},
                "Delivery": {"score": 20, "maxScore": 30, "subcategories": []}}),
            evaluation(3, student="s2"),
            evaluation(4, created_at="2026-03-01T10:00:00Z"),
            evaluation(5, video_path=None, image_path="slide.png")]
    src = write_export(tmp_path / "exported.json", rows)
    for fmt in ("qwen-single", "qwen-corrections", "qwen-pairs"):  # one folder per conversion
        assert cli("convert", fmt, src, "--out", tmp_path / fmt).code == 0
    single = read_jsonl(tmp_path / "qwen-single" / "train_qwen.jsonl")
    assert [r.get("video_path") or r.get("image_path") for r in single] == ["v1.mp4", "v2.mp4", "v3.mp4", "v4.mp4", "slide.png"]
    assert set(single[0]) == {"video_path", "rubric", "scores", "evaluation_id", "student_id"}
    assert single[0]["scores"] == rows[0]["evaluation_data"]["sections"]
    (correction,) = read_jsonl(tmp_path / "qwen-corrections" / "train_qwen_correction_pairs.jsonl")
    assert correction["scores_original"]["Content"]["score"] == 30 and correction["evaluation_id"] == "e2"
    assert correction["scores_final"] == rows[1]["evaluation_data"]["sections"]
    pairs = read_jsonl(tmp_path / "qwen-pairs" / "train_qwen_pairs.jsonl")
    # student s1, in time order: e2 (Jan), e1 (Feb), e4 (Mar); e5 has only an image
    assert [(p["video_path_1"], p["video_path_2"]) for p in pairs] == [("v2.mp4", "v1.mp4"), ("v1.mp4", "v4.mp4")]
    summary = json.loads((tmp_path / "qwen-pairs" / "summary.json").read_text())
    assert summary["format"] == "qwen-pairs" and summary["written"] == 2 and summary["skipped"] == 1
    assert summary["files"] == ["train_qwen_pairs.jsonl", "summary.json"]


def test_qwen_as_chat_records_with_media_parts(cli, tmp_path):
    src = write_export(tmp_path / "exported.json", [evaluation(1)])
    assert cli("convert", "qwen-single", src, "--out", tmp_path, "--chat").code == 0
    (record,) = read_jsonl(tmp_path / "train_qwen.jsonl")
    user, assistant = record["messages"]
    # Relative to the export's folder, made absolute: the run trains from another folder.
    assert user["content"][0] == {"type": "video", "video": str(tmp_path / "v1.mp4")}
    assert json.loads(assistant["content"]) == evaluation(1)["evaluation_data"]["sections"]
    assert cli("validate", tmp_path / "train_qwen.jsonl").code == 0


def test_media_root_places_the_export_s_relative_paths(cli, tmp_path):
    src = write_export(tmp_path / "exported.json", [evaluation(1), evaluation(2, video_path="/abs/v2.mp4"),
                                                    evaluation(3, video_path="https://cdn.example/v3.mp4")])
    media = tmp_path / "media store"
    assert cli("convert", "qwen-single", src, "--out", tmp_path / "out", "--chat", "--media-root", media).code == 0
    videos = [r["messages"][0]["content"][0]["video"] for r in read_jsonl(tmp_path / "out" / "train_qwen.jsonl")]
    assert videos == [str(media / "v1.mp4"), "/abs/v2.mp4", "https://cdn.example/v3.mp4"]
    assert cli("convert", "qwen-single", src, "--out", tmp_path / "manifest").code == 0  # the manifest keeps them
    assert [r["video_path"] for r in read_jsonl(tmp_path / "manifest" / "train_qwen.jsonl")] == \
        ["v1.mp4", "/abs/v2.mp4", "https://cdn.example/v3.mp4"]


@pytest.mark.parametrize("value, problem", [
    ("media_root: [1]", "data.options.media_root: list is not a string"),
    ("chat: maybe", "data.options.chat: 'maybe' is not on or off; expected true or false"),
])
def test_manifest_options_are_checked_entry_by_entry(cli, tmp_path, value, problem):
    src = write_export(tmp_path / "exported.json", [evaluation(1)])
    m = tmp_path / "m.yaml"
    m.write_text(f"name: q\ndata:\n  format: qwen-single\n  inputs: [{src}]\n  options: {{{value}}}\n"
                 f"model: {{path: {tmp_path}}}\n")
    r = cli("run", m, "--dry-run")
    assert r.code != 0 and problem in r.err


def test_a_switch_written_false_in_a_manifest_is_off(tmp_path):
    from slurmtune.config import load_manifest

    src = write_export(tmp_path / "exported.json", [evaluation(1)])
    m = tmp_path / "m.yaml"
    m.write_text(f"name: q\ndata:\n  format: qwen-single\n  inputs: [{src}]\n  options: {{chat: false}}\n")
    cfg = load_manifest(m)
    assert cfg.data.options == {"chat": "false"}
    converter = get_converter("qwen-single")(**cfg.data.options)
    assert converter.opts["chat"] is False and converter.group_field == "student_id"


# --- properties -----------------------------------------------------------------------

flag = st.sampled_from([True, False, "true", 1, None, "yes"])
row_strategy = st.fixed_dictionaries({
    "student": st.sampled_from(["s1", "s2", "s3", "s4"]),
    "consent": st.one_of(st.none(), st.fixed_dictionaries(
        {}, optional={"student_data_collection": flag, "instructor_llm_training": flag})),
    "tier": st.sampled_from(["institution", "demo", "DEMO", "pro", None]),
    "score": st.integers(min_value=-2, max_value=45),
})


def _build(rows):
    evs = []
    for i, r in enumerate(rows):
        ev = evaluation(i, student=r["student"], account_tier=r["tier"])
        ev["evaluation_data"]["sections"]["Content"]["score"] = r["score"]
        ev["evaluation_data"]["sections"]["Content"]["subcategories"] = []
        if r["consent"] is None:
            del ev["consent"]
        else:
            ev["consent"] = r["consent"]
        evs.append(ev)
    return evs


def _convert_or_nothing(fmt, src, out, **kw) -> Summary:
    """run_conversion with on_error=skip; when no record may be written, the failure's
    counts (and that it wrote nothing but summary.json)."""
    try:
        return run_conversion(get_converter(fmt)(), [src], out, on_error="skip", **kw)
    except InvalidInput as e:
        assert "no records to write" in str(e)
        assert os.listdir(out) == ["summary.json"]
        return Summary(**json.loads((out / "summary.json").read_text()))


def _may_train(ev) -> bool:
    c = ev.get("consent")
    return (isinstance(c, dict) and c.get("student_data_collection") is True
            and c.get("instructor_llm_training") is True
            and str(ev.get("account_tier")).strip().lower() != "demo")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row_strategy, min_size=1, max_size=12), split=st.sampled_from([None, 0.5, 0.8]),
       fmt=st.sampled_from(["speechgradebook", "qwen-single", "qwen-pairs"]))
def test_no_unconsented_or_demo_row_ever_reaches_an_output(tmp_path_factory, rows, split, fmt):
    evs = _build(rows)
    tmp = tmp_path_factory.mktemp("prop")
    src = write_export(tmp / "exported.json", evs)
    summary = _convert_or_nothing(fmt, src, tmp / "out", split=split)
    allowed = {ev["evaluation_id"] for ev in evs if _may_train(ev)}
    text = "".join(p.read_text() for p in (tmp / "out").glob("*.jsonl") if p.name != "rejected.jsonl")
    for ev in evs:
        if ev["evaluation_id"] not in allowed:
            assert f'"{ev["evaluation_id"]}"' not in text
    assert summary.excluded_consent + summary.excluded_demo == len(evs) - len(allowed)
    assert summary.read == len(evs) and summary.balanced()
    if fmt == "speechgradebook":
        assert summary.written == summary.accepted
        assert summary.rejected == sum(1 for ev in evs if ev["evaluation_id"] in allowed
                                       and not 0 <= ev["evaluation_data"]["sections"]["Content"]["score"] <= 40)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row_strategy, min_size=1, max_size=10), seed=st.integers(0, 3),
       fmt=st.sampled_from(["speechgradebook", "qwen-pairs", "qwen-corrections"]))
def test_conversion_is_deterministic(tmp_path_factory, rows, seed, fmt):
    tmp = tmp_path_factory.mktemp("det")
    src = write_export(tmp / "exported.json", _build(rows))
    outs = []
    for run in ("a", "b"):
        _convert_or_nothing(fmt, src, tmp / run, split=0.5 if fmt == "speechgradebook" else None, seed=seed)
        outs.append({p.name: p.read_bytes() for p in sorted((tmp / run).iterdir())})
    assert outs[0] == outs[1]
