"""Writing a `RunResult` to a run directory and reading it back (the only code that knows the file layout).

OUT/
  run.json              record: config, task, model, metrics, summaries, timings, versions (JSON)
  pairs.jsonl           the prompt pairs (`tasks.PromptPairs.save_jsonl`)
  tables/<name>.parquet every table of `reports.result.TABLES` that was computed (dtypes kept)
  circuit.json          the circuit, node-link JSON; circuit.graphml the same for Gephi/Cytoscape
  scores.csv            one tidy export of every score (exact, method nodes, edges, residual stream)
  baseline.csv, oracle.csv, faithfulness.csv, roles.csv   CSV exports of those tables, for spreadsheets
  .partial/<config key>/ stage results of an unfinished run (same formats), for resuming

Every file is written atomically (`reports.store`); `load_result` reads only the JSON/JSONL/Parquet files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import networkx as nx
import pandas as pd

from circuitlab.reports import store
from circuitlab.reports.result import SUMMARIES, TABLES, RunResult

CSV_EXPORTS = ("baseline", "oracle", "faithfulness", "roles")


def write_value(directory: Path, name: str, value: Any) -> None:
    """Write one field: DataFrame -> Parquet, prompt pairs -> JSONL, graph -> node-link JSON, dict -> JSON."""
    if isinstance(value, pd.DataFrame):
        store.write_parquet(directory / f"{name}.parquet", value)
    elif isinstance(value, nx.Graph):
        from circuitlab.graphs.io import to_node_link

        store.write_json(directory / f"{name}.json", to_node_link(value))
    elif hasattr(value, "save_jsonl"):
        store.write_with(directory / f"{name}.jsonl", value.save_jsonl)
    else:
        store.write_json(directory / f"{name}.json", value)


def read_value(directory: Path, name: str) -> Any:
    """Read a field written by `write_value` (None when it was never written)."""
    if (directory / f"{name}.parquet").is_file():
        return pd.read_parquet(directory / f"{name}.parquet")
    if (directory / f"{name}.jsonl").is_file():
        from circuitlab.tasks import PromptPairs

        return PromptPairs.load_jsonl(directory / f"{name}.jsonl")
    if (directory / f"{name}.json").is_file():
        data = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
        if name == "circuit":
            from circuitlab.graphs.io import from_node_link

            return from_node_link(data)
        return data
    return None


class StageCache:
    """Stage outputs of one configuration under OUT/.partial/<key>/<stage>/, with a `<stage>.done` marker."""

    def __init__(self, out: str | os.PathLike[str], key: str) -> None:
        self.root = Path(out) / store.PARTIAL / key

    def has(self, stage: str) -> bool:
        return (self.root / f"{stage}.done").is_file()

    def save(self, stage: str, values: dict[str, Any], seconds: float) -> None:
        for name, value in values.items():
            if value is not None:
                write_value(self.root / stage, name, value)
        store.write_json(self.root / f"{stage}.done", {"fields": list(values), "seconds": seconds})

    def load(self, stage: str) -> tuple[dict[str, Any], float]:
        marker = json.loads((self.root / f"{stage}.done").read_text(encoding="utf-8"))
        values = {name: read_value(self.root / stage, name) for name in marker["fields"]}
        return values, float(marker.get("seconds", float("nan")))


def save_result(result: RunResult, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write every file of a finished run (see the module docstring); returns the run.json record."""
    from circuitlab.graphs.io import write_graphml

    out = Path(out)
    write_value(out, "pairs", result.pairs)
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
    store.write_json(out / "run.json", record)
    return record


def load_result(out: str | os.PathLike[str]) -> RunResult:
    """Read a finished run directory back into a `RunResult` (no model needed)."""
    from circuitlab.reports.config import make_config

    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"run directory {str(out)!r} does not exist")
    for name in ("run.json", "pairs.jsonl", "circuit.json", "tables/baseline.parquet"):
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out / name} is missing: {out} is not a finished circuitlab run "
                                    "(rerun `circuitlab run` with the same arguments to complete it)")
    record = json.loads((out / "run.json").read_text(encoding="utf-8"))
    result = RunResult(make_config(record["config"]), task=record["task"], model=record["model"])
    result.pairs = read_value(out, "pairs")
    result.circuit = read_value(out, "circuit")
    for name in TABLES:
        result.update({name: read_value(out / "tables", name)})
    result.oracle_summary, result.faithfulness_summary = record.get("oracle"), record.get("faithfulness")
    result.acdc_summary = record.get("acdc")
    result.timings, result.resumed = dict(record.get("timings", {})), list(record.get("resumed_stages", []))
    result.info = {k: record[k] for k in ("command", "versions", "threads", "wall_seconds", "platform") if k in record}
    return result


__all__ = ["CSV_EXPORTS", "StageCache", "load_result", "read_value", "save_result", "write_value", "SUMMARIES"]
