"""Typed results of circuit discovery: `EdgeScores`, `NodeScores` and the `Circuit` they select.

A `Circuit` is an edge mask over `patching.edges.ComputationalGraph`. A node circuit keeps every edge
between its nodes (and from `input`, into `logits`), so corrupting the other edges is exactly ablating every
other node's output: node and edge circuits are evaluated alike (`graphs.discovery.evaluate`).
Scores estimate m(clean) − m(clean with the edge or node corrupted); `effect` divides by m(clean) − m(corrupt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from circuitlab.graphs.circuit import Selection, circuit_from_edge_scores, circuit_from_node_scores, select
from circuitlab.patching.components import parse_node
from circuitlab.patching.normalize import normalize_difference
from circuitlab.patching.topology import ComputationalGraph, PositionalGraph, node_totals

EDGE_COLUMNS = ["edge", "sender", "receiver", "channel", "score", "effect", "method"]
NODE_COLUMNS = ["node", "component", "layer", "head", "score", "effect", "method", "exact"]


# ---------------------------------------------------------------------- circuits

@dataclass(frozen=True, eq=False)
class Circuit:
    """A circuit as an edge mask (bool [n_edges]) over a model's computational graph.

    `nodes` is set for node circuits (the kept heads and MLPs); `scores` are the per-edge (edge circuits) or
    per-node (node circuits) scores the circuit was selected from, kept as graph attributes.
    """

    graph: ComputationalGraph
    edges: Tensor
    method: str = ""
    nodes: tuple[str, ...] | None = None
    scores: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.edges.shape != (self.graph.n_edges,):
            raise ValueError(f"circuit mask has shape {tuple(self.edges.shape)}; the graph has {self.graph.n_edges} edges")

    @classmethod
    def from_edges(cls, graph: ComputationalGraph, names: list[str], method: str = "") -> Circuit:
        """An edge circuit from MIB edge names (`a0.h1->a2.h3<q>`)."""
        return cls(graph, graph.edges_vector(names).bool(), method)

    @classmethod
    def from_nodes(cls, graph: ComputationalGraph, nodes: list[str], method: str = "",
                   scores: dict[str, float] | None = None) -> Circuit:
        """A node circuit: every edge whose sender and receiver are kept (`input`, `logits` always are)."""
        kept = {parse_node(n).name for n in nodes}
        unknown = kept - set(graph.sender_names[1:])
        if unknown:
            raise ValueError(f"nodes {sorted(unknown)} are not heads or MLPs of this model's graph")
        send = torch.tensor([name in kept or name == "input" for name in graph.sender_names])
        recv = torch.tensor([name in kept or name == "logits" for name in graph.receiver_names])
        mask = send[graph.edge_sender] & recv[graph.edge_receiver]
        return cls(graph, mask, method, tuple(sorted(kept, key=graph.sender_names.index)), dict(scores or {}))

    @property
    def kind(self) -> str:
        return "edge" if self.nodes is None else "node"

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    def edge_names(self) -> list[str]:
        return [self.graph.edge_names[i] for i in self.edges.nonzero().flatten().tolist()]

    def connected(self) -> bool:
        """Whether some kept path leads from `input` to `logits`."""
        g = self.graph
        idx = self.edges.nonzero().flatten()
        succ: dict[str, set[str]] = {}
        for s, r in zip(g.edge_sender[idx].tolist(), g.edge_receiver[idx].tolist()):
            succ.setdefault(g.sender_names[s], set()).add(g.receiver_names[r])
        seen, todo = {"input"}, ["input"]
        while todo:
            for nxt in succ.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return "logits" in seen

    def to_networkx(self, name: str = "circuit") -> nx.MultiDiGraph:
        """The circuit as a `graphs.circuit` MultiDiGraph, pruned to paths from input to logits (a position-aware
        circuit: one graph edge per model edge kept at any segment, its score summed over segments)."""
        if self.nodes is not None:
            frame = pd.DataFrame([{**_node_columns(n), "effect": self.scores.get(n, 0.0)} for n in self.nodes])
            return circuit_from_node_scores(frame, Selection(top_fraction=1.0), method=self.method,
                                            n_layers=self.graph.n_layers, name=name)
        names = self.edge_names()
        frame = pd.DataFrame({"edge": names, "score": [self.scores.get(e, 0.0) for e in names]})
        if isinstance(self.graph, PositionalGraph):  # position-aware edges drawn once per edge, scores summed
            frame = frame.assign(edge=[e.rpartition("@")[0] for e in names]).groupby("edge", sort=False,
                                                                                     as_index=False)["score"].sum()
        return circuit_from_edge_scores(frame, Selection(top_fraction=1.0), method=self.method,
                                        n_layers=self.graph.n_layers, name=name)


def _node_columns(name: str) -> dict[str, Any]:
    node = parse_node(name)
    return {"node": name, "component": "z" if node.kind == "head" else "mlp_out", "layer": node.layer,
            "head": node.head if node.kind == "head" else -1}


# ---------------------------------------------------------------------- scores

def ranking_key(scores: Tensor, kept: Tensor | None = None) -> Tensor:
    """The key circuits are grown by (descending): the scores, or for ACDC every kept edge above every removed
    one. `EdgeScores.ranking` and the report's explorer (which reads the saved edge table) share it."""
    if kept is None:
        return scores
    change = torch.nan_to_num(scores.double(), nan=0.0).abs()
    return change + (1.0 + 2.0 * float(change.max())) * kept.double()



@dataclass(frozen=True, eq=False)
class EdgeScores:
    """Per-edge scores [n_edges] of one method over a model's graph.

    `scores` estimate m(clean) − m(clean with the edge corrupted); `gap` = m(clean) − m(corrupt) turns them into
    effects (fractions of the gap). ACDC also records which edges it `kept`.
    """

    graph: ComputationalGraph
    scores: Tensor
    method: str
    gap: float
    kept: Tensor | None = None

    def __post_init__(self) -> None:
        if self.scores.shape != (self.graph.n_edges,):
            raise ValueError(f"{self.method}: {tuple(self.scores.shape)} scores for {self.graph.n_edges} edges")

    def ranking(self) -> Tensor:
        """The order circuits are grown in: the scores, or for ACDC every kept edge above every removed one."""
        return ranking_key(self.scores, self.kept)

    def to_frame(self) -> pd.DataFrame:
        """One row per edge: `EDGE_COLUMNS` (plus `kept` for ACDC)."""
        g = self.graph
        values = self.scores.detach().double().cpu().numpy()
        frame = pd.DataFrame({
            "edge": g.edge_names, "sender": [g.sender_names[i] for i in g.edge_sender.tolist()],
            "receiver": [g.receiver_names[i] for i in g.edge_receiver.tolist()],
            "channel": [g.receiver_channels[i] for i in g.edge_receiver.tolist()],
            "score": values, "effect": normalize_difference(values, self.gap), "method": self.method},
            columns=EDGE_COLUMNS)
        if self.kept is not None:
            frame["kept"] = self.kept.bool().cpu().numpy()
        return frame

    @classmethod
    def from_frame(cls, graph: ComputationalGraph, frame: pd.DataFrame, gap: float) -> EdgeScores:
        """Back from `to_frame` (rows in the graph's edge order)."""
        if list(frame["edge"]) != graph.edge_names:
            raise ValueError("edge score table does not list this graph's edges in order")
        kept = torch.tensor(frame["kept"].to_numpy(bool)) if "kept" in frame.columns else None
        return cls(graph, torch.tensor(frame["score"].to_numpy(float)), str(frame["method"].iloc[0]), gap, kept)

    def node_scores(self) -> NodeScores:
        """Each head's and MLP's score: the sum of its outgoing edge scores (its attribution-patching score)."""
        g = self.graph
        totals = node_totals([g.sender_names[i] for i in g.edge_sender.tolist()],
                             [g.receiver_names[i] for i in g.edge_receiver.tolist()], self.scores, absolute=False)
        names = g.sender_names[1:]
        return NodeScores.from_values(g, names, [totals.get(n, 0.0) for n in names], self.gap, self.method, False)

    def select(self, selection: Selection) -> Circuit:
        """The edges a `Selection` keeps (ranked by `ranking()`)."""
        ranking = self.ranking().detach().double().cpu().numpy()
        return self.circuit(torch.tensor(np.asarray(select(pd.Series(ranking), selection), dtype=bool)))

    def circuit(self, mask: Tensor) -> Circuit:
        """The edge circuit of a bool mask [n_edges], carrying these scores."""
        values = torch.nan_to_num(self.scores.detach().double().cpu(), nan=0.0).tolist()
        kept = mask.nonzero().flatten().tolist()
        return Circuit(self.graph, mask.bool(), self.method, None, {self.graph.edge_names[i]: values[i] for i in kept})

    def top_k(self, k: int, *, absolute: bool = True) -> Circuit:
        """The k edges of largest |score| (or signed score with `absolute=False`)."""
        return self.select(Selection(top_k=k, absolute=absolute))

    def to_mib(self, circuit: Circuit | None = None) -> dict[str, object]:
        """The EAP-IG/MIB JSON dict: every edge's score, `in_graph` for the circuit's edges (default: none)."""
        g = self.graph
        inside = circuit.edges if circuit is not None else torch.zeros(g.n_edges, dtype=torch.bool)
        values = self.scores.detach().double().cpu().tolist()
        edges = {name: {"score": values[i], "in_graph": bool(inside[i])} for i, name in enumerate(g.edge_names)}
        used = {g.sender_names[s] for s in g.edge_sender[inside].tolist()}
        used |= {g.receiver_names[r] for r in g.edge_receiver[inside].tolist()}
        nodes = {name: {"in_graph": name in used} for name in g.sender_names + ["logits"]}
        cfg = {"n_layers": g.n_layers, "n_heads": g.n_heads, "parallel_attn_mlp": g.parallel}
        return {"cfg": cfg, "nodes": nodes, "edges": edges}


@dataclass(frozen=True, eq=False)
class NodeScores:
    """One row per head and MLP (`NODE_COLUMNS`): `score` is m(clean) − m(node corrupted) (exact or estimated),
    `effect` the same as a fraction of m(clean) − m(corrupt)."""

    graph: ComputationalGraph
    frame: pd.DataFrame
    method: str

    @classmethod
    def from_values(cls, graph: ComputationalGraph, nodes: list[str], scores: list[float], gap: float,
                    method: str, exact: bool) -> NodeScores:
        rows = [{**_node_columns(n), "score": float(s), "effect": float(normalize_difference(s, gap)), "method": method,
                 "exact": exact} for n, s in zip(nodes, scores)]
        return cls(graph, pd.DataFrame(rows, columns=NODE_COLUMNS), method)

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def edge_ranking(self, *, absolute: bool) -> Tensor:
        """Node scores as edge scores, the one node-to-edge ranking: min(|s_u|, |s_v|) with `absolute`, else
        min(s_u, s_v) (`input` and `logits` count as the largest value). Any threshold t on them keeps exactly
        the edges of the node circuit {|s| >= t} (or {s >= t})."""
        values = dict(zip(self.frame["node"], self.frame["score"].abs() if absolute else self.frame["score"]))
        top = max(values.values()) if values else 1.0
        values["input"] = values["logits"] = top
        g = self.graph
        send = torch.tensor([values[g.sender_names[s]] for s in g.edge_sender.tolist()], dtype=torch.float64)
        recv = torch.tensor([values[g.receiver_names[r]] for r in g.edge_receiver.tolist()], dtype=torch.float64)
        return torch.minimum(send, recv)

    def select(self, selection: Selection) -> Circuit:
        """The node circuit of the nodes a `Selection` keeps (on |effect| by default)."""
        mask = select(self.frame["effect"].astype(float).reset_index(drop=True), selection)
        chosen = self.frame[np.asarray(mask, dtype=bool)]
        return Circuit.from_nodes(self.graph, list(chosen["node"]), self.method,
                                  dict(zip(chosen["node"], chosen["effect"].astype(float))))

    def top_k(self, k: int) -> Circuit:
        return self.select(Selection(top_k=k))
