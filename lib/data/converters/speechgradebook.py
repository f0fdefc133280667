"""SpeechGradebook's ``exported.json`` -> text-tier chat records and video-tier Qwen manifests.

::

    slurmtune convert speechgradebook exported.json --out data/ --split 0.9
    slurmtune convert qwen-single exported.json --out data/          # train_qwen.jsonl
    slurmtune convert qwen-corrections exported.json --out data/     # train_qwen_correction_pairs.jsonl
    slurmtune convert qwen-pairs exported.json --out data/           # train_qwen_pairs.jsonl
    slurmtune convert qwen-single exported.json --out data/ --chat   # chat records with video parts
    slurmtune convert qwen-pairs exported.json --out data/ --chat --media-root /project/sgb/media

The export is a list of evaluations, or ``{"evaluations": [...], ...}``. Each
row is checked for consent first (slurmtune.data.consent), then for shape: the
scores in ``evaluation_data.sections`` must match the rubric's categories and
lie within 0..maxScore. The assistant's target is exactly that ``sections``
object, as JSON.

The Qwen manifests keep each ``video_path`` as the export has it (the manifest format's
contract). Chat records (``--chat``) are trained from the run folder, so their media paths are
made absolute: a relative one is taken under ``--media-root`` (default: the export's folder).
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from slurmtune.data.converters.base import Converter, Option, Rejected, Skipped, Where
from slurmtune.data.records import json_type, text_part, text_problem

SYSTEM_PROMPT = (
    "You are an experienced public-speaking instructor. Grade the speech against the rubric. "
    "Reply with JSON only: an object with one key per rubric category, each holding its "
    "score, maxScore, an optional comment and its subcategories' scores. Every score lies "
    "between 0 and its maxScore."
)
QWEN_PROMPT = "Grade this speech against the rubric below. Reply with JSON scores only.\n\n"
CORRECTION_PROMPT = ("An automatic grader gave the scores below. Correct them as the "
                     "instructor would. Reply with JSON scores only.\n\nAutomatic scores:\n")
PAIR_PROMPT = ("These are two speeches by the same student, in the order they were given. "
               "Grade both against the rubric. Reply with JSON: {\"speech_1\": scores, \"speech_2\": scores}.\n\n")

Problems = list[tuple[str, str]]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_id(x: Any) -> bool:
    return (isinstance(x, str) and x.strip() != "") or (isinstance(x, int) and not isinstance(x, bool))


def check_rubric(rubric: Any) -> Problems:
    if not isinstance(rubric, dict):
        return [("rubric", "missing; expected an object with name and categories")]
    problems: Problems = []
    if not isinstance(rubric.get("name"), str):
        problems.append(("rubric.name", f"expected a string, got {json_type(rubric.get('name'))}"))
    categories = rubric.get("categories")
    if not isinstance(categories, list) or not categories:
        return problems + [("rubric.categories", "expected a non-empty list of {name, maxScore}")]
    for i, cat in enumerate(categories):
        at = f"rubric.categories[{i}]"
        if not isinstance(cat, dict) or not isinstance(cat.get("name"), str):
            problems.append((f"{at}.name", "expected a string"))
            continue
        if not _is_number(cat.get("maxScore")) or cat["maxScore"] <= 0:
            problems.append((f"{at}.maxScore", f"{cat.get('maxScore')!r}; expected a number above 0"))
        for j, sub in enumerate(cat.get("subcategories") or []):
            if not isinstance(sub, dict) or not isinstance(sub.get("name"), str) \
                    or not _is_number(sub.get("maxScore")):
                problems.append((f"{at}.subcategories[{j}]", "expected {name: string, maxScore: number}"))
    return problems


def check_scores(sections: Any, rubric: dict, where: str) -> Problems:
    """Scores in the shape of ``evaluation_data.sections``, against a (valid) rubric."""
    if not isinstance(sections, dict) or not sections:
        return [(where, "expected an object with one entry per rubric category")]
    categories = {c["name"]: c for c in rubric["categories"]}
    problems: Problems = []
    for name in sections:
        if name not in categories:
            problems.append((f"{where}.{name}", f"not a category of rubric {rubric['name']!r}; "
                                                f"expected one of {', '.join(categories)}"))
    for name, cat in categories.items():
        section = sections.get(name)
        at = f"{where}.{name}"
        if not isinstance(section, dict):
            problems.append((at, "missing; expected {score, maxScore, subcategories}"))
            continue
        problems += _check_score(section, cat["maxScore"], at)
        subs = {s["name"]: s for s in cat.get("subcategories") or [] if isinstance(s, dict)}
        given = section.get("subcategories", [])
        if not isinstance(given, list):
            problems.append((f"{at}.subcategories", "expected a list of {name, score, maxScore}"))
            continue
        for j, sub in enumerate(given):
            sat = f"{at}.subcategories[{j}]"
            if not isinstance(sub, dict) or not isinstance(sub.get("name"), str):
                problems.append((f"{sat}.name", "expected a string"))
            elif subs and sub["name"] not in subs:
                problems.append((f"{sat}.name", f"{sub['name']!r} is not a subcategory of {name!r}"))
            else:
                limit = subs[sub["name"]]["maxScore"] if subs else sub.get("maxScore")
                problems += _check_score(sub, limit, sat)
    return problems


def _check_score(entry: dict, limit: Any, at: str) -> Problems:
    score, max_score = entry.get("score"), entry.get("maxScore", limit)
    if not _is_number(score):
        return [(f"{at}.score", f"{score!r}; expected a number")]
    if not _is_number(max_score):
        return [(f"{at}.maxScore", f"{max_score!r}; expected a number")]
    if _is_number(limit) and max_score != limit:
        return [(f"{at}.maxScore", f"{max_score} differs from the rubric's maxScore {limit}")]
    if not 0 <= score <= max_score:
        return [(f"{at}.score", f"{score} is outside 0..{max_score}")]
    return []


def check_evaluation(ev: dict) -> Problems:
    """Every problem of one (consented) evaluation."""
    problems: Problems = []
    for key in ("evaluation_id", "student_id"):
        if not _is_id(ev.get(key)):
            found = "missing" if key not in ev else f"{ev[key]!r}"
            problems.append((key, f"{found}; expected a non-empty string or integer id"))
    if "created_at" in ev and _parse_time(ev["created_at"]) is None:
        problems.append(("created_at", f"{ev['created_at']!r}; expected an ISO 8601 time"))
    problem = text_problem(ev.get("transcript"), "the speech's transcript", "transcript" in ev)
    if problem:
        problems.append(("transcript", problem))
    if ev.get("video_notes") is not None and not isinstance(ev["video_notes"], str):
        problems.append(("video_notes", f"expected a string, got {json_type(ev['video_notes'])}"))
    rubric_problems = check_rubric(ev.get("rubric"))
    problems += rubric_problems
    data = ev.get("evaluation_data")
    if not isinstance(data, dict) or "sections" not in data:
        problems.append(("evaluation_data.sections", "missing; expected the instructor's scores"))
    elif not rubric_problems:
        problems += check_scores(data["sections"], ev["rubric"], "evaluation_data.sections")
    if ev.get("scores_original") is not None and not rubric_problems:
        problems += check_scores(ev["scores_original"], ev["rubric"], "scores_original")
    return problems


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def render_rubric(rubric: dict) -> str:
    lines = [f"Rubric: {rubric['name']}"]
    for cat in rubric["categories"]:
        lines.append(f"- {cat['name']} (max {_num(cat['maxScore'])})")
        for sub in cat.get("subcategories") or []:
            lines.append(f"  - {sub['name']} (max {_num(sub['maxScore'])})")
    return "\n".join(lines)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _media(ev: dict) -> tuple[str, str] | None:
    """('video', path) or ('image', path) of an evaluation, or None."""
    for key, kind in (("video_path", "video"), ("video_url", "video"), ("image_path", "image")):
        value = ev.get(key)
        if isinstance(value, str) and value.strip():
            return kind, value
    return None


class SpeechGradebook(Converter):
    name = "speechgradebook"
    help = "SpeechGradebook exported.json -> text-tier chat records (train.jsonl [+ validation.jsonl])"
    outputs = ("train.jsonl",)
    list_keys = ("evaluations",)
    group_field = "meta.student_id"
    id_field = "evaluation_id"
    row_kind = "an evaluation object"
    consent_required = True  # the export contract: no consent object means no consent

    def check_row(self, row: dict, where: Where) -> list[tuple[str, str]]:
        return check_evaluation(row)

    def convert(self, value: Any, where: Where) -> Iterable[tuple[str, dict]]:
        ev = self.admit(value, where)
        user = render_rubric(ev["rubric"]) + "\n\nTranscript:\n" + ev["transcript"].strip()
        if isinstance(ev.get("video_notes"), str) and ev["video_notes"].strip():
            user += "\n\nVideo notes:\n" + ev["video_notes"].strip()
        sections = ev["evaluation_data"]["sections"]
        yield self.outputs[0], {
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": user},
                {"role": "assistant", "content": json.dumps(sections, ensure_ascii=False)},
            ],
            "meta": self.meta(ev, where),
        }

    def meta(self, ev: dict, where: Where) -> dict:
        return {"source": self.name, **where.meta(), "evaluation_id": ev["evaluation_id"],
                "student_id": ev["student_id"], "course_id": ev.get("course_id")}


CHAT_OPTION = Option("chat", "write chat records with video/image parts instead of the Qwen manifest",
                     flag=True)
MEDIA_ROOT_OPTION = Option("media_root", "folder the export's relative video/image paths are under, for "
                                         "--chat records (default: the export file's folder)")


class QwenSingle(SpeechGradebook):
    name = "qwen-single"
    help = "exported.json -> train_qwen.jsonl ({video_path|image_path, rubric, scores})"
    outputs = ("train_qwen.jsonl",)
    options = (CHAT_OPTION, MEDIA_ROOT_OPTION)

    @property
    def group_field(self) -> str:
        return "meta.student_id" if self.opts.get("chat") else "student_id"

    def convert(self, value: Any, where: Where) -> Iterable[tuple[str, dict]]:
        ev = self.admit(value, where)
        kind, path = self.media(ev, where)
        scores = ev["evaluation_data"]["sections"]
        if self.opts.get("chat"):
            prompt = QWEN_PROMPT + render_rubric(ev["rubric"])
            yield self.outputs[0], chat_with_media([(kind, path)], prompt, scores, self.meta(ev, where))
            return
        yield self.outputs[0], {f"{kind}_path": path, "rubric": ev["rubric"], "scores": scores,
                                "evaluation_id": ev["evaluation_id"], "student_id": ev["student_id"]}

    def media(self, ev: dict, where: Where) -> tuple[str, str]:
        """(kind, path) of the evaluation's video or image; for chat records an absolute path."""
        media = _media(ev)
        if media is None:
            raise Skipped("no video_path, video_url or image_path")
        kind, path = media
        if not self.opts.get("chat") or path.startswith(("http://", "https://")) or Path(path).is_absolute():
            return kind, path
        root = Path(self.opts.get("media_root") or where.path.parent).expanduser()
        return kind, str(root.absolute() / path)


class QwenCorrections(QwenSingle):
    name = "qwen-corrections"
    help = "exported.json -> train_qwen_correction_pairs.jsonl (AI scores vs the instructor's)"
    outputs = ("train_qwen_correction_pairs.jsonl",)

    def convert(self, value: Any, where: Where) -> Iterable[tuple[str, dict]]:
        ev = self.admit(value, where)
        if ev.get("scores_original") is None:
            raise Skipped("no scores_original (not corrected by an instructor)")
        kind, path = self.media(ev, where)
        if kind != "video":
            raise Skipped("no video_path or video_url")
        final = ev["evaluation_data"]["sections"]
        if self.opts.get("chat"):
            prompt = (CORRECTION_PROMPT + json.dumps(ev["scores_original"], ensure_ascii=False)
                      + "\n\n" + render_rubric(ev["rubric"]))
            yield self.outputs[0], chat_with_media([(kind, path)], prompt, final, self.meta(ev, where))
            return
        yield self.outputs[0], {"video_path": path, "rubric": ev["rubric"],
                                "scores_original": ev["scores_original"], "scores_final": final,
                                "evaluation_id": ev["evaluation_id"], "student_id": ev["student_id"]}


class QwenPairs(QwenSingle):
    """Same student, same rubric, consecutive speeches in time order: (1, 2), (2, 3), ...

    Rows are indexed in a temporary SQLite file as they stream by, so pairing
    needs no memory proportional to the export.
    """

    name = "qwen-pairs"
    help = "exported.json -> train_qwen_pairs.jsonl (same student, two speeches, in time order)"
    outputs = ("train_qwen_pairs.jsonl",)

    def __init__(self, **options):
        super().__init__(**options)
        self._tmp = tempfile.TemporaryDirectory(prefix="slurmtune-pairs-")
        self.db = sqlite3.connect(Path(self._tmp.name) / "index.sqlite")
        self.db.execute("CREATE TABLE ev (student TEXT, rubric TEXT, at TEXT, ord INTEGER, row TEXT)")
        self.count = 0

    def convert(self, value: Any, where: Where) -> Iterable[tuple[str, dict]]:
        ev = self.admit(value, where)
        kind, path = self.media(ev, where)
        if kind != "video":
            raise Skipped("no video_path or video_url")
        at = _parse_time(ev.get("created_at"))
        if at is None:
            raise Rejected("created_at", "missing; expected an ISO 8601 time to order the speeches")
        row = {"video_path": path, "rubric": ev["rubric"], "scores": ev["evaluation_data"]["sections"],
               "evaluation_id": ev["evaluation_id"], "student_id": ev["student_id"],
               "meta": self.meta(ev, where)}
        self.count += 1
        self.db.execute("INSERT INTO ev VALUES (?, ?, ?, ?, ?)",
                        (json.dumps(ev["student_id"]), json.dumps(ev["rubric"], sort_keys=True),
                         at.isoformat(), self.count, json.dumps(row, ensure_ascii=False)))
        return ()

    def finish(self) -> Iterable[tuple[str, dict]]:
        previous = None
        query = "SELECT student, rubric, row FROM ev ORDER BY student, rubric, at, ord"
        for student, rubric, row in self.db.execute(query):
            row = json.loads(row)
            if previous is not None and previous[:2] == (student, rubric):
                yield self.outputs[0], self.pair(previous[2], row)
            previous = (student, rubric, row)
        self.db.close()
        self._tmp.cleanup()

    def pair(self, first: dict, second: dict) -> dict:
        if self.opts.get("chat"):
            prompt = PAIR_PROMPT + render_rubric(first["rubric"])
            answer = {"speech_1": first["scores"], "speech_2": second["scores"]}
            meta = {"source": self.name, "evaluation_ids": [first["evaluation_id"], second["evaluation_id"]],
                    "student_id": first["student_id"]}
            return chat_with_media([("video", first["video_path"]), ("video", second["video_path"])],
                                   prompt, answer, meta)
        return {"video_path_1": first["video_path"], "video_path_2": second["video_path"],
                "rubric": first["rubric"], "scores_1": first["scores"], "scores_2": second["scores"],
                "evaluation_id_1": first["evaluation_id"], "evaluation_id_2": second["evaluation_id"],
                "student_id": first["student_id"]}


def chat_with_media(media: list[tuple[str, str]], prompt: str, answer: Any, meta: dict) -> dict:
    parts = [{"type": kind, kind: path} for kind, path in media] + [text_part(prompt)]
    return {"messages": [{"role": "user", "content": parts},
                         {"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)}],
            "meta": meta}
