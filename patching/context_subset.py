"""A context restricted to some prompts (repeats allowed): minibatches for mask learning, bootstrap resamples
for stability. Slices the cached clean/corrupted activations instead of rerunning the model."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import Tensor

from circuitlab.patching.edge_runner import GraphActivations
from circuitlab.patching.edges import EdgeContext


def _subset_pairs(pairs: Any, idx: Tensor) -> Any:
    if hasattr(pairs, "subset"):
        return pairs.subset(idx)
    batch = int(pairs.clean_tokens.shape[0])
    changes = {}
    for f in dataclasses.fields(pairs):
        value = getattr(pairs, f.name)
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
            changes[f.name] = value[idx]
        elif isinstance(value, dict):
            changes[f.name] = {k: v[idx] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch else v
                               for k, v in value.items()}
    return dataclasses.replace(pairs, **changes)


def _subset_acts(acts: GraphActivations, idx: Tensor) -> GraphActivations:
    return GraphActivations(acts.senders[idx], [r[idx] for r in acts.resid_pre], [r[idx] for r in acts.resid_mid],
                            acts.resid_final[idx])


def subset_context(ctx: EdgeContext, idx: Sequence[int] | Tensor) -> EdgeContext:
    """The same runs restricted to prompts `idx` (repeats allowed, as a bootstrap resample needs)."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    out = EdgeContext(ctx.edge_runner, ctx.task, _subset_pairs(ctx.pairs, idx), _subset_acts(ctx.clean, idx),
                      _subset_acts(ctx.corrupt, idx), ctx.read_positions[idx], ctx.clean_values[idx],
                      ctx.corrupt_values[idx])
    if ctx.split is not None:  # position-aware edges: the same segments, these prompts' positions
        out.split, out._graph = ctx.split.subset(idx), ctx._graph
    return out


__all__ = ["subset_context"]
