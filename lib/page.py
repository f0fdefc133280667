"""The one page type of slurmtune (report.html, a dataset's review page): a single HTML file that
works offline, from a laptop or a cluster's file browser, and loads nothing.

::

    html = render_page(title="Eval report: r1", subtitle="runs/r1/eval/predictions.jsonl",
                       sections="<h2>Metrics</h2>...", rows_title="Examples",
                       filters=[("pass", "passed"), ("fail", "failed")], search_hint="Search answers",
                       head=["#", "Prompt", "Result"], rows=['<tr data-status="pass" data-index="0">...</tr>'])

Each row is a ``<tr>`` with ``data-status`` (one of the filter values) and ``data-index``; the
page's script filters rows by status and searches their text, keeping the view in the URL
fragment (``page.html#filter=fail&q=gauss``) so a link opens the same view. Callers escape
everything that comes from data (``html.escape``); images are inline ``data:`` URIs, the only
source the page's Content-Security-Policy allows.
"""

from __future__ import annotations

import re
from html import escape
from pathlib import Path

TEMPLATE = Path(__file__).with_name("page.html")


def render_page(title: str, subtitle: str, sections: str, rows_title: str, filters: list[tuple[str, str]],
                search_hint: str, head: list[str], rows: list[str]) -> str:
    """The page; ``title``, ``subtitle``, ``rows_title``, ``search_hint``, ``head`` and the filter
    labels are plain text (escaped here), ``sections`` and ``rows`` are HTML."""
    values = {
        "TITLE": escape(title),
        "SUBTITLE": escape(subtitle),
        "SECTIONS": sections,
        "ROWS_TITLE": escape(rows_title),
        "FILTERS": "\n".join(f'    <option value="{escape(v)}">{escape(label)}</option>' for v, label in filters),
        "SEARCH_HINT": escape(search_hint),
        "HEAD": "".join(f"<th>{escape(h)}</th>" for h in head),
        "N_ROWS": str(len(rows)),
        "ROWS": "\n".join(rows),
    }
    # One pass, so a placeholder-like string inside the data is never substituted.
    return re.sub(r"@@([A-Z_]+)@@", lambda m: values[m.group(1)], TEMPLATE.read_text(encoding="utf-8"))
