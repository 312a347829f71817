"""Exact, differentiable node circuits: keep some heads/MLPs clean, replace every other one's output.

A node circuit keeps a set of senders (heads, MLPs, optionally the `input` embeddings). Every other sender's
output is replaced by its value in the corrupted run at all positions; everything else (the kept senders, the
MLPs when only heads are masked, norms, attention patterns) is recomputed from the patched residual stream.
With a continuous mask m_u in [0, 1] sender u writes `m_u * a_u + (1 - m_u) * a_u^corrupt`, where `a_u` is
its output in this same forward pass. This equals edge patching (`patching.edges`) with every outgoing edge
of u set to m_u, at the cost of one ordinary forward per circuit instead of one copy of the residual stream
per receiver, so it is cheap enough to optimise masks by gradient descent on a real model.

Masks are vectors over `ComputationalGraph.sender_names` (`input`, `a{l}.h{h}`, `m{l}`); `node_mask` builds
one from names. Many circuits run in one batched forward ([C, n_senders] masks).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from circuitlab.patching.activation import _metric_values
from circuitlab.patching.edge_masks import edge_masked_final
from circuitlab.patching.edges import EdgeContext, distinct_circuits
from circuitlab.patching.engine import _gather_logits


def node_mask(ctx: EdgeContext, keep: Iterable[str], *, keep_input: bool = True, keep_mlps: bool = False) -> Tensor:
    """A 0/1 sender vector [n_senders] with the named nodes kept (plus `input` / every MLP if asked)."""
    names = ctx.graph.sender_names
    index = {name: i for i, name in enumerate(names)}
    vec = torch.zeros(len(names))
    for name in keep:
        if name not in index:
            raise ValueError(f"node {name!r} is not a sender of this model's graph (e.g. {names[1]!r}, 'm0', 'input')")
        vec[index[name]] = 1.0
    if keep_input:
        vec[0] = 1.0
    if keep_mlps:
        vec[mlp_indices(ctx)] = 1.0
    return vec


def head_indices(ctx: EdgeContext) -> Tensor:
    """Sender indices of every attention head, in graph order."""
    return torch.tensor(ctx.graph.senders_of("head"), dtype=torch.long)


def mlp_indices(ctx: EdgeContext) -> Tensor:
    """Sender indices of every MLP, in graph order (empty for attention-only models)."""
    return torch.tensor(ctx.graph.senders_of("mlp"), dtype=torch.long)


def node_masked_final(ctx: EdgeContext, masks: Tensor) -> Tensor:
    """Final residual streams [C * batch, pos, d_model] for C node circuits (masks [C, n_senders]).

    Differentiable in `masks` (autograd-safe: no in-place writes into saved tensors).
    """
    er = ctx.edge_runner
    r, g = er.runner, er.graph
    if masks.dim() != 2 or masks.shape[1] != g.n_senders:
        raise ValueError(f"node masks must be [circuits, {g.n_senders}] over graph.sender_names; got {tuple(masks.shape)}")
    if getattr(er, "backend", "fast") == "hook":  # every outgoing edge of u at m_u: the same circuit, by edges

        return edge_masked_final(ctx, expand_to_edges(ctx, masks))
    n_circ = masks.shape[0]
    # Positions before `pos0` are the same in the clean and corrupted runs, hence in every mix of them: start there
    # from the corrupted run's keys/values and prepend its final stream (`EngineContext.shared_prefix`).
    pos0 = ctx.shared_prefix
    past = ctx.corrupt_run.kv if pos0 else None
    corrupt = ctx.corrupt.senders[:, pos0:]  # [b, p, n_senders, d]
    batch, seq, _, dm = corrupt.shape
    masks = masks.to(corrupt.device, corrupt.dtype)

    def mix(clean_out: Tensor, first: int, count: int) -> Tensor:
        """clean_out [C*b, p, count, d] -> mixed with the corrupted outputs of senders first..first+count."""
        m = masks[:, first:first + count].view(n_circ, 1, 1, count, 1)
        out = clean_out.view(n_circ, batch, seq, count, dm)
        bad = corrupt[:, :, first:first + count].unsqueeze(0)
        return (bad + m * (out - bad)).view(n_circ * batch, seq, count, dm)

    embed = ctx.clean.senders[:, pos0:, 0]
    resid = mix(embed.unsqueeze(2).repeat(n_circ, 1, 1, 1), 0, 1)[:, :, 0]
    for layer in range(r.n_layers):
        x = r.ln1[layer](resid)
        q, k, v = r.project_q(layer, x), r.project_k(layer, x), r.project_v(layer, x)
        heads = er.shares(layer, r.head_outputs(layer, r.attend(layer, q, k, v, pos0, past)))  # [C*b, p, H, d]
        attn = er.attn_total(layer, mix(heads, g.head_sender(layer, 0), g.n_heads))
        if r.attn_only:
            resid = resid + attn
            continue
        mlp_in = resid if r.parallel else resid + attn
        mlp = mix(r.mlp_block(layer, mlp_in).unsqueeze(2), g.mlp_sender(layer), 1)[:, :, 0]
        resid = resid + attn + mlp
    if pos0:
        resid = torch.cat([ctx.corrupt.resid_final[:, :pos0].repeat(n_circ, 1, 1), resid], dim=1)
    return resid


def node_masked_metric(ctx: EdgeContext, masks: Tensor) -> Tensor:
    """Per-prompt task metric [C, batch] of C node circuits (differentiable in `masks`)."""
    batch, reads = ctx.read_positions.shape
    final = node_masked_final(ctx, masks)
    logits = _gather_logits(ctx.edge_runner.runner, final, ctx.read_positions, 0, ctx.metric_vocab)
    return _metric_values(ctx.task, ctx.pairs, logits.view(masks.shape[0], batch, reads, -1))


def evaluate_node_masks(ctx: EdgeContext, masks: Tensor, *, chunk: int = 8, full_is_clean: bool = False) -> Tensor:
    """Per-prompt metric [C, batch] for node masks [C, n_senders] (1 = keep clean), without gradients; each distinct
    circuit runs once, and with `full_is_clean` the whole model is read as the clean run (`edges.distinct_circuits`)."""
    if masks.dim() == 1:
        masks = masks.unsqueeze(0)
    if not bool(torch.isfinite(masks).all()):
        raise ValueError("node masks contain NaN or inf")
    def evaluate(distinct: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([node_masked_metric(ctx, distinct[start:start + chunk])
                              for start in range(0, distinct.shape[0], chunk)], dim=0)

    return distinct_circuits(ctx, masks, evaluate, full_is_clean=full_is_clean)


def expand_to_edges(ctx: EdgeContext, masks: Tensor) -> Tensor:
    """The edge masks [C, n_edges] equivalent to node masks [C, n_senders] (every outgoing edge = m_u)."""
    return masks[:, ctx.graph.edge_sender]


__all__: list[Any] = ["node_mask", "head_indices", "mlp_indices", "node_masked_final", "node_masked_metric",
                      "evaluate_node_masks", "expand_to_edges"]
