"""What each kind of sweep cell runs, and how its parameters are checked before anything heavy loads.

- `run`: one ordinary `circuitlab run` (parameters are `RunConfig` fields; the folder is a normal run folder:
  report.html/.md, run.json, scores.csv, circuit.json/.graphml, pairs.jsonl, baseline/faithfulness/oracle/
  roles tables). ACDC above its edge limit is skipped with the reason (give `force: true` to run it).
- `bench`: one discovery method on a model with a known circuit, as one row of `circuitlab bench methods`
  (`graphs.benchmark.benchmark_case`): a ground-truth name (`graphs.groundtruth.list_groundtruth()`), a
  folder laid out like one (model + circuit.json + task.json), or `smollm2-ioi` (no reference circuit).
  The folder holds result.json and result.csv (edge/node ROC-AUC, CPR/CMD with bootstrap intervals, times).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from circuitlab.patching.methods import method_names
from circuitlab.reports.cells import Cell, SkipCell

SMOLLM2_IOI = "smollm2-ioi"  # the bench grid's name for SmolLM2 IOI
SMOLLM2_IOI_ROW = ("smollm2-135m IOI", "task (ABC)")  # its model and counterfactual as the results table shows them
BENCH_FIELDS = ("model", "method", "counterfactual", "seed", "n", "ioi_n", "circuit", "task")


def _bench_options() -> tuple[str, ...]:
    from circuitlab.graphs.benchmark import BenchConfig

    return tuple(f.name for f in fields(BenchConfig) if f.name != "seed")


# ---------------------------------------------------------------------- validation (cheap, before running)

def check_params(kind: str, params: dict[str, Any], where: str) -> dict[str, Any]:
    """Validated, resolved parameters of one cell (errors name the option and the cell)."""
    from circuitlab.reports.config import ConfigError

    if kind == "run":
        from circuitlab.reports.config import FIELDS, make_config, validate

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
        from circuitlab.graphs.benchmark import COUNTERFACTUALS, BenchConfig

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
    raise ConfigError(f"{where}: unknown sweep kind {kind!r}: use run or bench")


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


def run_run_cell(cell: Cell, folder: Path) -> dict[str, Any]:
    """One `circuitlab run` into `folder`; returns the headline numbers of its run.json."""
    from circuitlab.patching.methods import get_method
    from circuitlab.reports.config import make_config
    from circuitlab.reports.run import execute

    cfg = make_config({**cell.params, "out": str(folder), "threads": cell.threads})
    limit = get_method(cfg.method).max_edges
    if limit is not None and not cfg.force:
        from circuitlab.patching.topology import ComputationalGraph
        from circuitlab.patching.models import load_model

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
    from circuitlab.graphs.benchmark import BenchCase, Reference, adapt_groundtruth, own_case
    from circuitlab.graphs.groundtruth import list_groundtruth, load_groundtruth

    model, n, seed, cf = str(params["model"]), int(params["n"]), int(params["seed"]), params["counterfactual"]
    if model == SMOLLM2_IOI:
        if cf != "task":
            raise SkipCell(f"{SMOLLM2_IOI} has only the task's own (ABC) counterfactual, not {cf!r}")
        from circuitlab.patching.models import load_model
        from circuitlab.tasks import get_task

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


def run_bench_cell(cell: Cell, folder: Path) -> dict[str, Any]:
    """One method on one benchmark case; writes result.json/.csv into `folder` and returns the row."""
    import pandas as pd

    from circuitlab.graphs.benchmark import BenchConfig, benchmark_case
    from circuitlab.reports import store

    params = cell.params
    case = _bench_case(params)
    options = {k: params[k] for k in _bench_options() if k in params}
    config = BenchConfig(seed=int(params["seed"]), **options)
    frame = benchmark_case(case, [params["method"]], config)
    row = {k: (None if isinstance(v, float) and v != v else v) for k, v in frame.iloc[0].to_dict().items()}
    row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
    if str(row.get("note") or "").startswith("skipped:"):
        raise SkipCell(str(row["note"])[len("skipped:"):].strip())
    store.write_csv(folder / "result.csv", pd.DataFrame([row]))
    store.write_json(folder / "result.json", {"cell": cell.params, "result": row})
    return row


RUNNERS: dict[str, Callable[[Cell, Path], dict[str, Any]]] = {"run": run_run_cell, "bench": run_bench_cell}

