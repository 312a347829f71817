"""What each kind of sweep cell runs, how its parameters are checked before anything heavy loads, and
`run_cell`, which runs one cell in a private staging folder and records its outcome.

- `run`: one ordinary `circuitlab run` (parameters are `RunConfig` fields; the folder is a normal run folder:
  report.html/.md, run.json, scores.csv, circuit.json/.graphml, pairs.jsonl, baseline/faithfulness/oracle/
  roles tables). ACDC above its edge limit is skipped with the reason (give `force: true` to run it).
- `bench`: one discovery method on a model with a known circuit, as one row of `circuitlab bench methods`
  (`graphs.benchmark.benchmark_case`): a ground-truth name (`graphs.groundtruth.list_groundtruth()`), a
  folder laid out like one (model + circuit.json + task.json), or `smollm2-ioi` (no reference circuit).
  The folder holds result.json and result.csv (edge/node ROC-AUC, CPR/CMD with bootstrap intervals, times).
- `leaderboard`: one method on a model and task, judged on held-out prompts (`reports.leaderboard_cell`).
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import socket
import tempfile
import time
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from circuitlab.graphs.benchmark import (
    BenchCase, BenchConfig, COUNTERFACTUALS, Reference, adapt_groundtruth, benchmark_case, own_case,
)
from circuitlab.graphs.groundtruth import list_groundtruth, load_groundtruth
from circuitlab.patching.methods import get_method, method_names
from circuitlab.patching.models import load_model
from circuitlab.patching.topology import ComputationalGraph
from circuitlab.reports import store
from circuitlab.reports.cells import Cell, CellOutcome, SkipCell
from circuitlab.reports.config import ConfigError, FIELDS, make_config, validate
from circuitlab.reports.leaderboard_cell import check_leaderboard_params, run_leaderboard_cell
from circuitlab.reports.run import execute
from circuitlab.tasks import get_task

SMOLLM2_IOI = "smollm2-ioi"  # the bench grid's name for SmolLM2 IOI
SMOLLM2_IOI_ROW = ("smollm2-135m IOI", "task (ABC)")  # its model and counterfactual as the results table shows them
BENCH_FIELDS = ("model", "method", "counterfactual", "seed", "n", "ioi_n", "circuit", "task")


def _bench_options() -> tuple[str, ...]:
    return tuple(f.name for f in fields(BenchConfig) if f.name != "seed")


# ---------------------------------------------------------------------- validation (cheap, before running)

def check_params(kind: str, params: dict[str, object], where: str) -> dict[str, object]:
    """Validated, resolved parameters of one cell (errors name the option and the cell)."""
    if kind == "run":
        unknown = sorted(set(params) - FIELDS)
        if unknown:
            raise ConfigError(f"{where}: unknown run option(s) {unknown}; known: {', '.join(sorted(FIELDS))}")
        if "out" in params:
            raise ConfigError(f"{where}: 'out' is chosen by the sweep (each cell gets its own folder); remove it")
        cfg = make_config({**params, "out": "."})
        validate(cfg)
        resolved = cfg.to_dict()
        resolved.pop("out")
        return resolved
    if kind == "bench":
        known = set(BENCH_FIELDS) | set(_bench_options())
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown bench option(s) {unknown}; known: {', '.join(sorted(known))}")
        resolved = {"counterfactual": "task", "seed": 0, "n": 32, "circuit": None, "task": None, **params}
        if str(resolved.get("model")) == SMOLLM2_IOI:  # SmolLM2 IOI has its own pair count (`ioi_n`, default 8)
            resolved["n"] = int(resolved.pop("ioi_n", 8))
        resolved.pop("ioi_n", None)
        if "model" not in params or "method" not in params:
            raise ConfigError(f"{where}: a bench cell needs a model and a method")
        if resolved["method"] not in method_names():
            raise ConfigError(f"{where}: unknown method {resolved['method']!r}: use one of {', '.join(method_names())}")
        if resolved["counterfactual"] not in COUNTERFACTUALS:
            raise ConfigError(f"{where}: unknown counterfactual {resolved['counterfactual']!r}: use one of "
                              f"{', '.join(COUNTERFACTUALS)}")
        if int(resolved["n"]) < 1:
            raise ConfigError(f"{where}: n must be >= 1, got {resolved['n']}")
        options = {k: resolved[k] for k in _bench_options() if k in resolved}
        try:
            BenchConfig(**options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return resolved
    if kind == "leaderboard":
        return check_leaderboard_params(params, where)
    raise ConfigError(f"{where}: unknown sweep kind {kind!r}: use run, bench or leaderboard")


# ---------------------------------------------------------------------- run cells

def _run_result(record: dict[str, Any]) -> dict[str, Any]:
    metrics = record.get("metrics") or {}
    faith = record.get("faithfulness") or {}
    out = {"metric": metrics.get("metric"), "clean": metrics.get("clean"), "corrupt": metrics.get("corrupt"),
           "difference": metrics.get("difference"),
           "difference_low": (metrics.get("difference_ci") or [None, None])[0],
           "difference_high": (metrics.get("difference_ci") or [None, None])[1],
           "cpr": faith.get("cpr"), "cpr_low": (faith.get("cpr_ci") or [None, None])[0],
           "cpr_high": (faith.get("cpr_ci") or [None, None])[1], "cmd": faith.get("cmd"),
           "cmd_low": (faith.get("cmd_ci") or [None, None])[0], "cmd_high": (faith.get("cmd_ci") or [None, None])[1],
           "oracle_spearman": (record.get("oracle") or {}).get("spearman"),
           "node_spearman": (record.get("node_agreement") or {}).get("spearman"),
           "circuit_nodes": (record.get("circuit") or {}).get("nodes"),
           "circuit_edges": (record.get("circuit") or {}).get("edges"),
           "weight_hash": (record.get("model") or {}).get("weight_hash")}
    return out


def run_run_cell(cell: Cell, folder: Path) -> dict[str, object]:
    """One `circuitlab run` into `folder`; returns the headline numbers of its run.json."""
    cfg = make_config({**cell.params, "out": str(folder), "threads": cell.threads})
    limit = get_method(cfg.method).max_edges
    if limit is not None and not cfg.force:
        mcfg = load_model(cfg.model, device=cfg.device).cfg
        n_edges = ComputationalGraph(int(mcfg.n_layers), int(mcfg.n_heads),
                                     int(getattr(mcfg, "n_key_value_heads", None) or mcfg.n_heads),
                                     bool(getattr(mcfg, "attn_only", False))).n_edges
        if n_edges > limit:
            raise SkipCell(f"{cfg.method.upper()} on {n_edges} edges is above its limit of {limit} (set force: true)")
    record = execute(cfg, quiet=True, command=cfg.command())
    return _run_result(record)


# ---------------------------------------------------------------------- bench cells

def _bench_case(params: dict[str, Any]) -> Any:
    model, n, seed, cf = str(params["model"]), int(params["n"]), int(params["seed"]), params["counterfactual"]
    if model == SMOLLM2_IOI:
        if cf != "task":
            raise SkipCell(f"{SMOLLM2_IOI} has only the task's own (ABC) counterfactual, not {cf!r}")

        lm = load_model("smollm2-135m")
        task = get_task("ioi")
        label, counterfactual = SMOLLM2_IOI_ROW
        return BenchCase(label, lm, task, task.generate(lm, n, seed=seed), None, counterfactual)
    path = Path(model).expanduser()
    if model in list_groundtruth() or (path.is_dir() and params.get("circuit") is None
                                       and (path / "circuit.json").is_file() and (path / "task.json").is_file()):
        gt = load_groundtruth(model) if model in list_groundtruth() else load_groundtruth(path.name, path.parent)
        task, pairs = adapt_groundtruth(gt, n, seed, counterfactual=cf)
        return BenchCase(gt.name, gt.model, task, pairs, Reference.from_groundtruth(gt), cf)
    if not path.is_dir():
        raise FileNotFoundError(f"bench model {model!r} is neither a ground-truth name ({', '.join(list_groundtruth())}"
                                f"), {SMOLLM2_IOI}, nor a model directory")
    circuit = params.get("circuit") or path / "circuit.json"
    task = params.get("task") or path / "task.json"
    return own_case(path, circuit, task, n, seed, cf)


def run_bench_cell(cell: Cell, folder: Path) -> dict[str, object]:
    """One method on one benchmark case; writes result.json/.csv into `folder` and returns the row."""
    params = cell.params
    case = _bench_case(params)
    options = {k: params[k] for k in _bench_options() if k in params}
    config = BenchConfig(seed=int(params["seed"]), **options)
    frame = benchmark_case(case, [params["method"]], config)
    row = store.plain_row(frame.iloc[0].to_dict())
    if str(row.get("note") or "").startswith("skipped:"):
        raise SkipCell(str(row["note"])[len("skipped:"):].strip())
    store.write_csv(folder / "result.csv", pd.DataFrame([row]))
    store.write_json(folder / "result.json", {"cell": cell.params, "result": row})
    return row


RUNNERS: dict[str, Callable[[Cell, Path], dict[str, Any]]] = {"run": run_run_cell, "bench": run_bench_cell,
                                                               "leaderboard": run_leaderboard_cell}


# ---------------------------------------------------------------------- running

def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _backend(executor: str, device: str) -> dict[str, Any]:
    return {"executor": executor, "device": device, "host": socket.gethostname(), "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


def run_cell(cell: Cell, executor: str = "sequential") -> CellOutcome:
    """Run one cell in a private staging folder; never raises for a cell's own failure (it is recorded)."""
    staging = Path(tempfile.mkdtemp(prefix="circuitlab-cell-"))
    previous = torch.get_num_threads()
    torch.set_num_threads(cell.threads)
    exact_peak = _reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    outcome = CellOutcome(status="done")
    try:
        outcome.result = RUNNERS[cell.kind](cell, staging)
    except SkipCell as exc:
        outcome = CellOutcome(status="skipped", reason=str(exc))
    except Exception as exc:  # a cell's failure is data: the sweep goes on and records it
        outcome = CellOutcome(status="failed", error=f"{type(exc).__name__}: {exc}",
                              result={"traceback": traceback.format_exc(limit=8)})
    finally:
        torch.set_num_threads(previous)
    outcome.wall_seconds = time.perf_counter() - started
    outcome.peak_rss_mb = _peak_rss_mb()
    outcome.backend = _backend(executor, str(cell.params.get("device", "cpu")))
    outcome.backend["peak_memory"] = "VmHWM during the cell" if exact_peak else "process peak (ru_maxrss)"
    if torch.cuda.is_available():
        outcome.backend["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if outcome.status == "done":
        outcome.files = {str(p.relative_to(staging)): p.read_bytes()
                         for p in sorted(staging.rglob("*")) if p.is_file() and ".partial" not in p.parts}
    shutil.rmtree(staging, ignore_errors=True)
    return outcome
