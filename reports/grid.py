"""`circuitlab sweep CONFIG --out DIR`: a grid of cells, each one ordinary run with its own folder.

A sweep file (YAML or JSON):

    kind: run                      # or bench (a method on a model with a known circuit)
    grid:                          # lists are crossed; a single value is the same in every cell
      model: [smollm2-135m]
      task: [ioi, capitals]
      method: [eap-ig, eap, activation]
      seed: [0, 1]
    options: {n: 16}               # any option of the kind, the same in every cell
    resources: {num_cpus: 1, num_gpus: 0, memory_mb: 4000}
    exclude: [{task: capitals, method: eap}]   # optional: drop cells matching every key given

Output: DIR/cells/<label>-<key>/ (the cell's files + cell.json: status, error or skip reason, wall time,
peak memory, backend), DIR/sweep.parquet and sweep.csv (one row per cell), DIR/summary.md/.html
(methods compared across models and tasks) and DIR/sweep.json (what this invocation ran and reused).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from circuitlab.reports import rundir, store
from circuitlab.reports.cell_kinds import check_params
from circuitlab.reports.cells import Cell, CellOutcome, cell_key, model_fingerprint
from circuitlab.reports.config import ConfigError
from circuitlab.reports.executors import Executor, SequentialExecutor, make_executor
from circuitlab.reports.parsing import DuplicateKeyError, parse_unique
from circuitlab.reports.sweep_summary import write_summary

SWEEP_KEYS = ("kind", "grid", "options", "resources", "exclude")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory_mb")
CELL_RECORD = "cell.json"


@dataclass
class SweepSpec:
    """A parsed sweep file: the kind of cell, the grid, shared options, per-cell resources, exclusions."""

    kind: str = "run"
    grid: dict[str, list[object]] = field(default_factory=dict)
    options: dict[str, object] = field(default_factory=dict)
    resources: dict[str, object] = field(default_factory=dict)
    exclude: list[dict[str, object]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, object], where: str = "sweep") -> SweepSpec:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a sweep file holds a mapping with {', '.join(SWEEP_KEYS)}")
        unknown = sorted(set(data) - set(SWEEP_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; a sweep file has {', '.join(SWEEP_KEYS)}")
        grid = data.get("grid") or {}
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"{where}: 'grid' must map option names to a value or a list of values")
        grid = {str(k).replace("-", "_"): (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in grid.items()}
        empty = [k for k, v in grid.items() if not v]
        if empty:
            raise ConfigError(f"{where}: grid list(s) {empty} are empty")
        options = {str(k).replace("-", "_"): v for k, v in (data.get("options") or {}).items()}
        both = sorted(set(options) & set(grid))
        if both:
            raise ConfigError(f"{where}: {both} given both in grid and options; keep one")
        resources = dict(data.get("resources") or {})
        bad = sorted(set(resources) - set(RESOURCE_KEYS))
        if bad:
            raise ConfigError(f"{where}: unknown resource(s) {bad}; use {', '.join(RESOURCE_KEYS)}")
        for key, value in resources.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{where}: resource {key} must be a number >= 0, got {value!r}")
            if key in ("num_cpus", "memory_mb") and value <= 0:  # a cell with no CPU (or memory) never runs
                raise ConfigError(f"{where}: resource {key} must be > 0 (a cell needs some), got {value!r}")
        exclude = data.get("exclude") or []
        if not isinstance(exclude, list) or not all(isinstance(e, dict) for e in exclude):
            raise ConfigError(f"{where}: 'exclude' must be a list of mappings such as {{method: acdc}}")
        return cls(str(data.get("kind", "run")), grid, options, resources,
                   [{str(k).replace("-", "_"): v for k, v in e.items()} for e in exclude])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SweepSpec:
        """Read a YAML/JSON sweep file (errors name the file and the bad key)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"sweep file {str(path)!r} does not exist")
        try:
            data = parse_unique(path.read_text(), json_file=path.suffix.lower() == ".json")
        except DuplicateKeyError as exc:
            raise ConfigError(f"sweep file {str(path)!r}: {exc}; keep one") from None
        except Exception as exc:  # yaml and json raise different types; both mean a malformed file
            raise ConfigError(f"sweep file {str(path)!r} cannot be parsed: {str(exc).splitlines()[0]}") from exc
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "grid": self.grid, "options": self.options, "resources": self.resources,
                "exclude": self.exclude}

    def cells(self) -> list[Cell]:
        """Every cell of the grid (validated and resolved; exclusions and duplicates dropped), in grid order."""
        keys = list(self.grid)
        out: list[Cell] = []
        seen: set[str] = set()
        for values in itertools.product(*(self.grid[k] for k in keys)):
            point = dict(zip(keys, values))
            params = {**self.options, **point}
            if any(all(params.get(k) == v for k, v in rule.items()) for rule in self.exclude):
                continue
            where = "cell " + ", ".join(f"{k}={v}" for k, v in point.items())
            resolved = check_params(self.kind, params, where)
            ident = json.dumps(resolved, sort_keys=True, default=str)
            if ident not in seen:
                seen.add(ident)
                out.append(Cell(self.kind, resolved, dict(self.resources)))
        if not out:
            raise ConfigError("the sweep has no cells (every grid point is excluded)")
        return out


@dataclass
class SweepResult:
    """What one invocation did: the table of every cell and which cells it ran or reused."""

    table: pd.DataFrame
    ran: list[str]
    reused: list[str]
    out: Path


def _read_record(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / CELL_RECORD).read_text())
    except (OSError, ValueError):
        return None


def _write_cell(folder: Path, record: dict[str, Any], files: dict[str, bytes]) -> None:
    """Write a finished cell: files and record into a staging sibling, then one rename into place."""
    staging = folder.with_name(f".staging-{folder.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    for rel, data in files.items():
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    store.write_json(staging / CELL_RECORD, record)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)


def _record(cell: Cell, key: str, outcome: CellOutcome, attempt: int) -> dict[str, Any]:
    result = dict(outcome.result)
    trace = result.pop("traceback", None)
    return {"key": key, "kind": cell.kind, "params": cell.params, "resources": cell.resources,
            "status": outcome.status, "error": outcome.error, "reason": outcome.reason, "result": result,
            "traceback": trace, "wall_seconds": round(outcome.wall_seconds, 3),
            "peak_rss_mb": round(outcome.peak_rss_mb, 1), "backend": outcome.backend, "attempt": attempt,
            "code_version": store.code_version(), "model_weights": _fingerprint(cell),
            "files": sorted(outcome.files), "finished": _dt.datetime.now(_dt.timezone.utc).isoformat()}


def _fingerprint(cell: Cell) -> str:
    try:
        return model_fingerprint(str(cell.params.get("model", "")))
    except (OSError, ValueError) as exc:
        return f"unreadable: {exc}"


def run_sweep(spec: SweepSpec, out: str | os.PathLike[str], *, executor: Executor | None = None, force: bool = False,
              say: Callable[[str], None] = lambda s: None) -> SweepResult:
    """Run every cell not already finished under `out` (all of them with `force`); write the table and summary.

    A cell is finished when its folder (named by its content key) holds a record with status done or
    skipped; failed cells run again. Each cell is written as soon as it finishes.
    """
    executor = executor or SequentialExecutor()
    out = store.check_writable(rundir.check_kind(out, "sweep"))  # never mixes cells into a run/patch/... folder
    root = out / "cells"
    root.mkdir(exist_ok=True)
    for stale in root.glob(".staging-*"):  # left by an interrupted sweep: never a finished cell
        shutil.rmtree(stale, ignore_errors=True)
    cells = spec.cells()
    keys = [cell_key(c) for c in cells]
    folders = [root / f"{c.label()}-{k}" for c, k in zip(cells, keys)]
    todo, reused = [], []
    for i, folder in enumerate(folders):
        record = _read_record(folder)
        if record and record.get("key") == keys[i] and record.get("status") in ("done", "skipped") and not force:
            reused.append(folder.name)
        else:
            todo.append(i)
    say(f"sweep: {len(cells)} cells, {len(reused)} already finished, {len(todo)} to run on {executor.name}")
    ran: list[str] = []

    def on_done(j: int, outcome: CellOutcome) -> None:
        i = todo[j]
        previous = _read_record(folders[i])
        attempt = (previous or {}).get("attempt", 0) + 1 if previous and previous.get("key") == keys[i] else 1
        _write_cell(folders[i], _record(cells[i], keys[i], outcome, attempt), outcome.files)
        ran.append(folders[i].name)
        detail = outcome.error or outcome.reason
        say(f"  [{len(ran)}/{len(todo)}] {folders[i].name}: {outcome.status}{': ' + detail if detail else ''} "
            f"({outcome.wall_seconds:.1f}s)")

    started = time.time()
    try:
        with executor:
            executor.run_cells([cells[i] for i in todo], on_done)
    finally:
        table = collect_table(folders)
        store.write_json(out / "sweep.json", {
            "spec": spec.to_dict(), "executor": executor.name, "code_version": store.code_version(),
            "cells": len(cells), "ran": ran, "reused": reused, "wall_seconds": round(time.time() - started, 3),
            "status": table["status"].value_counts().to_dict() if len(table) else {}})
        write_table(out, table)

    write_summary(out, table, spec.kind)
    return SweepResult(table, ran, reused, out)


def collect_table(folders: list[Path]) -> pd.DataFrame:
    """One tidy row per cell (in grid order) from the cells' records; cells never run are `missing`."""
    rows = []
    for folder in folders:
        record = _read_record(folder) or {"status": "missing", "params": {}, "result": {}, "backend": {}}
        row: dict[str, Any] = {"cell": folder.name, "key": record.get("key", folder.name.rsplit("-", 1)[-1]),
                               "kind": record.get("kind", ""), "status": record["status"],
                               "error": record.get("error", ""), "reason": record.get("reason", "")}
        for key, value in (record.get("params") or {}).items():
            row[key] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
        for key, value in (record.get("result") or {}).items():
            if key not in row:
                row[key] = value
        backend = record.get("backend") or {}
        row.update(wall_seconds=record.get("wall_seconds"), peak_rss_mb=record.get("peak_rss_mb"),
                   executor=backend.get("executor", ""), device=backend.get("device", ""),
                   host=backend.get("host", ""), node=backend.get("node", ""), attempt=record.get("attempt"))
        rows.append(row)
    return _tidy(pd.DataFrame(rows))


def _tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """One type per column (numbers as float, everything else as text) so Parquet and CSV agree."""
    for col in frame.columns:
        values = frame[col].dropna()
        if frame[col].dtype == object:
            numeric = len(values) > 0 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            whole = numeric and len(values) == len(frame) and all(isinstance(v, int) for v in values)
            if whole:
                frame[col] = frame[col].astype("int64")
            elif numeric:
                frame[col] = frame[col].astype(float)
            else:
                frame[col] = frame[col].map(lambda v: "" if v is None else str(v))
    return frame


def write_table(out: Path, table: pd.DataFrame) -> None:
    """sweep.parquet and sweep.csv, atomically."""
    store.write_csv(out / "sweep.csv", table)
    store._atomic(out / "sweep.parquet", lambda tmp: table.to_parquet(tmp, index=False))


# ---------------------------------------------------------------------- command line

def add_sweep_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `circuitlab sweep CONFIG --out DIR` on the CLI's subparsers."""
    p = subparsers.add_parser("sweep", help="a grid of runs (models x tasks x methods x ...), sequential or on Ray")
    p.add_argument("config", help="YAML/JSON sweep file (grid, options, resources; see README)")
    p.add_argument("--out", required=True, help="sweep folder: cells/, sweep.parquet/.csv, summary.md/.html")
    p.add_argument("--executor", default="sequential", help="sequential (default, in this process) or ray")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS; implies ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all cores)")
    p.add_argument("--force", action="store_true", help="rerun every cell, finished ones too")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_sweep)
    return p


def _cmd_sweep(args: Any) -> int:
    address = args.address or (os.environ.get("RAY_ADDRESS") if args.executor == "ray" else None)
    spec = SweepSpec.load(args.config)
    executor = make_executor(args.executor, address=address, num_cpus=args.num_cpus)
    say = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    result = run_sweep(spec, args.out, executor=executor, force=args.force, say=say)
    counts = result.table["status"].value_counts().to_dict()
    print(f"sweep: {', '.join(f'{v} {k}' for k, v in counts.items())}; ran {len(result.ran)}, reused "
          f"{len(result.reused)}; table {result.out / 'sweep.parquet'}; summary {result.out / 'summary.html'}")
    return 1 if counts.get("failed") else 0
