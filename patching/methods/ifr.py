"""Information flow routes (Ferrando & Voita 2024, arXiv 2403.00824) as a method, `ifr`: one clean forward, no
gradients, no corrupted run.

A receiver's input is the sum of its senders' contributions, y = Σ_j c_j (the edge graph's senders: the
embedding, every earlier head's share of the attention output and every earlier MLP output; biases belong to no
sender). Each sender's proximity to the input is max(‖y‖₁ − ‖y − c_j‖₁, 0) (as in ALTI, Ferrando et al. 2022),
normalised to sum to 1 over the receiver's senders, at every prompt and position. An edge's score is that
importance averaged over each prompt's real (unpadded) positions, then over prompts, so it lies in [0, 1] and
a receiver's incoming scores sum to 1. The q, k and v inputs of a head read the same stream, so they score alike.
"""

import torch
from torch import Tensor

from circuitlab.patching.engine import EngineContext
from circuitlab.patching.methods.registry import Method, MethodOptions, MethodScores, register
from circuitlab.patching.prompts import Prompts


def proximity_importance(senders: Tensor, n_prev: int, mask: Tensor) -> Tensor:
    """Importance [n_prev] of the first `n_prev` senders ([batch, pos, n_senders, d]) for the receiver whose input
    is their sum: per position normalised proximity, averaged over each prompt's real positions (`mask` [batch,
    pos], 1 = real), then over prompts."""
    parts = senders[:, :, :n_prev].double()
    total = parts.sum(2, keepdim=True)  # y [b, p, 1, d]
    proximity = (total.abs().sum(-1) - (total - parts).abs().sum(-1)).clamp(min=0.0)  # [b, p, n_prev]
    norm = proximity.sum(-1, keepdim=True)
    share = torch.where(norm > 0, proximity / norm.clamp(min=torch.finfo(norm.dtype).tiny), torch.zeros_like(proximity))
    weights = mask.double() / mask.double().sum(1, keepdim=True).clamp(min=1.0)  # each prompt's real positions
    return torch.einsum("bpn,bp->n", share, weights) / senders.shape[0]


def ifr_scores(ctx: EngineContext) -> Tensor:
    """Information-flow-routes edge scores [n_edges] on one prompt batch (its clean run), in edge order."""
    g, senders = ctx.graph, ctx.clean.senders
    mask = ctx.pairs.attention_mask
    mask = torch.ones(senders.shape[:2], device=senders.device) if mask is None else mask.to(senders.device)
    matrix = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
    by_prefix: dict[int, list[int]] = {}
    for receiver in range(g.n_receivers):
        by_prefix.setdefault(g.senders_before(receiver), []).append(receiver)
    with torch.no_grad():
        for n_prev, receivers in by_prefix.items():
            matrix[:n_prev, receivers] = proximity_importance(senders, n_prev, mask).cpu().unsqueeze(1)
    return matrix[g.edge_sender, g.edge_receiver]


def score(prompts: Prompts, options: MethodOptions) -> MethodScores:
    return MethodScores(edges=prompts.weighted(ifr_scores))


IFR = register(Method("ifr", "edge", False, "information flow routes: share of the sender's contribution in the "
                      "receiver's input, max(|y|_1 - |y - c_j|_1, 0) normalised over senders (one clean forward)",
                      score, benchmark=False, leaderboard_order=2))
# not in `bench methods`' default: `--methods ifr`; not yet in the committed grid
