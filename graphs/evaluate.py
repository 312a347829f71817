"""Evaluating circuits: agreement with a reference circuit (precision, recall, F1, ROC-AUC) and, for node
circuits, faithfulness, completeness and minimality (Wang et al. 2022, arXiv 2211.00593, Section 4).

Faithfulness runs the model with every head and MLP *outside* the circuit ablated — replaced by its
activation on the corrupt prompts (`ablation="corrupt"`) or by that activation's mean over the corrupt
batch at each position (`"mean"`, Wang et al.'s mean ablation over an ABC dataset) — and reports
F = (m(C) − m(∅)) / (m(M) − m(∅)), where M is the full model and ∅ has every component ablated.
Completeness compares F(C \\ K) with F(M \\ K) for knocked-out sets K; minimality reports, for each node v,
the drop m(C) − m(C \\ {v}). Head outputs are ablated at `hook_z`, MLPs at `hook_mlp_out`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import networkx as nx
import numpy as np
import pandas as pd
import torch
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.graphs.circuit import component_nodes, node_name_from_row
from circuitlab.patching.activation import mean_ablation
from circuitlab.patching.components import edge_name, head_node, hook_name, mlp_node, parse_edge, parse_node
from circuitlab.patching.normalize import is_normalizable, normalize


# ------------------------------------------------------------------ agreement with a reference

@dataclass(frozen=True)
class Agreement:
    """Set agreement of a found circuit with a reference: counts and precision / recall / F1."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": self.precision,
                "recall": self.recall, "f1": self.f1}


def _agreement(found: set, reference: set) -> Agreement:
    return Agreement(len(found & reference), len(found - reference), len(reference - found))


def node_set(graph: nx.MultiDiGraph, heads_only: bool = False) -> set[str]:
    """The component nodes (heads, and MLPs unless `heads_only`) of a circuit."""
    return {n for n in component_nodes(graph) if not heads_only or graph.nodes[n]["kind"] == "head"}


def edge_set(graph: nx.MultiDiGraph, match_channels: bool = True) -> set[str]:
    """The MIB edge names of a circuit; `resid` edges into heads count as `<q>`, `<k>` and `<v>`.
    Without `match_channels`, edges are `src->dst` pairs."""
    out = set()
    for u, v, ch in graph.edges(keys=True):
        if not match_channels:
            out.add(edge_name(u, v))
        elif ch == "resid" and graph.nodes[v]["kind"] == "head":
            out.update(edge_name(u, v, c) for c in "qkv")
        else:
            out.add(edge_name(u, v, ch))
    return out


def compare_nodes(found: nx.MultiDiGraph, reference: nx.MultiDiGraph, *, heads_only: bool = False) -> Agreement:
    """Node precision/recall of `found` against `reference` (input and logits excluded)."""
    return _agreement(node_set(found, heads_only), node_set(reference, heads_only))


def compare_edges(found: nx.MultiDiGraph, reference: nx.MultiDiGraph, *, match_channels: bool = True) -> Agreement:
    """Edge precision/recall of `found` against `reference` (see `edge_set` for channel matching)."""
    return _agreement(edge_set(found, match_channels), edge_set(reference, match_channels))


def roc_auc(scores: Iterable[float], labels: Iterable[bool]) -> float:
    """Area under the ROC curve of `scores` for binary `labels`: the probability that a random positive
    outscores a random negative, ties counting 1/2 (Mann-Whitney U with average ranks)."""
    s = np.asarray(list(scores), dtype=float)
    y = np.asarray(list(labels), dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; drop or fill them before computing ROC-AUC")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC-AUC needs both positives and negatives (got {n_pos} positive, {n_neg} negative)")
    ranks = pd.Series(s).rank(method="average").to_numpy()
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def node_score_auroc(scores: Mapping[str, float] | pd.DataFrame, reference: nx.MultiDiGraph, *,
                     absolute: bool = True, heads_only: bool = False) -> float:
    """ROC-AUC of per-node scores against membership in the reference circuit.

    `scores` maps node names to scores, or is a node-score table with `component`, `layer`, `head`,
    `effect` (per-position rows are reduced to their largest |effect|). Every scored node is a candidate.
    """
    if isinstance(scores, pd.DataFrame):
        names = [node_name_from_row(c, lay, h) for c, lay, h in zip(scores["component"], scores["layer"], scores["head"])]
        frame = pd.DataFrame({"node": names, "score": scores["effect"].astype(float)})
        frame["key"] = frame["score"].abs()
        frame = frame.sort_values("key", ascending=False, kind="stable").drop_duplicates("node")
        scores = dict(zip(frame["node"], frame["score"]))
    items = {parse_node(k).name: float(v) for k, v in scores.items()}
    if heads_only:
        items = {k: v for k, v in items.items() if parse_node(k).kind == "head"}
    members = node_set(reference, heads_only)
    values = [abs(v) if absolute else v for v in items.values()]
    return roc_auc(values, [k in members for k in items])


def edge_score_auroc(scores: pd.DataFrame, reference: nx.MultiDiGraph, *, absolute: bool = True,
                     match_channels: bool = True) -> float:
    """ROC-AUC of per-edge scores (columns `edge`, `score`) against the reference circuit's edges."""
    members = edge_set(reference, match_channels)
    names = [edge_name(*parse_edge(e)) if match_channels else edge_name(*parse_edge(e)[:2]) for e in scores["edge"]]
    values = scores["score"].astype(float)
    return roc_auc(values.abs() if absolute else values, [n in members for n in names])


# ------------------------------------------------------------------ faithfulness (node circuits)

Metric = Callable[[torch.Tensor], torch.Tensor]


def all_components(model: TransformerBridge) -> list[str]:
    """Every head and (unless attention-only) MLP node of a model."""
    out = [head_node(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
    if not getattr(model.cfg, "attn_only", False):
        out += [mlp_node(layer) for layer in range(model.cfg.n_layers)]
    return out


class Ablator:
    """Runs a model with a chosen set of components kept and the rest ablated (see the module docstring)."""

    def __init__(self, model: TransformerBridge, clean_tokens: torch.Tensor, corrupt_tokens: torch.Tensor,
                 metric: Metric,
                 ablation: str = "mean") -> None:
        if ablation not in ("mean", "corrupt"):
            raise ValueError(f"ablation={ablation!r}: use 'mean' or 'corrupt'")
        if clean_tokens.shape != corrupt_tokens.shape:
            raise ValueError(f"clean {tuple(clean_tokens.shape)} and corrupt {tuple(corrupt_tokens.shape)} "
                             "tokens must have the same shape")
        self.model, self.clean, self.metric = model, clean_tokens, metric
        L = model.cfg.n_layers
        names = {hook_name("z", layer) for layer in range(L)}
        if not getattr(model.cfg, "attn_only", False):
            names |= {hook_name("mlp_out", layer) for layer in range(L)}
        with torch.no_grad():
            _, cache = model.run_with_cache(corrupt_tokens, names_filter=lambda n: n in names)
        self.replacement = {}
        for name in names:
            act = cache[name]
            self.replacement[name] = mean_ablation(act, None) if ablation == "mean" else act
        self.components = all_components(model)

    def metric_with(self, keep: Iterable[str]) -> float:
        """The metric on the clean prompts with every component not in `keep` ablated."""
        keep_set = {parse_node(n).name for n in keep}
        unknown = keep_set - set(self.components)
        if unknown:
            raise ValueError(f"nodes {sorted(unknown)} are not components of this model")
        hooks = []
        for layer in range(self.model.cfg.n_layers):
            drop = [h for h in range(self.model.cfg.n_heads) if head_node(layer, h) not in keep_set]
            if drop:
                hooks.append((hook_name("z", layer), self._head_hook(hook_name("z", layer), drop)))
            if mlp_node(layer) in self.components and mlp_node(layer) not in keep_set:
                name = hook_name("mlp_out", layer)
                hooks.append((name, lambda act, hook, name=name: self.replacement[name]))
        with torch.no_grad(), self.model.hooks(fwd_hooks=hooks):
            logits = self.model(self.clean)
        return float(self.metric(logits))

    def _head_hook(self, name: str, heads: list[int]):
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            z = z.clone()
            z[:, :, heads] = self.replacement[name][:, :, heads]
            return z
        return hook


def faithfulness(model: TransformerBridge, circuit: nx.MultiDiGraph | Iterable[str], clean_tokens: torch.Tensor,
                 corrupt_tokens: torch.Tensor, metric: Metric, *, ablation: str = "mean") -> dict[str, float]:
    """m(model), m(circuit), m(empty) and F = (m(C) − m(∅)) / (m(M) − m(∅)) for a node circuit."""
    ab = Ablator(model, clean_tokens, corrupt_tokens, metric, ablation)
    nodes = node_set(circuit) if isinstance(circuit, nx.Graph) else {parse_node(n).name for n in circuit}
    full, empty, mine = ab.metric_with(ab.components), ab.metric_with([]), ab.metric_with(nodes)
    return {"metric_model": full, "metric_circuit": mine, "metric_empty": empty,
            "faithfulness": normalize(mine, full, empty) if is_normalizable(full, empty) else float("nan")}


def completeness(model: TransformerBridge, circuit: nx.MultiDiGraph, clean_tokens: torch.Tensor,
                 corrupt_tokens: torch.Tensor,
                 metric: Metric, knockouts: Mapping[str, Iterable[str]] | None = None, *,
                 ablation: str = "mean") -> pd.DataFrame:
    """For each knocked-out set K (default: each class of nodes sharing a `role`, and each single node):
    m(C \\ K), m(M \\ K) and the gap |m(C \\ K) − m(M \\ K)| (small = complete)."""
    ab = Ablator(model, clean_tokens, corrupt_tokens, metric, ablation)
    nodes = node_set(circuit)
    if knockouts is None:
        knockouts = {}
        for n in sorted(nodes):
            role = circuit.nodes[n].get("role", "")
            if role:
                knockouts.setdefault(f"role:{role}", []).append(n)
            knockouts[n] = [n]
    rows = []
    for label, group in knockouts.items():
        k = {parse_node(n).name for n in group}
        in_c, in_m = ab.metric_with(nodes - k), ab.metric_with(set(ab.components) - k)
        rows.append({"knockout": label, "metric_circuit_minus_k": in_c, "metric_model_minus_k": in_m,
                     "gap": abs(in_c - in_m)})
    return pd.DataFrame(rows)


def minimality(model: TransformerBridge, circuit: nx.MultiDiGraph, clean_tokens: torch.Tensor,
               corrupt_tokens: torch.Tensor,
               metric: Metric, *, ablation: str = "mean") -> pd.DataFrame:
    """For each circuit node v: m(C), m(C \\ {v}) and the drop m(C) − m(C \\ {v}) (large |drop| = needed)."""
    ab = Ablator(model, clean_tokens, corrupt_tokens, metric, ablation)
    nodes = node_set(circuit)
    base = ab.metric_with(nodes)
    rows = [{"node": v, "metric_circuit": base, "metric_without": (w := ab.metric_with(nodes - {v})),
             "drop": base - w} for v in sorted(nodes)]
    return pd.DataFrame(rows)
