"""Per-head induction measurements on any bridge: attention scores, OV/QK eigenvalue scores, composition.

- Attention scores on repeated random tokens (`graphs.role_scores.repeated_token_scores`): previous-token,
  duplicate-token and prefix-matching (induction), each a mean attention probability in [0, 1], and
  `previous_token_top`, the share of query positions whose most-attended key is the previous token.
- OV copying score (`graphs.role_scores.copying_scores`): Σλ/Σ|λ| over the eigenvalues of W_E W_V W_O W_U
  (Olsson et al. 2022); +1 = the head copies the token it attends to, −1 = it suppresses it.
- QK matching score, Σλ/Σ|λ| of a vocab × vocab QK circuit: positive when a query token attends to keys
  carrying the same token. `qk_direct` is the direct circuit W_E W_Q W_Kᵀ W_Eᵀ (keys are raw tokens; a
  duplicate-token head matches there). `qk_matching` for a head in layer ≥ 1 goes through the earlier head
  with the highest previous-token score (`qk_via`), W_E W_Q W_Kᵀ (W_E W_V' W_O')ᵀ: the keys carry the
  *previous* token, so an induction head matches there (Elhage et al. 2021's K-composition term). Layer-0
  heads have no such path, so their `qk_matching` is `qk_direct`.
- Composition scores between heads of different layers (Elhage et al. 2021, arXiv mathematical framework):
  ‖M‖_F / (‖A‖_F ‖B‖_F) with M = W_OV^s W_QK^r (Q-composition), W_QK^r (W_OV^s)ᵀ (K-composition) and
  W_OV^s W_OV^r (V-composition), in the row-vector convention (resid @ W). 0 = the receiver cannot read what
  the sender writes; 1 = the maximum.

Norms: each reading matrix (W_Q, W_K, W_V) has its layer's input norm folded in (LN centring, then the
norm's weight); token embeddings are normalised per row as the first layer would see them (see
`graphs.role_scores`); W_U gets the final norm's weight. Per-token norm scales of deeper residual streams are
positive scalars and are left out: an approximation, stated, exact for models without norms. Rotary
models: the QK matrices are read at relative offset 0 (no rotation), which content-matching heads use
through their low-frequency rotary pairs; attention scores measured on prompts need no such caveat.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from torch import Tensor

from circuitlab.graphs.role_scores import (RepeatedTokens, copying_scores, eigen_score, kv_head, normed_embeddings,
                                           repeated_random_tokens, repeated_token_scores)
from circuitlab.patching.components import head_node

HEAD_COLUMNS = ["layer", "head", "previous_token", "previous_token_top", "duplicate_token", "induction", "ov_copying", "qk_direct",
                "qk_matching", "qk_via"]
COMPOSITION_COLUMNS = ["sender", "receiver", "sender_layer", "sender_head", "receiver_layer", "receiver_head",
                       "q_comp", "k_comp", "v_comp"]


@dataclass(frozen=True)
class ProbeOptions:
    """Repeated-random-token prompts for the attention scores: `n` sequences of `half` tokens drawn from
    `tokens` (default: the whole vocabulary), repeated once, after `bos_id` if given."""

    n: int = 32
    half: int = 40
    seed: int = 0
    tokens: tuple[int, ...] | None = None
    bos_id: int | None = None


def repeated_prompts(d_vocab: int, options: ProbeOptions = ProbeOptions()) -> RepeatedTokens:
    """`options.n` sequences of `half` distinct tokens from the allowed set, repeated: `[BOS] r r`."""
    return repeated_random_tokens(d_vocab, options.half, options.n, seed=int(options.seed), bos_id=options.bos_id,
                                  tokens=options.tokens)


# ------------------------------------------------------------------ norm folding

def _norm_type(model) -> str | None:
    return getattr(model.cfg, "normalization_type", None)


def _ln_weight(model, key: str) -> Tensor | None:
    state = model.state_dict()
    return state[key].detach().float() if key in state else None


def _reader(model, layer: int, weight: Tensor) -> Tensor:
    """A reading matrix [..., d_model, d_head] with the layer's input norm folded in (centring, then weight)."""
    w = weight.float()
    ln = _ln_weight(model, f"blocks.{layer}.ln1.weight")
    if ln is not None:
        w = ln[:, None] * w
    if _norm_type(model) in ("LN", "LNPre"):
        w = w - w.mean(dim=-2, keepdim=True)
    return w


def _qkv(model, layer: int, head: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(W_Q, W_K, W_V, W_O) of a head, the first three with the input norm folded in."""
    kv = kv_head(model, head)
    return (_reader(model, layer, model.W_Q.detach()[layer, head]), _reader(model, layer, model.W_K.detach()[layer, kv]),
            _reader(model, layer, model.W_V.detach()[layer, kv]), model.W_O.detach()[layer, head].float())


def qk_scores(model, head_scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per head: `qk_direct`, `qk_matching` and `qk_via` (see the module docstring).

    `head_scores` (with `layer`, `head`, `previous_token`) picks each layer-≥1 head's route; without it every
    earlier head is tried and the most positive score is kept.
    """
    rows = []
    for layer in range(model.cfg.n_layers):
        emb_q = normed_embeddings(model)
        for head in range(model.cfg.n_heads):
            wq, wk, _, _ = _qkv(model, layer, head)
            direct = eigen_score(emb_q @ wq, (emb_q @ wk).T)
            via, best = "", direct
            if layer > 0:
                candidates = [(l0, h0) for l0 in range(layer) for h0 in range(model.cfg.n_heads)]
                if head_scores is not None:
                    earlier = head_scores[head_scores["layer"] < layer]
                    top = earlier.sort_values("previous_token", ascending=False).iloc[0]
                    candidates = [(int(top["layer"]), int(top["head"]))]
                scored = []
                for l0, h0 in candidates:
                    _, _, wv0, wo0 = _qkv(model, l0, h0)
                    keys = (normed_embeddings(model) @ wv0 @ wo0) @ wk  # [vocab, d_head]: previous token's key
                    scored.append((eigen_score(emb_q @ wq, keys.T), head_node(l0, h0)))
                best, via = max(scored)
            rows.append({"layer": layer, "head": head, "qk_direct": direct, "qk_matching": best, "qk_via": via})
    return pd.DataFrame(rows, columns=["layer", "head", "qk_direct", "qk_matching", "qk_via"])


def composition_scores(model) -> pd.DataFrame:
    """Q-, K- and V-composition scores for every (sender, receiver) head pair with sender layer < receiver layer."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    mats = {(l, h): _qkv(model, l, h) for l in range(n_layers) for h in range(n_heads)}
    rows = []
    for (ls, hs), (_, _, wv_s, wo_s) in mats.items():
        ov_s = wv_s @ wo_s  # [d_model, d_model]
        for (lr, hr), (wq, wk, wv, wo) in mats.items():
            if lr <= ls:
                continue
            qk_r, ov_r = wq @ wk.T, wv @ wo
            denom_qk = float(qk_r.norm() * ov_s.norm())
            denom_ov = float(ov_r.norm() * ov_s.norm())

            def ratio(m: Tensor, d: float) -> float:
                return float(m.norm()) / d if d > 1e-12 else 0.0

            rows.append({"sender": head_node(ls, hs), "receiver": head_node(lr, hr), "sender_layer": ls,
                         "sender_head": hs, "receiver_layer": lr, "receiver_head": hr,
                         "q_comp": ratio(ov_s @ qk_r, denom_qk), "k_comp": ratio(qk_r @ ov_s.T, denom_qk),
                         "v_comp": ratio(ov_s @ ov_r, denom_ov)})
    return pd.DataFrame(rows, columns=COMPOSITION_COLUMNS)


def head_scores(model, probe: ProbeOptions = ProbeOptions()) -> pd.DataFrame:
    """One row per head with every column of `HEAD_COLUMNS` (attention, OV and QK scores)."""
    prompts = repeated_prompts(model.cfg.d_vocab, probe)
    attn = repeated_token_scores(model, prompts)
    copy = copying_scores(model, n_tokens=min(500, model.cfg.d_vocab))
    out = attn.merge(copy.rename(columns={"copying": "ov_copying"}), on=["layer", "head"])
    out = out.merge(qk_scores(model, attn), on=["layer", "head"])
    return out[HEAD_COLUMNS]


__all__ = ["COMPOSITION_COLUMNS", "HEAD_COLUMNS", "ProbeOptions", "composition_scores", "eigen_score", "head_scores",
           "qk_scores", "repeated_prompts"]
