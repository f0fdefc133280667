"""`slurmtune review`: a dataset as one offline page, looked through in a real headless Chromium."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from browser import data_images, dump_dom, loaded_images
from conftest import write_jsonl
from factories import evaluation, write_export
from test_media import write_video


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data set"
    (folder / "media").mkdir(parents=True)
    Image.new("RGB", (80, 40), (10, 160, 20)).save(folder / "media" / "page.png")
    write_video(folder / "media" / "talk.mp4")
    (folder / "media" / "empty.mp4").write_bytes(b"")
    chat = write_jsonl(folder / "train.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "What does the page say?"},
                                                   {"type": "image", "image": "media/page.png"}]},
                      {"role": "assistant", "content": "Green."}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Score the talk on the thesis."},
                                                   {"type": "video", "video": "media/talk.mp4"}]},
                      {"role": "assistant", "content": "4 of 5"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "And this one?"},
                                                   {"type": "video", "video": "media/empty.mp4"}]},
                      {"role": "assistant", "content": "?"}]},
        {"messages": [{"role": "user", "content": "<b>bold</b> question with no answer"}]},
    ])
    export = write_export(folder / "exported.json", [
        evaluation(1, student="s1"),
        evaluation(2, student="stu-PRIVATE", transcript="A PRIVATE speech nobody consented to show.",
                   consent={"student_data_collection": False, "instructor_llm_training": False})])
    return {"chat": chat, "export": export, "page": tmp_path / "review.html"}


def test_the_page_shows_each_row_its_media_and_its_problems(cli, chromium, data, tmp_path):
    r = cli("review", data["chat"], data["export"], "--out", data["page"])
    assert r.code == 0, r.err
    assert r.out.strip() == (f"{data['page']}: 5 rows shown, 2 with problems (2 problems), "
                             "1 excluded by consent")
    dom = dump_dom(chromium, tmp_path, data["page"].as_uri())
    rows = re.findall(r'<tr data-status="(\w+)" data-index="(\d+)">(.*?)</tr>', dom.split('id="examples"')[1], re.S)
    assert [(status, index) for status, index, _ in rows] == [
        ("ok", "0"), ("ok", "1"), ("problem", "2"), ("problem", "3"), ("ok", "4")]
    assert ">train.jsonl:1<" in rows[0][2] and ">exported.json:3 evaluations[0]<" in rows[4][2]
    # The problems validate --check-paths finds, each in its own row, file:line: field: what.
    assert f"{data['chat']}:3: messages[0].content[1].video: " in rows[2][2] and "is empty (0 bytes)" in rows[2][2]
    assert "video cannot be shown" in rows[2][2]
    assert f"{data['chat']}:4: " in rows[3][2] and "assistant" in rows[3][2]
    assert "&lt;b&gt;bold&lt;/b&gt;" in rows[3][2]  # data stays text
    image, strip = data_images(dom)
    assert image.size == (192, 96) and strip.size == (4 * 128, 96)
    assert loaded_images(chromium, tmp_path, data["page"]) == [[192, 96], [512, 96]]
    # Consent first: the excluded evaluation is counted, never shown.
    assert "PRIVATE" not in data["page"].read_text() and "excluded by consent (not shown)" in dom


def test_filter_and_search_from_the_url(cli, chromium, data, tmp_path):
    assert cli("review", data["chat"], data["export"], "--out", data["page"]).code == 0
    uri = data["page"].as_uri()

    def shown(fragment: str) -> list[int]:
        dom = dump_dom(chromium, tmp_path, uri + fragment)
        return [int(m.group(1)) for m in re.finditer(r'<tr data-status="\w+" data-index="(\d+)">', dom)]

    assert shown("#filter=problem") == [2, 3]
    assert shown("#filter=ok&q=THE%20TALK") == [1]  # case-insensitive, over the row's text
    assert shown("#q=thesis") == [1, 4]  # the export row's rubric has a Thesis
    assert shown("#q=evaluations") == [4]


def test_rows_past_max_rows_are_counted_and_problems_of_no_row_listed(cli, data, tmp_path):
    r = cli("review", data["chat"], tmp_path / "missing.jsonl", "--out", data["page"], "--max-rows", "2")
    assert r.code == 0, r.err
    assert r.out.strip().endswith("2 rows shown, 0 with problems (3 problems), 0 excluded by consent, "
                                  "2 left out")
    html = data["page"].read_text()
    assert "The first 2 rows are shown; 2 more are left out (raise --max-rows)." in html
    other = html.split('id="other-problems">', 1)[1].split("</ul>", 1)[0]
    assert "missing.jsonl" in other and f"{data['chat']}:3:" in other and f"{data['chat']}:4:" in other


@pytest.mark.parametrize("out, message", [
    ("train.jsonl", "is one of the inputs; expected a new file"),
    ("review.txt", "expected a page name ending in .html"),
])
def test_an_output_that_cannot_be_written_is_one_line(cli, data, out, message):
    target = data["chat"] if out == "train.jsonl" else data["chat"].with_name(out)
    before = data["chat"].read_bytes()
    r = cli("review", data["chat"], "--out", target)
    assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1
    assert data["chat"].read_bytes() == before and not data["chat"].with_name("review.txt").exists()


def test_a_json_document_row_shows_its_fields(cli, data):
    assert cli("review", data["export"], "--out", data["page"]).code == 0
    html = data["page"].read_text()
    assert json.dumps("Speech number 1.") in html.replace("&quot;", '"')
