"""One-call circuit discovery: `discover(model, task, pairs, method) -> Discovery`, and `evaluate(context, circuit)`.

    found = discover(model, task, pairs, "eap-ig", steps=5)
    found.edge_scores.to_frame()                       # one row per edge: score, effect (0 = corrupt, 1 = clean)
    circuit = found.edge_scores.top_k(100)             # a Circuit: an edge mask over the model's graph
    evaluate(found.context, circuit).faithfulness      # exact edge patching of that circuit

Methods come from the one registry, `graphs.methods`. Edge methods (EAP, EAP-IG, ACDC, random) give
`EdgeScores`; node methods (exact activation patching, node attribution patching) give `NodeScores` only.
Every method gives node scores (for edge methods: the sum of each node's outgoing edge scores).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from circuitlab.graphs.circuit import Selection
from circuitlab.graphs.methods import get_method
from circuitlab.graphs.scores import Circuit, EdgeScores, NodeScores
from circuitlab.patching.acdc import acdc
from circuitlab.patching.activation import PatchingConfig, activation_patching, prepare
from circuitlab.patching.attribution import eap_ig_scores, eap_scores
from circuitlab.patching.components import head_node, mlp_node
from circuitlab.patching.edges import EdgeContext, ablated_context, evaluate_edge_masks, prepare_edges
from circuitlab.patching.topology import ComputationalGraph
from circuitlab.patching.normalize import normalize

DEFAULT_TOP_K = {"edge": 50, "node": 20}


@dataclass(frozen=True)
class DiscoveryOptions:
    """Options of `discover`. `steps`: EAP-IG integration steps. `acdc_threshold` / `acdc_objective` (`kl` or
    `metric`, the latter as a fraction of |m(clean) − m(corrupt)|). `ablation` (`zero`/`mean`): replace the
    corrupted run by zeros or by the mean over the corrupted prompts (`patching.activation.mean_ablation`). `selection`: which edges/nodes form the circuit (default:
    the top 50 edges or 20 nodes, doubled until a path joins input to logits). `seed` seeds `random`."""

    steps: int = 5
    acdc_threshold: float = 0.05
    acdc_objective: str = "kl"
    ablation: str | None = None
    selection: Selection | None = None
    seed: int = 0
    memory_budget_mb: float = 1024.0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.acdc_objective not in ("kl", "metric"):
            raise ValueError(f"acdc_objective {self.acdc_objective!r} is unknown: use 'kl' or 'metric'")
        if self.ablation not in (None, "zero", "mean"):
            raise ValueError(f"ablation {self.ablation!r} is unknown: use None, 'zero' or 'mean'")


@dataclass(frozen=True, eq=False)
class Discovery:
    """What `discover` found: the method's edge scores (edge methods) and node scores, the selected circuit,
    the edge context it was measured on, and the method's own seconds (context preparation excluded)."""

    method: str
    context: Any  # the engine context (or prompt batches) the scores were measured on
    node_scores: NodeScores
    circuit: Circuit
    seconds: float
    edge_scores: EdgeScores | None = None

    def ranking(self) -> Tensor:
        """Edge scores that order circuits for faithfulness curves (node methods: the weakest-link ranking)."""
        if self.edge_scores is not None:
            return self.edge_scores.ranking()
        return self.node_scores.edge_ranking(absolute=True)


def discover(model: Any, task: Any, pairs: Any, method: str = "eap-ig", *, context: Any = None,
             **options: Any) -> Discovery:
    """Score the model's graph with `method` and select a circuit; see `DiscoveryOptions` for `options`."""
    spec = get_method(method)
    try:
        opts = DiscoveryOptions(**options)
    except TypeError:
        known = ", ".join(f.name for f in dataclasses.fields(DiscoveryOptions))
        raise ValueError(f"unknown discover() option among {sorted(options)}: use {known}") from None
    ctx = context or prepare_edges(model, task, pairs)
    if context is None and opts.ablation:
        ctx = ablated_context(ctx, opts.ablation)
    elif opts.ablation and hasattr(context, "with_ablation"):  # prompt batches: means over the whole dataset
        ctx = context.with_ablation(opts.ablation)
    start = time.perf_counter()
    edges, nodes = score(method, model, task, pairs, ctx, opts)
    seconds = time.perf_counter() - start
    circuit = choose_circuit(edges if edges is not None else nodes, opts.selection, spec.level)
    return Discovery(method, ctx, nodes, circuit, seconds, edges)


def score(method: str, model: Any, task: Any, pairs: Any, ctx: Any, opts: DiscoveryOptions
          ) -> tuple[EdgeScores | None, NodeScores]:
    """Run one registered method on a prepared context — one engine context, or prompt batches
    (`patching.batched.Batches`, summed exactly over batches) — : (edge scores or None, node scores)."""
    spec = get_method(method)
    batched = hasattr(ctx, "edge_contexts")
    graph = ComputationalGraph.from_model(model) if batched else ctx.graph
    clean, corrupt = ctx.baseline() if batched else (ctx.clean_values, ctx.corrupt_values)
    gap = float(clean.double().mean() - corrupt.double().mean())
    kept = None
    if method == "activation":
        return None, _activation_nodes(model, task, pairs, ctx, graph, float(clean.double().mean()), gap, opts)
    if method in ("eap", "attribution"):
        values = ctx.eap() if batched else eap_scores(ctx)
    elif method == "eap-ig":
        values = ctx.eap_ig(opts.steps, progress=opts.progress) if batched else eap_ig_scores(
            ctx, steps=opts.steps, progress=opts.progress)
    elif method == "acdc":
        threshold = opts.acdc_threshold * (abs(gap) if opts.acdc_objective == "metric" else 1.0)
        result = acdc(ctx, threshold, objective=opts.acdc_objective,
                      progress=opts.progress)
        values, kept = result.scores, result.kept.bool()
    else:
        values = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(opts.seed))
    edges = EdgeScores(graph, values.detach().double().cpu(), method, gap, kept)
    nodes = edges.node_scores()
    if spec.level == "node":
        return None, NodeScores(graph, nodes.frame.assign(method=method), method)
    return edges, nodes


def _activation_nodes(model: Any, task: Any, pairs: Any, ctx: Any, graph: ComputationalGraph, clean: float,
                      gap: float, opts: DiscoveryOptions) -> NodeScores:
    """Exact noising of every head output (`z`) and MLP output: score = m(clean) − m(node corrupted)."""
    config = PatchingConfig(direction="noise", source=opts.ablation, memory_budget_mb=opts.memory_budget_mb,
                            progress=opts.progress)
    names, values = [], []
    for kind in ["z"] + ([] if graph.attn_only else ["mlp_out"]):
        if hasattr(ctx, "edge_contexts"):
            frame = ctx.activation_patching(kind, config=config)
        else:
            pctx = ctx if opts.ablation is None else prepare(model, task, pairs)  # the one engine context
            frame = activation_patching(model, task, pairs, kind, config=config, context=pctx)
        names += [head_node(int(l), int(h)) if kind == "z" else mlp_node(int(l)) for l, h in zip(frame["layer"], frame["head"])]
        values += (clean - frame["metric"].to_numpy(float)).tolist()
    order = {name: i for i, name in enumerate(graph.sender_names)}
    ranked = sorted(zip(names, values), key=lambda item: order[item[0]])
    return NodeScores.from_values(graph, [n for n, _ in ranked], [v for _, v in ranked], gap, "activation", True)


def choose_circuit(scores: EdgeScores | NodeScores, selection: Selection | None, level: str) -> Circuit:
    """The circuit a selection keeps; with none, ACDC's kept edges or the default top-k doubled until input
    reaches logits."""
    if selection is not None:
        return scores.select(selection)
    if isinstance(scores, EdgeScores) and scores.kept is not None:
        return scores.circuit(scores.kept)
    available = scores.graph.n_edges if level == "edge" else len(scores.frame)
    k = min(DEFAULT_TOP_K[level], available)
    while True:
        circuit = scores.select(Selection(top_k=k))
        if circuit.connected() or k >= available:
            return circuit
        k = min(available, 2 * k)


# ---------------------------------------------------------------------- evaluation

@dataclass(frozen=True, eq=False)
class CircuitEvaluation:
    """Per-prompt metric with only the circuit's edges clean (`circuit`), with all (`clean`) and none
    (`corrupt`); `faithfulness` = (m(C) − m(∅)) / (m(M) − m(∅)) on the means."""

    circuit: np.ndarray
    clean: np.ndarray
    corrupt: np.ndarray
    n_edges: int

    @property
    def metric(self) -> float:
        return float(self.circuit.mean())

    @property
    def faithfulness(self) -> float:
        return float(normalize(self.metric, float(self.clean.mean()), float(self.corrupt.mean())))


def evaluate(context: Any, circuit: Circuit, *, memory_budget_mb: float = 1024.0) -> CircuitEvaluation:
    """Exact edge patching of a circuit (edge or node circuit): its edges clean, every other edge corrupted.
    `context`: an engine context, or prompt batches (`patching.batched.Batches`, one batch alive at a time)."""
    batched = hasattr(context, "edge_contexts")
    graph = ComputationalGraph.from_model(context.model) if batched else context.graph
    if circuit.graph.n_edges != graph.n_edges:
        raise ValueError(f"the circuit has {circuit.graph.n_edges} edges but the context's model has "
                         f"{graph.n_edges}: evaluate a circuit on the model it was found on")
    mask = circuit.edges.float().unsqueeze(0)
    if batched:
        values = context.evaluate_edge_masks(mask, memory_budget_mb=memory_budget_mb)[0]
        clean, corrupt = context.baseline()
    else:
        values = evaluate_edge_masks(context, mask, memory_budget_mb=memory_budget_mb)[0]
        clean, corrupt = context.clean_values, context.corrupt_values
    return CircuitEvaluation(values.cpu().double().numpy(), clean.cpu().double().numpy(),
                             corrupt.cpu().double().numpy(), circuit.n_edges)


__all__ = ["Circuit", "CircuitEvaluation", "Discovery", "DiscoveryOptions", "EdgeScores", "NodeScores",
           "choose_circuit", "discover", "evaluate", "score"]
