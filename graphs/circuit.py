"""Circuits as NetworkX graphs: build them from node scores, edge scores or path-patching results.

A circuit is an `nx.MultiDiGraph` (a subclass of `nx.DiGraph`) whose edge *key* is the channel, so the
three attention inputs of one head (`a0.h1->a5.h5<q>`, `<k>`, `<v>`) are three edges, as in ACDC,
EAP-IG and MIB. Node names and edge names come from `patching.components` only.

Node attributes (all GraphML-safe scalars; optional ones are absent rather than None):

| attribute  | type  | meaning                                                                       |
|------------|-------|-------------------------------------------------------------------------------|
| `kind`     | str   | `input`, `head`, `mlp` or `logits`                                            |
| `layer`    | int   | block index; `-1` for `input`, `n_layers` (or last layer + 1) for `logits`    |
| `head`     | int   | head index; `-1` for non-heads                                                |
| `role`     | str   | strongest detected role (`""` when none), see `graphs.roles`                  |
| `roles`    | str   | JSON list of all detected roles, strongest first (`"[]"` when none)           |
| `score`    | float | the node's score (normalized effect, or summed |edge score| through it)      |
| `evidence` | str   | JSON object: how the score/roles were measured (`"{}"` when nothing)          |
| `position` | str   | optional: token position or token role (`END`, `S2`, …) the score refers to   |

Edge attributes: `channel` (`q`, `k`, `v` for attention readers, `resid` otherwise — also used for
edges *implied* by a node selection, meaning "reads the residual stream through any input"), `score`
(float) and `method` (str). Graph attributes: `name`, `method`, `n_layers` (int, -1 when unknown).

Edges implied by a node selection (`circuit_from_node_scores`) connect every selected node to every
selected node that can read it (heads read the outputs of earlier layers; an MLP reads heads of its own
and earlier layers and MLPs of earlier layers), `input` to every node and every node to `logits`. Their
score is the weaker |score| of their two ends (the "weakest link"), so drawings stay readable.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable

import networkx as nx
import pandas as pd

from circuitlab.patching.components import canonical_kind, edge_name, head_node, mlp_node, parse_edge, parse_node
from circuitlab.patching.topology import can_read, node_totals, sort_key

NODE_KINDS = ("input", "head", "mlp", "logits")
CHANNELS = ("q", "k", "v", "resid")


def json_safe(value: object) -> object:
    """`value` with numpy/torch scalars made plain and every non-finite float made None, so that it dumps as
    strict JSON (`null`, never a bare `NaN`, which JSON readers reject)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return json_safe(value.item())
        except (ValueError, AttributeError):
            return str(value)
    return value


def evidence_json(evidence: dict[str, object]) -> str:
    """A node's or role's `evidence` as strict JSON text (non-finite numbers written as `null`)."""
    return json.dumps(json_safe(evidence), sort_keys=True, allow_nan=False)

@dataclass(frozen=True)
class Selection:
    """How to keep scored items: exactly one of `threshold` (keep |score| >= t), `top_k` (the k largest)
    or `top_fraction` (the largest ceil(f * n)). With `absolute=False` the signed score is ranked."""

    threshold: float | None = None
    top_k: int | None = None
    top_fraction: float | None = None
    absolute: bool = True

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.threshold, self.top_k, self.top_fraction)]
        if sum(given) != 1:
            raise ValueError("Selection needs exactly one of threshold=, top_k= or top_fraction= "
                             f"(got threshold={self.threshold}, top_k={self.top_k}, top_fraction={self.top_fraction})")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: must be a positive integer")
        if self.top_fraction is not None and not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction={self.top_fraction}: must be in (0, 1]")
        if self.threshold is not None and math.isnan(self.threshold):
            raise ValueError("threshold is NaN: give a number")


def select(scores: pd.Series, selection: Selection) -> pd.Series:
    """Boolean mask of the scores a `Selection` keeps (ties at the top-k boundary are broken by order)."""
    key = scores.abs() if selection.absolute else scores
    if selection.threshold is not None:
        return key >= selection.threshold
    k = selection.top_k if selection.top_k is not None else math.ceil(selection.top_fraction * len(scores))
    keep = key.sort_values(ascending=False, kind="stable").index[: min(k, len(scores))]
    return scores.index.isin(keep)


# ------------------------------------------------------------------ graph primitives

def new_circuit(name: str = "circuit", method: str = "", n_layers: int | None = None) -> nx.MultiDiGraph:
    """An empty circuit graph with its graph-level attributes set."""
    graph = nx.MultiDiGraph()
    graph.graph.update(name=name, method=method, n_layers=-1 if n_layers is None else int(n_layers))
    return graph


def node_attributes(name: str, n_layers: int | None = None, score: float = 0.0) -> dict[str, object]:
    """Default attributes of a node named `input`, `a{l}.h{h}`, `m{l}` or `logits` (validates the name)."""
    node = parse_node(name)
    layer = {"input": -1, "logits": n_layers if n_layers is not None else -1}.get(node.kind, node.layer)
    return {"kind": node.kind, "layer": int(layer), "head": -1 if node.head is None else int(node.head),
            "role": "", "roles": "[]", "score": float(score), "evidence": "{}"}


def add_node(graph: nx.MultiDiGraph, name: str, score: float = 0.0, **attrs: object) -> str:
    """Add (or update) a node with validated name and default attributes; returns the canonical name."""
    canonical = parse_node(name).name
    n_layers = graph.graph.get("n_layers", -1)
    base = node_attributes(canonical, None if n_layers is None or n_layers < 0 else n_layers, score)
    if canonical in graph:
        graph.nodes[canonical].update({k: v for k, v in attrs.items()})
        if score:
            graph.nodes[canonical]["score"] = float(score)
        return canonical
    base.update(attrs)
    graph.add_node(canonical, **base)
    return canonical


def add_edge(graph: nx.MultiDiGraph, src: str, dst: str, channel: str = "resid", score: float = 0.0,
             method: str = "") -> None:
    """Add an edge keyed by its channel; both ends are added with default attributes when missing."""
    if channel not in CHANNELS:
        raise ValueError(f"edge {src}->{dst}: unknown channel {channel!r}; use one of {', '.join(CHANNELS)}")
    _check_score(score, f"edge {edge_name(src, dst, channel)}")
    src, dst = add_node(graph, src), add_node(graph, dst)
    if channel in ("q", "k", "v") and graph.nodes[dst]["kind"] != "head":
        raise ValueError(f"edge {src}->{dst}<{channel}>: q/k/v channels only lead into attention heads")
    graph.add_edge(src, dst, key=channel, channel=channel, score=float(score), method=method)


def edge_names(graph: nx.MultiDiGraph) -> list[str]:
    """The MIB-style names of a circuit's edges (`a0.h1->a5.h5<q>`, `m3->logits`)."""
    return [edge_name(u, v, ch) for u, v, ch in graph.edges(keys=True)]


def validate_circuit(graph: nx.MultiDiGraph) -> None:
    """Raise ValueError if the graph has a cycle, an edge against layer order, bad names or NaN scores."""
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        path = " -> ".join([str(e[0]) for e in cycle] + [str(cycle[-1][1])])
        raise ValueError(f"circuit is not a DAG: cycle {path}. Check the edge list for reversed edges.")
    for name, data in graph.nodes(data=True):
        parse_node(name)
        _check_score(data.get("score", 0.0), f"node {name}")
    for u, v, ch, data in graph.edges(keys=True, data=True):
        if not can_read(u, v):
            raise ValueError(f"edge {edge_name(u, v, ch)} goes against layer order: {v} cannot read {u}")
        _check_score(data.get("score", 0.0), f"edge {edge_name(u, v, ch)}")


def prune(graph: nx.MultiDiGraph) -> nx.MultiDiGraph:
    """Keep only nodes on some path from `input` to `logits` (and the edges between them)."""
    if "input" not in graph or "logits" not in graph:
        missing = [n for n in ("input", "logits") if n not in graph]
        raise ValueError(f"circuit has no {' or '.join(missing)} node, so no path input -> logits: "
                         "select more nodes/edges or lower the threshold")
    keep = (nx.descendants(graph, "input") | {"input"}) & (nx.ancestors(graph, "logits") | {"logits"})
    if "logits" not in nx.descendants(graph, "input"):
        raise ValueError("circuit is empty after pruning: no path from input to logits among the selected "
                         "edges; select more (lower threshold, larger top_k) or connect input/logits")
    pruned = graph.subgraph(sorted(keep, key=sort_key)).copy()
    pruned.graph.update(graph.graph)
    return pruned


def finish(graph: nx.MultiDiGraph) -> nx.MultiDiGraph:
    """Validate, prune to input->logits paths, and fix the `logits` layer; the last step of every builder."""
    validate_circuit(graph)
    graph = prune(graph)
    n_layers = graph.graph.get("n_layers", -1)
    if n_layers is None or n_layers < 0:
        layers = [d["layer"] for n, d in graph.nodes(data=True) if d["kind"] in ("head", "mlp")]
        n_layers = max(layers) + 1 if layers else 0
    graph.nodes["logits"]["layer"] = int(n_layers)
    return graph


# ------------------------------------------------------------------ builders

def _check_score(value: Any, what: str) -> None:
    try:
        bad = math.isnan(float(value))
    except (TypeError, ValueError):
        raise ValueError(f"{what}: score {value!r} is not a number") from None
    if bad:
        raise ValueError(f"{what}: score is NaN. Drop or fill NaN scores before building a circuit "
                         "(NaN usually means a metric with zero clean-corrupt difference).")


def _require(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; it has {list(df.columns)}")
    if df.empty:
        raise ValueError(f"{what} is empty: nothing to build a circuit from")


def _nan_rows(df: pd.DataFrame, column: str, label_columns: list[str], what: str) -> None:
    nan = df[column].astype(float).isna()
    if nan.any():
        examples = df.loc[nan, label_columns].head(3).to_dict("records")
        raise ValueError(f"{what}: {int(nan.sum())} NaN value(s) in {column!r} (e.g. {examples}). "
                         "Drop or fill them first.")


def _empty(what: str, selection: Selection) -> ValueError:
    return ValueError(f"{what}: the selection {selection} kept nothing; lower the threshold or raise top_k")


def node_name_from_row(component: str, layer: int | float, head: int | float | None) -> str:
    """The graph node of a node-score row: `z`/`head` with a head index -> `a{l}.h{h}`, `mlp_out` -> `m{l}`."""
    kind = canonical_kind(str(component))
    if kind == "z":
        if head is None or (isinstance(head, float) and math.isnan(head)):
            raise ValueError(f"head row at layer {layer} has no head index")
        return head_node(int(layer), int(head))
    if kind == "mlp_out":
        return mlp_node(int(layer))
    raise ValueError(f"component {component!r} is not a graph node: only heads (z/head) and MLPs (mlp_out) "
                     "become circuit nodes")


def circuit_from_node_scores(scores: pd.DataFrame, selection: Selection, *, score_column: str = "effect",
                             method: str = "activation_patching", n_layers: int | None = None,
                             name: str = "circuit") -> nx.MultiDiGraph:
    """A node circuit from per-component scores (e.g. normalized activation-patching effects).

    `scores` has columns `component`, `layer`, `head` (NaN for MLPs) and `score_column`; an optional
    `position` column holds per-position rows, which are reduced to the position of largest |score|.
    Selected nodes are connected as described in the module docstring (implied edges).
    """
    _require(scores, ["component", "layer", "head", score_column], "node scores")
    _nan_rows(scores, score_column, ["component", "layer", "head"], "node scores")
    frame = scores.copy()
    frame["node"] = [node_name_from_row(c, lay, h) for c, lay, h in
                     zip(frame["component"], frame["layer"], frame["head"])]
    frame["_abs"] = frame[score_column].astype(float).abs()
    best = frame.sort_values("_abs", ascending=False, kind="stable").drop_duplicates("node")
    best = best.set_index("node")
    mask = select(best[score_column].astype(float), selection)
    chosen = best[mask]
    if chosen.empty:
        raise _empty("node scores", selection)
    graph = new_circuit(name, method, n_layers)
    add_node(graph, "input")
    add_node(graph, "logits")
    for node, row in chosen.iterrows():
        attrs: dict[str, Any] = {"evidence": evidence_json({"method": method, score_column: float(row[score_column])})}
        if "position" in chosen.columns and not pd.isna(row["position"]):
            attrs["position"] = str(row["position"])
        add_node(graph, str(node), score=float(row[score_column]), **attrs)
    nodes = sorted(chosen.index, key=sort_key)
    strength = {n: abs(float(chosen.loc[n, score_column])) for n in nodes}
    strength.update(input=math.inf, logits=math.inf)
    implied = f"node:{method}"
    for dst in nodes + ["logits"]:
        for src in ["input"] + nodes:
            if src != dst and can_read(src, dst):
                link = min(strength[src], strength[dst])
                add_edge(graph, src, dst, "resid", 0.0 if math.isinf(link) else link, implied)
    return finish(graph)


def circuit_from_edge_scores(scores: pd.DataFrame, selection: Selection, *, method: str = "",
                             n_layers: int | None = None, name: str = "circuit") -> nx.MultiDiGraph:
    """An edge circuit from per-edge scores (EAP, EAP-IG, ACDC): columns `edge`, `score`, optional `method`.

    Edges are selected on |score|; nodes get the summed |score| of their kept outgoing edges (input and
    logits: of all their kept edges) as `score`. The result is pruned to input->logits paths.
    """
    _require(scores, ["edge", "score"], "edge scores")
    _nan_rows(scores, "score", ["edge"], "edge scores")
    frame = scores.reset_index(drop=True)
    parsed = [parse_edge(str(e)) for e in frame["edge"]]
    dup = pd.Series([edge_name(*p) for p in parsed]).duplicated()
    if dup.any():
        raise ValueError(f"edge scores list {frame['edge'][dup].iloc[0]!r} more than once; aggregate first")
    mask = select(frame["score"].astype(float), selection)
    if not mask.any():
        raise _empty("edge scores", selection)
    graph = new_circuit(name, method, n_layers)
    for keep, (src, dst, ch), (_, row) in zip(mask, parsed, frame.iterrows()):
        if keep:
            row_method = str(row["method"]) if "method" in frame.columns else method
            add_edge(graph, src, dst, ch, float(row["score"]), row_method)
    _node_scores_from_edges(graph)
    return finish(graph)


def _node_scores_from_edges(graph: nx.MultiDiGraph) -> None:
    """Node scores of an edge circuit: summed |score| of their kept edges (`patching.topology.node_totals`)."""
    edges = list(graph.edges(data="score"))
    totals = node_totals([u for u, _, _ in edges], [v for _, v, _ in edges], [s for _, _, s in edges], absolute=True)
    for node in graph.nodes:
        graph.nodes[node]["score"] = float(totals.get(node, 0.0))


def circuit_from_path_patching(effects: pd.DataFrame, selection: Selection, *, method: str = "path_patching",
                               connect_input: bool = True, connect_logits: bool = True,
                               n_layers: int | None = None, name: str = "circuit") -> nx.MultiDiGraph:
    """A circuit from path-patching results: columns `sender`, `receiver`, `channel`, `effect`.

    Each kept row is the edge sender->receiver<channel>. Path patching rarely measures `input` or
    `logits` edges, so with `connect_input` every kept node without a kept sender is fed by `input`
    (channel `resid`) and with `connect_logits` every kept node without a kept receiver feeds `logits`;
    those implied edges have score 0 and method `implied`.
    """
    _require(effects, ["sender", "receiver", "channel", "effect"], "path-patching effects")
    _nan_rows(effects, "effect", ["sender", "receiver", "channel"], "path-patching effects")
    frame = effects.reset_index(drop=True)
    mask = select(frame["effect"].astype(float), selection)
    if not mask.any():
        raise _empty("path-patching effects", selection)
    graph = new_circuit(name, method, n_layers)
    for _, row in frame[mask].iterrows():
        channel = str(row["channel"]) if not pd.isna(row["channel"]) else "resid"
        add_edge(graph, str(row["sender"]), str(row["receiver"]), channel, float(row["effect"]), method)
    for node in list(graph.nodes):
        if node not in ("input", "logits"):
            if connect_input and graph.in_degree(node) == 0:
                add_edge(graph, "input", node, "resid", 0.0, "implied")
            if connect_logits and graph.out_degree(node) == 0:
                add_edge(graph, node, "logits", "resid", 0.0, "implied")
    _node_scores_from_edges(graph)
    for node in graph.nodes:
        graph.nodes[node]["evidence"] = evidence_json({"method": method, "score": "sum |effect| of outgoing edges"})
    return finish(graph)


def component_nodes(graph: nx.MultiDiGraph) -> list[str]:
    """The head and MLP nodes of a circuit (no `input`/`logits`), in model order."""
    return sorted((n for n, d in graph.nodes(data=True) if d["kind"] in ("head", "mlp")), key=sort_key)


def circuit_table(graph: nx.MultiDiGraph) -> pd.DataFrame:
    """A tidy table of a circuit's nodes: node, kind, layer, head, role, roles, score, evidence."""
    rows = []
    for node in sorted(graph.nodes, key=sort_key):
        data = graph.nodes[node]
        rows.append({"node": node, "kind": data["kind"], "layer": data["layer"], "head": data["head"],
                     "role": data.get("role", ""), "roles": json.loads(data.get("roles", "[]")),
                     "score": data.get("score", 0.0), "evidence": data.get("evidence", "{}")})
    return pd.DataFrame(rows)
