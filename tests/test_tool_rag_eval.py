"""The course assistant's tool and rag stages: their eval metrics against hand-computed
predictions files, and the tiny model trained and evaluated on both kinds of records through
the main job's path."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import EXAMPLES, REPO, read_jsonl, write_jsonl
from slurmtune.evaluate.metrics import json_equal, score_file
from slurmtune.evaluate.report import write_reports

EVAL = EXAMPLES / "course_assistant" / "eval"
MODELS = REPO.parent / "shared" / "models"


def call(name, **arguments):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def answered(record, actual):
    return {**copy.deepcopy(record), "actual": actual}


def test_tool_call_metrics_by_hand(tmp_path):
    tb = {r["id"]: r for r in read_jsonl(EVAL / "tool_benchmark.jsonl")}
    text_2 = tb["tb-002"]["messages"][-1]["tool_calls"][0]["function"]["arguments"]["text"]
    text_1 = tb["tb-001"]["messages"][-1]["tool_calls"][0]["function"]["arguments"]["text"]
    rows = [
        # arguments as a JSON string, keys in another order: the same call
        answered(tb["tb-001"], "<tool_call>\n" + json.dumps({"arguments": json.dumps({"text": text_1}),
                                                            "name": "check_plagiarism"}) + "\n</tool_call>"),
        answered(tb["tb-002"], call("validate_format", text=text_2, style="APA")),  # 1 of 2 fields
        answered(tb["tb-003"], call("check_plagiarism", text="x")),                   # wrong tool
        answered(tb["tb-004"], call("validate_format", text="tesla", style="IEEE")),  # none was expected
        answered(tb["tb-001"], "It is original."),                                   # missed
        answered(tb["tb-004"], "The tesla."),                                         # right: no call
        answered(tb["tb-002"], "<tool_call>\n{not json}\n</tool_call>"),              # malformed
    ]
    result = score_file(write_jsonl(tmp_path / "p.jsonl", rows))
    assert result["metrics"]["tool_calls"] == {
        "n": 7, "n_expected_call": 5, "n_expected_no_call": 2,
        "name_match": 2, "name_match_rate": 0.4, "arguments_match": 1, "arguments_match_rate": 0.2,
        "missed": 2, "missed_rate": 0.4, "unexpected": 1, "unexpected_rate": 0.5,
        "argument_fields": {"n": 8, "correct": 2, "rate": 0.25}, "malformed": 1}
    assert [d["passed"] for d in result["records"]] == [True, False, False, False, False, True, False]
    assert (result["passed"], result["failed"]) == (2, 5)
    assert result["records"][1]["checks"]["tool_calls"]["fields_correct"] == 1
    assert json_equal({"a": [1, 2.0]}, {"a": [1.0, 2]}) and not json_equal(True, 1) and not json_equal("1", 1)
    # the expected answer of a call turn reads as the model writes it: exact match holds for tb-003's own call
    expected = tb["tb-003"]["messages"][-1]["tool_calls"][0]["function"]["arguments"]
    exact = score_file(write_jsonl(tmp_path / "q.jsonl", [answered(tb["tb-003"], call("validate_format", **expected))]))
    assert exact["metrics"]["exact_match"]["correct"] == 1 and exact["passed"] == 1


def test_citation_metrics_by_hand(tmp_path):
    rb = read_jsonl(EVAL / "rag_benchmark.jsonl")
    rows = [answered(rb[0], "Only one formula sheet; it is closed book [syl-7]."),  # valid
            answered(rb[1], "VSWR = 3 [notes-6.4] [notes-9.9]."),                   # an id not given
            answered(rb[2], "Tuesdays 14:00-16:00 in B214."),                       # cites nothing
            answered(rb[3], "No: it is not accepted [syl-3].")]                     # given, not the expected one
    result = score_file(write_jsonl(tmp_path / "p.jsonl", rows))
    assert result["metrics"]["citations"] == {
        "n": 4, "citing": 3, "valid": 2, "valid_rate": 2 / 3, "unknown_ids": 1,
        "n_expected_citation": 4, "uncited": 1, "recall": 0.5}
    assert result["metrics"]["key_points"]["coverage"] == 1.0
    assert [d["passed"] for d in result["records"]] == [True, False, False, True]
    assert result["records"][1]["checks"]["citations"]["unknown"] == ["notes-9.9"]
    # the report shows both tables' rows and each example's citations
    paths = write_reports(tmp_path, tmp_path / "p.jsonl", result, out_dir=tmp_path / "report")
    html = paths["html"].read_text()
    assert 'data-metric="citations.valid_rate" data-value="0.6666666666666666"' in html
    assert "cites notes-6.4, notes-9.9; not given: notes-9.9" in html
    assert "Passages:\n[notes-6.4] The voltage standing wave ratio" in html  # the full prompt
    assert "| Citations: only passages given | 4 | 66.7% |" in paths["md"].read_text()


@pytest.fixture(scope="module")
def trained_tool_rag(tmp_path_factory):
    """The tiny model trained on the tool and rag examples (Qwen2.5's own template, which renders
    tools) and evaluated on both benchmarks: the main job's steps, in this process."""
    from slurmtune.cli.main import main
    from slurmtune.runs.folder import Run
    root = tmp_path_factory.mktemp("tool-rag")
    template = root / "qwen2.5.jinja"
    template.write_text(json.loads((MODELS / "qwen2.5-instruct" / "tokenizer_config.json").read_text())["chat_template"])
    eval_file = write_jsonl(root / "eval.jsonl", read_jsonl(EVAL / "tool_benchmark.jsonl")
                            + read_jsonl(EVAL / "rag_benchmark.jsonl"))
    course = EXAMPLES / "course_assistant"
    manifest = root / "m.yaml"
    manifest.write_text(f"""name: tool-rag
output_dir: {root / 'runs'}
data: {{train_files: [{course / 'tool_sft.jsonl'}, {course / 'rag_sft.jsonl'}], eval_file: {eval_file}}}
model: {{path: {root / 'tiny'}, tiny_arch: llama, chat_template: {template}}}
lora: {{r: 4, alpha: 8}}
train: {{method: lora, max_steps: 3, batch_size: 2, grad_accum: 1, lr: 1.0e-3, max_length: 1536, save_steps: 3}}
eval: {{shards: 2, max_new_tokens: 8}}
slurm: {{gpus: 0}}
""")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SLURMTUNE_DEBUG_LOG", str(root / "cli-debug.log"))
        assert main(["run", str(manifest), "--executor", "debug"]) == 0
    return Run.open(None, root / "runs")


def test_tool_and_rag_records_train_and_are_scored_end_to_end(trained_tool_rag):
    run = trained_tool_rag
    lineage = json.loads((run.dir / "final" / "lineage.json").read_text())
    assert sum(f["rows"] for f in lineage["data_files"]) == 11
    log = (run.dir / "training.log").read_text()
    share = next(line for line in log.splitlines() if "preflight:" in line)
    assert "tokens trained" in share and "(100%)" not in share
    report = json.loads((run.dir / "eval_report.json").read_text())
    predictions = read_jsonl(run.dir / "predictions.jsonl")
    assert report["n"] == len(predictions) == 8
    calls, citations = report["metrics"]["tool_calls"], report["metrics"]["citations"]
    assert (calls["n"], calls["n_expected_call"], calls["n_expected_no_call"]) == (4, 3, 1)
    assert (citations["n"], citations["n_expected_citation"]) == (4, 4)
    # the numbers are those of the predictions the model wrote, scored again here
    assert score_file(run.dir / "predictions.jsonl")["metrics"] == report["metrics"]
    html = (run.dir / "report.html").read_text()
    assert "Tool calls: right tools with right arguments" in html and "Citations: only passages given" in html
