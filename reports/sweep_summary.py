"""The summary report of a sweep (summary.md and summary.html): methods compared across models and tasks.

Each table has one row per (model, task) — for bench sweeps (model, counterfactual) — and one column per
method. A value is the mean over that group's finished cells (seeds and any other varied option) with a
95% interval: the cell's own bootstrap interval when the group has one cell and the metric has one (CPR,
CMD, clean-corrupt difference), otherwise a bootstrap interval of the mean over the group's cells.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, FileSystemLoader

from circuitlab.patching.stats import bootstrap_ci
from circuitlab.reports import plots, store
from circuitlab.reports.page import page_script, sort_key
from circuitlab.reports.plots import plotly_js

METRICS = {
    "run": [("cpr", "CPR: area under the faithfulness curve (higher is better)"),
            ("cmd", "CMD: area of |1 - faithfulness| (0 is best)"),
            ("node_spearman", "rank agreement of the method's node scores with exact activation patching"),
            ("oracle_spearman", "rank agreement of edge scores with exact edge patching on sampled edges"),
            ("difference", "clean - corrupt metric (does the model do the task?)")],
    "bench": [("edge_auroc", "edge ROC-AUC against the known circuit"),
              ("node_auroc", "node ROC-AUC against the known circuit"),
              ("cpr", "CPR (higher is better)"), ("cmd", "CMD (0 is best)")],
    "leaderboard": [("cpr", "held-out CPR (higher is better)"), ("cmd", "held-out CMD (0 is best)"),
                    ("stability_boot_edges", "Jaccard overlap of edge circuits over discovery resamples")],
}


def _group_keys(kind: str, table: pd.DataFrame) -> list[str]:
    second = "counterfactual" if kind == "bench" else "task"
    return [k for k in ("model", second) if k in table.columns]


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def interval(values: pd.DataFrame, metric: str) -> tuple[float, float, float, int] | None:
    """(mean, low, high, n) over a group's finished cells (see the module docstring for the interval; low and
    high are NaN for one cell without its own interval); None when no cell has the metric."""
    col = pd.to_numeric(values[metric], errors="coerce").dropna() if metric in values else pd.Series(dtype=float)
    if col.empty:
        return None
    mean = float(col.mean())
    if len(col) == 1:
        low_col, high_col = f"{metric}_low", f"{metric}_high"
        if low_col in values and high_col in values:
            low = pd.to_numeric(values.loc[col.index, low_col], errors="coerce").iloc[0]
            high = pd.to_numeric(values.loc[col.index, high_col], errors="coerce").iloc[0]
            if not (math.isnan(low) or math.isnan(high)):
                return mean, float(low), float(high), 0  # 0: the cell's own interval, over prompts
        return mean, math.nan, math.nan, 1
    low, high = bootstrap_ci(col.to_numpy(dtype=float), n_boot=2000, seed=0)
    return mean, float(low), float(high), len(col)


def summarise(values: pd.DataFrame, metric: str) -> str:
    """`mean [low, high] (n=k)` over a group's finished cells (see the module docstring for the interval)."""
    found = interval(values, metric)
    if found is None:
        return "n/a"
    mean, low, high, n = found
    if n == 0:
        return f"{_fmt(mean)} [{_fmt(low)}, {_fmt(high)}]"
    if n == 1:
        return f"{_fmt(mean)} (n=1)"
    return f"{_fmt(mean)} [{_fmt(low)}, {_fmt(high)}] (n={n})"


def build_sections(table: pd.DataFrame, kind: str) -> list[dict[str, object]]:
    """Report sections as plain data: title, text, column names and rows of strings."""
    sections: list[dict[str, Any]] = []
    keys = _group_keys(kind, table)
    done = table[table["status"] == "done"]
    methods = list(dict.fromkeys(table["method"])) if "method" in table else []
    for metric, text in METRICS.get(kind, []):
        if metric not in done or pd.to_numeric(done[metric], errors="coerce").isna().all():
            continue
        rows, numbers = [], []
        for group, frame in done.groupby(keys, sort=False) if keys else [((), done)]:
            group = group if isinstance(group, tuple) else (group,)
            rows.append([*map(str, group), *[summarise(frame[frame["method"] == m], metric) for m in methods]])
            numbers.append((" / ".join(map(str, group)),
                            [interval(frame[frame["method"] == m], metric) for m in methods]))
        sections.append({"title": metric, "text": text, "columns": [*keys, *methods], "rows": rows,
                         "sort": [[""] * len(keys) + [sort_key(v[0]) if v else "" for v in vals]
                                  for _, vals in numbers],
                         "plot": plots.method_intervals(metric, methods, numbers)})
    counts = table.groupby(["method", "status"]).size().unstack(fill_value=0) if methods else pd.DataFrame()
    if not counts.empty:
        sections.append({"title": "cells by status", "text": "", "columns": ["method", *counts.columns],
                         "rows": [[m, *map(str, r)] for m, r in zip(counts.index, counts.to_numpy().tolist())]})
    problems = table[table["status"].isin(["failed", "skipped", "missing"])]
    if not problems.empty:
        sections.append({"title": "failed, skipped and missing cells", "text": "",
                         "columns": ["cell", "status", "error or reason"],
                         "rows": [[r["cell"], r["status"], r["error"] or r["reason"]]
                                  for r in problems.to_dict("records")]})
    timing = done.assign(wall_seconds=pd.to_numeric(done["wall_seconds"], errors="coerce"))
    if not timing.empty and methods:
        sections.append({"title": "wall time and peak memory per cell", "text": "mean over finished cells",
                         "columns": ["method", "wall s", "peak RSS MB"],
                         "rows": [[m, f"{f['wall_seconds'].mean():.1f}",
                                   f"{pd.to_numeric(f['peak_rss_mb'], errors='coerce').mean():.0f}"]
                                  for m, f in timing.groupby("method", sort=False)]})
    return sections


def _markdown(title: str, intro: str, sections: list[dict[str, Any]]) -> str:
    lines = [f"# {title}", "", intro, ""]
    for s in sections:
        lines += [f"## {s['title']}", ""] + ([s["text"], ""] if s["text"] else [])
        lines += ["| " + " | ".join(s["columns"]) + " |", "|" + "---|" * len(s["columns"])]
        lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in s["rows"]] + [""]
    return "\n".join(lines)


def write_summary(out: str | Path, table: pd.DataFrame, kind: str) -> tuple[Path, Path]:
    """Write summary.md and summary.html for a sweep's table (`kind`: the sweep's cell kind)."""
    out = Path(out)
    counts = table["status"].value_counts().to_dict()
    title = f"circuitlab sweep: {len(table)} {kind} cells"
    intro = (", ".join(f"{v} {k}" for k, v in counts.items()) + ". Values: mean [95% interval]; one cell: its "
             "own bootstrap interval over prompts; several (seeds, options): bootstrap interval of their mean. "
             "Every cell's numbers are in sweep.parquet / sweep.csv.")
    sections = build_sections(table, kind)
    md = store.write_text(out / "summary.md", _markdown(title, intro, sections))
    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True)
    page = env.get_template("sweep.html.j2").render(title=title, intro=intro, sections=sections, plotly_js=plotly_js(),
                                                     script=page_script())
    html = store.write_text(out / "summary.html", page)
    return md, html


__all__ = ["write_summary", "build_sections", "interval", "summarise", "METRICS"]
