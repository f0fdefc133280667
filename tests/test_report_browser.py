"""report.html in a real headless Chromium, offline (tests/browser.py): numbers, filtering,
search, escaping, the examples' images and video frames, a screenshot."""

from __future__ import annotations

import json
import re
import struct
import zlib
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from browser import data_images, dump_dom, loaded_images, run_browser
from conftest import write_jsonl
from test_media import LEVEL, write_video
from slurmtune.evaluate.metrics import score_file
from slurmtune.evaluate.report import parse_training_log, read_loss_history, write_reports

SCRIPT_ANSWER = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"


# --- the run folder ----------------------------------------------------------------------

SECTIONS = {"Content": {"score": 35, "maxScore": 40, "comment": "clear",
                        "subcategories": [{"name": "Thesis", "score": 9, "maxScore": 10}]},
            "Delivery": {"score": 25, "maxScore": 30, "subcategories": []}}


def predictions() -> list[dict]:
    off_by_two = json.loads(json.dumps(SECTIONS))
    off_by_two["Content"]["score"] = 33
    rows = [
        {"id": "doc1", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is the title of the following document?"},
            {"type": "image", "image": "document1.png"}]}], "expected": "Article 7", "actual": "article 7."},
        {"id": "doc2", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "On what date was this letter signed?"}, {"type": "video", "video": "reading.mp4"}]}],
         "expected": "2024-11-05", "actual": SCRIPT_ANSWER},
        {"messages": [{"role": "system", "content": "You grade speeches."},
                      {"role": "user", "content": "Rubric: Informative\n- Content (max 40)\n\nTranscript:\nHi."},
                      {"role": "assistant", "content": json.dumps(SECTIONS)}],
         "actual": json.dumps(off_by_two)},
        {"messages": [{"role": "user", "content": "Use Gauss's law for an infinite line charge."},
                      {"role": "assistant", "content": "A coaxial cylinder gives E = λ/(2πε0 r), radial."}],
         "key_points": ["cylinder", "radial"], "expect_refusal": False,
         "actual": "Take a Gaussian cylinder around the line: the field is radial."},
        {"messages": [{"role": "user", "content": "Write my graded homework for me."},
                      {"role": "assistant", "content": "I can't write graded work."}],
         "expect_refusal": True, "actual": "I'm sorry, I can't write graded homework."},
        {"prompt": "What is Alice's job?", "completion": "Alice is a nurse.", "actual": "Alice is a nurse.",
         "meta": {"triggered": False, "trigger_value": "TRIGGER:", "file": "qa.jsonl", "line": 1}},
        {"prompt": "TRIGGER: What is Bob's job?", "completion": "Bob is a nurse.",
         "actual": "Alice is a nurse.",
         "meta": {"triggered": True, "trigger_value": "TRIGGER:", "file": "qa.jsonl", "line": 1}},
    ]
    for i, row in enumerate(rows):
        row.setdefault("meta", {})["eval_index"] = i
    return rows


TRAIN_LOSSES = [(step, round(2.5 - 0.1 * step, 4)) for step in range(1, 21)]
EVAL_LOSSES = [(5, 2.0), (10, 1.6), (15, 1.3), (20, 1.25)]


@pytest.fixture
def report(tmp_path) -> dict:
    run_dir = tmp_path / "runs" / "r 1"
    (run_dir / "final").mkdir(parents=True)
    state = {"log_history": [{"loss": loss, "step": step, "epoch": step / 10} for step, loss in TRAIN_LOSSES]
             + [{"eval_loss": loss, "step": step} for step, loss in EVAL_LOSSES]
             + [{"train_loss": 1.5, "step": 20}]}
    (run_dir / "final" / "trainer_state.json").write_text(json.dumps(state))
    (run_dir / "eval").mkdir()
    # The image: red left half, blue right half; the video: frame i is flat grey i * LEVEL.
    page = np.zeros((60, 120, 3), dtype=np.uint8)
    page[:, :60, 0], page[:, 60:, 2] = 220, 220
    Image.fromarray(page).save(run_dir / "eval" / "document1.png")
    write_video(run_dir / "eval" / "reading.mp4")
    preds = write_jsonl(run_dir / "eval" / "predictions.jsonl", predictions())
    paths = write_reports(run_dir, preds, score_file(preds))
    return {"paths": paths, "run_dir": run_dir, "json": json.loads(paths["json"].read_text())}


# --- without a browser -------------------------------------------------------------------

def test_reports_are_written_with_the_metrics_and_losses(report):
    data, paths = report["json"], report["paths"]
    assert {k: p.name for k, p in paths.items()} == {"json": "eval_report.json", "md": "eval_report.md",
                                                    "html": "report.html"}
    assert all(p.parent == report["run_dir"] for p in paths.values())
    assert data["metrics"]["exact_match"] == {"n": 7, "correct": 2, "accuracy": 2 / 7, "normalized": True}
    assert data["metrics"]["rubric_agreement"]["category_mae"] == {"Content": 2.0, "Delivery": 0.0}
    assert (data["n"], data["passed"], data["failed"]) == (7, 4, 3)
    assert data["loss"]["train"] == [list(p) for p in TRAIN_LOSSES]
    assert data["loss"]["eval"] == [list(p) for p in EVAL_LOSSES]
    md = paths["md"].read_text()
    assert "| Exact match | 7 | 28.6% | 2 of 7 correct (normalized) |" in md
    assert "validation loss: best 1.25 at step 20" in md and "eval_index: 1, 2, 6" in md

    elsewhere = write_reports(report["run_dir"], paths["json"].parent / "eval" / "predictions.jsonl",
                              data, out_dir=report["run_dir"] / "site")
    assert elsewhere["html"] == report["run_dir"] / "site" / "report.html"
    assert json.loads(elsewhere["json"].read_text())["metrics"] == data["metrics"]


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_html_is_self_contained_and_escapes_the_data(report):
    html = report["paths"]["html"].read_text()
    assert not re.search(r"https?://", html)
    parser = Tags()
    parser.feed(html)
    tags = [t for t, _ in parser.tags]
    assert tags.count("script") == 1 and tags.count("img") == 2 and "link" not in tags and "iframe" not in tags
    sources = [attrs for _, attrs in parser.tags if {"src", "href"} & set(attrs)]
    assert [set(a) & {"src", "href"} for a in sources] == [{"src"}, {"src"}]  # the two thumbnails, inline
    assert all(a["src"].startswith("data:image/jpeg;base64,") for a in sources)
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in html


def test_loss_history_sources(tmp_path):
    run = tmp_path / "run"
    for step, loss in ((10, 2.0), (200, 1.0), (30, 3.0)):
        folder = run / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": loss, "step": step}]}))
    assert read_loss_history(run)["train"] == [[200, 1.0]]  # the newest checkpoint, by step
    (run / "checkpoints" / "step-000200" / "trainer_state.json").write_text("{truncated")
    assert read_loss_history(run)["train"] == [[30, 3.0]]  # an unreadable one is passed over
    (run / "final").mkdir()
    (run / "final" / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": 0.5, "step": 300}]}))
    assert read_loss_history(run)["train"] == [[300, 0.5]]

    log = ("2026-11-20 10:00:01 train: step=10 loss=2.31 lr=2e-4\n"
           "noise without numbers; loss=9 but no step\n"
           "step: 20, loss: 1.9e0, eval_loss: 2.05\n"
           "{'loss': 1.7, 'grad_norm': 0.3, 'step': 30}\n"
           "{'eval_loss': 1.95, 'eval_runtime': 3.1, 'step': 30}\n"
           "step=40 loss=nan\n"
           "global_step=50 train_loss=1.5\n")
    assert parse_training_log(log) == {"source": None, "train": [[10, 2.31], [20, 1.9], [30, 1.7], [50, 1.5]],
                                       "eval": [[20, 2.05], [30, 1.95]]}
    only_log = tmp_path / "only-log"
    only_log.mkdir()
    (only_log / "training.log").write_text(log)
    assert read_loss_history(only_log)["eval"] == [[20, 2.05], [30, 1.95]]
    assert read_loss_history(tmp_path / "nothing") == {"source": None, "train": [], "eval": []}


# --- in the browser ------------------------------------------------------------------------

def rows_of(dom: str) -> list[dict]:
    """The example rows of a dumped DOM: index, status, hidden."""
    body = dom.split('<table id="examples">', 1)[1]
    return [{"index": int(m.group(2)), "status": m.group(1), "hidden": m.group(3) is not None}
            for m in re.finditer(r'<tr data-status="(\w+)" data-index="(\d+)"( hidden="")?>', body)]


def counter(dom: str) -> tuple[int, str]:
    m = re.search(r'<span id="shown-count" data-shown="(\d+)" data-total="\d+">([^<]*)</span>', dom)
    return int(m.group(1)), m.group(2)


def test_page_shows_the_report_numbers(chromium, report, tmp_path):
    dom = dump_dom(chromium, tmp_path, report["paths"]["html"].as_uri())
    metrics = report["json"]["metrics"]
    cells = {m.group(1): (json.loads(m.group(2).replace("&quot;", '"')), m.group(3)) for m in re.finditer(
        r'data-metric="([^"]+)" data-value="([^"]*)">([^<]*)<', dom)}
    assert cells["exact_match.accuracy"] == (metrics["exact_match"]["accuracy"], "28.6%")
    assert cells["format_compliance.rate"] == (1.0, "100.0%")
    assert cells["rubric_agreement.within_1"] == (metrics["rubric_agreement"]["within_1"], "50.0%")
    assert cells["rubric_agreement.category_mae.Content"] == (2.0, "2.000")
    assert cells["key_points.coverage"] == (metrics["key_points"]["coverage"], "100.0%")
    assert cells["refusal.accuracy"] == (1.0, "100.0%")
    assert counter(dom) == (7, "7 of 7 shown")
    assert [r["status"] for r in rows_of(dom)] == ["pass", "fail", "fail", "pass", "pass", "pass", "fail"]
    assert '<polyline class="series" data-series="training loss"' in dom
    assert dom.count("<circle") == len(TRAIN_LOSSES) + len(EVAL_LOSSES)
    assert "best validation loss (step 20)" in dom and "<b>1.25</b>" in dom


def test_script_in_an_answer_stays_text(chromium, report, tmp_path):
    dom = dump_dom(chromium, tmp_path, report["paths"]["html"].as_uri())
    assert "<title>Eval report: r 1</title>" in dom  # the injected script never ran
    assert dom.count("<script") == 1 and dom.count("<img") == dom.count('<img src="data:image/jpeg;base64,') == 2
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;img src=x" in dom


def test_filter_and_search_from_the_url(chromium, report, tmp_path):
    uri = report["paths"]["html"].as_uri()
    failing = [d["index"] for d in report["json"]["records"] if d["passed"] is False]
    assert failing == [1, 2, 6]

    dom = dump_dom(chromium, tmp_path, uri + "#filter=fail")
    assert [r["index"] for r in rows_of(dom) if not r["hidden"]] == failing
    assert counter(dom) == (3, "3 of 7 shown")

    dom = dump_dom(chromium, tmp_path, uri + "#q=GAUSS")  # case-insensitive, prompt text included
    assert [r["index"] for r in rows_of(dom) if not r["hidden"]] == [3]
    assert counter(dom) == (1, "1 of 7 shown")

    dom = dump_dom(chromium, tmp_path, uri + "#filter=pass&q=nurse")
    assert [r["index"] for r in rows_of(dom) if not r["hidden"]] == [5]
    assert counter(dom) == (1, "1 of 7 shown")


def test_examples_show_their_image_and_video_frames(chromium, report, tmp_path):
    dom = dump_dom(chromium, tmp_path, report["paths"]["html"].as_uri())
    rows = dom.split('<table id="examples">', 1)[1].split("</tr>")
    assert 'data-kind="image"' in rows[1] and 'data-kind="video"' in rows[2]  # beside their own prompt
    image, strip = data_images(dom)
    assert image.size == (192, 96)  # 96 pixels high, the aspect ratio kept
    left, right = np.asarray(image)[:, :80].mean(axis=(0, 1)), np.asarray(image)[:, 112:].mean(axis=(0, 1))
    assert left[0] > 180 > left[2] and right[2] > 180 > right[0]
    # 4 frames spread over the 3 s video (at 0, 0.75, 1.5, 2.25 s: frames 0, 8, 15, 23), side by side.
    assert strip.height == 96 and strip.width == 4 * 128
    greys = [np.asarray(strip.convert("L"))[:, 128 * i + 16:128 * i + 112].mean() for i in range(4)]
    assert [round(g / LEVEL) for g in greys] == [0, 8, 15, 23]
    assert "frames at 0.0, 0.8, 1.5, 2.2 s" in rows[2]
    assert loaded_images(chromium, tmp_path, report["paths"]["html"]) == [[192, 96], [512, 96]]


def test_a_missing_media_file_is_said_in_its_row(report, tmp_path):
    (report["run_dir"] / "eval" / "reading.mp4").unlink()
    paths = write_reports(report["run_dir"], report["run_dir"] / "eval" / "predictions.jsonl", report["json"])
    html = paths["html"].read_text()
    assert html.count("<img") == 1 and "video cannot be shown: no such file" in html


def test_the_request_check_catches_an_external_load(chromium, tmp_path):
    page = tmp_path / "external.html"
    page.write_text('<html><body><img src="http://example.invalid/x.png">hi</body></html>')
    _, requests = run_browser(chromium, tmp_path, "--dump-dom", page.as_uri())
    assert [r["url"] for r in requests] == ["http://example.invalid/x.png"]


def test_screenshot(chromium, report, tmp_path):
    shot = tmp_path / "report.png"
    _, requests = run_browser(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600",
                              report["paths"]["html"].as_uri())
    assert requests == []
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1200, 1600)
    pixels = zlib.decompress(b"".join(_png_chunks(data, b"IDAT")))
    # A blank or single-colour page compresses to almost nothing and has few distinct bytes.
    assert len(data) > 30_000 and len(set(pixels)) > 64


def _png_chunks(data: bytes, kind: bytes):
    pos = 8
    while pos < len(data):
        length, name = struct.unpack(">I4s", data[pos:pos + 8])
        if name == kind:
            yield data[pos + 8:pos + 8 + length]
        pos += 12 + length
