"""Saving and loading circuits: GraphML, node-link JSON, and the EAP-IG / MIB circuit JSON.

All node/edge attributes of a circuit are scalars (JSON-valued ones are stored as JSON strings), so
GraphML and node-link JSON round-trip them exactly. The EAP-IG/MIB format (`Graph.to_json` of
github.com/hannamw/EAP-IG, used by the MIB benchmark, arXiv 2504.13151) is

    {"cfg": {"n_layers": .., "n_heads": .., "parallel_attn_mlp": false, "d_model": ..},
     "nodes": {"input": {"in_graph": true, "score": ..}, "a0.h1": {...}, "m0": {...}, "logits": {...}},
     "edges": {"a0.h1->a5.h5<q>": {"score": .., "in_graph": true}, "m3->logits": {...}, ...}}

Edges with channel `resid` into a head (implied edges) have no MIB name: they are written as the three
edges `<q>`, `<k>`, `<v>` with the same score. Importing keeps only `in_graph` edges (or all, with
`in_graph_only=False`) and prunes to input->logits paths.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import networkx as nx

from circuitlab.graphs.circuit import add_edge, finish, new_circuit
from circuitlab.patching.components import edge_name, parse_edge, parse_node
from circuitlab.patching.topology import sort_key

PathLike = str | os.PathLike[str]


def write_graphml(graph: nx.MultiDiGraph, path: PathLike) -> Path:
    """Write a circuit as GraphML (attributes typed; edge ids are the channels)."""
    path = Path(path)
    nx.write_graphml(graph, path, named_key_ids=True)
    return path


def read_graphml(path: PathLike) -> nx.MultiDiGraph:
    """Read a circuit written by `write_graphml` (edge keys restored from the GraphML edge ids)."""
    raw = nx.read_graphml(Path(path), force_multigraph=True)
    graph = nx.MultiDiGraph()
    graph.graph.update(raw.graph)
    graph.graph.pop("node_default", None)
    graph.graph.pop("edge_default", None)
    for node, data in raw.nodes(data=True):
        graph.add_node(node, **data)
    for u, v, _, data in raw.edges(keys=True, data=True):
        graph.add_edge(u, v, key=data["channel"], **data)
    return graph


def to_node_link(graph: nx.MultiDiGraph) -> dict[str, object]:
    """The node-link dict of a circuit (`nodes`, `edges`, `graph`), JSON-serialisable."""
    return nx.node_link_data(graph, edges="edges")


def from_node_link(data: dict[str, object]) -> nx.MultiDiGraph:
    """A circuit from a node-link dict written by `to_node_link`."""
    graph = nx.node_link_graph(data, directed=True, multigraph=True, edges="edges")
    return nx.MultiDiGraph(graph)


def write_json(graph: nx.MultiDiGraph, path: PathLike) -> Path:
    """Write a circuit as node-link JSON."""
    path = Path(path)
    path.write_text(json.dumps(to_node_link(graph), indent=1, allow_nan=False))
    return path


def read_json(path: PathLike) -> nx.MultiDiGraph:
    """Read a circuit written by `write_json`."""
    return from_node_link(json.loads(Path(path).read_text()))


def to_mib(graph: nx.MultiDiGraph, *, n_layers: int | None = None, n_heads: int | None = None,
           d_model: int | None = None, all_edge_scores: dict[str, float] | None = None) -> dict[str, object]:
    """The EAP-IG/MIB circuit dict of a circuit.

    `all_edge_scores` optionally adds scored edges outside the circuit (written with `in_graph: false`),
    which MIB's top-k sweeps need; circuit edges always have `in_graph: true`.
    """
    heads = [d["head"] for _, d in graph.nodes(data=True) if d["kind"] == "head"]
    layers = [d["layer"] for _, d in graph.nodes(data=True) if d["kind"] in ("head", "mlp")]
    if n_layers is None:
        n_layers = graph.graph.get("n_layers", -1)
        n_layers = n_layers if n_layers and n_layers > 0 else (max(layers) + 1 if layers else 0)
    cfg = {"n_layers": int(n_layers), "n_heads": int(n_heads if n_heads is not None else (max(heads) + 1 if heads else 0)),
           "parallel_attn_mlp": False}
    if d_model is not None:
        cfg["d_model"] = int(d_model)
    nodes = {n: {"in_graph": True, "score": float(d["score"])} for n, d in sorted(graph.nodes(data=True), key=lambda x: sort_key(x[0]))}
    edges: dict[str, dict[str, Any]] = {}
    for name, score in (all_edge_scores or {}).items():
        edges[edge_name(*parse_edge(name))] = {"score": float(score), "in_graph": False}
    for u, v, ch, data in graph.edges(keys=True, data=True):
        channels = ("q", "k", "v") if ch == "resid" and graph.nodes[v]["kind"] == "head" else (ch,)
        for c in channels:
            edges[edge_name(u, v, c)] = {"score": float(data["score"]), "in_graph": True}
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def from_mib(data: dict[str, object], *, in_graph_only: bool = True, method: str = "mib",
             name: str = "circuit") -> nx.MultiDiGraph:
    """A circuit from an EAP-IG/MIB circuit dict; edge scores are kept exactly, node scores when given."""
    for key in ("cfg", "nodes", "edges"):
        if key not in data:
            raise ValueError(f"not an EAP-IG/MIB circuit: missing top-level key {key!r} (has {list(data)})")
    n_layers = data["cfg"].get("n_layers")
    graph = new_circuit(name, method, n_layers)
    for edge, info in data["edges"].items():
        if in_graph_only and not info.get("in_graph", False):
            continue
        src, dst, ch = parse_edge(edge)
        add_edge(graph, src, dst, ch, float(info.get("score", 0.0) if info.get("score") is not None else 0.0), method)
    if graph.number_of_edges() == 0:
        raise ValueError("the MIB circuit has no edges in the graph (in_graph true); nothing to import")
    for node, info in data["nodes"].items():
        name_ = parse_node(node).name
        if name_ in graph and info.get("score") is not None:
            graph.nodes[name_]["score"] = float(info["score"])
    return finish(graph)


def write_mib(graph: nx.MultiDiGraph, path: PathLike, **kwargs: object) -> Path:
    """Write a circuit as EAP-IG/MIB JSON (see `to_mib` for options)."""
    path = Path(path)
    path.write_text(json.dumps(to_mib(graph, **kwargs), allow_nan=False))
    return path


def read_mib(path: PathLike, **kwargs: object) -> nx.MultiDiGraph:
    """Read an EAP-IG/MIB circuit JSON file (see `from_mib`)."""
    return from_mib(json.loads(Path(path).read_text()), **kwargs)
