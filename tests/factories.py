"""Small valid source rows for tests; override any field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

RUBRIC = {"name": "Informative", "categories": [
    {"name": "Content", "maxScore": 40, "subcategories": [{"name": "Thesis", "maxScore": 10}]},
    {"name": "Delivery", "maxScore": 30, "subcategories": []}]}


def evaluation(n: int = 1, student: str = "s1", **fields) -> dict:
    ev = {
        "evaluation_id": f"e{n}", "student_id": student, "course_id": "c1", "instructor_id": "i1",
        "created_at": f"2026-01-{n % 28 + 1:02d}T10:00:00Z", "account_tier": "institution",
        "consent": {"student_data_collection": True, "instructor_llm_training": True},
        "rubric": copy.deepcopy(RUBRIC),
        "transcript": f"Speech number {n}.", "video_path": f"v{n}.mp4", "markers": [],
        "evaluation_data": {"sections": {
            "Content": {"score": 35, "maxScore": 40, "comment": "clear",
                        "subcategories": [{"name": "Thesis", "score": 9, "maxScore": 10}]},
            "Delivery": {"score": 25, "maxScore": 30, "subcategories": []}}},
    }
    ev.update(fields)
    return ev


def write_export(path, evaluations, wrapped: bool = True) -> Path:
    """An exported.json, one evaluation per line (so line numbers are predictable: row i is line i+2)."""
    path = Path(path)
    body = ",\n".join(json.dumps(e) for e in evaluations)
    text = '{"exported_at": "2026-11-01",\n"evaluations": [\n' + body + "\n]}\n" if wrapped \
        else "[\n" + body + "\n]\n"
    path.write_text(text, encoding="utf-8")
    return path
