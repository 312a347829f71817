"""ACDC (Conmy et al. 2023): greedy edge pruning by exact edge patching.

Start from the full graph. Visit receivers from the logits backwards (reverse topological order); for each
edge into a receiver, corrupt it tentatively and keep it corrupted if the objective moves by less than
`threshold`. Objective `kl` is the KL divergence from the clean run's next-token distribution at the read
positions (the paper's default); `metric` uses |change of the task metric|. A node whose outgoing edges
have all been removed cannot matter: its incoming edges are removed without evaluation.

Each tentative removal is one batched forward over the prompts, so the cost is about one forward per
edge of the still-connected graph: fine for small models, hours for SmolLM2's 123k edges (the CLI warns).
Over prompt batches (`patching.batched.Batches`), each evaluation rebuilds one batch's context at a time, so
memory stays that of one batch (about three times the compute of keeping every batch's context alive).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from circuitlab.patching.edges import EdgeContext, _logits_at, segments
from circuitlab.patching.engine import EngineContext
from circuitlab.patching.prompts import Prompts


@dataclass
class ACDCResult:
    """Kept edges (bool [n_edges]), per-edge objective changes when tested (NaN if never tested), forwards."""

    kept: Tensor
    scores: Tensor
    forwards: int


def _objective(ctx: EdgeContext | Sequence[EdgeContext] | Callable[[], Iterator[EdgeContext]], masks: Tensor,
               kind: str, clean_logprobs: Tensor | Sequence[Tensor]) -> Tensor:
    """Mean objective over the prompts of each circuit [C]; a list of contexts (or a function giving them one
    at a time) is a dataset in prompt batches."""
    if isinstance(ctx, (list, tuple)) or callable(ctx):
        total, size = 0.0, 0
        for c, lp in zip(ctx() if callable(ctx) else ctx, clean_logprobs):
            n = c.read_positions.shape[0]
            total, size = total + _objective(c, masks, kind, lp) * n, size + n
        return total / size
    er = ctx.edge_runner
    final = er.masked(ctx.pairs.clean_tokens, ctx.corrupt, ctx.graph.mask(masks), **segments(ctx))
    logits = _logits_at(er.runner, final, ctx.read_positions)
    batch, reads = ctx.read_positions.shape
    logits = logits.view(masks.shape[0], batch, reads, -1)
    if kind == "kl":
        logprobs = F.log_softmax(logits, dim=-1)
        kl = (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum(-1)
        return kl.mean(dim=(1, 2))
    return ctx.task.metric_at(logits, ctx.pairs).mean(1)


def acdc(ctx: Prompts | EngineContext | Sequence[EngineContext], threshold: float, *, objective: str = "kl",
         progress: bool = False) -> ACDCResult:
    """Run ACDC at `threshold`; returns which edges survive and the objective change each removal caused.

    `ctx` may be a list of contexts, one per prompt batch, or prompt batches (`Batches`, whose contexts are
    rebuilt one at a time for every evaluation): each objective is then the exact mean over all prompts.
    """
    if objective not in ("kl", "metric"):
        raise ValueError(f"objective {objective!r} is unknown: use 'kl' or 'metric'")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if isinstance(ctx, Prompts):  # prompt batches: one batch's context alive at a time
        contexts: Any = ctx.edge_contexts
        first = next(iter(contexts()))
    else:
        contexts = list(ctx) if isinstance(ctx, (list, tuple)) else [ctx]
        first = contexts[0]
    g = first.graph
    kept = torch.ones(g.n_edges)
    scores = torch.full((g.n_edges,), float("nan"))
    with torch.no_grad():
        clean_logprobs = []
        for c in (contexts() if callable(contexts) else contexts):
            clean_final = c.edge_runner.masked(c.pairs.clean_tokens, c.corrupt, g.mask(kept.unsqueeze(0)), **segments(c))
            clean_logits = _logits_at(c.edge_runner.runner, clean_final, c.read_positions)
            clean_logprobs.append(F.log_softmax(clean_logits.view(1, *c.read_positions.shape, -1), dim=-1)[0])
        if callable(contexts) and len(clean_logprobs) == 1:
            contexts = [first]  # one batch: keep its context
        ctx = contexts if callable(contexts) or len(contexts) > 1 else contexts[0]
        clean_logprobs = clean_logprobs if len(clean_logprobs) > 1 else clean_logprobs[0]
        current = _objective(ctx, kept.unsqueeze(0), objective, clean_logprobs)[0]
        forwards = 1
        receivers = list(range(g.n_receivers - 1, -1, -1))
        iterator: Any = receivers
        if progress:
            iterator = tqdm(receivers, desc="ACDC receivers", disable=None)  # a bar on a terminal only
        edge_recv = g.edge_receiver
        for receiver in iterator:
            incoming = torch.nonzero(edge_recv == receiver).flatten().tolist()
            node = g.receiver_names[receiver]
            if node != "logits" and not _has_outgoing(g, kept, node, g.receiver_channels[receiver]):
                for e in incoming:
                    kept[e] = 0.0
                continue
            for e in reversed(incoming):
                if kept[e] == 0:
                    continue
                trial = kept.clone()
                trial[e] = 0.0
                value = _objective(ctx, trial.unsqueeze(0), objective, clean_logprobs)[0]
                forwards += 1
                change = (value - current) if objective == "kl" else (value - current).abs()
                scores[e] = float(change)
                if change <= threshold:
                    kept, current = trial, value
    return ACDCResult(kept.bool(), scores, forwards)


def _has_outgoing(graph: Any, kept: Tensor, node: str, channel: str) -> bool:
    """Whether the node a receiver belongs to still sends along a kept edge (`<q>`, `<k>` and `<v>` receivers
    belong to their query head, also with grouped-query attention)."""
    return bool((kept[graph.edge_sender == graph.sender_index(node)] > 0).any())
