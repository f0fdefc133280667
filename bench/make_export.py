"""Generate a synthetic SpeechGradebook ``exported.json`` (deterministic for a seed).

::

    python bench/make_export.py 200000 /tmp/exported.json           # the benchmark's input
    python bench/make_export.py 48 examples/speechgradebook/exported.json --seed 7

Rows follow the export contract: consented rows with scores inside the rubric,
plus a share of rows without consent, demo-tier rows and (with ``--invalid``)
rows whose scores break the rubric, so every counter of a conversion moves.
Transcripts vary in length like real speeches (a few sentences to a few pages).
"""

from __future__ import annotations

import argparse
import json
import random
from datetime import datetime, timedelta, timezone

RUBRICS = [
    {"name": "Informative Speech", "categories": [
        {"name": "Content", "maxScore": 40, "subcategories": [
            {"name": "Thesis", "maxScore": 10}, {"name": "Evidence", "maxScore": 20},
            {"name": "Organization", "maxScore": 10}]},
        {"name": "Delivery", "maxScore": 30, "subcategories": [
            {"name": "Eye contact", "maxScore": 10}, {"name": "Vocal variety", "maxScore": 10},
            {"name": "Pacing", "maxScore": 10}]},
        {"name": "Visual aids", "maxScore": 10, "subcategories": []}]},
    {"name": "Persuasive Speech", "categories": [
        {"name": "Argument", "maxScore": 50, "subcategories": [
            {"name": "Claim", "maxScore": 20}, {"name": "Reasoning", "maxScore": 30}]},
        {"name": "Delivery", "maxScore": 30, "subcategories": [
            {"name": "Confidence", "maxScore": 15}, {"name": "Clarity", "maxScore": 15}]},
        {"name": "Call to action", "maxScore": 20, "subcategories": []}]},
]

SENTENCES = [
    "Good morning everyone, today I want to talk about why sleep matters for students.",
    "According to a recent survey, most first-year students sleep less than seven hours.",
    "Sleep is when the brain consolidates what we learned during the day.",
    "Let me show you a chart of test scores against hours of sleep.",
    "As you can see, the difference is not small.",
    "Some people say they work better at night, and that may be true for a few of us.",
    "But for most of us, a regular schedule makes the biggest difference.",
    "My second point is about caffeine and how long it stays in the body.",
    "Coffee after four in the afternoon can delay sleep by more than an hour.",
    "Finally, I want to ask each of you to try one change this week.",
    "Put your phone in another room thirty minutes before bed.",
    "Thank you for listening, and I am happy to take questions.",
    "Um, so, the next slide, sorry, shows the results from the second study.",
    "Community gardens reduce food costs for families in our neighborhood.",
    "The city council will vote on the garden proposal next month.",
    "I urge you to sign the petition at the back of the room.",
]
COMMENTS = ["Clear thesis and strong evidence.", "Work on eye contact.", "Good pacing overall.",
            "Slides were hard to read.", "Persuasive closing.", "Needs a clearer call to action."]


def make_evaluation(i: int, rng: random.Random, invalid_share: float = 0.0) -> dict:
    student = rng.randrange(max(1, i // 3 + 1)) if i else 0
    rubric = RUBRICS[rng.randrange(len(RUBRICS))]
    sections = {}
    for cat in rubric["categories"]:
        subs = [{"name": s["name"], "score": rng.randint(s["maxScore"] // 2, s["maxScore"]),
                 "maxScore": s["maxScore"]} for s in cat["subcategories"]]
        score = sum(s["score"] for s in subs) if subs else rng.randint(cat["maxScore"] // 2, cat["maxScore"])
        section = {"score": score, "maxScore": cat["maxScore"], "subcategories": subs}
        if rng.random() < 0.5:
            section["comment"] = rng.choice(COMMENTS)
        sections[cat["name"]] = section
    roll = rng.random()
    consent = {"student_data_collection": True, "instructor_llm_training": True}
    if roll < 0.08:
        consent["instructor_llm_training"] = False
    elif roll < 0.10:
        consent = None
    created = datetime(2026, 1, 12, 9, tzinfo=timezone.utc) + timedelta(hours=rng.randrange(24 * 120))
    ev = {
        "evaluation_id": f"ev-{i:07d}",
        "student_id": f"stu-{student:06d}",
        "course_id": f"COMM-{101 + student % 3}",
        "instructor_id": f"ins-{student % 7:03d}",
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "account_tier": "demo" if 0.10 <= roll < 0.14 else "institution",
        "rubric": rubric,
        "transcript": " ".join(rng.choice(SENTENCES) for _ in range(int(rng.lognormvariate(2.3, 0.8)) + 2)),
        "video_path": f"videos/{i:07d}.mp4",
        "markers": [{"t": rng.randint(0, 300), "label": "filler word"}] if rng.random() < 0.3 else [],
        "evaluation_data": {"sections": sections},
    }
    if consent is not None:
        ev["consent"] = consent
    if rng.random() < 0.3:
        ev["video_notes"] = "Speaker looks at notes often; steady voice."
    if rng.random() < 0.25:
        original = json.loads(json.dumps(sections))
        first = next(iter(original.values()))
        first["score"] = max(0, first["score"] - rng.randint(1, 5))
        ev["scores_original"] = original
    if rng.random() < invalid_share:
        next(iter(sections.values()))["score"] = 999  # above every maxScore
    return ev


def write_export(n: int, path: str, seed: int = 0, invalid_share: float = 0.0, indent: bool = False) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"exported_at": "2026-11-01T00:00:00Z", "evaluations": [')
        for i in range(n):
            f.write(("\n" if indent else "") + ("," if i else "")
                    + json.dumps(make_evaluation(i, rng, invalid_share), ensure_ascii=False))
        f.write("\n]}\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--invalid", type=float, default=0.0, help="share of rows with a score above maxScore")
    ap.add_argument("--one-line", action="store_true", help="the whole export on one line (as browsers save it)")
    args = ap.parse_args()
    write_export(args.n, args.out, args.seed, args.invalid, indent=not args.one_line)
