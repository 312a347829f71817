"""The data behind report.html's circuit explorer: every head and MLP with its numbers, the run's top edges in
the order its faithfulness curve kept them, and the curve's measured points.

The page draws from this alone (`templates/report.js`): nodes laid out by layer (heads stacked by index, the
MLP above them), coloured by role or (a run with --variables) by the variable each head carries
(its `carries` attribute, `graphs.variables`), sized by effect; edges coloured by channel. The threshold control only
stops at the curve's measured points, so the faithfulness it states was measured at exactly the edges drawn.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import networkx as nx
import numpy as np
import pandas as pd
import torch

from circuitlab.graphs.draw import CHANNEL_COLORS, ROLE_COLORS
from circuitlab.graphs.scores import ranking_key
from circuitlab.graphs.variables import CARRIES_RULE
from circuitlab.patching.components import head_node, parse_node
from circuitlab.reports.result import RunResult, strongest_per_node

MAX_DRAWN = 400  # edges embedded (and drawn at most): the strongest ones; beyond that a page stops being readable
EDGES_PER_NODE = 5  # strongest incoming and outgoing edges listed in a node's evidence panel
ATTENTION_DECIMALS = 4  # attention weights embedded in the page (a probability to 1e-4 reads the same)
COLORS = {**CHANNEL_COLORS, "mlp": "#ff7f0e", "logits": "#7f7f7f", "resid": "#555555"}
VARIABLE_PALETTE = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628")  # one per task variable
NO_VARIABLE = "#bdbdbd"  # a circuit head that carries none of the measured variables


@dataclass
class ExplorerEdge:
    """One scored edge: `channel` is q/k/v into a head, mlp into an MLP, logits into the logits, else resid."""

    edge: str
    sender: str
    receiver: str
    channel: str
    score: float


@dataclass
class ExplorerNode:
    """A head, MLP, input or logits node with the numbers its evidence panel shows."""

    name: str
    kind: str
    layer: int
    head: int
    x: float
    y: float
    in_circuit: bool
    role: str = ""
    carries: str = ""  # the variable it carries ("": none, or not measured; `graphs.variables`)
    roles: list[str] = field(default_factory=list)
    numbers: dict[str, float | str] = field(default_factory=dict)  # score, exact_effect, evidence entries
    role_evidence: list[dict[str, object]] = field(default_factory=list)  # one per role detection of this head
    incoming: list[ExplorerEdge] = field(default_factory=list)
    outgoing: list[ExplorerEdge] = field(default_factory=list)


@dataclass
class Threshold:
    """A measured point of the top-k% faithfulness curve (signed selection)."""

    percent: float
    n_edges: int
    faithfulness: float
    ci_low: float
    ci_high: float


@dataclass
class Explorer:
    """Everything the explorer draws; `edges` are in ranking order, the first `n_edges` of a threshold drawn."""

    nodes: list[ExplorerNode]
    edges: list[ExplorerEdge]
    thresholds: list[Threshold]
    total_edges: int
    method: str
    source: str  # where the edges come from, in words
    n_layers: int
    n_heads: int
    colors: dict[str, str]
    role_colors: dict[str, str]
    prompts: list[list[str]] = field(default_factory=list)  # the tokens of the prompts with attention patterns
    attention: dict[str, list[list[list[float]]]] = field(default_factory=dict)  # head -> prompt -> query -> key
    variables: list[str] = field(default_factory=list)  # measured task variables (run --variables)
    variable_colors: dict[str, str] = field(default_factory=dict)  # variable -> colour; "" -> carries none
    baselines: dict[str, float] = field(default_factory=dict)  # variable -> no-intervention held-out IIA
    carries_rule: str = ""

    def to_json(self) -> str:
        """JSON for a <script type="application/json"> block (non-finite numbers as null, `</` escaped)."""
        return json.dumps(_finite(asdict(self)), separators=(",", ":")).replace("</", "<\\/")


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _channel(receiver: str, channel: str) -> str:
    if channel != "resid":
        return channel
    return "logits" if receiver == "logits" else ("mlp" if receiver.startswith("m") else "resid")


def _number(value: object) -> float | str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    return str(value)


def _ranked_edges(result: RunResult) -> tuple[pd.DataFrame, str]:
    """All scored edges in the order the faithfulness curve kept them (the run's ranking, descending)."""
    if result.edges is not None and not result.edges.empty:
        frame = result.edges
        kept = torch.tensor(frame["kept"].to_numpy(bool)) if "kept" in frame.columns else None
        key = ranking_key(torch.tensor(frame["score"].to_numpy(float)), kept)
        order = torch.argsort(key, descending=True).numpy()  # the order `patching.faithfulness.top_k_masks` uses
        return frame.iloc[order].reset_index(drop=True), f"{result.config.method} edge scores"
    graph = result.circuit
    rows = [{"edge": f"{u}->{v}" + (f"<{d['channel']}>" if d["channel"] in ("q", "k", "v") else ""), "sender": u,
             "receiver": v, "channel": d["channel"], "score": float(d.get("score", 0.0))}
            for u, v, d in graph.edges(data=True)]
    frame = pd.DataFrame(rows, columns=["edge", "sender", "receiver", "channel", "score"])
    return frame.sort_values("score", ascending=False, kind="stable").reset_index(drop=True), "the circuit's edges"


def _edges(frame: pd.DataFrame) -> list[ExplorerEdge]:
    return [ExplorerEdge(str(e), str(s), str(r), _channel(str(r), str(c)), float(v))
            for e, s, r, c, v in zip(frame["edge"], frame["sender"], frame["receiver"], frame["channel"],
                                     frame["score"])]


def _position(name: str, n_layers: int, n_heads: int) -> tuple[str, int, int, float, float]:
    node = parse_node(name)
    if node.kind == "input":
        return "input", -1, -1, -1.0, (n_heads - 1) / 2
    if node.kind == "logits":
        return "logits", n_layers, -1, float(n_layers), (n_heads - 1) / 2
    if node.kind == "head":
        return "head", node.layer, node.head, float(node.layer), float(node.head)
    return "mlp", node.layer, -1, node.layer + 0.35, float(n_heads)


def build_explorer(result: RunResult) -> Explorer:
    """The explorer's data from a run's result (the circuit, node and edge scores, roles, faithfulness curve)."""
    graph: nx.MultiDiGraph = result.circuit
    n_layers, n_heads = result.model.n_layers, result.model.n_heads
    ranked, source = _ranked_edges(result)
    method_scores = {} if result.nodes is None else dict(zip(result.nodes["node"], result.nodes["score"]))
    exact = {} if result.exact is None else dict(zip(*[strongest_per_node(
        result.exact[result.exact["component"].isin(["z", "mlp_out"])])[c] for c in ("node", "effect")]))
    names = {"input", "logits"} | set(method_scores) | set(exact) | set(graph.nodes)
    names |= set(ranked["sender"].head(MAX_DRAWN)) | set(ranked["receiver"].head(MAX_DRAWN))
    roles = _role_evidence(result.roles)
    variables = sorted(k[len("iia_"):-len("_none")] for k in graph.graph if k.startswith("iia_") and k.endswith("_none"))
    by_abs = ranked.assign(_abs=ranked["score"].abs()).sort_values("_abs", ascending=False, kind="stable")
    incoming = {k: g.head(EDGES_PER_NODE) for k, g in by_abs.groupby("receiver", sort=False)}
    outgoing = {k: g.head(EDGES_PER_NODE) for k, g in by_abs.groupby("sender", sort=False)}
    nodes = []
    for name in sorted(names, key=lambda n: _position(n, n_layers, n_heads)[3:]):
        kind, layer, head, x, y = _position(name, n_layers, n_heads)
        node = ExplorerNode(name, kind, layer, head, x, y, name in graph.nodes)
        if node.in_circuit:
            data = graph.nodes[name]
            node.role, node.roles = str(data.get("role", "")), list(json.loads(data.get("roles", "[]") or "[]"))
            node.numbers = {k: _number(data[k]) for k in ("score", "exact_effect") if k in data}
            node.numbers.update({k: _number(v) for k, v in data.items() if k.startswith(("iia_", "graded_"))})
            if kind == "head":
                node.carries = str(data.get("carries", "") or "")
            node.numbers.update(_flat(json.loads(data.get("evidence", "{}") or "{}")))
        else:
            if name in method_scores:
                node.numbers["score"] = float(method_scores[name])
            if name in exact:
                node.numbers["exact_effect"] = float(exact[name])
        if kind == "head":
            node.role_evidence = roles.get(head_node(layer, head), [])
            if not node.roles:
                node.roles = [str(r["role"]) for r in node.role_evidence]
        node.incoming = _edges(incoming[name]) if name in incoming else []
        node.outgoing = _edges(outgoing[name]) if name in outgoing else []
        nodes.append(node)
    # a node method's curve ranked every graph edge by node scores, not these circuit edges: no threshold then
    curve = result.faithfulness if result.edges is not None and not result.edges.empty else None
    colors = {v: VARIABLE_PALETTE[i % len(VARIABLE_PALETTE)] for i, v in enumerate(variables)}
    return Explorer(nodes, _edges(ranked.head(MAX_DRAWN)), _thresholds(curve), int(len(ranked)),
                    result.config.method, source, n_layers, n_heads, COLORS, ROLE_COLORS,
                    *_attention(result.attention), variables, {**colors, "": NO_VARIABLE} if variables else {},
                    {v: float(graph.graph[f"iia_{v}_none"]) for v in variables}, CARRIES_RULE if variables else "")


def _attention(table: pd.DataFrame | None) -> tuple[list[list[str]], dict[str, list[list[list[float]]]]]:
    """The prompts' tokens and each head's pattern per prompt as rows of keys 0..query (causal: no more)."""
    if table is None or table.empty:
        return [], {}
    table = table.sort_values(["prompt", "node", "query", "key"], kind="stable")
    first = table[table["key"] == 0].drop_duplicates(["prompt", "query"])
    prompts = [list(g.sort_values("query")["query_token"]) for _, g in first.groupby("prompt", sort=True)]
    patterns: dict[str, list[list[list[float]]]] = {}
    for (node, prompt), g in table.groupby(["node", "prompt"], sort=True):
        rows = [list(np.round(r["weight"].to_numpy(float), ATTENTION_DECIMALS)) for _, r in g.groupby("query")]
        patterns.setdefault(str(node), []).append([[float(v) for v in row] for row in rows])
    return prompts, patterns


def _flat(evidence: dict[str, object], prefix: str = "") -> dict[str, float | str]:
    """Evidence as named numbers: nested objects become dotted names (roles.name_mover.copying)."""
    out: dict[str, float | str] = {}
    for key, value in evidence.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = _number(value)
    return out


def _role_evidence(roles: pd.DataFrame | None) -> dict[str, list[dict[str, object]]]:
    out: dict[str, list[dict[str, object]]] = {}
    if roles is None:
        return out
    for row in roles.itertuples(index=False):
        evidence = {k: _number(v) for k, v in json.loads(row.evidence or "{}").items()}
        out.setdefault(head_node(int(row.layer), int(row.head)), []).append(
            {"role": str(row.role), "score": float(row.score), "threshold": float(row.threshold), "evidence": evidence})
    return out


def _thresholds(curve: pd.DataFrame | None) -> list[Threshold]:
    if curve is None or curve.empty:
        return []
    signed = curve[curve["selection"] == "signed"].sort_values("percent")
    return [Threshold(float(r.percent), int(r.n_edges), float(r.faithfulness), float(r.ci_low), float(r.ci_high))
            for r in signed.itertuples(index=False)]


__all__ = ["Explorer", "ExplorerEdge", "ExplorerNode", "MAX_DRAWN", "Threshold", "build_explorer"]
