"""Report pages from sections: report.html (self-contained and interactive: Plotly inlined, the circuit explorer,
sortable tables) and report.md (figures as PNG files), both through the Jinja2 templates in `templates/`.

A page never fetches anything: plotly.js, the page's script (`templates/report.js`) and every figure's data are
inlined, so the file opens from disk in any browser.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from circuitlab.reports.plots import plotly_js

TEMPLATES = Path(__file__).parent / "templates"
MAX_ROWS = 60  # rows of a table in report.md
MAX_HTML_ROWS = 500  # rows of a table in report.html (sortable and filterable there)
MISSING = ("n/a", "", "nan", "None")


@dataclass
class Section:
    """One report section: a title, paragraphs (plain text), tables and figures (name, PNG bytes; Plotly JSON for
    the HTML page where there is an interactive version)."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[tuple[str, str, bytes]] = field(default_factory=list)  # (file stem, caption, png)
    code: str | None = None
    plots: dict[str, str] = field(default_factory=dict)  # file stem -> the same figure as Plotly JSON (report.html)
    explorer: str | None = None  # the circuit explorer's data (JSON, `reports.explorer`)


def fmt(value: object, digits: int = 3) -> str:
    """A cell or number as text: floats to `digits` decimals, missing or non-finite values as n/a."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}"
    return str(value)


def sort_key(value: object) -> str:
    """A numeric cell's key for the page's table sorting (data-sort), empty for text."""
    if isinstance(value, (bool, np.bool_)):
        return ""
    if isinstance(value, (int, float, np.integer, np.floating)) and np.isfinite(value):
        return repr(float(value))
    return ""


def _table(caption: str, table: Any, limit: int) -> dict[str, Any]:
    """A table as cells, without the columns that hold nothing but n/a (or nothing)."""
    shown = table.head(limit)
    keep = [i for i, c in enumerate(table.columns) if not all(fmt(v) in MISSING for v in table[c])]
    rows = [[(fmt(row[i]), sort_key(row[i])) for i in keep] for row in shown.itertuples(index=False)]
    return {"caption": caption, "columns": [str(table.columns[i]) for i in keep], "rows": rows,
            "hidden": max(0, len(table) - limit),
            "dropped": [str(c) for i, c in enumerate(table.columns) if i not in keep]}


def _view(sections: list[Section], limit: int) -> list[dict[str, Any]]:
    """Sections as plain data for the templates: PNGs base64-encoded (for figures without a Plotly version)."""
    out = []
    for i, section in enumerate(sections):
        out.append({"title": section.title, "id": f"section-{i}", "paragraphs": section.paragraphs,
                    "code": section.code, "explorer": section.explorer,
                    "figures": [{"stem": stem, "caption": caption, "plot": section.plots.get(stem),
                                 "base64": "" if stem in section.plots or section.explorer else
                                 base64.b64encode(png).decode("ascii")}
                                for stem, caption, png in section.figures],
                    "tables": [_table(caption, table, limit) for caption, table in section.tables]})
    return out


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined,
                      autoescape=select_autoescape(["html.j2"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["md"] = lambda text: str(text).replace("|", "\\|").replace("\n", " ")
    return env


def report_title(record: dict[str, object]) -> str:
    """The report's title, shared by the HTML and Markdown renderers (a run folder or a localize folder)."""
    if record.get("kind") == "localize":
        return f"circuitlab localize: {record['variable']} in {record['task']} on {record['model']['name']}"
    return f"circuitlab: {record['task']['name']} on {record['model']['name']} ({record['config']['method']})"


def page_script() -> str:
    """The page's own script (explorer, figures, tables), inlined like plotly.js."""
    return (TEMPLATES / "report.js").read_text(encoding="utf-8")


def to_html(record: dict[str, object], sections: list[Section]) -> str:
    """One self-contained interactive HTML page (templates/report.html.j2)."""
    return _environment().get_template("report.html.j2").render(
        title=report_title(record), sections=_view(sections, MAX_HTML_ROWS), plotly_js=plotly_js(),
        script=page_script())


def to_markdown(record: dict[str, object], sections: list[Section]) -> str:
    """The report as Markdown (templates/report.md.j2); figures are figures/<name>.png next to it."""
    view = [{**s, "tables": [{**t, "rows": [[cell for cell, _ in row] for row in t["rows"]]} for t in s["tables"]]}
            for s in _view(sections, MAX_ROWS)]  # Markdown cells without their sort keys
    return _environment().get_template("report.md.j2").render(title=report_title(record), sections=view)
