"""A hand-wired 2-layer attention-only induction model whose every score is known in advance.

Residual stream (no norms): [token one-hot (V) | position one-hot (n_ctx) | previous token (V) | output (V)].
- a0.h0, previous-token head: query position i matches key position i−1; copies the key's token one-hot
  into the previous-token subspace. OV copying score 0 (it writes nothing W_U reads).
- a0.h1, duplicate-token head: query token matches key token; its W_O is zero (it writes nothing).
- a1.h0, induction head: query token matches the key's previous-token subspace (K-composition with a0.h0);
  copies the key's token one-hot into the output subspace, which W_U reads: OV = identity, copying score 1.
- a1.h1: all zeros (uniform attention, writes nothing).
"""

from __future__ import annotations

import torch

from circuitlab.patching.models import boot_native_model

V, N_CTX, SCALE = 8, 24, 60.0
D_HEAD = max(V, N_CTX)
D_MODEL = V + N_CTX + V + V
TOK, POS, PREV, OUT = 0, V, V + N_CTX, V + N_CTX + V


def induction_model():
    """The hand-wired model as a TL-native bridge (eval mode)."""
    model = boot_native_model(dict(n_layers=2, d_model=D_MODEL, n_heads=2, d_head=D_HEAD, d_vocab=V, n_ctx=N_CTX,
                                   attn_only=True, normalization_type=None, positional_embedding_type="standard",
                                   seed=0))
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    state["embed.weight"][torch.arange(V), TOK + torch.arange(V)] = 1.0
    state["pos_embed.weight"][torch.arange(N_CTX), POS + torch.arange(N_CTX)] = 1.0
    state["unembed.weight"][torch.arange(V), OUT + torch.arange(V)] = 20.0  # confident copies
    big = SCALE * D_HEAD ** 0.5

    def rows(head: int) -> slice:
        return slice(head * D_HEAD, (head + 1) * D_HEAD)

    # nn.Linear weights are [out, in]: q/k/v map d_model -> heads*d_head, o maps heads*d_head -> d_model.
    q0, k0 = state["blocks.0.attn.q.weight"], state["blocks.0.attn.k.weight"]
    v0, o0 = state["blocks.0.attn.v.weight"], state["blocks.0.attn.o.weight"]
    for i in range(N_CTX):  # a0.h0: query at i -> direction i; key at j -> direction j+1
        q0[rows(0)][i, POS + i] = big
        if i + 1 < D_HEAD:
            k0[rows(0)][i + 1, POS + i] = 1.0
    for t in range(V):
        v0[rows(0)][t, TOK + t] = 1.0
        o0[PREV + t, rows(0)][t] = 1.0
        q0[rows(1)][t, TOK + t] = big  # a0.h1: duplicate token (writes nothing)
        k0[rows(1)][t, TOK + t] = 1.0
    q1, k1 = state["blocks.1.attn.q.weight"], state["blocks.1.attn.k.weight"]
    v1, o1 = state["blocks.1.attn.v.weight"], state["blocks.1.attn.o.weight"]
    for t in range(V):
        q1[rows(0)][t, TOK + t] = big
        k1[rows(0)][t, PREV + t] = 1.0
        v1[rows(0)][t, TOK + t] = 1.0
        o1[OUT + t, rows(0)][t] = 1.0
    model.load_state_dict(state, strict=False)
    return model
