"""The `leaderboard` sweep-cell kind: one model x task x method cell of `circuitlab bench leaderboard`.

`check_leaderboard_params` validates a cell's parameters before anything heavy loads; `run_leaderboard_cell`
loads the model, splits the task's prompts into discovery and held-out ones that share no template
(`tasks.split.rephrased_split`), runs `graphs.leaderboard.leaderboard_cell` and writes result.json, result.csv and
curve.csv (the held-out faithfulness curve) and edge_scores.npy (the method's edge scores on the discovery
prompts, float32 in the graph's edge order: what `bench leaderboard --export-mib` writes as MIB files) into the
cell's folder. A task the model cannot pose (greater-than on
a digit-by-digit tokenizer) and ACDC above its edge limit are skipped cells, with the reason.
"""

from __future__ import annotations

import io
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.graphs.leaderboard import LeaderboardConfig, known_methods, leaderboard_cell
from circuitlab.patching.architecture import describe
from circuitlab.patching.edges import prepare_edges
from circuitlab.patching.methods import METHODS as REGISTRY
from circuitlab.patching.models import load_model
from circuitlab.patching.topology import ComputationalGraph
from circuitlab.reports import store
from circuitlab.reports.cells import Cell, SkipCell
from circuitlab.reports.config import ConfigError
from circuitlab.tasks import get_task
from circuitlab.tasks.base import Task, TaskUnsupportedError
from circuitlab.tasks.custom import load_task
from circuitlab.tasks.split import rephrased_split

SCORES_FILE = "edge_scores.npy"  # the method's edge scores on the discovery prompts, in the graph's edge order
LEADERBOARD_FIELDS = ("model", "task", "method", "seed", "n", "n_heldout", "import_file")


def _options() -> tuple[str, ...]:
    return tuple(f.name for f in fields(LeaderboardConfig) if f.name != "seed")


def leaderboard_config(params: dict[str, object]) -> LeaderboardConfig:
    """The cell's `LeaderboardConfig` (lists from JSON become tuples)."""
    options = {k: (tuple(params[k]) if isinstance(params[k], list) else params[k]) for k in _options() if k in params}
    return LeaderboardConfig(seed=int(params.get("seed", 0)), **options)


def check_leaderboard_params(params: dict[str, object], where: str) -> dict[str, object]:
    """Validated, resolved parameters of one leaderboard cell (errors name the option and the cell)."""
    known = set(LEADERBOARD_FIELDS) | set(_options())
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown leaderboard option(s) {unknown}; known: {', '.join(sorted(known))}")
    if "model" not in params or "task" not in params or "method" not in params:
        raise ConfigError(f"{where}: a leaderboard cell needs a model, a task and a method")
    resolved = {"seed": 0, "n": 8, "n_heldout": 8, **params}
    if resolved["method"] not in known_methods():
        raise ConfigError(f"{where}: unknown method {resolved['method']!r}: use one of {', '.join(known_methods())}")
    for key in ("n", "n_heldout"):
        if int(resolved[key]) < 2:
            raise ConfigError(f"{where}: {key} must be >= 2 (bootstrap intervals), got {resolved[key]}")
    if (resolved["method"] == "imported") != bool(resolved.get("import_file")):
        raise ConfigError(f"{where}: method 'imported' and import_file go together (a MIB score file to evaluate)")
    try:
        leaderboard_config(resolved)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return resolved


def _task(name: str) -> Task:
    path = Path(name).expanduser()
    return load_task(path) if path.is_file() else get_task(name.replace("-", "_"))


def model_graph(model: TransformerBridge) -> ComputationalGraph:
    """The edge graph of a loaded model (the engine's: `ComputationalGraph.from_architecture`)."""
    return ComputationalGraph.from_architecture(describe(model))


def run_leaderboard_cell(cell: Cell, folder: Path) -> dict[str, object]:
    """One method on one model and task (see the module docstring); returns the row."""
    cpu_start = time.process_time()
    p = cell.params
    method = str(p["method"])
    model = load_model(str(p["model"]))
    limit = REGISTRY[method].max_edges if method in REGISTRY else None
    if limit is not None:
        n_edges = model_graph(model).n_edges
        if n_edges > limit:
            raise SkipCell(f"{method.upper()} on {n_edges} edges is above its limit of {limit} edges (one masked "
                           f"forward per edge tried)")
    task = _task(str(p["task"]))
    try:
        disc, held = rephrased_split(task, model, int(p["n"]), int(p["n_heldout"]), seed=int(p["seed"]))
    except TaskUnsupportedError as exc:
        raise SkipCell(f"task {p['task']} on {p['model']}: {exc}") from None
    ctx, hctx = prepare_edges(model, task, disc), prepare_edges(model, task, held)
    result = leaderboard_cell(ctx, hctx, method, leaderboard_config(p))
    row = {"model": str(p["model"]), "task": str(p["task"]), **result.row,
           "cpu_seconds": time.process_time() - cpu_start}  # this process's CPU time: the cell's cost on a quiet machine
    row = store.plain_row(row)
    store.write_csv(folder / "result.csv", pd.DataFrame([row]))
    store.write_csv(folder / "curve.csv", result.curve)
    buffer = io.BytesIO()
    np.save(buffer, result.edge_scores.numpy().astype(np.float32))
    store.write_bytes(folder / SCORES_FILE, buffer.getvalue())
    store.write_json(folder / "result.json", {"cell": p, "result": row,
                                              "templates": {"discovery": disc.info, "heldout": held.info}})
    return row


__all__ = ["SCORES_FILE", "LEADERBOARD_FIELDS", "check_leaderboard_params", "leaderboard_config", "model_graph",
           "run_leaderboard_cell"]
