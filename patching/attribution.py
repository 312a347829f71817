"""Gradient estimates of edge and node effects: EAP, EAP-IG and node-level attribution patching.

Sign convention (all methods, and ACDC/exact scores too): an edge's `score` estimates
`m(clean) - m(clean with this edge corrupted)`, so a positive score means the edge carries the clean
behaviour. `effect` is the score divided by `m(clean) - m(corrupt)` (the fraction of the clean–corrupt gap).

- EAP (Syed et al. 2023): score(u->v) = (a_u^clean - a_u^corrupt) · dm/dx_v at the clean run — one clean
  forward+backward plus the cached corrupted forward.
- EAP-IG (Hanna et al. 2024, "inputs" variant): the gradient is averaged over `steps` runs whose input
  embeddings go from corrupted to clean (alpha = k/steps, k = 1..steps).
- Node attribution: a node's score is the sum of its outgoing edge scores, which equals
  (a_u^clean - a_u^corrupt) · dm/da_u, attribution patching of that head or MLP (Nanda 2023).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from patching.activation import _metric_values
from patching.edges import EdgeContext, _logits_at, evaluate_edge_masks

EDGE_COLUMNS = ["edge", "sender", "receiver", "channel", "score", "effect", "method"]
NODE_COLUMNS = ["component", "layer", "head", "position", "role", "metric", "effect", "score", "method"]


def _receiver_gradients(ctx: EdgeContext, embed: Tensor | None = None) -> Tensor:
    """d(mean metric)/d(receiver input) at a run [batch, pos, n_receivers, d_model]."""
    er = ctx.edge_runner
    with torch.enable_grad():
        _, final, leaves = er.plain(ctx.pairs.clean_tokens, embed=embed, leaves=True)
        logits = _logits_at(er.runner, final, ctx.read_positions)
        metric = _metric_values(ctx.task, ctx.pairs, logits).mean()
        flat = leaves["attn"] + leaves["mlp"] + leaves["logits"]
        grads = torch.autograd.grad(metric, flat)
    g = ctx.graph
    n_attn = len(leaves["attn"])
    parts = []
    for layer in range(g.n_layers):
        parts.append(grads[layer])
        if not g.attn_only:
            parts.append(grads[n_attn + layer].unsqueeze(2))
    parts.append(grads[-1].unsqueeze(2))
    return torch.cat(parts, dim=2)


def _scores_from_gradients(ctx: EdgeContext, grads: Tensor) -> Tensor:
    delta = ctx.clean.senders - ctx.corrupt.senders  # [b, p, n_senders, d]
    matrix = torch.einsum("bpnd,bprd->nr", delta, grads)
    g = ctx.graph
    return matrix[g.edge_sender, g.edge_receiver]


def eap_scores(ctx: EdgeContext) -> Tensor:
    """EAP edge scores [n_edges] (see module docstring for the sign)."""
    return _scores_from_gradients(ctx, _receiver_gradients(ctx)).detach()


def eap_ig_scores(ctx: EdgeContext, steps: int = 5) -> Tensor:
    """EAP-IG edge scores [n_edges]: gradients integrated over input embeddings from corrupted to clean."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    runner = ctx.edge_runner.runner
    clean_embed = runner.embed(ctx.pairs.clean_tokens)
    corrupt_embed = runner.embed(ctx.pairs.corrupt_tokens)
    total = None
    for k in range(1, steps + 1):
        alpha = k / steps
        grads = _receiver_gradients(ctx, embed=corrupt_embed + alpha * (clean_embed - corrupt_embed))
        total = grads if total is None else total + grads
    return _scores_from_gradients(ctx, total / steps).detach()


def edge_frame(ctx: EdgeContext, scores: Tensor, method: str) -> pd.DataFrame:
    """Tidy edge scores: one row per edge, columns `EDGE_COLUMNS`."""
    g = ctx.graph
    gap = ctx.clean_metric - ctx.corrupt_metric
    values = scores.detach().cpu().numpy().astype(float)
    return pd.DataFrame({
        "edge": g.edge_names,
        "sender": [g.sender_names[i] for i in g.edge_sender.tolist()],
        "receiver": [g.receiver_names[i] for i in g.edge_receiver.tolist()],
        "channel": [g.receiver_channels[i] for i in g.edge_receiver.tolist()],
        "score": values,
        "effect": values / gap,
        "method": method,
    }, columns=EDGE_COLUMNS)


def node_frame(ctx: EdgeContext, scores: Tensor, method: str) -> pd.DataFrame:
    """Node scores (sum of outgoing edge scores) for every head and MLP, in activation-patching columns."""
    g = ctx.graph
    per_sender = torch.zeros(g.n_senders, dtype=scores.dtype)
    per_sender.index_add_(0, g.edge_sender, scores.detach().cpu())
    gap = ctx.clean_metric - ctx.corrupt_metric
    rows = []
    for index, name in enumerate(g.sender_names):
        if name == "input":
            continue
        value = float(per_sender[index])
        if name.startswith("a"):
            layer, head = (int(x) for x in name[1:].split(".h"))
            component = "z"
        else:
            layer, head, component = int(name[1:]), -1, "mlp_out"
        rows.append({"component": component, "layer": layer, "head": head, "position": -1, "role": "",
                     "metric": float("nan"), "effect": value / gap, "score": value, "method": method})
    return pd.DataFrame(rows, columns=NODE_COLUMNS)


def exact_edge_scores(ctx: EdgeContext, edges: Any, *, memory_budget_mb: float = 1024.0,
                      progress: bool = False) -> Tensor:
    """Exact scores m(clean) - m(clean with edge e corrupted) for the given edge indices (or names)."""
    g = ctx.graph
    index = [g.edge_index(e) if isinstance(e, str) else int(e) for e in edges]
    masks = torch.ones(len(index), g.n_edges)
    masks[torch.arange(len(index)), torch.tensor(index, dtype=torch.long)] = 0.0
    values = evaluate_edge_masks(ctx, masks, memory_budget_mb=memory_budget_mb, progress=progress)
    return ctx.clean_metric - values.mean(1)


def spearman(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties."""
    ra = pd.Series(np.asarray(a, dtype=float)).rank().to_numpy()
    rb = pd.Series(np.asarray(b, dtype=float)).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def oracle_check(ctx: EdgeContext, scores: Tensor, *, n_edges: int = 200, seed: int = 0,
                 memory_budget_mb: float = 1024.0, progress: bool = False) -> tuple[float, pd.DataFrame]:
    """Re-score a random sample of edges exactly; return Spearman rho (approx vs exact) and the sample.

    Half the sample is drawn from the approximate method's top edges by |score|, half uniformly, so that
    the check covers the edges a circuit would be built from as well as the bulk.
    """
    g = ctx.graph
    n = min(n_edges, g.n_edges)
    generator = torch.Generator().manual_seed(seed)
    top = torch.argsort(scores.abs(), descending=True)[: n // 2]
    rest = torch.tensor(sorted(set(range(g.n_edges)) - set(top.tolist())), dtype=torch.long)
    uniform = rest[torch.randperm(len(rest), generator=generator)[: n - len(top)]]
    chosen = torch.cat([top, uniform])
    exact = exact_edge_scores(ctx, chosen.tolist(), memory_budget_mb=memory_budget_mb, progress=progress)
    frame = pd.DataFrame({"edge": [g.edge_names[i] for i in chosen.tolist()],
                          "approx": scores[chosen].cpu().numpy(), "exact": exact.cpu().numpy()})
    return spearman(frame["approx"], frame["exact"]), frame
