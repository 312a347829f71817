"""`circuitlab bench leaderboard`: every method x every task on a real model, judged on held-out prompts.

A sweep (`kind: leaderboard`, one cell per model x task x method, `reports.leaderboard_cell`) run by
`reports.grid.run_sweep`: in-process or on Ray (`--executor ray`), cells under `--sweep-dir` (default
OUT/sweep) reused on a rerun. Each cell: held-out CPR/CMD over MIB's edge fractions with 95% bootstrap
intervals, the smallest head and edge circuits within [0.8, 1.2] held-out (or none reached), Jaccard stability
over discovery resamples and over the rephrased (held-out) template family, and cost (seconds, forwards,
backwards of the method; the cell's peak RSS). See `graphs.leaderboard` for every definition.
Writes OUT/leaderboard.parquet, leaderboard.csv, leaderboard.md and leaderboard.html (tables and Plotly curves).
`--report-only` writes them from the cells already finished (a partial run is marked PARTIAL); `--export-mib DIR`
writes every finished cell's edge scores as a MIB circuit-track submission (`graphs.mib.write_submission`).

Defaults (budget): SmolLM2-135M; tasks ioi, capitals, greater_than, repeated_tokens; the methods of
`graphs.leaderboard.LEADERBOARD_METHODS`; 8 discovery + 8 held-out pairs; 1000 bootstrap resamples; 2 stability
resamples per side; MIB's 10 fractions; 30 mask-learning steps; one torch thread per cell. Budget, aimed at 2 h
in-process: every method runs 5 times per cell (all discovery prompts + 2 x 2 stability resamples). Measured
(bench/results/leaderboard.md, the full default run on SmolLM2): 40 cells, 36 done and 4 skipped (ACDC above 5000
edges, with the reason), 7,175 CPU s in all (1 h 59.6 min on one core); edge pruning is a third of it. `--resamples
1` or fewer `--methods` cut it. greater_than runs on SmolLM2 in its digit mode (`tasks.greater_than`).
`--import FILE` evaluates a MIB-format score file (`graphs.mib`) as one more method row.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from circuitlab.graphs.leaderboard import LEADERBOARD_METHODS, known_methods
from circuitlab.graphs.mib import write_submission
from circuitlab.patching.models import load_model
from circuitlab.patching.faithfulness import PERCENTS
from circuitlab.reports import store
from circuitlab.reports.executors import make_executor
from circuitlab.reports.cells import cell_key
from circuitlab.reports.grid import SweepResult, SweepSpec, collect_table, run_sweep
from circuitlab.reports.leaderboard_cell import SCORES_FILE, model_graph
from circuitlab.reports.page import Section, to_html
from circuitlab.reports.plots import faithfulness_curve
from circuitlab.reports.summaries import FaithfulnessSummary

DEFAULT_TASKS = ("ioi", "capitals", "greater_than", "repeated_tokens")
COLUMNS = ["model", "task", "method", "status", "cpr", "cpr_low", "cpr_high", "cmd", "cmd_low", "cmd_high",
           "heads_at_target", "heads_faithfulness", "heads_low", "heads_high", "edges_at_target",
           "edges_faithfulness", "edges_low", "edges_high", "stability_boot_edges", "stability_boot_edges_low",
           "stability_boot_edges_high", "stability_boot_heads", "stability_boot_heads_low", "stability_boot_heads_high",
           "stability_rephrase_edges", "stability_rephrase_edges_low", "stability_rephrase_edges_high",
           "stability_rephrase_heads", "stability_rephrase_heads_low", "stability_rephrase_heads_high",
           "seconds", "forwards", "backwards", "wall_seconds", "cpu_seconds", "peak_rss_mb", "n_discovery", "n_heldout", "n_edges",
           "n_heads", "level", "note", "cell"]


TEXT_COLUMNS = ("model", "task", "method", "status", "level", "note", "cell")


def _csv(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def add_leaderboard_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `bench leaderboard`."""
    p.add_argument("--models", default="smollm2-135m", help="comma-separated models (registry names or folders)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated tasks and/or pair files")
    p.add_argument("--methods", default=",".join(LEADERBOARD_METHODS),
                   help=f"comma-separated, any of {','.join(known_methods())}")
    p.add_argument("--n", type=int, default=8, help="discovery prompt pairs")
    p.add_argument("--n-heldout", type=int, default=8, help="held-out pairs (templates the discovery pairs lack)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for every interval")
    p.add_argument("--resamples", type=int, default=2, help="stability resamples per side (discovery, rephrased)")
    p.add_argument("--percents", default=",".join(f"{x:g}" for x in PERCENTS), help="edge fractions in %% (MIB's)")
    p.add_argument("--mask-steps", type=int, default=30, help="node/edge pruning steps")
    p.add_argument("--edge-search", action="store_true",
                   help="search the smallest edge circuit by exact prefix search (slow) instead of MIB's fractions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per cell")
    p.add_argument("--out", default="bench/results", help="folder for leaderboard.parquet/.csv/.md/.html")
    p.add_argument("--sweep-dir", default=None, help="where the cells live (default OUT/leaderboard_sweep; reused)")
    p.add_argument("--executor", default="sequential", help="sequential (default) or ray")
    p.add_argument("--address", default=None, help="Ray cluster address (implies --executor ray)")
    p.add_argument("--force", action="store_true", help="rerun every cell")
    p.add_argument("--import", dest="import_file", default=None,
                   help="a MIB-format score file (graphs.mib) to evaluate instead of the methods, on every model and task given")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the outputs from the cells already finished under --sweep-dir")
    p.add_argument("--export-mib", default=None, metavar="DIR",
                   help="also write each finished cell's scores as a MIB circuit-track submission under DIR/<method>/")
    p.add_argument("--quiet", action="store_true")


def sweep_spec(args: argparse.Namespace) -> SweepSpec:
    """The leaderboard as a sweep: models x tasks x methods, one cell each."""
    methods = _csv(args.methods)
    bad = [m for m in methods if m not in known_methods()]
    if bad:
        raise ValueError(f"unknown method(s) {bad}: use any of {', '.join(known_methods())}")
    options: dict[str, Any] = {"n": args.n, "n_heldout": args.n_heldout, "n_boot": args.n_boot,
                               "resamples": args.resamples, "mask_steps": args.mask_steps,
                               "percents": [float(x) for x in _csv(args.percents)], "edge_search": bool(args.edge_search)}
    if getattr(args, "import_file", None):
        options["import_file"] = str(Path(args.import_file).resolve())
        methods = ["imported"]
    # method before task: cells run method by method (cheapest first), so a partial run covers every task
    grid = {"model": _csv(args.models), "method": methods, "task": _csv(args.tasks), "seed": [args.seed]}
    return SweepSpec.from_dict({"kind": "leaderboard", "grid": grid, "options": options,
                                "resources": {"num_cpus": args.threads}})


def leaderboard_frame(result: SweepResult) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The leaderboard rows (`COLUMNS`, grid order) and each finished cell's held-out curve."""
    table = result.table.copy()
    for col in COLUMNS:
        if col not in table:
            table[col] = None
    table["note"] = [next((str(r[k]) for k in ("reason", "error", "note") if isinstance(r.get(k), str) and r[k]), "")
                     for r in table.to_dict("records")]
    curves = {}
    for cell in table.loc[table["status"] == "done", "cell"]:
        path = result.out / "cells" / cell / "curve.csv"
        if path.is_file():
            curves[cell] = pd.read_csv(path)
    for col in COLUMNS:
        if col not in TEXT_COLUMNS:
            table[col] = pd.to_numeric(table[col].replace("", None), errors="coerce")
    order = {name: i for i, name in enumerate(dict.fromkeys(table["task"]))}
    table = table.assign(_t=table["task"].map(order)).sort_values(["model", "_t"], kind="stable")
    return table[COLUMNS].reset_index(drop=True), curves


def _num(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{float(v):.{digits}f}"


def _ci(r: dict[str, Any], key: str, low: str | None = None, high: str | None = None) -> str:
    if r.get(key) is None or r.get(key) != r.get(key):
        return "n/a"
    return f"{_num(r[key])} [{_num(r.get(low or key + '_low'))}, {_num(r.get(high or key + '_high'))}]"


def _circuit(r: dict[str, Any], prefix: str) -> str:
    if r.get("status") != "done":
        return "n/a"
    size = r.get(f"{prefix}_at_target")
    if size is None or size != size:
        return "none reached"
    return f"{int(size)} ({_ci(r, prefix + '_faithfulness', prefix + '_low', prefix + '_high')})"


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def display_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as strings, one row per cell (Markdown and HTML)."""
    rows = []
    for r in frame.to_dict("records"):
        done = r["status"] == "done"
        rows.append({"model": r["model"], "task": r["task"], "method": r["method"],
                     "CPR [95% CI]": _ci(r, "cpr") if done else "n/a", "CMD [95% CI]": _ci(r, "cmd") if done else "n/a",
                     "heads in [0.8, 1.2]": _circuit(r, "heads"), "edges in [0.8, 1.2]": _circuit(r, "edges"),
                     "stability edges (boot / rephrase)": (f"{_ci(r, 'stability_boot_edges')} / "
                                                           f"{_ci(r, 'stability_rephrase_edges')}") if done else "n/a",
                     "stability heads (boot / rephrase)": (f"{_ci(r, 'stability_boot_heads')} / "
                                                           f"{_ci(r, 'stability_rephrase_heads')}") if done else "n/a",
                     "method s": _num(r["seconds"], 1), "forwards": _num(r["forwards"], 1),
                     "backwards": _num(r["backwards"], 0), "cell s": _num(r["wall_seconds"], 0),
                     "cell CPU s": _num(r["cpu_seconds"], 0),
                     "peak RSS MB": _num(r["peak_rss_mb"], 0), "status / note": _short(f"{r['status']}: {r['note'] or ''}")})
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame, command: str, header: str = "") -> str:
    """leaderboard.md: how it was made, the table, how to read it."""
    shown = display_table(frame)
    lines = ["# Circuit-discovery leaderboard (held-out prompts)", "",
             f"Generated by `{command}` — do not edit by hand; rerun the command.", "", header, "",
             "| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in shown.itertuples(index=False)]
    lines += ["", "How to read it: every number is measured on held-out prompts whose templates the discovery prompts "
              "do not use. CPR/CMD: MIB's areas over the edge fractions (signed / absolute ranking), 95% bootstrap "
              "intervals over prompts. Circuits: the smallest head prefix / edge fraction whose held-out faithfulness "
              "lies in [0.8, 1.2] (and stays there for larger ones), with its interval. Stability: Jaccard overlap of "
              "the top 1% edges / top 10% heads found on bootstrap resamples of the discovery prompts (boot) and of "
              "the held-out template family (rephrase) with those found on all discovery prompts; mean [2.5, 97.5 "
              "percentile]. Cost: the method's seconds, forwards (1 = every layer once over the discovery prompts; "
              "the clean and corrupted runs every method shares are not counted) and backwards on all discovery "
              "prompts; the cell's wall time, CPU time (its cost on a quiet machine: "
              "cells run with one thread) and peak RSS. Definitions: "
              "`graphs/leaderboard.py`.", ""]
    return "\n".join(lines)


def html_page(frame: pd.DataFrame, curves: dict[str, pd.DataFrame], command: str, header: str) -> str:
    """leaderboard.html: the table (sortable) and each finished cell's held-out faithfulness curve (Plotly)."""
    sections = [Section("Leaderboard", [f"Generated by {command}.", header], [("every cell", display_table(frame))])]
    for task, group in frame.groupby("task", sort=False):
        section = Section(f"Held-out faithfulness curves: {task}")
        for r in group.to_dict("records"):
            curve = curves.get(r["cell"])
            if curve is None:
                continue
            stem = f"curve-{r['cell']}"
            section.figures.append((stem, f"{r['model']} / {task} / {r['method']}", b""))
            summary = FaithfulnessSummary(cpr=r["cpr"], cpr_ci=(r["cpr_low"], r["cpr_high"]), cmd=r["cmd"],
                                          cmd_ci=(r["cmd_low"], r["cmd_high"]))
            section.plots[stem] = faithfulness_curve(curve, summary, None)
        if section.figures:
            sections.append(section)
    record = {"task": {"name": "leaderboard"}, "model": {"name": ", ".join(dict.fromkeys(frame["model"]))},
              "config": {"method": "every method"}}
    return to_html(record, sections)


def run_leaderboard(args: argparse.Namespace, command: str) -> pd.DataFrame:
    """Run (or resume) the leaderboard sweep and write the four outputs under `args.out`."""
    say: Callable[[str], None] = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    if args.n < 2 or args.n_heldout < 2 or args.threads < 1:
        raise ValueError("--n and --n-heldout must be >= 2 and --threads >= 1")
    start = time.perf_counter()
    out = Path(args.out)
    sweep_dir = Path(args.sweep_dir or out / "leaderboard_sweep")
    if args.report_only:
        result = finished_cells(sweep_spec(args), sweep_dir)
    else:
        result = run_sweep(sweep_spec(args), sweep_dir, executor=make_executor(args.executor, address=args.address),
                           force=args.force, say=say)
    frame, curves = leaderboard_frame(result)
    total = time.perf_counter() - start
    counts = frame["status"].value_counts().to_dict()
    header = (f"{len(result.ran)} cells ran in this invocation and {len(result.reused)} were reused from "
              f"{result.out} ({total:.0f} s this invocation; every cell's own wall time is in the table). Cells: "
              + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".")
    if counts.get("missing"):
        header = (f"**PARTIAL**: {counts['missing']} of {len(frame)} cells have not run yet (status missing). "
                  + header)
    out.mkdir(parents=True, exist_ok=True)
    store.write_parquet(out / "leaderboard.parquet", frame)
    store.write_csv(out / "leaderboard.csv", frame)
    store.write_text(out / "leaderboard.md", markdown(frame, command, header))
    store.write_text(out / "leaderboard.html", html_page(frame, curves, command, header))
    if args.export_mib:
        written = export_mib(frame, result.out, Path(args.export_mib))
        say(f"wrote {len(written)} MIB files under {args.export_mib}")
    say(display_table(frame).to_string(index=False))
    say(f"wrote {out / 'leaderboard.md'}, leaderboard.csv, leaderboard.parquet, leaderboard.html")
    return frame


def finished_cells(spec: SweepSpec, sweep_dir: Path) -> SweepResult:
    """The sweep's table from what is on disk, running nothing. A cell's folder is matched by its parameters, not
    its content key, so cells finished by an earlier version of the code count too (their `code_version` is in
    cell.json); cells with no finished folder have status missing."""
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep folder {sweep_dir}: run the leaderboard first (without --report-only)")
    cells = spec.cells()
    folders = []
    for c in cells:
        found = sweep_dir / "cells" / f"{c.label()}-{cell_key(c)}"
        candidates = []
        for folder in sorted((sweep_dir / "cells").glob(f"{c.label()}-*")):
            try:
                record = json.loads((folder / "cell.json").read_text())
            except (OSError, ValueError):
                continue
            same = json.dumps(record.get("params"), sort_keys=True) == json.dumps(c.params, sort_keys=True)
            if same and record.get("status") in ("done", "skipped"):
                candidates.append((str(record.get("finished", "")), folder))
        folders.append(max(candidates)[1] if candidates else found)
    table = collect_table(folders)
    for key in ("model", "task", "method"):  # cells not run yet have no record: name them from the grid
        table[key] = [str(c.params[key]) for c in cells]
    return SweepResult(table, [], [f.name for f, s in zip(folders, table["status"]) if s != "missing"], sweep_dir)


def export_mib(frame: pd.DataFrame, sweep_dir: Path, out: Path) -> list[Path]:
    """Each finished cell's edge scores (`edge_scores.npy`) as a MIB submission under out/<method>/."""
    written: list[Path] = []
    graphs: dict[str, Any] = {}
    for r in frame[frame["status"] == "done"].to_dict("records"):
        path = sweep_dir / "cells" / r["cell"] / SCORES_FILE
        if not path.is_file():
            continue
        if r["model"] not in graphs:
            model = load_model(str(r["model"]))
            graphs[r["model"]] = (model_graph(model), int(model.cfg.d_model))
        graph, d_model = graphs[r["model"]]
        scores = torch.from_numpy(np.load(path)).double()
        written += write_submission(out / str(r["method"]), graph, scores, task=Path(str(r["task"])).stem,
                                    model=str(r["model"]), d_model=d_model)
    return written


def leaderboard_command(args: argparse.Namespace) -> int:
    command = " ".join(["circuitlab"] + [shlex.quote(a) for a in sys.argv[1:]])
    if not command.startswith("circuitlab bench"):
        command = "circuitlab bench leaderboard"
    run_leaderboard(args, command)
    return 0


__all__ = ["COLUMNS", "DEFAULT_TASKS", "add_leaderboard_arguments", "display_table", "leaderboard_command",
           "leaderboard_frame", "markdown", "run_leaderboard", "sweep_spec"]
