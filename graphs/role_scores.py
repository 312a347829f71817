"""Measurements behind the head roles of `graphs.roles`: attention scores on repeated random tokens and on
IOI positions, OV copying scores, and direct logit attribution — measured on prompts through the bridge.

Direct logit attribution goes through the final norm as the field does (TransformerLens's `apply_ln`): a
head's output at END is centred (LayerNorm models: minus its mean over d_model), divided by the cached `ln_final.hook_scale` at END and multiplied by the final norm's weight before the
unembedding. The copying score applies the layer's input norm (centring for LN, RMS scaling, weight) to
each embedding row and the final norm's weight to W_U, but not the final norm's per-token scale (a
positive scalar per position that cannot change which tokens a head promotes): an approximation, since
raw bridges keep un-folded norms and a head in a deep layer reads a residual stream, not raw embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import pandas as pd
import torch
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.components import head_node, hook_name


# ------------------------------------------------------------------ prompts

@dataclass(frozen=True)
class RepeatedTokens:
    """Random token sequences repeated twice: `tokens[:, offset:offset+half]` equals the next `half`."""

    tokens: torch.Tensor
    half: int
    offset: int


def repeated_random_tokens(d_vocab: int, half: int, batch: int, *, seed: int = 0, bos_id: int | None = None,
                           low: int = 0, high: int | None = None,
                           tokens: tuple[int, ...] | None = None) -> RepeatedTokens:
    """`batch` sequences of `half` distinct random tokens, repeated (`[BOS] r r`); BOS first if given.

    Tokens come from `tokens` if given, else from [low, high); never the BOS token. Tokens within a half are
    distinct, so the only duplicates are the repeat itself.
    """
    high = d_vocab if high is None else high
    allowed = torch.tensor(tokens, dtype=torch.long) if tokens is not None else torch.arange(low, high)
    if bos_id is not None:
        allowed = allowed[allowed != bos_id]
    if len(allowed) < half:
        where = "the allowed tokens" if tokens is not None else f"[{low}, {high})"
        raise ValueError(f"need at least half={half} distinct tokens in {where}; only {len(allowed)} (BOS excluded)")
    gen = torch.Generator().manual_seed(seed)
    first = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:half]] for _ in range(batch)])
    parts = [first, first]
    if bos_id is not None:
        parts.insert(0, torch.full((batch, 1), bos_id, dtype=torch.long))
    return RepeatedTokens(torch.cat(parts, dim=1).long(), half, 1 if bos_id is not None else 0)


@dataclass(frozen=True)
class IOIPrompts:
    """IOI prompts as tokens plus per-prompt positions (`END`, `IO`, `S1`, `S2`, optional `S1+1`) and the
    IO and S token ids (default: the tokens at the IO and S1 positions)."""

    tokens: torch.Tensor
    positions: Mapping[str, torch.Tensor]
    io_ids: torch.Tensor | None = None
    s_ids: torch.Tensor | None = None

    def ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(self.tokens.shape[0])
        io = self.io_ids if self.io_ids is not None else self.tokens[rows, self.positions["IO"]]
        s = self.s_ids if self.s_ids is not None else self.tokens[rows, self.positions["S1"]]
        io, s = io.long(), s.long()
        io = io[:, 0] if io.ndim == 2 else io  # tasks give [batch, n_answers]: the first is the answer
        s = s[:, 0] if s.ndim == 2 else s
        return io, s


def _check_ioi(prompts: IOIPrompts) -> None:
    for key in ("END", "IO", "S1", "S2"):
        if key not in prompts.positions:
            raise ValueError(f"IOI prompts lack position {key!r}; have {list(prompts.positions)}")
        if prompts.positions[key].shape[0] != prompts.tokens.shape[0]:
            raise ValueError(f"positions[{key!r}] has {prompts.positions[key].shape[0]} entries for "
                             f"{prompts.tokens.shape[0]} prompts")


# ------------------------------------------------------------------ helpers

def _norm_weights(model: Any) -> dict[str, torch.Tensor]:
    """The norm weights of a bridge (`blocks.{l}.ln1.weight`, `ln_final.weight`), empty without norms."""
    return {k: v.detach() for k, v in model.state_dict().items()
            if k == "ln_final.weight" or (k.startswith("blocks.") and k.endswith(".ln1.weight"))}


def kv_head(model: TransformerBridge, head: int) -> int:
    """The key/value head that query head `head` reads (grouped-query attention; the head itself without)."""
    n_heads = model.cfg.n_heads
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or n_heads
    return head // (n_heads // n_kv)


def eigen_score(left: torch.Tensor, right: torch.Tensor) -> float:
    """Σλ/Σ|λ| over the eigenvalues of `left @ right` ([n, k] @ [k, n]), via the small k × k product (the
    non-zero eigenvalues of AB and BA agree); 0 when every eigenvalue is ~0."""
    eig = torch.linalg.eigvals(right.double() @ left.double())
    total = float(eig.abs().sum())
    return float(eig.real.sum()) / total if total > 1e-12 else 0.0


def _heads(model: Any) -> list[tuple[int, int]]:
    return [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]


def _patterns(model: Any, tokens: torch.Tensor, extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    names = {hook_name("pattern", layer) for layer in range(model.cfg.n_layers)} | set(extra)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {k: cache[k] for k in names}


def head_patterns(model: TransformerBridge, prompts: list[torch.Tensor], heads: list[tuple[int, int]]) -> pd.DataFrame:
    """The attention patterns of `heads` on each prompt (1-D token ids, each run alone so no padding enters):
    one row per prompt, head (`node`), query and key position (key <= query), with the weight and both tokens
    (decoded, or `<id>` for a model without a tokenizer)."""
    rows = []
    for index, tokens in enumerate(prompts):
        cache = _patterns(model, tokens.reshape(1, -1))
        ids = tokens.reshape(-1)
        words = ([str(w) for w in model.to_str_tokens(ids)] if getattr(model, "tokenizer", None) is not None
                 else [f"<{int(t)}>" for t in ids])  # a model saved without a tokenizer: token ids
        for layer, head in heads:
            pattern = cache[hook_name("pattern", layer)][0, head].float().cpu()
            query, key = torch.tril_indices(len(words), len(words))
            rows.append(pd.DataFrame({"prompt": index, "node": head_node(layer, head), "query": query.numpy(),
                                      "key": key.numpy(), "weight": pattern[query, key].numpy(),
                                      "query_token": [words[q] for q in query.tolist()],
                                      "key_token": [words[k] for k in key.tolist()]}))
    columns = ["prompt", "node", "query", "key", "weight", "query_token", "key_token"]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)


# ------------------------------------------------------------------ scores

def repeated_token_scores(model: TransformerBridge, prompts: RepeatedTokens) -> pd.DataFrame:
    """Per head: previous-token, duplicate-token and induction (prefix-matching) attention scores.

    Each is a mean attention probability. `previous_token_top` is the share of query positions at which the
    previous token gets strictly more attention than any other key (a head that spreads its attention over the
    last few tokens but favours i−1 is a previous-token head by that share, whatever its mean)."""
    tokens, half, off = prompts.tokens, prompts.half, prompts.offset
    if tokens.shape[1] != off + 2 * half:
        raise ValueError(f"tokens have length {tokens.shape[1]}, expected offset+2*half = {off + 2 * half}")
    cache = _patterns(model, tokens)
    second = torch.arange(off + half, off + 2 * half)
    prev_q = torch.arange(off + 1, off + 2 * half)
    rows = []
    for layer in range(model.cfg.n_layers):
        pattern = cache[hook_name("pattern", layer)].float()  # [batch, head, dest, src]
        prev_w = pattern[:, :, prev_q, prev_q - 1]  # [batch, head, query]
        prev = prev_w.mean(dim=(0, 2))
        rest = pattern[:, :, prev_q].clone()
        rest[:, :, torch.arange(len(prev_q)), prev_q - 1] = -1.0
        prev_top = (prev_w > rest.amax(-1)).float().mean(dim=(0, 2))
        dup = pattern[:, :, second, second - half].mean(dim=(0, 2))
        ind = pattern[:, :, second, second - half + 1].mean(dim=(0, 2))
        for head in range(model.cfg.n_heads):
            rows.append({"layer": layer, "head": head, "previous_token": float(prev[head]),
                         "previous_token_top": float(prev_top[head]),
                         "duplicate_token": float(dup[head]), "induction": float(ind[head])})
    return pd.DataFrame(rows)


def normed_embeddings(model: TransformerBridge, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Token embeddings (all, or the given `rows` of W_E) normalised per row as a first layer's input norm would
    (LayerNorm: centred, then scaled; RMSNorm: scaled), before the norm's weight; unchanged without norms."""
    emb = model.W_E.detach().float() if rows is None else rows.float()
    norm = getattr(model.cfg, "normalization_type", None)
    if norm in ("LN", "LNPre"):
        emb = emb - emb.mean(dim=-1, keepdim=True)
    if norm is not None:
        emb = emb / (emb.pow(2).mean(dim=-1, keepdim=True) + float(getattr(model.cfg, "eps", 1e-5))).sqrt()
    return emb


def copying_scores(model: TransformerBridge, heads: list[tuple[int, int]] | None = None, *, n_tokens: int = 500,
                   seed: int = 0) -> pd.DataFrame:
    """Per head: OV copying score sum(λ)/sum(|λ|) of W_E[S] W_V W_O W_U[:, S] for a token sample S.

    The non-zero eigenvalues of (E V)(O U) equal those of (O U)(E V), a d_head × d_head matrix, so the
    score is exact for the sample and cheap for large vocabularies. Norms: see the module docstring.
    """
    heads = _heads(model) if heads is None else heads
    d_vocab = model.cfg.d_vocab
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randperm(d_vocab, generator=gen)[: min(n_tokens, d_vocab)]
    W_E = model.W_E.detach()[sample].float()
    W_U = model.W_U.detach()[:, sample].float()
    norms = _norm_weights(model)
    final_w = norms.get("ln_final.weight")
    if final_w is not None:
        W_U = final_w.float()[:, None] * W_U
    normed = normed_embeddings(model, W_E)
    W_V, W_O = model.W_V.detach().float(), model.W_O.detach().float()
    rows = []
    for layer, head in heads:
        emb = normed
        ln1 = norms.get(f"blocks.{layer}.ln1.weight")
        if ln1 is not None:
            emb = emb * ln1.float()
        score = eigen_score(emb @ W_V[layer, kv_head(model, head)], W_O[layer, head] @ W_U)
        rows.append({"layer": layer, "head": head, "copying": score})
    return pd.DataFrame(rows, columns=["layer", "head", "copying"])


def ioi_batches(prompts: IOIPrompts, batch_size: int | None) -> list[tuple[slice, IOIPrompts]]:
    """Consecutive batches of at most `batch_size` prompts (None: one), with the slice each one covers."""
    n = int(prompts.tokens.shape[0])
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = n if batch_size is None else min(batch_size, max(n, 1))
    out = []
    for start in range(0, n, max(size, 1)):
        sl = slice(start, min(start + size, n))
        out.append((sl, IOIPrompts(prompts.tokens[sl], {k: v[sl] for k, v in prompts.positions.items()},
                                   None if prompts.io_ids is None else prompts.io_ids[sl],
                                   None if prompts.s_ids is None else prompts.s_ids[sl])))
    return out


def mean_over_batches(frames: list[pd.DataFrame], sizes: list[int]) -> pd.DataFrame:
    """Per-batch frames of means over prompts (same rows) -> the mean over every prompt: Σ n_b · frame_b / n."""
    out = frames[0].copy()
    columns = [c for c in out.columns if c not in ("layer", "head")]
    total = sum(sizes)
    out[columns] = sum(f[columns].to_numpy(dtype="float64") * (n / total) for f, n in zip(frames, sizes))
    return out


Hooks = list | Callable[[IOIPrompts], list] | None


def ioi_head_scores(model: TransformerBridge, prompts: IOIPrompts, *, fwd_hooks: Hooks = None,
                    final_scale: torch.Tensor | None = None, batch_size: int | None = None) -> pd.DataFrame:
    """Per head on IOI prompts: attention END→IO, END→S2, S2→S1, S2→S1+1, S1+1→S1, and the direct logit
    attribution of the head's END output onto W_U[IO] − W_U[S] (mean over prompts).

    `fwd_hooks` run during the forward (ablations): a list, or a function of a batch's prompts giving one (for
    hooks that index prompts); `final_scale` [batch] freezes the final norm's scale at END (e.g. to the clean
    run's), so DLA changes reflect the heads and not the norm. `batch_size` runs the prompts in batches (memory
    flat in their number) and averages exactly over them.
    """
    _check_ioi(prompts)
    if batch_size is not None and batch_size < prompts.tokens.shape[0]:
        parts = ioi_batches(prompts, batch_size)
        frames = [ioi_head_scores(model, part, fwd_hooks=fwd_hooks,
                                  final_scale=None if final_scale is None else final_scale[sl]) for sl, part in parts]
        return mean_over_batches(frames, [sl.stop - sl.start for sl, _ in parts])
    if callable(fwd_hooks):
        fwd_hooks = fwd_hooks(prompts)
    L = model.cfg.n_layers
    names = {hook_name("pattern", layer) for layer in range(L)} | {hook_name("z", layer) for layer in range(L)}
    names.add("ln_final.hook_scale")
    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks or []):
        _, cache = model.run_with_cache(prompts.tokens, names_filter=lambda n: n in names)
    rows_idx = torch.arange(prompts.tokens.shape[0])
    pos = {k: v.long() for k, v in prompts.positions.items()}
    s1p1 = pos.get("S1+1", pos["S1"] + 1)
    io, s = prompts.ids()
    direction = (model.W_U.detach()[:, io] - model.W_U.detach()[:, s]).T.float()  # [batch, d_model]
    final_w = _norm_weights(model).get("ln_final.weight")
    if final_w is not None:
        direction = direction * final_w.float()
    if final_scale is not None:
        scale = final_scale.reshape(-1, 1).float()
    elif "ln_final.hook_scale" in cache:
        scale = cache["ln_final.hook_scale"][rows_idx, pos["END"]].reshape(-1, 1).float()
    else:  # models without a final norm
        scale = torch.ones(prompts.tokens.shape[0], 1)
    centred = str(getattr(model.cfg, "normalization_type", None) or "") in ("LN", "LNPre")
    out = []
    for layer in range(L):
        pattern = cache[hook_name("pattern", layer)].float()
        z_end = cache[hook_name("z", layer)][rows_idx, pos["END"]].float()  # [batch, head, d_head]
        head_out = torch.einsum("bhd,hdm->bhm", z_end, model.W_O.detach()[layer].float())
        if centred:  # LayerNorm subtracts the mean over d_model: linear, so it applies to each head's share
            head_out = head_out - head_out.mean(dim=-1, keepdim=True)
        head_out = head_out / scale[:, :, None]
        dla = torch.einsum("bhm,bm->bh", head_out, direction).mean(0)

        def attn(dest: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
            return pattern[rows_idx, :, dest, src].mean(0)

        a_io, a_s2 = attn(pos["END"], pos["IO"]), attn(pos["END"], pos["S2"])
        a_dup, a_ind, a_prev = attn(pos["S2"], pos["S1"]), attn(pos["S2"], s1p1), attn(s1p1, pos["S1"])
        for head in range(model.cfg.n_heads):
            out.append({"layer": layer, "head": head, "attn_end_io": float(a_io[head]),
                        "attn_end_s2": float(a_s2[head]), "attn_s2_s1": float(a_dup[head]),
                        "attn_s2_s1p1": float(a_ind[head]), "attn_s1p1_s1": float(a_prev[head]),
                        "dla_io_minus_s": float(dla[head])})
    return pd.DataFrame(out)


def final_norm_scale(model: TransformerBridge, prompts: IOIPrompts, *,
                     batch_size: int | None = None) -> torch.Tensor | None:
    """The final norm's scale at END per prompt ([batch]), or None for models without a final norm."""
    scales = []
    for _, part in ioi_batches(prompts, batch_size):
        with torch.no_grad():
            _, cache = model.run_with_cache(part.tokens, names_filter=lambda n: n == "ln_final.hook_scale")
        if "ln_final.hook_scale" not in cache:
            return None
        rows = torch.arange(part.tokens.shape[0])
        scales.append(cache["ln_final.hook_scale"][rows, part.positions["END"].long()].reshape(-1))
    return torch.cat(scales)


def z_end_mean(model: TransformerBridge, prompts: IOIPrompts, layer: int, *, fwd_hooks: Hooks = None,
               batch_size: int | None = None) -> torch.Tensor:
    """The mean over every prompt of `layer`'s per-head `z` at END [head, d_head], summed over batches."""
    total = None
    for _, part in ioi_batches(prompts, batch_size):
        hooks = fwd_hooks(part) if callable(fwd_hooks) else (fwd_hooks or [])
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            _, cache = model.run_with_cache(part.tokens, names_filter=lambda n: n == hook_name("z", layer))
        rows = torch.arange(part.tokens.shape[0])
        z = cache[hook_name("z", layer)][rows, part.positions["END"].long()].double().sum(0)
        total = z if total is None else total + z
    return total / prompts.tokens.shape[0]
