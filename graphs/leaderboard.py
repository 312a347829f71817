"""One leaderboard cell: a discovery method on a task's discovery prompts, judged on held-out prompts.

`leaderboard_cell(model, task, discovery, heldout, method, config)` returns a `LeaderboardResult`:

- **CPR / CMD** (MIB, `patching.faithfulness`): the method's edge ranking, circuits at MIB's edge fractions,
  measured by exact edge patching on the *held-out* prompts (templates the discovery prompts do not use), with
  95% bootstrap intervals over those prompts; the curve is kept for plots.
- **smallest circuit within [target, 2 - target] held-out** (`graphs.selection.within`): heads — the smallest
  prefix of the method's head ranking whose held-out faithfulness reaches the target at every larger grid size
  (`graphs.selection.select_by_faithfulness` on a held-out head evaluator), kept only if it is also within
  the band; edges — the smallest MIB fraction of the |score| ranking whose held-out faithfulness is within the
  band there and at every larger fraction (the curve's own circuits, no extra forwards), or with
  `edge_search=True` the same prefix search as heads over edges (`select_by_faithfulness`, ~45 exact edge
  evaluations). None when no circuit qualifies ("none reached").
- **stability**: the circuit is the top `stability_percent` % of edges and the top `stability_heads` % of heads by
  |score|. The method is rerun on `resamples` bootstrap resamples of the discovery prompts and on as many of the
  held-out (rephrased template) prompts; each circuit's Jaccard overlap with the circuit found on all discovery
  prompts is summarised as mean and 95% percentile interval (`graphs.stability.overlap`). Seeded methods get
  seed + 1 + i on resample i, so a fixed random ranking does not count as stable.
- `imported` (`import_file`): edge scores from a MIB score file (`graphs.mib.read_scores`), judged the same way
  (no stability and no cost: the scores cannot be rediscovered here).
- **cost** of the method on all discovery prompts: seconds, forwards (every layer once over every discovery
  prompt = 1) and backwards (`patching.work.WorkCounter`); peak memory is the sweep cell's.

Methods (`LEADERBOARD_METHODS`: those with a `leaderboard_order` in the registry, cheapest first): the registered
methods (`patching.methods`; node methods rank edges by the weakest link, `graphs.scores.NodeScores.edge_ranking`)
and the circuit searches `CIRCUIT_METHODS` from `graphs.faithful` (node and edge pruning: learned masks; greedy:
EAP-IG's faithful prefix refined by exact gains, its circuit ranked first).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from circuitlab.graphs.benchmark import BenchConfig, edge_scores_from_nodes, node_scores_from_edges, run_method
from circuitlab.graphs.faithful import FaithfulConfig, find_faithful_circuit, rank
from circuitlab.graphs.mib import read_scores
from circuitlab.graphs.selection import (CircuitEvaluator, edge_evaluator, node_evaluator, select_by_faithfulness,
                                         within)
from circuitlab.graphs.stability import overlap
from circuitlab.patching.context_subset import subset_context
from circuitlab.patching.edges import EdgeContext
from circuitlab.patching.faithfulness import PERCENTS, FaithfulnessResult, faithfulness_curve
from circuitlab.patching.mask_learning import MaskConfig
from circuitlab.patching.methods import METHODS as REGISTRY, leaderboard_names, leaderboard_searches
from circuitlab.patching.prompts import OneBatch
from circuitlab.patching.work import WorkCounter

CIRCUIT_METHODS = leaderboard_searches()  # graphs.faithful searches run as methods (the registry's SEARCHES)
LEADERBOARD_METHODS = leaderboard_names()  # the registry's order, cheapest first: a partial run has the most cells


IMPORTED = "imported"  # edge scores read from a MIB score file (`graphs.mib`, `LeaderboardConfig.import_file`)


def known_methods() -> tuple[str, ...]:
    return (*REGISTRY, *CIRCUIT_METHODS, IMPORTED)


@dataclass(frozen=True)
class LeaderboardConfig:
    """How each cell runs and is judged (see the module docstring); every random choice uses `seed`."""

    percents: tuple[float, ...] = PERCENTS
    target: float = 0.8
    n_boot: int = 1000
    resamples: int = 2
    stability_percent: float = 1.0
    stability_heads: float = 10.0
    eap_ig_steps: int = 5
    mask_steps: int = 30
    mask_batch: int = 4
    node_sparsity: float = 0.02
    edge_sparsity: float = 1e-4
    mask_lr: float = 0.25
    edge_search: bool = False
    memory_budget_mb: float = 1024.0
    import_file: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.5 <= self.target < 1.0:
            raise ValueError(f"target must be in [0.5, 1), got {self.target}")
        if self.resamples < 0 or self.n_boot < 0:
            raise ValueError(f"resamples and n_boot must be >= 0, got {self.resamples} and {self.n_boot}")
        if not self.percents or any(not 0 < p <= 100 for p in self.percents) or list(self.percents) != sorted(self.percents):
            raise ValueError(f"percents must be increasing values in (0, 100], got {self.percents}")
        for name in ("stability_percent", "stability_heads"):
            if not 0 < getattr(self, name) <= 100:
                raise ValueError(f"{name} must be in (0, 100], got {getattr(self, name)}")


@dataclass
class Ranking:
    """A method's scores on one set of prompts: every edge, and every head (in the graph's head order)."""

    edges: Tensor
    heads: Tensor
    note: str = ""


@dataclass(frozen=True)
class InBand:
    """The smallest circuit within the band on held-out prompts: its size (heads or edges), faithfulness and
    95% interval."""

    size: int
    faithfulness: float
    low: float
    high: float


@dataclass
class LeaderboardResult:
    """One cell: the row (flat numbers, `ROW_COLUMNS`), the held-out faithfulness curve and the method's edge
    scores on all discovery prompts (what `graphs.mib` exports)."""

    row: dict[str, object]
    curve: pd.DataFrame = field(default_factory=pd.DataFrame)
    edge_scores: Tensor | None = None


ROW_COLUMNS = ["method", "level", "n_discovery", "n_heldout", "n_edges", "n_heads", "cpr", "cpr_low", "cpr_high",
               "cmd", "cmd_low", "cmd_high", "heads_at_target", "heads_faithfulness", "heads_low", "heads_high",
               "edges_at_target", "edges_faithfulness", "edges_low", "edges_high",
               "stability_boot_edges", "stability_boot_edges_low", "stability_boot_edges_high",
               "stability_boot_heads", "stability_boot_heads_low", "stability_boot_heads_high",
               "stability_rephrase_edges", "stability_rephrase_edges_low", "stability_rephrase_edges_high",
               "stability_rephrase_heads", "stability_rephrase_heads_low", "stability_rephrase_heads_high",
               "seconds", "forwards", "backwards", "note"]


def _heads(ctx: EdgeContext) -> list[str]:
    g = ctx.graph
    return [g.sender_names[i] for i in g.senders_of("head")]


def _head_scores(ctx: EdgeContext, nodes: pd.DataFrame) -> Tensor:
    values = dict(zip(nodes["node"], nodes["score"].astype(float)))
    return torch.tensor([values.get(h, 0.0) for h in _heads(ctx)], dtype=torch.float64)


def _faithful_config(cfg: LeaderboardConfig, seed: int) -> FaithfulConfig:
    masks = MaskConfig(steps=cfg.mask_steps, sparsity=cfg.node_sparsity, lr=cfg.mask_lr, seed=seed,
                       batch_size=cfg.mask_batch)
    edge_masks = MaskConfig(level="edge", steps=cfg.mask_steps, sparsity=cfg.edge_sparsity, lr=cfg.mask_lr,
                            seed=seed, batch_size=cfg.mask_batch)
    return FaithfulConfig(target=cfg.target, eap_ig_steps=cfg.eap_ig_steps, masks=masks, edge_masks=edge_masks,
                          n_boot=0, seed=seed, memory_budget_mb=cfg.memory_budget_mb)


def rank_method(method: str, ctx: EdgeContext, cfg: LeaderboardConfig, seed: int | None = None) -> Ranking:
    """The method's edge and head scores on `ctx` (see the module docstring for node and circuit methods)."""
    seed = cfg.seed if seed is None else seed
    g = ctx.graph
    if method == IMPORTED:
        if not cfg.import_file:
            raise ValueError("method 'imported' reads a MIB score file: give import_file")
        edges = read_scores(cfg.import_file, g)
        return Ranking(edges, _head_scores(ctx, node_scores_from_edges(g, edges)), f"scores from {cfg.import_file}")
    if method in CIRCUIT_METHODS:
        fcfg = _faithful_config(cfg, seed)
        if method == "greedy":
            found = find_faithful_circuit(ctx, "greedy", fcfg)
            base = found.ranking.set_index("item")["score"].abs()
            top = float(base.max()) if len(base) else 1.0
            scores = {item: float(base[item]) + (top + 1.0 if item in set(found.circuit.items) else 0.0)
                      for item in base.index}
            nodes = pd.DataFrame({"node": list(scores), "score": list(scores.values())})
            return _from_nodes(ctx, nodes, f"greedy circuit of {found.circuit.size} heads ranked first")
        level_eval = (node_evaluator(ctx, memory_budget_mb=cfg.memory_budget_mb) if method == "node-pruning"
                      else edge_evaluator(ctx, memory_budget_mb=cfg.memory_budget_mb))
        scores, _, note = rank(ctx, method, fcfg, level_eval)
        if method == "node-pruning":
            nodes = pd.DataFrame({"node": level_eval.items, "score": scores.double().numpy()})
            return _from_nodes(ctx, nodes, note)
        edges = scores.double()
        return Ranking(edges, _head_scores(ctx, node_scores_from_edges(g, edges)), note)
    bench = BenchConfig(eap_ig_steps=cfg.eap_ig_steps, n_boot=0, seed=seed, memory_budget_mb=cfg.memory_budget_mb,
                        acdc_max_edges=REGISTRY["acdc"].max_edges or 0)
    edges, nodes, _ = run_method(method, ctx.edge_runner.runner.model, ctx.task, ctx.pairs, ctx=OneBatch(ctx),
                                 config=bench)
    if edges is None:
        return Ranking(edge_scores_from_nodes(g, nodes).double(), _head_scores(ctx, nodes),
                       "edge scores from node scores (weakest link)")
    return Ranking(edges.double(), _head_scores(ctx, nodes))


def _from_nodes(ctx: EdgeContext, nodes: pd.DataFrame, note: str) -> Ranking:
    """Head scores as given; MLPs (never masked by head-level methods) count as the largest score."""
    g = ctx.graph
    top = float(nodes["score"].abs().max()) if len(nodes) else 1.0
    mlps = [g.sender_names[i] for i in g.senders_of("mlp")]
    full = pd.concat([nodes, pd.DataFrame({"node": mlps, "score": [top] * len(mlps)})], ignore_index=True)
    return Ranking(edge_scores_from_nodes(g, full).double(), _head_scores(ctx, nodes), note)


def top_items(names: list[str], scores: Tensor, percent: float) -> set[str]:
    """The top `percent` % of `names` by |score| (at least one; ties broken by position, stably)."""
    k = max(1, int(round(len(names) * percent / 100.0)))
    order = torch.argsort(scores.abs(), descending=True, stable=True)[:k].tolist()
    return {names[i] for i in order}


def smallest_edge_fraction(result: FaithfulnessResult, target: float) -> InBand | None:
    """The smallest MIB-fraction circuit (|score| ranking) within the band there and at every larger fraction."""
    rows = result.curve[result.curve["selection"] == "absolute"].sort_values("percent").reset_index(drop=True)
    ok = [within(float(f), target) for f in rows["faithfulness"]]
    for i in range(len(rows)):
        if all(ok[i:]):
            r = rows.iloc[i]
            return InBand(int(r["n_edges"]), float(r["faithfulness"]), float(r["ci_low"]), float(r["ci_high"]))
    return None


def _smallest(evaluator: CircuitEvaluator, scores: Tensor, cfg: LeaderboardConfig) -> InBand | None:
    if not bool((scores.abs() > 0).any()):
        return None
    found = select_by_faithfulness(evaluator, scores, cfg.target, n_boot=cfg.n_boot, seed=cfg.seed)
    if not found.reached or not within(found.faithfulness, cfg.target):
        return None
    return InBand(found.size, found.faithfulness, found.ci[0], found.ci[1])


def _put(row: dict[str, object], prefix: str, found: InBand | None) -> None:
    row[f"{prefix}_at_target"] = found.size if found else None
    row[f"{prefix}_faithfulness"] = found.faithfulness if found else float("nan")
    row[f"{prefix}_low"] = found.low if found else float("nan")
    row[f"{prefix}_high"] = found.high if found else float("nan")


def _stability(method: str, ctx: EdgeContext, hctx: EdgeContext, full: Ranking, cfg: LeaderboardConfig
               ) -> dict[str, float]:
    g = ctx.graph
    heads = _heads(ctx)
    ref_edges = top_items(list(g.edge_names), full.edges, cfg.stability_percent)
    ref_heads = top_items(heads, full.heads, cfg.stability_heads)
    rng = np.random.default_rng(cfg.seed)
    out: dict[str, float] = {}
    for name, source in (("boot", ctx), ("rephrase", hctx)):
        edge_sets, head_sets = [], []
        batch = int(source.clean_values.shape[0])
        for i in range(cfg.resamples):
            sub = subset_context(source, rng.integers(0, batch, batch).tolist())
            found = rank_method(method, sub, cfg, seed=cfg.seed + 1 + i)
            edge_sets.append(top_items(list(g.edge_names), found.edges, cfg.stability_percent))
            head_sets.append(top_items(heads, found.heads, cfg.stability_heads))
        for level, ref, sets in (("edges", ref_edges, edge_sets), ("heads", ref_heads, head_sets)):
            mean, low, high = overlap(ref, sets)
            out.update({f"stability_{name}_{level}": mean, f"stability_{name}_{level}_low": low,
                        f"stability_{name}_{level}_high": high})
    return out


def leaderboard_cell(ctx: EdgeContext, hctx: EdgeContext, method: str, cfg: LeaderboardConfig | None = None,
                     say: Callable[[str], None] = lambda s: None) -> LeaderboardResult:
    """Run `method` on the discovery context `ctx`, judge it on the held-out context `hctx` (module docstring).
    Raises ValueError for ACDC above its edge limit (the caller reports the reason)."""
    cfg = cfg or LeaderboardConfig()
    if method not in known_methods():
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(known_methods())}")
    g = ctx.graph
    limit = REGISTRY[method].max_edges if method in REGISTRY else None
    if limit is not None and g.n_edges > limit:
        raise ValueError(f"{method.upper()} on {g.n_edges} edges is above its limit of {limit} edges (one masked "
                         f"forward per edge: ~{g.n_edges} forwards)")
    torch.manual_seed(cfg.seed)
    pairs = ctx.pairs
    unit = float(len(pairs) * pairs.clean_tokens.shape[1] * g.n_layers)
    with WorkCounter() as counter:
        start = time.perf_counter()
        ranking = rank_method(method, ctx, cfg)
        seconds = time.perf_counter() - start
    say(f"  {method}: ranked in {seconds:.1f}s ({counter.forwards(unit):.1f} forwards, "
        f"{counter.backward_count()} backwards)")
    level = REGISTRY[method].level if method in REGISTRY else ("edge" if method == "edge-pruning" else "node")
    row: dict[str, object] = {"method": method, "level": level, "n_discovery": len(pairs), "n_heldout": len(hctx.pairs),
                           "n_edges": g.n_edges, "n_heads": len(_heads(ctx)), "seconds": seconds,
                           "forwards": counter.forwards(unit), "backwards": counter.backward_count(),
                           "note": ranking.note}
    result = faithfulness_curve(hctx, ranking.edges.float(), percents=tuple(cfg.percents), n_boot=cfg.n_boot,
                                seed=cfg.seed, memory_budget_mb=cfg.memory_budget_mb)
    row.update(cpr=result.cpr, cpr_low=result.cpr_ci[0], cpr_high=result.cpr_ci[1], cmd=result.cmd,
               cmd_low=result.cmd_ci[0], cmd_high=result.cmd_ci[1])
    say(f"  {method}: held-out CPR {result.cpr:.3f} CMD {result.cmd:.3f}")
    _put(row, "heads", _smallest(node_evaluator(hctx, memory_budget_mb=cfg.memory_budget_mb), ranking.heads, cfg))
    edges = (_smallest(edge_evaluator(hctx, memory_budget_mb=cfg.memory_budget_mb), ranking.edges, cfg)
             if cfg.edge_search else smallest_edge_fraction(result, cfg.target))
    _put(row, "edges", edges)
    if method == IMPORTED:  # fixed scores: nothing to rediscover, no cost of ours to count
        row.update(seconds=None, forwards=None, backwards=None)
        row["note"] = f"{ranking.note}; no stability (the scores cannot be rediscovered here)"
    else:
        row.update(_stability(method, ctx, hctx, ranking, cfg))
    say(f"  {method}: heads {row['heads_at_target']}, edges {row['edges_at_target']}, stability (boot) edges "
        f"{row.get('stability_boot_edges')}")
    return LeaderboardResult({k: row.get(k) for k in ROW_COLUMNS}, result.curve, ranking.edges.detach().cpu())


__all__ = ["CIRCUIT_METHODS", "IMPORTED", "InBand", "LEADERBOARD_METHODS", "LeaderboardConfig", "LeaderboardResult", "ROW_COLUMNS", "Ranking",
           "known_methods", "leaderboard_cell", "rank_method", "smallest_edge_fraction", "top_items"]
