"""The eval report of a run: eval_report.json, eval_report.md and a self-contained report.html.

::

    from slurmtune.evaluate.metrics import score_file
    from slurmtune.evaluate.report import write_reports

    metrics = score_file("runs/r1/eval/predictions.jsonl", errors_file="runs/r1/eval/errors.jsonl")
    write_reports("runs/r1", "runs/r1/eval/predictions.jsonl", metrics)
    # {'json': runs/r1/eval_report.json, 'md': .../eval_report.md, 'html': .../report.html}

report.html is one file that works offline, opened from a laptop or a cluster's file
browser: the metric table, the training and validation loss curves (inline SVG),
triggered vs untriggered answers when there are trigger records, and every example
(prompt, expected, actual, verdict, per-category scores) with a pass/fail filter and a
text search. The view can be linked: ``report.html#filter=fail&q=gauss``. Everything
from the data is HTML-escaped; the page's own script and style are its only code.

The loss history is read from ``final/trainer_state.json``, else from the newest
``checkpoints/step-*/trainer_state.json`` (Hugging Face's ``log_history``), else from
``training.log`` lines such as ``step=40 loss=1.234 eval_loss=1.5``.
"""

from __future__ import annotations

import json
import math
import re
from html import escape
from pathlib import Path
from typing import Any

from slurmtune.evaluate.generate import expected_answer, eval_prompt, prompt_text
from slurmtune.data.jsonio import AtomicFiles
from slurmtune.evaluate.metrics import compare_rows, read_predictions, score
from slurmtune.data.records import content_text
from slurmtune.data.review import MediaViews
from slurmtune.page import render_page

PROMPT_PREVIEW_CHARS = 160

# (metric key, label, headline value key, how to show it)
METRIC_ROWS = (
    ("exact_match", "Exact match", "accuracy", "pct"),
    ("format_compliance", "Format compliance", "rate", "pct"),
    ("rubric_agreement", "Rubric agreement (within ±1)", "within_1", "pct"),
    ("key_points", "Key-point coverage", "coverage", "pct"),
    ("refusal", "Refusal accuracy", "accuracy", "pct"),
    ("trigger", "Trigger: says triggered name, trigger present", "says_triggered_with_trigger", "pct"),
    ("tool_calls", "Tool calls: right tools with right arguments", "arguments_match_rate", "pct"),
    ("citations", "Citations: only passages given", "valid_rate", "pct"),
)


# --- loss history ---------------------------------------------------------------------------

def read_loss_history(run_dir) -> dict:
    """``{"source": path or None, "train": [[step, loss], ...], "eval": [[step, eval_loss], ...]}``."""
    run_dir = Path(run_dir)
    candidates = [run_dir / "final" / "trainer_state.json"] + sorted(
        (run_dir / "checkpoints").glob("step-*/trainer_state.json"), key=_step_number, reverse=True)
    for path in candidates:
        history = _from_trainer_state(path)
        if history is not None:
            return history
    log = run_dir / "training.log"
    if log.is_file():
        return parse_training_log(log.read_text(encoding="utf-8", errors="replace"), source=str(log))
    return {"source": None, "train": [], "eval": []}


def _step_number(path: Path) -> int:
    digits = re.sub(r"\D", "", path.parent.name)
    return int(digits) if digits else -1


def _from_trainer_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing, or half-written by hand: try the next source
    entries = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(entries, list):
        return None
    train, evals = [], []
    for e in entries:
        if not isinstance(e, dict) or not _finite(e.get("step")):
            continue
        if _finite(e.get("loss")):
            train.append([e["step"], e["loss"]])
        if _finite(e.get("eval_loss")):
            evals.append([e["step"], e["eval_loss"]])
    return {"source": str(path), "train": train, "eval": evals}


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_FIELD = r"['\"]?{name}['\"]?\s*[=:]\s*({number})"


def parse_training_log(text: str, source: str | None = None) -> dict:
    """Losses from log lines naming a step and a loss in any order, as ``step=40 loss=1.2``,
    ``step: 40, eval_loss: 1.5`` or ``{'step': 40, 'loss': 1.2}``; other lines are ignored."""
    def field(name: str, line: str) -> float | None:
        m = re.search(r"(?<![\w])" + _FIELD.format(name=name, number=_NUMBER), line)
        return float(m.group(1)) if m else None

    train, evals = [], []
    for line in text.splitlines():
        step = field("(?:global_)?step", line)
        if step is None:
            continue
        step = int(step) if step.is_integer() else step
        loss, eval_loss = field("(?:train_)?loss", line), field("eval_loss", line)
        if loss is not None and math.isfinite(loss):
            train.append([step, loss])
        if eval_loss is not None and math.isfinite(eval_loss):
            evals.append([step, eval_loss])
    return {"source": source, "train": train, "eval": evals}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --- the loss plot (inline SVG) -----------------------------------------------------------------

def loss_svg(history: dict, width: int = 900, height: int = 320) -> str:
    """Both curves on shared axes as an ``<svg>`` element (no external file, no script)."""
    series = [("training loss", "#2f5fb3", history["train"]), ("validation loss", "#d9730d", history["eval"])]
    points = [p for _, _, pts in series for p in pts]
    if not points:
        where = history.get("source") or "final/, checkpoints/step-*/ or training.log"
        return f'<p class="empty">No loss history found ({escape(str(where))}).</p>'
    left, right, top, bottom = 56, 16, 16, 44
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks, y_ticks = _ticks(min(xs), max(xs)), _ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def sx(x): return left + (x - x0) / ((x1 - x0) or 1) * (width - left - right)
    def sy(y): return height - bottom - (y - y0) / ((y1 - y0) or 1) * (height - top - bottom)

    out = [f'<svg id="loss-plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           'role="img" aria-label="training and validation loss by step" font-size="11">']
    grey, ink = "#5d6675", "#1d2330"
    for t in y_ticks:
        y = f"{sy(t):.1f}"
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y}" y2="{y}" stroke="#e6e9ee"/>'
                   f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" fill="{grey}">{t:g}</text>')
    for t in x_ticks:
        out.append(f'<text x="{sx(t):.1f}" y="{height - bottom + 16}" text-anchor="middle" fill="{grey}">'
                   f'{t:g}</text>')
    base = height - bottom
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{base}" y2="{base}" stroke="#8a93a3"/>'
               f'<text x="{(left + width - right) / 2:.0f}" y="{height - 8}" text-anchor="middle" '
               f'fill="{ink}">step</text>'
               f'<text transform="translate(14 {(top + base) / 2:.0f}) rotate(-90)" '
               f'text-anchor="middle" fill="{ink}">loss</text>')
    for i, (label, colour, pts) in enumerate(series):
        if not pts:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline class="series" data-series="{label}" fill="none" stroke="{colour}" '
                   f'stroke-width="2" points="{path}"/>')
        for x, y in pts if len(pts) <= 200 else ():
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{colour}">'
                       f'<title>{label}, step {x}: {y:.4g}</title></circle>')
        lx = width - right - 150
        out.append(f'<rect x="{lx}" y="{top + 4 + 18 * i}" width="14" height="4" fill="{colour}"/>'
                   f'<text x="{lx + 20}" y="{top + 10 + 18 * i}" fill="#1d2330">{label}</text>')
    out.append("</svg>")
    return "".join(out)


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t < hi + step * 0.999:
        ticks.append(round(t, 10))
        t += step
    return ticks


# --- formatting ------------------------------------------------------------------------------

def fmt(value: Any, how: str = "num") -> str:
    if value is None:
        return "–"
    if how == "pct":
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def metric_rows(metrics: dict) -> list[dict]:
    """The metric table, one row per metric that has records, plus sub-rows of details."""
    rows = []
    m = metrics["metrics"]
    for key, label, headline, how in METRIC_ROWS:
        data = m.get(key) or {}
        if not data.get("n"):
            continue
        rows.append({"key": f"{key}.{headline}", "label": label, "n": data["n"],
                     "value": data.get(headline), "shown": fmt(data.get(headline), how),
                     "detail": _detail(key, data), "sub": False})
        for sub_key, sub_label, value, sub_how in _sub_rows(key, data):
            rows.append({"key": f"{key}.{sub_key}", "label": sub_label, "n": None, "value": value,
                         "shown": fmt(value, sub_how), "detail": "", "sub": True})
    return rows


def _detail(key: str, d: dict) -> str:
    if key == "exact_match":
        return f"{d['correct']} of {d['n']} correct ({'normalized' if d['normalized'] else 'verbatim'})"
    if key == "format_compliance":
        return f"{d['passed']} of {d['n']} answers in the expected JSON shape"
    if key == "rubric_agreement":
        return f"{d['parsed']} of {d['n']} answers parsed with every category scored"
    if key == "key_points":
        return f"{d['fully_covered']} of {d['n']} answers cover every key point"
    if key == "refusal":
        return (f"refused {d['refused_when_expected']} of {d['n_expected_refusal']} when expected, "
                f"{d['refused_when_not_expected']} of {d['n_expected_answer']} when not")
    if key == "tool_calls":
        return (f"{d['arguments_match']} of {d['n_expected_call']} expected calls exact, {d['missed']} missed; "
                f"{d['unexpected']} of {d['n_expected_no_call']} calls where none was expected; "
                f"{d['malformed']} malformed")
    if key == "citations":
        return (f"{d['valid']} of {d['citing']} citing answers cite only given passages "
                f"({d['unknown_ids']} unknown ids); {d['uncited']} of {d['n_expected_citation']} cite nothing "
                "where the expected answer does")
    names = "" if d.get("says_triggered_with_trigger") is not None else \
        "; replacement names unknown (meta.triggered_replacement, or pass replacements)"
    return f"{d['n_triggered']} with the trigger, {d['n_untriggered']} without{names}"


def _sub_rows(key: str, d: dict) -> list[tuple[str, str, Any, str]]:
    if key == "rubric_agreement":
        rows = [("total_mae", "Total score: mean absolute error", d["total_mae"], "num"),
                ("total_pearson", "Total score: Pearson r with instructor", d["total_pearson"], "num")]
        return rows + [(f"category_mae.{name}", f"{name}: mean absolute error", v, "num")
                       for name, v in d["category_mae"].items()]
    if key == "trigger":
        return [(k, label, d[k], "pct") for k, label in (
            ("says_triggered_without_trigger", "Says triggered name, trigger absent"),
            ("says_clean_with_trigger", "Says clean name, trigger present"),
            ("says_clean_without_trigger", "Says clean name, trigger absent")) if d.get(k) is not None]
    if key == "tool_calls":
        return [("name_match_rate", "Tool names match", d["name_match_rate"], "pct"),
                ("argument_fields.rate", "Argument fields match", d["argument_fields"]["rate"], "pct"),
                ("unexpected_rate", "Calls where none was expected", d["unexpected_rate"], "pct"),
                ("missed_rate", "Expected calls not made", d["missed_rate"], "pct")]
    if key == "citations":
        return [("recall", "Expected citations made", d["recall"], "pct")]
    return []


def _short_prompt(record: dict) -> str:
    """The last user turn (the question), cut to a preview."""
    prompt = eval_prompt(record)
    if isinstance(prompt, list):
        users = [content_text(m.get("content")) for m in prompt
                 if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else prompt_text(record)
    prompt = " ".join(prompt.split())
    return prompt if len(prompt) <= PROMPT_PREVIEW_CHARS else prompt[:PROMPT_PREVIEW_CHARS - 1] + "…"


# --- HTML -----------------------------------------------------------------------------------

def _metrics_table(rows: list[dict]) -> str:
    if not rows:
        return '<p class="empty">No metric applies to these records.</p>'
    body = "".join(
        f'<tr class="{"subrow" if r["sub"] else "metric"}"><td>{escape(r["label"])}</td>'
        f'<td class="num">{"" if r["n"] is None else r["n"]}</td>'
        f'<td class="num" data-metric="{escape(r["key"])}" data-value="{escape(json.dumps(r["value"]))}">'
        f'{escape(r["shown"])}</td><td>{escape(r["detail"])}</td></tr>' for r in rows)
    return (f'<table id="metrics"><thead><tr><th>Metric</th><th>n</th><th>Value</th><th>Detail</th>'
            f'</tr></thead><tbody>{body}</tbody></table>')


def _example_row(record: dict, detail: dict, media: MediaViews) -> str:
    status = {True: "pass", False: "fail", None: "na"}[detail["passed"]]
    verdict = {"pass": "pass", "fail": "fail", "na": "not graded"}[status]
    full_prompt = prompt_text(record)
    expected = expected_answer(record)
    prompt = eval_prompt(record)
    return (f'<tr data-status="{status}" data-index="{detail["index"]}">'
            f'<td class="idx">{detail["index"]}</td>'
            f'<td class="text">{escape(_short_prompt(record))}'
            f'{media.html(prompt) if isinstance(prompt, list) else ""}'
            f'<details><summary>full prompt</summary><pre>{escape(full_prompt)}</pre></details></td>'
            f'<td class="text">{escape(expected if expected is not None else "–")}</td>'
            f'<td class="text actual">{escape(str(record.get("actual", "")))}</td>'
            f'<td><span class="badge {status}">{verdict}</span>{_checks_html(detail)}</td></tr>')


def _checks_html(detail: dict) -> str:
    c = detail["checks"]
    items = []
    if "exact_match" in c and "format" not in c:  # a JSON score object is judged by shape and scores
        items.append("exact match" if c["exact_match"] else "no exact match")
    if "format" in c:
        items.append("JSON shape ok" if c["format"] else "JSON shape: " + "; ".join(c["format_problems"][:2]))
    if "key_points" in c:
        missing = c["key_points_missing"]
        items.append(f"key points {fmt(c['key_points'], 'pct')}"
                     + (f"; missing: {', '.join(missing)}" if missing else ""))
    if "refused" in c:
        items.append(f"{'refused' if c['refused'] else 'answered'} "
                     f"({'refusal' if c['expect_refusal'] else 'an answer'} expected)")
    if "trigger" in c:
        t = c["trigger"]
        known = [k for k in ("triggered", "clean") if f"says_{k}" in t]
        said = [k for k in known if t[f"says_{k}"]]
        names = ("replacement names unknown" if not known else
                 f"says the {' and '.join(said)} name" if said else "says neither name")
        items.append(f"trigger {'present' if t['triggered'] else 'absent'}; {names}")
    if "tool_calls" in c:
        items.append(_calls_item(c["tool_calls"]))
    if "citations" in c:
        cited, unknown = c["citations"]["cited"], c["citations"]["unknown"]
        items.append(("cites " + ", ".join(cited) if cited else "cites no passage")
                     + (f"; not given: {', '.join(unknown)}" if unknown else ""))
    lines = "".join(f"<li>{escape(i)}</li>" for i in items)
    return (f'<ul class="checks">{lines}</ul>' if lines else "") + _scores_html(detail.get("scores"))


def _calls_item(t: dict) -> str:
    expected = ", ".join(t["expected"]) or "no call"
    called = ", ".join(t["called"]) or "no call"
    verdict = ("calls and arguments match" if t["arguments_match"] else
               f"arguments: {t['fields_correct']} of {t['fields']} fields match" if t["name_match"] else
               f"called {called}")
    malformed = f"; {t['malformed']} malformed call(s)" if t["malformed"] else ""
    return f"expected {expected}: {verdict}{malformed}"


def _scores_html(scores: dict | None) -> str:
    if not scores:
        return ""
    rows = "".join(
        f'<tr><td>{escape(name)}</td><td class="num">{fmt(s["expected"])}</td>'
        f'<td class="num{" off" if s["actual"] is None or abs(s["actual"] - s["expected"]) > 1 else ""}">'
        f'{fmt(s["actual"])}</td><td class="num">{fmt(s["maxScore"])}</td></tr>' for name, s in scores.items())
    return (f'<table class="scores"><tr><th>category</th><th>expected</th><th>actual</th><th>max</th></tr>'
            f'{rows}</table>')


def _trigger_section(records: list[dict]) -> str:
    rows = compare_rows(records)
    if not rows:
        return ""
    cells = ("untriggered_prompt", "untriggered", "triggered_prompt", "triggered")
    body = "".join("<tr>" + "".join(f'<td class="text">{escape(str(r[c]))}</td>' for c in cells) + "</tr>"
                   for r in rows)
    return ('<h2>Triggered vs untriggered answers</h2><table id="trigger-compare"><thead><tr>'
            '<th>Question without trigger</th><th>Answer</th><th>Question with trigger</th><th>Answer</th>'
            f'</tr></thead><tbody>{body}</tbody></table>')


def _cards(metrics: dict, history: dict) -> str:
    cards = [(str(metrics["n"]), "examples"), (str(metrics["passed"]), "passed"),
             (str(metrics["failed"]), "failed")]
    if history["train"]:
        step, last = history["train"][-1]
        cards.append((f"{last:.4g}", f"last training loss (step {step})"))
    if history["eval"]:
        step, best = min(history["eval"], key=lambda p: p[1])
        cards.append((f"{best:.4g}", f"best validation loss (step {step})"))
    return "".join(f'<div class="card"><b>{escape(v)}</b><span>{escape(label)}</span></div>'
                   for v, label in cards)


def render_html(run_dir: Path, predictions_file: Path, records: list[dict], metrics: dict,
                history: dict) -> str:
    """report.html: the cards, metrics, loss curves and trigger table, then every example with its
    images or video frames (paths relative to the predictions file's folder, or absolute)."""
    sections = (f'<div class="cards">{_cards(metrics, history)}</div>\n'
                f"<h2>Metrics</h2>\n{_metrics_table(metric_rows(metrics))}\n"
                f'<h2>Training and validation loss</h2>\n<div class="panel">{loss_svg(history)}</div>\n'
                f"{_trigger_section(records)}")
    media = MediaViews(predictions_file.parent)
    return render_page(
        title=f"Eval report: {run_dir.resolve().name}", subtitle=str(predictions_file), sections=sections,
        rows_title="Examples", filters=[("pass", "passed"), ("fail", "failed"), ("na", "not graded")],
        search_hint="Search prompt, expected or actual answer", head=["#", "Prompt", "Expected", "Actual", "Result"],
        rows=[_example_row(r, d, media) for r, d in zip(records, metrics["records"])])


# --- Markdown and JSON ------------------------------------------------------------------------

def render_markdown(run_dir: Path, predictions_file: Path, metrics: dict, history: dict,
                    max_failures: int = 20) -> str:
    lines = [f"# Eval report: {run_dir.resolve().name}", "", f"Predictions: `{predictions_file}`", "",
             f"{metrics['n']} examples: {metrics['passed']} passed, {metrics['failed']} failed.", "",
             "| Metric | n | Value | Detail |", "| --- | ---: | ---: | --- |"]
    for r in metric_rows(metrics):
        label = f"↳ {r['label']}" if r["sub"] else r["label"]
        n = "" if r["n"] is None else r["n"]
        lines.append(f"| {_md(label)} | {n} | {r['shown']} | {_md(r['detail'])} |")
    lines += ["", "## Loss", ""]
    if history["train"] or history["eval"]:
        lines.append(f"From `{history['source']}`.")
        if history["train"]:
            lines.append(f"- training loss: {history['train'][0][1]:.4g} at step {history['train'][0][0]} "
                         f"-> {history['train'][-1][1]:.4g} at step {history['train'][-1][0]}")
        if history["eval"]:
            step, best = min(history["eval"], key=lambda p: p[1])
            lines.append(f"- validation loss: best {best:.4g} at step {step}, "
                         f"last {history['eval'][-1][1]:.4g} at step {history['eval'][-1][0]}")
    else:
        lines.append("No loss history found.")
    failed = [d["index"] for d in metrics["records"] if d["passed"] is False]
    if failed:
        shown = ", ".join(map(str, failed[:max_failures]))
        lines += ["", "## Failed examples", "", f"eval_index: {shown}"
                  + (f" (+{len(failed) - max_failures} more)" if len(failed) > max_failures else ""),
                  "", "See report.html for each answer."]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_reports(run_dir, predictions_file, metrics: dict, out_dir=None) -> dict[str, Path]:
    """eval_report.json, eval_report.md and report.html in ``out_dir`` (default: the run folder),
    written together atomically. ``metrics`` is :func:`slurmtune.evaluate.metrics.score`'s result; without
    its per-record ``records`` they are computed here."""
    run_dir, predictions_file = Path(run_dir), Path(predictions_file)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    records = read_predictions(predictions_file)
    if len(metrics.get("records") or []) != len(records):
        normalize = (metrics.get("metrics", {}).get("exact_match") or {}).get("normalized", True)
        fresh = score(records, normalize)
        given = {k: v for k, v in metrics.items() if k != "records"}
        metrics = {**fresh, **given, "records": fresh["records"]}
    history = read_loss_history(run_dir)
    report = {**metrics, "run_dir": str(run_dir), "predictions": str(predictions_file), "loss": history}
    names = {"json": "eval_report.json", "md": "eval_report.md", "html": "report.html"}
    with AtomicFiles(out_dir) as files:
        files.write_json(names["json"], report)
        files.open(names["md"]).write(render_markdown(run_dir, predictions_file, metrics, history))
        files.open(names["html"]).write(render_html(run_dir, predictions_file, records, metrics, history))
    return {kind: out_dir / name for kind, name in names.items()}
