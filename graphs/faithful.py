"""Faithful circuits end to end: rank components with a method, choose the smallest faithful prefix, check it
on held-out prompts.

Methods (the circuit searches of the registry, `patching.methods.SEARCHES`, which says each one's level and
which scores it ranks), each producing a ranking over heads (node level; MLPs and embeddings are recomputed,
never corrupted, unless `heads_only=False`) or over edges (edge level):

| method         | level | ranking                                                                        |
|----------------|-------|--------------------------------------------------------------------------------|
| single-effect  | node  | exact single-head noising effect (m(clean) - m(head corrupted)) / gap          |
| eap, eap-ig    | node  | attribution node scores (sum of outgoing edge scores), by |score|              |
| eap-edges,     | edge  | attribution edge scores, by |score|                                            |
| eap-ig-edges   |       |                                                                                |
| node-pruning   | node  | learned hard-concrete node masks (`patching.mask_learning`), by log_alpha      |
| edge-pruning   | edge  | learned hard-concrete edge masks (Edge Pruning), by log_alpha                  |
| greedy         | node  | EAP-IG's faithful prefix refined by exact gains (`graphs.greedy`)              |
| ranking-edges  | edge  | the run's own edge ranking (given as `edge_scores`), highest first             |

The circuit is `graphs.selection.select_by_faithfulness` of the ranking on the discovery prompts, or, given
`validation` prompts (discovery templates set aside, never the test prompts), `graphs.selection.select_validated`:
the smallest prefix within [target, 2 - target] on both, over signed and absolute orders of attribution scores.
With validation, node and edge pruning start from the EAP-IG ranking when `init_from_scores` (its top
`init_fraction` of items open) and stop early on the validation prompts (`patching.mask_learning`). When even the
whole ranking (every item with a score clear of noise) falls short of the target, it is completed from the items
the ranking could not rank, by exact gain (`graphs.greedy.complete_by_exact_gain`: an item enters only with an
exact gain above noise, so inert components never do); `circuit.added` names them. The
headline number is its exact faithfulness on held-out prompts (`heldout` context), with a bootstrap interval.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from circuitlab.graphs.greedy import complete_by_exact_gain, greedy_refine
from circuitlab.graphs.selection import (
    CircuitEvaluator, FaithfulCircuit, batched_evaluator, candidate_order, distance, edge_evaluator, node_evaluator,
    normalized, select_by_faithfulness, select_validated, within,
)
from circuitlab.patching.activation import PatchingConfig, activation_patching
from circuitlab.patching.attribution import eap_ig_scores, eap_scores
from circuitlab.patching.components import head_node, mlp_node, node_kind, parse_edge
from circuitlab.patching.edges import EdgeContext
from circuitlab.patching.mask_learning import MaskConfig, keep_probability, learn_masks
from circuitlab.patching.methods import get_search
from circuitlab.patching.normalize import noising_share
from circuitlab.patching.topology import node_totals


@dataclass(frozen=True)
class FaithfulConfig:
    """Options of `find_faithful_circuit`: the target, attribution steps, mask learning, bootstrap."""

    target: float = 0.8
    heads_only: bool = True
    eap_ig_steps: int = 5
    masks: MaskConfig = field(default_factory=MaskConfig)
    edge_masks: MaskConfig = field(default_factory=lambda: MaskConfig(level="edge", steps=100))
    greedy_candidates: int = 32
    complete: bool = True  # complete a ranking that falls short of the target by exact gain
    memory_budget_mb: float = 1024.0  # masked circuits stacked per forward in exact evaluations
    require_lower: bool = False
    n_boot: int = 1000
    seed: int = 0
    init_from_scores: bool = False  # pruning: start from the EAP-IG ranking (its top init_fraction open)
    init_fraction: float = 0.02


@dataclass(frozen=True)
class CircuitSize:
    """How big a circuit is: heads, MLPs and edges (for a node circuit, the edges among its nodes)."""

    heads: int
    mlps: int
    edges: int


@dataclass
class FaithfulResult:
    """One method's circuit: ranking, chosen items, discovery and held-out faithfulness, sizes."""

    method: str
    level: str
    ranking: pd.DataFrame  # item, score (descending)
    circuit: FaithfulCircuit
    heldout: tuple[float, tuple[float, float]] | None
    heldout_curve: pd.DataFrame | None
    sizes: CircuitSize
    seconds: float
    notes: str = ""

    def row(self) -> dict[str, object]:
        held, val = self.heldout, self.circuit.validation
        return {"method": self.method, "level": self.level, **dataclasses.asdict(self.sizes),
                "discovery_faithfulness": self.circuit.faithfulness, "discovery_low": self.circuit.ci[0],
                "discovery_high": self.circuit.ci[1], "reached": self.circuit.reached,
                "heldout_faithfulness": held[0] if held else float("nan"),
                "heldout_low": held[1][0] if held else float("nan"), "heldout_high": held[1][1] if held else float("nan"),
                "validation_faithfulness": val[0] if val else float("nan"),
                "validation_low": val[1][0] if val else float("nan"), "validation_high": val[1][1] if val else float("nan"),
                "seconds": self.seconds, "notes": self.notes}


def single_effect_scores(ctx: EdgeContext, evaluator: CircuitEvaluator) -> Tensor:
    """Exact effect of corrupting each item alone (all others kept): (m(clean) - m(item corrupted)) / gap.

    Uses the activation-patching engine (noising `z` / `mlp_out` at all positions, each patched forward
    starting at its layer), which equals the node-masked forward with one item off (tested).
    """
    model = ctx.edge_runner.runner.model
    config = PatchingConfig(direction="noise")
    frames = [activation_patching(model, ctx.task, ctx.pairs, "z", config=config)]
    if any(node_kind(item) == "mlp" for item in evaluator.items):
        frames.append(activation_patching(model, ctx.task, ctx.pairs, "mlp_out", config=config))
    metric = {}
    for frame in frames:
        for row in frame.itertuples():
            name = head_node(int(row.layer), int(row.head)) if row.component == "z" else mlp_node(int(row.layer))
            metric[name] = float(row.metric)
    return torch.tensor([noising_share(metric[item], ctx.clean_metric, ctx.corrupt_metric) for item in evaluator.items])


def _attribution_nodes(ctx: EdgeContext, evaluator: CircuitEvaluator, edge_scores: Tensor) -> Tensor:
    g = ctx.graph
    totals = node_totals([g.sender_names[i] for i in g.edge_sender.tolist()],
                         [g.receiver_names[i] for i in g.edge_receiver.tolist()], edge_scores, absolute=False)
    return torch.tensor([totals.get(name, 0.0) for name in evaluator.items])


def _edge_scores(ctx: EdgeContext, method: str, steps: int) -> Tensor:
    """The edge scores of the registered method `method` (`eap` or `eap-ig`) on `ctx`."""
    return eap_ig_scores(ctx, steps=steps) if method == "eap-ig" else eap_scores(ctx)


def induced_edges(ctx: EdgeContext, heads: list[str], *, heads_only: bool = True) -> int:
    """Edges of the graph among the circuit's nodes: `input`, kept heads, MLPs (all, if only heads are
    masked) and `logits`."""
    g = ctx.graph
    keep = set(heads) | {"input", "logits"}
    if heads_only:
        keep |= {g.sender_names[i] for i in g.senders_of("mlp")}
    send = torch.tensor([n in keep for n in g.sender_names])[g.edge_sender]
    recv = torch.tensor([n in keep for n in g.receiver_names])[g.edge_receiver]
    return int((send & recv).sum())


def edge_circuit_sizes(edges: list[str]) -> CircuitSize:
    """Heads, MLPs and edges of an edge circuit (nodes touched by a kept edge)."""
    nodes = set()
    for name in edges:
        src, dst, _ = parse_edge(name.split("@")[0])  # position-aware edges: EDGE@SEGMENT
        nodes |= {src, dst}
    kinds = [node_kind(n) for n in nodes]
    return CircuitSize(heads=kinds.count("head"), mlps=kinds.count("mlp"), edges=len(edges))


def pruning_init(scores: Tensor, fraction: float, init: float) -> Tensor:
    """Initial log_alpha from a ranking: +init for the top `fraction` of items by signed score, -init for the rest."""
    k = max(1, int(round(fraction * len(scores))))
    out = torch.full((len(scores),), -abs(init))
    out[torch.argsort(scores.double(), descending=True, stable=True)[:k]] = abs(init)
    return out


def validation_monitor(validation: CircuitEvaluator, target: float) -> Callable[[Tensor], float]:
    """Early-stopping loss of learned masks (`learn_masks(monitor=...)`): the deterministic circuit's exact
    faithfulness on validation prompts; within the target band, its size as a fraction of all items (smaller is
    better), else 1 + its distance from 1."""
    def monitor(log_alpha: Tensor) -> float:
        mask = (log_alpha > 0).float()
        f = float(normalized(validation.values(mask), validation.clean_values, validation.corrupt_values, n_boot=0)[0][0])
        return float(mask.mean()) if within(f, target) else 1.0 + distance(f)

    return monitor


def rank(ctx: EdgeContext, method: str, config: FaithfulConfig, evaluator: CircuitEvaluator,
         log: Callable[[str], None] | None = None, edge_scores: Tensor | None = None,
         validation: CircuitEvaluator | None = None) -> tuple[Tensor, bool, str]:
    """(scores over evaluator.items, rank by |score|, note) for a ranking method. `edge_scores` reuses
    scores already computed on `ctx` (searches that rank a method's edge scores: `CircuitSearch.scores`/`own`).
    `validation`: pruning stops early on these prompts (and starts from EAP-IG with `config.init_from_scores`)."""
    search = get_search(method)
    if search.ranks == "own":
        if edge_scores is None:
            raise ValueError(f"circuit method {method!r} ranks the run's own edge scores: pass edge_scores")
        return edge_scores.float(), True, "the run's own edge ranking"
    if search.ranks == "scores":
        note = "attribution scores of the run" if edge_scores is not None else ""
        scores = edge_scores if edge_scores is not None else _edge_scores(ctx, search.scores, config.eap_ig_steps)
        if search.level == "node":
            return _attribution_nodes(ctx, evaluator, scores), True, note
        return scores.float(), True, note
    if search.ranks == "single-effect":
        return single_effect_scores(ctx, evaluator), True, "exact single-item noising effects"
    if search.ranks == "masks":
        base = config.masks if search.level == "node" else config.edge_masks
        mcfg = MaskConfig(**{**base.__dict__, "level": search.level, "heads_only": config.heads_only})
        init, note = None, ""
        if config.init_from_scores:
            scores = edge_scores if edge_scores is not None else eap_ig_scores(ctx, steps=config.eap_ig_steps)
            if search.level == "node":
                scores = _attribution_nodes(ctx, evaluator, scores)
            init = pruning_init(scores.float(), config.init_fraction, mcfg.init)
            note = f"from EAP-IG's top {config.init_fraction:.1%}, "
        monitor = validation_monitor(validation, config.target) if validation is not None else None
        result = learn_masks(ctx, mcfg, log=log, init=init, monitor=monitor)
        if result.items != evaluator.items:
            raise RuntimeError("mask items and evaluator items differ; this is a bug")
        if result.best_step is not None:
            note += f"kept step {result.best_step} by validation, "
        # keep probability orders items like log_alpha and is never exactly zero: closed gates rank last
        return (result.keep_probability, False,
                f"{note}{len(result.history)} steps, sparsity {mcfg.sparsity}, {int(result.kept.sum())} gates open")
    raise ValueError(f"circuit method {method!r} is registered but graphs.faithful.rank does not implement it")


def prefix_curve(evaluator: CircuitEvaluator, ranked: list[str], sizes: list[int], *, n_boot: int = 1000,
                 seed: int = 0, batch: int = 16) -> pd.DataFrame:
    """Exact faithfulness (with 95% bootstrap interval) of the first k items of `ranked`, for each k in `sizes`:
    the faithfulness-vs-size curve of a ranking on another set of prompts (e.g. held-out ones)."""
    index = {name: i for i, name in enumerate(evaluator.items)}
    masks = torch.zeros(len(sizes), len(evaluator.items))
    for row, k in enumerate(sizes):
        masks[row, [index[n] for n in ranked[:k]]] = 1.0
    values = np.concatenate([evaluator.values(masks[i:i + batch]) for i in range(0, len(sizes), batch)]) if sizes \
        else np.zeros((0, len(evaluator.clean_values)))
    f, lo, hi = normalized(values, evaluator.clean_values, evaluator.corrupt_values, n_boot=n_boot, seed=seed)
    return pd.DataFrame({"size": list(sizes), "faithfulness": f, "ci_low": lo, "ci_high": hi})


def _chosen_order(circuit: FaithfulCircuit, default: bool) -> bool:
    """The order (`absolute`) whose prefix `select_validated` returned (it records it in the curve)."""
    return bool(circuit.curve["absolute"].iloc[0]) if "absolute" in circuit.curve.columns and len(circuit.curve) else default


Contexts = Callable[[], Iterable[EdgeContext]]


def find_faithful_circuit(ctx: EdgeContext, method: str, config: FaithfulConfig | None = None, *,
                          heldout: EdgeContext | None = None, log: Callable[[str], None] | None = None,
                          edge_scores: Tensor | None = None, batches: Contexts | None = None,
                          heldout_batches: Contexts | None = None, validation: EdgeContext | None = None
                          ) -> FaithfulResult:
    """Rank with `method` on `ctx`, choose the smallest prefix reaching `config.target` (on `ctx`, or within the
    band on `ctx` and `validation`: `graphs.selection.select_validated`), check on `heldout`.

    With `batches` (and `heldout_batches`), callables yielding one context per prompt batch, every exact
    evaluation runs batch by batch (`graphs.selection.batched_evaluator`) and `ctx` serves only for the graph:
    the ranking must then come from `edge_scores` computed over every prompt."""
    cfg = config or FaithfulConfig()
    search = get_search(method)
    if batches is not None and (edge_scores is None or search.ranks not in ("scores", "own")):
        raise ValueError(f"{method!r} ranks on one context holding every prompt: pass edge_scores (searches that "
                         "rank a method's edge scores, `patching.methods.SEARCHES`) or no batches")
    started = time.time()
    edge_level = search.level == "edge"

    def make(c: EdgeContext) -> CircuitEvaluator:
        if edge_level:
            return edge_evaluator(c, memory_budget_mb=cfg.memory_budget_mb)
        return node_evaluator(c, heads_only=cfg.heads_only, memory_budget_mb=cfg.memory_budget_mb)

    evaluator = batched_evaluator(make, batches) if batches is not None else make(ctx)
    val_eval = make(validation) if validation is not None else None
    scores, absolute, note = rank(ctx, method, cfg, evaluator, log, edge_scores, val_eval)
    if val_eval is not None:
        gates = []  # a mask learner's own circuit (its open gates) is a candidate size too
        if search.ranks == "masks":
            base = cfg.masks if search.level == "node" else cfg.edge_masks
            gates = [int((scores > keep_probability(torch.zeros(1), base)).sum())]
        circuit = select_validated(evaluator, val_eval, scores, cfg.target, orders=(False, True) if absolute else (False,),
                                   n_boot=cfg.n_boot, seed=cfg.seed, extra_sizes=gates)
        absolute = _chosen_order(circuit, absolute)
    else:
        circuit = select_by_faithfulness(evaluator, scores, cfg.target, absolute=absolute,
                                         require_lower=cfg.require_lower, n_boot=cfg.n_boot, seed=cfg.seed)
    if search.refine:
        refined = greedy_refine(evaluator, circuit.items, scores, cfg.target, candidates=cfg.greedy_candidates)
        f, ci = evaluator.faithfulness(refined.items, n_boot=cfg.n_boot, seed=cfg.seed)
        note = f"from EAP-IG's prefix of {circuit.size}: {refined.evaluations} exact evaluations"
        val = val_eval.faithfulness(refined.items, n_boot=cfg.n_boot, seed=cfg.seed) if val_eval is not None else None
        if val is not None and circuit.reached and not within(val[0], cfg.target):
            # the refinement ran on the discovery pairs alone: keep it only if the validation pairs agree
            note = (f"greedy's refinement on the discovery pairs ({len(refined.items)} items, {refined.evaluations} "
                    f"exact evaluations) left the band on the validation pairs ({val[0]:.3f}): the validated prefix "
                    f"of {circuit.size} is kept")
        else:
            circuit = FaithfulCircuit(refined.items, f, ci, cfg.target, refined.reached, circuit.candidates,
                                      circuit.curve, validation=val)  # the refined circuit's, not the prefix's
    if cfg.complete and not circuit.reached and val_eval is None:  # completion is unvalidated: not with validation
        ranked = set(candidate_order(scores, absolute=absolute))
        pool = [evaluator.items[i] for i in range(len(evaluator.items)) if i not in ranked]
        done = complete_by_exact_gain(evaluator, circuit.items, pool, cfg.target)
        if done.steps:
            f, ci = evaluator.faithfulness(done.items, n_boot=cfg.n_boot, seed=cfg.seed)
            note = "; ".join(x for x in (note, f"the ranking fell short of {cfg.target}: completed by exact gain "
                                         f"({done.evaluations} exact evaluations), added {', '.join(done.added) or 'none'}")
                             if x)
            circuit = FaithfulCircuit(done.items, f, ci, cfg.target, done.reached, circuit.candidates, circuit.curve,
                                      done.added)
    key = scores.abs() if absolute else scores
    order = torch.argsort(key, descending=True, stable=True).tolist()
    ranking = pd.DataFrame({"item": [evaluator.items[i] for i in order], "score": [float(scores[i]) for i in order]})
    held, held_curve = None, None
    if heldout is not None or heldout_batches is not None:
        held_eval = batched_evaluator(make, heldout_batches) if heldout_batches is not None else make(heldout)
        held = held_eval.faithfulness(circuit.items, n_boot=cfg.n_boot, seed=cfg.seed)
        held_curve = prefix_curve(held_eval, list(ranking["item"]), [int(s) for s in circuit.curve["size"]],
                                  n_boot=cfg.n_boot, seed=cfg.seed)
    if edge_level:
        sizes = edge_circuit_sizes(circuit.items)
    else:
        heads = [n for n in circuit.items if node_kind(n) == "head"]
        sizes = CircuitSize(heads=len(heads), mlps=sum(node_kind(n) == "mlp" for n in circuit.items),
                            edges=induced_edges(ctx, circuit.items, heads_only=cfg.heads_only))
    return FaithfulResult(method, "edge" if edge_level else "node", ranking, circuit, held, held_curve, sizes,
                          time.time() - started, note)


__all__ = ["CircuitSize", "FaithfulConfig", "FaithfulResult", "edge_circuit_sizes",
           "find_faithful_circuit", "induced_edges", "prefix_curve", "rank", "single_effect_scores"]
