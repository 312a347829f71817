"""Gradient estimates of edge and node effects: EAP, EAP-IG and node-level attribution patching.

Sign convention (all methods, and ACDC/exact scores too): an edge's `score` estimates
`m(clean) - m(clean with this edge corrupted)`, so a positive score means the edge carries the clean
behaviour. Its `effect` is the score as a fraction of `m(clean) - m(corrupt)` (`patching.normalize`); tidy tables
of scores are `graphs.scores.EdgeScores` / `NodeScores`.

- EAP (Syed et al. 2023): score(u->v) = (a_u^clean - a_u^corrupt) · dm/dx_v at the clean run — one clean
  forward+backward plus the cached corrupted forward.
- EAP-IG (Hanna et al. 2024, "inputs" variant): the gradient is averaged over `steps` runs whose input
  embeddings go from corrupted to clean (alpha = k/steps, k = 1..steps).
- EAP-IG on activations (MIB's "EAP-IG-activations" idea): the integration path runs through the activations,
  not the input embeddings: at step k every edge is kept at the fraction alpha = k/steps (each receiver reads
  its corrupted input plus alpha times every sender's difference, `patching.edge_masks`), and an edge's score
  is the gradient of the mean metric w.r.t. its mask, averaged over the steps. At alpha = 1 this gradient is
  exactly the EAP score (the all-ones masked run is the clean run).
- Node attribution: a node's score is the sum of its outgoing edge scores (`patching.topology.node_totals`), which equals
  (a_u^clean - a_u^corrupt) · dm/da_u, attribution patching of that head or MLP (Nanda 2023).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from circuitlab.patching.activation import _metric_values
from circuitlab.patching.edge_masks import edge_masked_metric
from circuitlab.patching.edges import EdgeContext, _logits_at, evaluate_edge_masks
from circuitlab.patching.engine import read_logits
from circuitlab.patching.prefix import unchanged_prefix, windowed
from circuitlab.patching.runner import at_positions
from circuitlab.patching.topology import ComputationalGraph


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
    """Edge scores: (a_u^clean - a_u^corrupt) . dm/dx_v summed over prompts and positions, or, position-aware
    (`ctx.split`), over the positions of each segment: edge s * n_base + e sums base edge e over segment s."""
    delta = ctx.clean.senders - ctx.corrupt.senders  # [b, p, n_senders, d]
    g = ctx.graph
    if ctx.split is None:
        matrix = torch.einsum("bpnd,bprd->nr", delta, grads)
        return matrix[g.edge_sender, g.edge_receiver]
    base = g.base
    flat_delta, flat_grads = delta.flatten(0, 1), grads.flatten(0, 1)  # [b*p, n, d], [b*p, r, d]
    parts = []
    for s in range(len(ctx.split.names)):
        at = ctx.split.positions(s).to(delta.device)
        matrix = torch.einsum("xnd,xrd->nr", flat_delta[at], flat_grads[at])
        parts.append(matrix[base.edge_sender, base.edge_receiver])
    return torch.cat(parts)


def eap_scores(ctx: EdgeContext) -> Tensor:
    """EAP edge scores [n_edges] (see module docstring for the sign)."""
    return _scores_from_gradients(ctx, _receiver_gradients(ctx)).detach()


def eap_ig_scores(ctx: EdgeContext, steps: int = 5, *, progress: bool = False) -> Tensor:
    """EAP-IG edge scores [n_edges]: gradients integrated over input embeddings from corrupted to clean."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    clean_embed = ctx.clean.senders[:, :, 0]
    corrupt_embed = ctx.corrupt.senders[:, :, 0]  # corrupted prompts' embeddings, or their ablation
    total = None
    iterator: Any = range(1, steps + 1)
    if progress:
        iterator = tqdm(iterator, desc="EAP-IG steps", unit="step", disable=None)  # a bar on a terminal only
    for k in iterator:
        alpha = k / steps
        grads = _receiver_gradients(ctx, embed=corrupt_embed + alpha * (clean_embed - corrupt_embed))
        total = grads if total is None else total + grads
    return _scores_from_gradients(ctx, total / steps).detach()


def eap_ig_activation_scores(ctx: EdgeContext, steps: int = 5, *, progress: bool = False) -> Tensor:
    """EAP-IG on activations [n_edges]: d(mean metric)/d(edge mask) averaged over masks alpha = k/steps."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    total = torch.zeros(ctx.graph.n_edges, dtype=torch.float64)
    iterator: Any = range(1, steps + 1)
    if progress:
        iterator = tqdm(iterator, desc="EAP-IG (activations) steps", unit="step", disable=None)  # a bar on a terminal only
    for k in iterator:
        with torch.enable_grad():
            masks = torch.full((1, ctx.graph.n_edges), k / steps, requires_grad=True)
            metric = edge_masked_metric(ctx, masks).mean()
            (grad,) = torch.autograd.grad(metric, masks)
        total += grad[0].detach().double().cpu()
    return (total / steps).float()


def exact_edge_scores(ctx: EdgeContext, edges: Sequence[int] | Sequence[str] | Tensor, *, chunk_size: int = 16,
                      progress: bool = False) -> Tensor:
    """Exact scores m(clean) - m(clean with edge e corrupted) for the given edge indices (or names).

    Corrupting one edge u->v of the full graph changes only receiver v's input, by -(a_u^clean - a_u^corrupt);
    every other receiver still reads the run's own activations. So each score is a clean forward from v's
    layer with one input replaced: the fast Runner starts there, several edges per batched forward. This
    equals `evaluate_edge_masks` with that single edge off (tested).
    """
    g, runner = ctx.graph, ctx.edge_runner.runner
    index = [g.edge_index(e) if isinstance(e, str) else int(e) for e in edges]
    if getattr(ctx.edge_runner, "backend", "fast") == "hook" or ctx.split is not None:
        # no partial runs (hook backend) or a receiver that reads the edge at some positions only: the full graph
        # minus one edge, by exact edge patching

        masks = torch.ones(len(index), g.n_edges)
        masks[torch.arange(len(index)), torch.tensor(index, dtype=torch.long)] = 0.0
        values = evaluate_edge_masks(ctx, masks, progress=progress).mean(1)
        return ctx.clean_metric - values.cpu()
    clean, corrupt = ctx.clean, ctx.corrupt
    batch, reads = ctx.read_positions.shape
    groups: dict[tuple[int, str], list[int]] = {}
    for position, e in enumerate(index):
        layer, channel, _ = g.receiver_info(int(g.edge_receiver[e]))
        groups.setdefault((layer, channel if channel in ("mlp", "logits") else "attn"), []).append(position)
    out = torch.empty(len(index))
    work = [(key, members[i:i + chunk_size]) for key, members in groups.items()
            for i in range(0, len(members), chunk_size)]
    iterator: Any = work
    if progress:
        iterator = tqdm(work, desc="exact edge scores", unit="fwd", disable=None)  # a bar on a terminal only
    with torch.no_grad():
        for (layer, channel), members in iterator:
            chosen = [index[m] for m in members]
            n = len(chosen)
            senders = g.edge_sender[chosen]
            delta = (clean.senders[:, :, senders] - corrupt.senders[:, :, senders]).permute(2, 0, 1, 3)  # [n,b,p,d]
            # Before the first position where a sender differs, the altered run is the clean run: start there.
            pos0 = unchanged_prefix(delta, ctx.read_positions) if ctx.clean_run is not None and channel != "logits" \
                and windowed(ctx.edge_runner.runner) else 0
            delta, past, read = delta[:, :, pos0:], ctx.clean_run.kv if pos0 else None, ctx.read_positions
            if channel == "logits":
                final = at_positions((clean.resid_final.unsqueeze(0) - delta).reshape(n * batch, *delta.shape[2:]),
                                     read)
            elif channel == "mlp":
                x = clean.resid_mid[layer][:, pos0:].unsqueeze(0) - delta
                alt = runner.mlp_block(layer, x).reshape(n * batch, *delta.shape[2:])
                hooks = {("mlp_out", layer): lambda a, alt=alt: alt}
                if runner.parallel:  # the MLP reads resid_pre; the block must still add its attention output
                    final = runner.run(clean.resid_pre[layer][:, pos0:].repeat(n, 1, 1), start_layer=layer,
                                       hooks=hooks, pos0=pos0, past=past, read=read)
                else:
                    final = runner.run(clean.resid_mid[layer][:, pos0:].repeat(n, 1, 1), start_layer=layer,
                                       start_at_mlp=True, hooks=hooks, pos0=pos0, past=past, read=read)
            else:
                final = runner.run(clean.resid_pre[layer][:, pos0:].repeat(n, 1, 1), start_layer=layer,
                                   hooks=_single_input_hooks(ctx, layer, chosen, delta, pos0), pos0=pos0, past=past,
                                   read=read)
            logits = read_logits(runner, final, ctx.metric_vocab)
            values = _metric_values(ctx.task, ctx.pairs, logits.view(n, batch, reads, -1)).mean(1)
            out[torch.tensor(members)] = ctx.clean_metric - values.cpu()
    return out


def _single_input_hooks(ctx: EdgeContext, layer: int, edges: list[int], delta: Tensor, pos0: int = 0) -> dict:
    """Hooks replacing, in copy i, the q/k/v of edge i's receiver (query) head with values from its altered
    input; keys/values are replaced as that query head reads them, leaving the rest of its group alone.
    `delta` and the hooked activations hold positions pos0.. only."""
    g, runner = ctx.graph, ctx.edge_runner.runner
    n, batch = delta.shape[0], delta.shape[1]
    x = runner.ln1[layer](ctx.clean.resid_pre[layer][:, pos0:].unsqueeze(0) - delta)  # [n, b, p, d]
    replacements: dict[str, list[tuple[int, int, Tensor]]] = {"q_n": [], "k_q": [], "v_q": []}
    for i, e in enumerate(edges):
        _, channel, head = g.receiver_info(int(g.edge_receiver[e]))
        copies = x[i].unsqueeze(2).expand(-1, -1, runner.n_heads, -1)  # the altered input, as every head would read it
        value = ctx.edge_runner.project(layer, channel, copies)[:, :, head]
        replacements["q_n" if channel == "q" else f"{channel}_q"].append((i, head, value))
    hooks = {}
    for key, items in replacements.items():
        if not items:
            continue

        def hook(act: Tensor, items=items) -> Tensor:
            act = act.clone().view(n, batch, *act.shape[1:])
            for i, head, value in items:
                act[i, :, :, head] = value
            return act.view(n * batch, *act.shape[2:])

        hooks[(key, layer)] = hook
    return hooks


def spearman(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties."""
    ra = pd.Series(np.asarray(a, dtype=float)).rank().to_numpy()
    rb = pd.Series(np.asarray(b, dtype=float)).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def oracle_check(ctx: EdgeContext, scores: Tensor, *, n_edges: int = 200, seed: int = 0, progress: bool = False) -> tuple[float, pd.DataFrame]:
    """Re-score a random sample of edges exactly; return Spearman rho (approx vs exact) and the sample.

    Half the sample is drawn from the approximate method's top edges by |score|, half uniformly, so that
    the check covers the edges a circuit would be built from as well as the bulk.
    """
    chosen = oracle_sample(ctx.graph, scores, n_edges=n_edges, seed=seed)
    exact = exact_edge_scores(ctx, chosen.tolist(), progress=progress)
    return oracle_frame(ctx.graph, scores, chosen, exact)


def oracle_sample(graph: ComputationalGraph, scores: Tensor, *, n_edges: int = 200, seed: int = 0) -> Tensor:
    """The edges `oracle_check` re-scores: half the top |score|, half drawn uniformly (seeded)."""
    n = min(n_edges, graph.n_edges)
    generator = torch.Generator().manual_seed(seed)
    top = torch.argsort(scores.abs(), descending=True)[: n // 2]
    rest = torch.tensor(sorted(set(range(graph.n_edges)) - set(top.tolist())), dtype=torch.long)
    uniform = rest[torch.randperm(len(rest), generator=generator)[: n - len(top)]]
    return torch.cat([top, uniform])


def oracle_frame(graph: ComputationalGraph, scores: Tensor, chosen: Tensor, exact: Tensor) -> tuple[float,
                 pd.DataFrame]:
    """Spearman rho of approximate vs exact scores on the sampled edges, and the sample as a table."""
    frame = pd.DataFrame({"edge": [graph.edge_names[i] for i in chosen.tolist()],
                          "approx": scores[chosen].cpu().numpy(), "exact": exact.cpu().numpy()})
    return spearman(frame["approx"], frame["exact"]), frame
