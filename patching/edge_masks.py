"""Differentiable edge patching: the exact masked forward of `patching.edges`, safe for autograd.

`EdgeRunner.masked` writes each layer's sender differences into one preallocated tensor, which is fast for
evaluation but cannot be differentiated (the in-place writes invalidate saved tensors). Here the differences
a_u - a_u^corrupt are kept per layer in a list and concatenated as each receiver layer needs them, so the
metric is differentiable in the edge masks: receiver v reads
`resid_corrupt(v) + sum_u c_uv (a_u - a_u^corrupt)`, exactly as in `patching.edges` (tested equal to
`evaluate_edge_masks`). Used by edge-level mask learning (`patching.mask_learning`). Position-aware contexts
(`edges.with_positions`) read each position's segment mask, so position-aware edge pruning learns them too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from circuitlab.patching.activation import _metric_values
from circuitlab.patching.edges import EdgeContext, _logits_at


def edge_masked_final(ctx: EdgeContext, edge_masks: Tensor) -> Tensor:
    """Final residual streams [C * batch, pos, d_model] for edge masks [C, n_edges] (differentiable)."""
    er = ctx.edge_runner
    r, g = er.runner, er.graph
    if edge_masks.dim() != 2 or edge_masks.shape[1] != ctx.graph.n_edges:
        raise ValueError(f"edge masks must be [circuits, {ctx.graph.n_edges}]; got {tuple(edge_masks.shape)}")
    if getattr(er, "backend", "fast") == "hook":  # the bridge's own forward on per-receiver copies
        return er.masked(ctx.pairs.clean_tokens, ctx.corrupt, g.mask(edge_masks.to(ctx.corrupt.senders.device)))
    n_circ = edge_masks.shape[0]
    corrupt = ctx.corrupt
    batch, seq, _, dm = corrupt.senders.shape
    masks = ctx.graph.mask(edge_masks.to(corrupt.senders.device, corrupt.senders.dtype)).transpose(-1, -2)
    # [C, n_receivers, n_senders]; position-aware: each position's segment mask, [C, b, p, n_receivers, n_senders]
    per_position = masks[:, ctx.split.index.to(masks.device)] if ctx.split is not None else None
    corrupt_senders = corrupt.senders.permute(2, 0, 1, 3)  # [n_senders, b, p, d]
    blocks = [(ctx.clean.senders[:, :, 0] - corrupt.senders[:, :, 0]).unsqueeze(0).expand(n_circ, -1, -1, -1)
              .unsqueeze(1)]  # list of [C, k, b, p, d]

    def inputs(base: Tensor, n_prev: int, receivers: slice) -> Tensor:
        deltas = torch.cat(blocks, dim=1)[:, :n_prev]  # [C, n_prev, b, p, d]
        if per_position is not None:
            mixed = torch.einsum("cbprs,csbpd->cbprd", per_position[..., receivers, :n_prev], deltas)
        else:
            mixed = torch.einsum("crs,csbpd->cbprd", masks[:, receivers, :n_prev], deltas)
        return base.unsqueeze(0).unsqueeze(3) + mixed  # [C, b, p, R, d]

    for layer in range(r.n_layers):
        n_prev = g.senders_before(g.attn_receivers(layer).start)
        x = inputs(corrupt.resid_pre[layer], n_prev, g.attn_receivers(layer))
        heads = er._attn_from_inputs(layer, x.reshape(n_circ * batch, seq, -1, dm))  # [C*b, p, H, d]
        first = g.head_sender(layer, 0)
        heads = heads.view(n_circ, batch, seq, g.n_heads, dm).permute(0, 3, 1, 2, 4)
        blocks.append(heads - corrupt_senders[first:first + g.n_heads].unsqueeze(0))
        if r.attn_only:
            continue
        receiver = g.mlp_receiver(layer)
        x_mlp = inputs(corrupt.resid_mid[layer], g.senders_before(receiver), slice(receiver, receiver + 1))[:, :, :, 0]
        mlp_out = r.mlp_block(layer, x_mlp)  # [C, b, p, d]
        idx = g.mlp_sender(layer)
        blocks.append((mlp_out - corrupt_senders[idx].unsqueeze(0)).unsqueeze(1))
    last = g.logits_receiver
    final = inputs(corrupt.resid_final, g.n_senders, slice(last, last + 1))[:, :, :, 0]
    return final.reshape(n_circ * batch, seq, dm)


def edge_masked_metric(ctx: EdgeContext, edge_masks: Tensor) -> Tensor:
    """Per-prompt task metric [C, batch] of C edge circuits (differentiable in `edge_masks`)."""
    batch, reads = ctx.read_positions.shape
    final = edge_masked_final(ctx, edge_masks)
    logits = _logits_at(ctx.edge_runner.runner, final, ctx.read_positions)
    return _metric_values(ctx.task, ctx.pairs, logits.view(edge_masks.shape[0], batch, reads, -1))


__all__ = ["edge_masked_final", "edge_masked_metric"]
