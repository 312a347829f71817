"""MIB circuit-track interop: export any method's edge scores as a MIB submission, import a MIB score file.

MIB (Mueller et al. 2025, arXiv 2504.13151) takes, per task and model, a folder named `<task>_<model>` holding
either one importance-score file (a score on every edge) or one circuit per edge fraction, each keeping no more
than that percentage of the edges (`SUBMISSION_PERCENTS`). Both are the EAP-IG/MIB circuit JSON that
`graphs.io` documents:

    {"cfg": {"n_layers", "n_heads", "parallel_attn_mlp", "d_model"},
     "nodes": {"input": {"in_graph": ..}, "a0.h1": .., "m0": .., "logits": ..},
     "edges": {"a0.h1->a5.h5<q>": {"score": .., "in_graph": ..}, "m3->logits": .., ...}}

Our graph's names are MIB's (`patching.topology`), so every edge of the graph is written under its own name.
`write_submission` writes `importances/<task>_<model>/importances.json` (every edge scored, `in_graph` true for
the whole model) and `multiple_circuits/<task>_<model>/edges_<p>pct.json` (binary circuits without scores: the
top floor(p% x edges) edges by |score| in the graph; a node is in the graph when an in-graph edge touches it,
`input` and `logits` always).
`read_scores` reads any such file back as one score per edge of a graph (a binary circuit file gives 1 for
in-graph edges and 0 otherwise); it refuses a file whose model shape or edge set differs from the graph's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from circuitlab.patching.topology import ComputationalGraph

SUBMISSION_PERCENTS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
PathLike = str | os.PathLike[str]


def _cfg(graph: ComputationalGraph, d_model: int | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "parallel_attn_mlp": graph.parallel}
    if graph.n_kv != graph.n_heads:
        cfg["n_key_value_heads"] = graph.n_kv
    if d_model is not None:
        cfg["d_model"] = int(d_model)
    return cfg


def _node_names(graph: ComputationalGraph) -> list[str]:
    return list(dict.fromkeys([*graph.sender_names, "logits"]))


def to_mib_scores(graph: ComputationalGraph, scores: Tensor, keep: Tensor | None = None, *,
                  d_model: int | None = None, with_scores: bool = True) -> dict[str, object]:
    """The MIB JSON dict of edge `scores` [n_edges]; `keep` [n_edges] bool marks the circuit (default: all).
    `with_scores=False` writes a binary circuit (MIB's multiple-circuit files carry no scores)."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if scores.numel() != graph.n_edges:
        raise ValueError(f"{scores.numel()} scores for a graph of {graph.n_edges} edges")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("edge scores contain NaN or inf: MIB files hold finite scores only")
    keep = torch.ones(graph.n_edges, dtype=torch.bool) if keep is None else keep.bool()
    touched = {"input", "logits"}
    for e in torch.nonzero(keep).flatten().tolist():
        touched.add(graph.sender_names[int(graph.edge_sender[e])])
        touched.add(graph.edge_names[e].split("->")[1].split("<")[0])
    nodes = {n: {"in_graph": n in touched} for n in _node_names(graph)}
    edges = {name: ({"score": float(s), "in_graph": bool(k)} if with_scores else {"in_graph": bool(k)})
             for name, s, k in zip(graph.edge_names, scores.tolist(), keep.tolist())}
    return {"cfg": _cfg(graph, d_model), "nodes": nodes, "edges": edges}


def submission_masks(scores: Tensor, percents: tuple[float, ...] = SUBMISSION_PERCENTS) -> list[Tensor]:
    """Top floor(p% x n_edges) edges by |score| for each p (never more than p% of the edges)."""
    order = torch.argsort(torch.as_tensor(scores).abs(), descending=True, stable=True)
    n = order.numel()
    masks = []
    for p in percents:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[: int(math.floor(n * p / 100.0))]] = True
        masks.append(mask)
    return masks


def write_submission(out: PathLike, graph: ComputationalGraph, scores: Tensor, *, task: str, model: str,
                     d_model: int | None = None, percents: tuple[float, ...] = SUBMISSION_PERCENTS) -> list[Path]:
    """Write the importance-score file and one circuit per MIB fraction under `out` (module docstring)."""
    folder = f"{task}_{Path(model).name}"
    scores_dir, circuits_dir = Path(out) / "importances" / folder, Path(out) / "multiple_circuits" / folder
    scores_dir.mkdir(parents=True, exist_ok=True)
    circuits_dir.mkdir(parents=True, exist_ok=True)
    written = [scores_dir / "importances.json"]
    written[0].write_text(json.dumps(to_mib_scores(graph, scores, d_model=d_model), allow_nan=False))
    for p, mask in zip(percents, submission_masks(scores, percents)):
        path = circuits_dir / f"edges_{p:g}pct.json"
        path.write_text(json.dumps(to_mib_scores(graph, scores, mask, d_model=d_model, with_scores=False),
                                   allow_nan=False))
        written.append(path)
    return written


def scores_from_mib(data: dict[str, object], graph: ComputationalGraph, *, source: str = "<mib>") -> Tensor:
    """One score per edge of `graph` [n_edges] from a MIB JSON dict (see the module docstring)."""
    for key in ("cfg", "edges"):
        if key not in data:
            raise ValueError(f"{source}: not a MIB circuit/score file (no {key!r}; has {sorted(data)})")
    cfg = data["cfg"]
    for key, want in (("n_layers", graph.n_layers), ("n_heads", graph.n_heads)):
        if key in cfg and int(cfg[key]) != want:
            raise ValueError(f"{source}: {key}={cfg[key]} but the model's graph has {want}: a file for another model")
    edges: dict[str, Any] = data["edges"]
    missing = [e for e in graph.edge_names if e not in edges]
    extra = sorted(set(edges) - set(graph.edge_names))
    if missing or extra:
        raise ValueError(f"{source}: the file's edges differ from the graph's ({len(missing)} missing, e.g. "
                         f"{missing[:2]}; {len(extra)} unknown, e.g. {extra[:2]}): a file for another model or graph")
    has_scores = any(edges[e].get("score") is not None for e in graph.edge_names)
    values = [(edges[e].get("score") if has_scores else float(bool(edges[e].get("in_graph", False))))
              for e in graph.edge_names]
    if any(v is None for v in values):
        raise ValueError(f"{source}: some edges have a score and others none; give every edge a score")
    out = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{source}: scores contain NaN or inf")
    return out


def read_scores(path: PathLike, graph: ComputationalGraph) -> Tensor:
    """Edge scores [n_edges] of `graph` from a MIB score (or circuit) JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MIB score file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc}); MIB score files are the EAP-IG/MIB circuit JSON") from None
    return scores_from_mib(data, graph, source=str(path))


__all__ = ["SUBMISSION_PERCENTS", "read_scores", "scores_from_mib", "submission_masks", "to_mib_scores",
           "write_submission"]
