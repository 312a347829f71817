"""Writing a `RunResult` to a run directory and reading it back (the only code that knows the file layout).

OUT/
  run.json              record: config, task, model, metrics, summaries, timings, versions (JSON)
  pairs.jsonl           the prompt pairs (`tasks.PromptPairs.save_jsonl`); heldout_pairs.jsonl the held-out ones,
                        validation_pairs.jsonl (--validation-n) those the circuit's size is chosen on
  tables/<name>.parquet every table of `reports.result.TABLES` that was computed (dtypes kept)
  circuit.json          the circuit, node-link JSON; circuit.graphml the same for Gephi/Cytoscape
  scores.csv            one tidy export of every score (exact, method nodes, edges, residual stream)
  baseline.csv, oracle.csv, faithfulness.csv, roles.csv, faithful_curve.csv, stability.csv   CSV exports of
                        those tables, for spreadsheets
  report.html, report.md, figures/*.png   the rendered report (`reports.render`)
  .partial/<resume key>/ stage results (same formats), for resuming; each `<stage>.done` lists its files

Every file is written atomically (`reports.store`). run.json lists every output with its size and SHA-256
(`outputs`; the report files under `rendered`); `load_result` checks them before reading, and a saved stage
is resumed only when its files match its `.done` record. The folder itself is written as a staging folder
and swapped into place whole (`reports.rundir`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import networkx as nx
import pandas as pd

from circuitlab.graphs.io import from_node_link, to_node_link, write_graphml
from circuitlab.reports import store, rundir
from circuitlab.reports.config import make_config
from circuitlab.reports.result import TABLES, RunResult
from circuitlab.reports.rundir import mismatch
from circuitlab.tasks import PromptPairs
from circuitlab.reports.summaries import ModelRecord, Summary

CSV_EXPORTS = ("baseline", "oracle", "faithfulness", "roles", "faithful_curve", "stability")


def write_value(directory: Path, name: str, value: object) -> None:
    """Write one field: DataFrame -> Parquet, prompt pairs -> JSONL, graph -> node-link JSON, dict -> JSON."""
    if isinstance(value, pd.DataFrame):
        store.write_parquet(directory / f"{name}.parquet", value)
    elif isinstance(value, nx.Graph):
        store.write_json(directory / f"{name}.json", to_node_link(value))
    elif isinstance(value, Summary):
        store.write_json(directory / f"{name}.json", value.to_dict())
    elif isinstance(value, PromptPairs):
        store.write_with(directory / f"{name}.jsonl", value.save_jsonl)
    else:
        store.write_json(directory / f"{name}.json", value)


def read_value(directory: Path, name: str) -> object:
    """Read a field written by `write_value` (None when it was never written)."""
    if (directory / f"{name}.parquet").is_file():
        return store.read_parquet(directory / f"{name}.parquet")
    if (directory / f"{name}.jsonl").is_file():
        path = directory / f"{name}.jsonl"
        try:
            return PromptPairs.load_jsonl(path)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a readable prompt-pairs file ({exc}); delete it and rerun") from None
    if (directory / f"{name}.json").is_file():
        data = store.read_json(directory / f"{name}.json")
        if name == "circuit":
            return from_node_link(data)
        return data
    return None


class StageCache:
    """Stage outputs of one resume key under <folder>/.partial/<key>/<stage>/, with a `<stage>.done` marker
    listing every file of the stage with its size and SHA-256."""

    def __init__(self, folder: str | os.PathLike[str], key: str) -> None:
        self.root = Path(folder) / store.PARTIAL / key
        self.problems: dict[str, str] = {}

    def has(self, stage: str) -> bool:
        """True when the stage finished and its files still match their record (else the reason is kept in
        `problems` and the marker removed, so the stage is recomputed)."""
        done = self.root / f"{stage}.done"
        if not done.is_file():
            return False
        try:
            files = json.loads(done.read_text(encoding="utf-8"))["files"]
            problem = next((p for name, expected in files.items()
                            if (p := mismatch(self.root / stage, name, expected))), None)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            problem = f"{done} is unreadable or lists no files"
        if problem:
            self.problems[stage] = problem
            done.unlink(missing_ok=True)
            return False
        return True

    def save(self, stage: str, values: dict[str, object], seconds: float) -> None:
        folder = self.root / stage
        for name, value in values.items():
            if value is not None:
                write_value(folder, name, value)
        files = {str(p.relative_to(folder)): store.file_record(p) for p in sorted(folder.rglob("*"))
                 if p.is_file()} if folder.is_dir() else {}
        store.write_json(self.root / f"{stage}.done", {"fields": list(values), "seconds": seconds, "files": files})

    def load(self, stage: str) -> tuple[dict[str, object], float]:
        marker = store.read_json(self.root / f"{stage}.done")
        values = {name: read_value(self.root / stage, name) for name in marker["fields"]}
        return values, float(marker.get("seconds", float("nan")))


def save_result(result: RunResult, out: str | os.PathLike[str]) -> dict[str, object]:
    """Write every file of a finished run (see the module docstring); returns the run.json record."""
    out = Path(out)
    write_value(out, "pairs", result.pairs)
    for name in ("heldout_pairs", "validation_pairs"):
        if getattr(result, name) is not None:
            write_value(out, name, getattr(result, name))
    for name in TABLES:
        table = getattr(result, name)
        if table is not None:
            write_value(out / "tables", name, table)
            if name in CSV_EXPORTS:
                store.write_csv(out / f"{name}.csv", table)
    store.write_csv(out / "scores.csv", result.scores_table())
    write_value(out, "circuit", result.circuit)
    store.write_with(out / "circuit.graphml", lambda tmp: write_graphml(result.circuit, tmp))

    record = result.record()
    record["kind"] = "run"  # rundir.result_kind: what this folder holds
    record["outputs"] = rundir.manifest(out)
    store.write_json(out / "run.json", record)
    return record


def load_result(out: str | os.PathLike[str]) -> RunResult:
    """Read a finished run directory back into a `RunResult` (no model needed)."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"run directory {str(out)!r} does not exist")
    record = rundir.read_record(out)
    if record.get("kind") in ("patch", "path"):
        raise ValueError(f"{out} holds one `circuitlab {record['kind']}` sweep (scores.csv"
                         f"{', heatmap.png' if record['kind'] == 'patch' else ''}), not a `circuitlab run` "
                         "discovery: `circuitlab report` renders run folders only; read its scores.csv directly")
    rundir.verify_outputs(out, record)
    for name in ("pairs.jsonl", "circuit.json", "tables/baseline.parquet"):
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out / name} is missing: {out} is not a finished circuitlab run "
                                    "(rerun `circuitlab run` with the same arguments to complete it)")
    result = RunResult(make_config(record["config"]), task=record["task"], model=ModelRecord.from_dict(record["model"]))
    result.pairs = read_value(out, "pairs")
    result.heldout_pairs = read_value(out, "heldout_pairs")
    result.validation_pairs = read_value(out, "validation_pairs")
    result.update({"faithful": record.get("circuit_faithfulness")})
    result.circuit = read_value(out, "circuit")
    for name in TABLES:
        result.update({name: read_value(out / "tables", name)})
    result.update({"oracle_summary": record.get("oracle"), "faithfulness_summary": record.get("faithfulness"),
                   "acdc_summary": record.get("acdc"), "prompt_split": record.get("split")})
    result.timings, result.resumed = dict(record.get("timings", {})), list(record.get("resumed_stages", []))
    result.info = {k: record[k] for k in ("command", "versions", "threads", "threads_chosen", "wall_seconds", "platform") if k in record}
    return result


__all__ = ["CSV_EXPORTS", "StageCache", "load_result", "read_value", "save_result", "write_value"]
