"""One-call circuit discovery: `discover(model, task, pairs, method) -> Discovery`, and `evaluate(context, circuit)`.

    found = discover(model, task, pairs, "eap-ig", steps=5)
    found.edge_scores.to_frame()                       # one row per edge: score, effect (0 = corrupt, 1 = clean)
    circuit = found.edge_scores.top_k(100)             # a Circuit: an edge mask over the model's graph
    evaluate(found.context, circuit).faithfulness      # exact edge patching of that circuit

Methods come from the one registry, `patching.methods` (one file per method). Edge methods (EAP, EAP-IG, ACDC, random) give
`EdgeScores`; node methods (exact activation patching, node attribution patching) give `NodeScores` only.
Every method gives node scores (for edge methods: the sum of each node's outgoing edge scores).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.graphs.circuit import Selection
from circuitlab.graphs.scores import Circuit, EdgeScores, NodeScores
from circuitlab.patching.edges import prepare_edges
from circuitlab.patching.engine import EngineContext
from circuitlab.patching.methods import MethodOptions, get_method
from circuitlab.patching.normalize import normalize
from circuitlab.patching.prompts import Prompts, as_prompts
from circuitlab.tasks.base import PromptPairs, Task

DEFAULT_TOP_K = {"edge": 50, "node": 20}


@dataclass(frozen=True)
class DiscoveryOptions(MethodOptions):
    """Options of `discover`: every method's options (`patching.methods.MethodOptions`: steps, ACDC threshold and
    objective, ablation, seed, memory budget) and `selection`, which edges/nodes form the circuit (default: the
    top 50 edges or 20 nodes, doubled until a path joins input to logits). `edge_positions` (`roles`, `each`):
    position-aware edges (Haklay et al. 2025), every edge split by the role segment it is read at
    (`patching.topology.PositionalGraph`, edge names `EDGE@SEGMENT`); edge methods only."""

    selection: Selection | None = None
    edge_positions: str | None = None


@dataclass(frozen=True, eq=False)
class Discovery:
    """What `discover` found: the method's edge scores (edge methods) and node scores, the selected circuit,
    the edge context it was measured on, and the method's own seconds (context preparation excluded)."""

    method: str
    context: Prompts  # the prompts (one batch or many) the scores were measured on
    node_scores: NodeScores
    circuit: Circuit
    seconds: float
    edge_scores: EdgeScores | None = None

    def ranking(self) -> Tensor:
        """Edge scores that order circuits for faithfulness curves (node methods: the weakest-link ranking)."""
        if self.edge_scores is not None:
            return self.edge_scores.ranking()
        return self.node_scores.edge_ranking(absolute=True)


def discover(model: TransformerBridge, task: Task, pairs: PromptPairs, method: str = "eap-ig", *,
             context: Prompts | EngineContext | None = None,
             **options: object) -> Discovery:
    """Score the model's graph with `method` and select a circuit; see `DiscoveryOptions` for `options`.
    `context`: an engine context or prompt batches (`patching.prompts.Prompts`) to reuse (None: built here)."""
    spec = get_method(method)
    try:
        opts = DiscoveryOptions(**options)
    except TypeError:
        known = ", ".join(f.name for f in dataclasses.fields(DiscoveryOptions))
        raise ValueError(f"unknown discover() option among {sorted(options)}: use {known}") from None
    if opts.edge_positions and spec.level != "edge":
        raise ValueError(f"edge positions {opts.edge_positions!r} split edges, but {method!r} scores nodes: use an "
                         "edge method (eap, eap-ig, acdc, random) or edge_positions=None")
    prompts = as_prompts(context if context is not None else prepare_edges(model, task, pairs))
    if opts.ablation:
        prompts = prompts.with_ablation(opts.ablation)  # prompt batches: means over the whole dataset
    if opts.edge_positions:
        prompts = prompts.with_positions(opts.edge_positions)
    start = time.perf_counter()
    edges, nodes = score(method, prompts, opts)
    seconds = time.perf_counter() - start
    circuit = choose_circuit(edges if edges is not None else nodes, opts.selection, spec.level)
    return Discovery(method, prompts, nodes, circuit, seconds, edges)


def score(method: str, prompts: Prompts, opts: MethodOptions) -> tuple[EdgeScores | None, NodeScores]:
    """Run one registered method (`patching.methods`) on prompts — one batch or many, summed exactly over
    batches —: (edge scores or None, node scores)."""
    spec = get_method(method)
    graph = prompts.graph
    clean, corrupt = prompts.baseline()
    gap = float(clean.double().mean() - corrupt.double().mean())
    found = spec.score(prompts, opts)
    if found.nodes is not None:
        return None, NodeScores.from_values(graph, list(found.nodes), list(found.nodes.values()), gap, method,
                                            spec.exact)
    edges = EdgeScores(graph, found.edges.detach().double().cpu(), method, gap, found.kept)
    nodes = edges.node_scores()
    if spec.level == "node":
        return None, NodeScores(graph, nodes.frame.assign(method=method), method)
    return edges, nodes


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


def evaluate(context: Prompts | EngineContext, circuit: Circuit, *, memory_budget_mb: float = 1024.0
             ) -> CircuitEvaluation:
    """Exact edge patching of a circuit (edge or node circuit): its edges clean, every other edge corrupted.
    `context`: an engine context, or prompt batches (`patching.prompts.Prompts`, one batch alive at a time)."""
    prompts = as_prompts(context)
    graph = prompts.graph
    if circuit.graph.n_edges != graph.n_edges:
        raise ValueError(f"the circuit has {circuit.graph.n_edges} edges but the context's model has "
                         f"{graph.n_edges}: evaluate a circuit on the model it was found on")
    values = prompts.evaluate_edge_masks(circuit.edges.float().unsqueeze(0), memory_budget_mb=memory_budget_mb)[0]
    clean, corrupt = prompts.baseline()
    return CircuitEvaluation(values.cpu().double().numpy(), clean.cpu().double().numpy(),
                             corrupt.cpu().double().numpy(), circuit.n_edges)


__all__ = ["Circuit", "CircuitEvaluation", "Discovery", "DiscoveryOptions", "EdgeScores", "NodeScores",
           "choose_circuit", "discover", "evaluate", "score"]
