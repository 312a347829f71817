"""Role detectors for attention heads, measured on prompts through the bridge — never read off head indices.

Every detector returns a tidy DataFrame with columns `layer`, `head`, `role`, `score`, `threshold`,
`evidence` (JSON string) holding the heads whose score reaches the threshold; the `*_scores` functions
return the raw per-head measurements for every head. `assign_roles` writes them onto circuit nodes.

Scores (attention scores are mean attention probabilities, in [0, 1]; a uniform head scores ~1/T):

| role                  | score                                                                              |
|-----------------------|------------------------------------------------------------------------------------|
| previous_token        | attention from position i to i-1 on repeated random tokens                        |
| duplicate_token       | attention from a token of the repeat to its earlier occurrence                     |
| induction             | prefix matching: attention from a repeated token to the token after its earlier   |
|                       | occurrence (Olsson et al. 2022, arXiv 2209.11895); role also needs copying > 0     |
| copying (evidence)    | OV-circuit copying: sum(λ)/sum(|λ|) of the eigenvalues of W_E W_V W_O W_U on a     |
|                       | token sample (Olsson et al.); +1 = pure copying, −1 = pure anti-copying            |
| name_mover            | attention END→IO ≥ attention threshold and direct logit attribution onto IO−S ≥    |
|                       | DLA threshold (Wang et al. 2022, arXiv 2211.00593); score = DLA                    |
| negative_name_mover   | same attention, DLA ≤ −threshold; score = −DLA                                     |
| s_suppression         | attends END→S2 (≥ attention threshold, more than to IO) and DLA ≥ threshold: lowers|
|                       | the subject's logit (copy suppression, arXiv 2310.04625); our addition             |
| backup_name_mover     | DLA onto IO−S rises by ≥ threshold when the name movers are mean-ablated at END,   |
|                       | and the head then attends END→IO; score = the rise                                 |
| s_inhibition          | path patching: summed signed effect of the head on name movers' queries (channel |
|                       | q); the summed |effect| is shown as evidence (`abs_effect`)                        |

Direct logit attribution goes through the final norm as the field does (TransformerLens's `apply_ln`): a
head's output at END is centred (LayerNorm models: minus its mean over d_model), divided by the cached `ln_final.hook_scale` at END and multiplied by the final norm's weight before the
unembedding. The copying score applies the layer's input norm (centring for LN, RMS scaling, weight) to
each embedding row and the final norm's weight to W_U, but not the final norm's per-token scale (a
positive scalar per position that cannot change which tokens a head promotes): an approximation, since
raw bridges keep un-folded norms and a head in a deep layer reads a residual stream, not raw embeddings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import networkx as nx
import pandas as pd
import torch

from circuitlab.patching.components import head_node, hook_name, parse_node

ROLES = ("name_mover", "negative_name_mover", "backup_name_mover", "s_suppression", "s_inhibition", "induction",
         "duplicate_token", "previous_token")
ROLE_COLUMNS = ["layer", "head", "role", "score", "threshold", "evidence"]


@dataclass(frozen=True)
class RoleThresholds:
    """Thresholds of the role scores (see the module docstring for what each score is)."""

    previous_token: float = 0.4
    duplicate_token: float = 0.3
    induction: float = 0.3
    copying: float = 0.0
    name_mover_attention: float = 0.2
    name_mover_dla: float = 0.1
    backup_dla_increase: float = 0.05
    s_inhibition: float = 0.05


# ------------------------------------------------------------------ prompts

@dataclass(frozen=True)
class RepeatedTokens:
    """Random token sequences repeated twice: `tokens[:, offset:offset+half]` equals the next `half`."""

    tokens: torch.Tensor
    half: int
    offset: int


def repeated_random_tokens(d_vocab: int, half: int, batch: int, *, seed: int = 0, bos_id: int | None = None,
                           low: int = 0, high: int | None = None) -> RepeatedTokens:
    """`batch` sequences of `half` distinct random tokens from [low, high), repeated; BOS first if given.

    Tokens within a half are distinct, so the only duplicates are the repeat itself.
    """
    high = d_vocab if high is None else high
    if high - low < half:
        raise ValueError(f"need at least half={half} distinct tokens in [{low}, {high})")
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(high - low, generator=gen)[:half] + low for _ in range(batch)]
    first = torch.stack(rows)
    parts = [first, first]
    if bos_id is not None:
        parts.insert(0, torch.full((batch, 1), bos_id, dtype=torch.long))
    return RepeatedTokens(torch.cat(parts, dim=1).long(), half, 1 if bos_id is not None else 0)


# ------------------------------------------------------------------ helpers

def _norm_weights(model: Any) -> dict[str, torch.Tensor]:
    """The norm weights of a bridge (`blocks.{l}.ln1.weight`, `ln_final.weight`), empty without norms."""
    return {k: v.detach() for k, v in model.state_dict().items()
            if k == "ln_final.weight" or (k.startswith("blocks.") and k.endswith(".ln1.weight"))}


def _kv_index(model: Any, head: int) -> int:
    n_heads = model.cfg.n_heads
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or n_heads
    return head // (n_heads // n_kv)


def _heads(model: Any) -> list[tuple[int, int]]:
    return [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]


def _rows(df: pd.DataFrame, role: str, column: str, threshold: float, evidence_columns: list[str],
          sign: float = 1.0, extra: pd.Series | None = None) -> pd.DataFrame:
    """Rows of `df` whose `sign * column` reaches the threshold (and `extra`, a boolean mask, if given)."""
    keep = sign * df[column] >= threshold
    if extra is not None:
        keep &= extra
    out = []
    for _, row in df[keep].iterrows():
        evidence = {c: _plain(row[c]) for c in evidence_columns if c in row and not _is_nan(row[c])}
        out.append({"layer": int(row["layer"]), "head": int(row["head"]), "role": role,
                    "score": float(sign * row[column]), "threshold": float(threshold),
                    "evidence": json.dumps(evidence, sort_keys=True)})
    return pd.DataFrame(out, columns=ROLE_COLUMNS).sort_values("score", ascending=False, ignore_index=True)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and value != value


def _plain(value: Any) -> Any:
    if isinstance(value, (float, int, str, bool)) or value is None:
        return round(value, 6) if isinstance(value, float) else value
    if hasattr(value, "item"):
        return round(float(value.item()), 6)
    return value


def _patterns(model: Any, tokens: torch.Tensor, extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    names = {hook_name("pattern", layer) for layer in range(model.cfg.n_layers)} | set(extra)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {k: cache[k] for k in names}


# ------------------------------------------------------------------ repeated-token roles

def repeated_token_scores(model: Any, prompts: RepeatedTokens) -> pd.DataFrame:
    """Per head: previous-token, duplicate-token and induction (prefix-matching) attention scores."""
    tokens, half, off = prompts.tokens, prompts.half, prompts.offset
    if tokens.shape[1] != off + 2 * half:
        raise ValueError(f"tokens have length {tokens.shape[1]}, expected offset+2*half = {off + 2 * half}")
    cache = _patterns(model, tokens)
    second = torch.arange(off + half, off + 2 * half)
    prev_q = torch.arange(off + 1, off + 2 * half)
    rows = []
    for layer in range(model.cfg.n_layers):
        pattern = cache[hook_name("pattern", layer)].float()  # [batch, head, dest, src]
        prev = pattern[:, :, prev_q, prev_q - 1].mean(dim=(0, 2))
        dup = pattern[:, :, second, second - half].mean(dim=(0, 2))
        ind = pattern[:, :, second, second - half + 1].mean(dim=(0, 2))
        for head in range(model.cfg.n_heads):
            rows.append({"layer": layer, "head": head, "previous_token": float(prev[head]),
                         "duplicate_token": float(dup[head]), "induction": float(ind[head])})
    return pd.DataFrame(rows)


def copying_scores(model: Any, heads: list[tuple[int, int]] | None = None, *, n_tokens: int = 500,
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
    norm = getattr(model.cfg, "normalization_type", None)
    eps = float(getattr(model.cfg, "eps", 1e-5))
    W_V, W_O = model.W_V.detach().float(), model.W_O.detach().float()
    rows = []
    for layer, head in heads:
        emb = W_E
        if norm in ("LN", "LNPre"):
            emb = emb - emb.mean(dim=-1, keepdim=True)
        if norm is not None:
            emb = emb / (emb.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()
        ln1 = norms.get(f"blocks.{layer}.ln1.weight")
        if ln1 is not None:
            emb = emb * ln1.float()
        small = (W_O[layer, head] @ W_U) @ (emb @ W_V[layer, _kv_index(model, head)])  # [d_head, d_head]
        eig = torch.linalg.eigvals(small.double())
        total = eig.abs().sum().item()
        score = eig.real.sum().item() / total if total > 0 else 0.0
        rows.append({"layer": layer, "head": head, "copying": score})
    return pd.DataFrame(rows, columns=["layer", "head", "copying"])


def detect_repeated_token_roles(model: Any, prompts: RepeatedTokens,
                                thresholds: RoleThresholds = RoleThresholds(), *,
                                with_copying: bool = True) -> pd.DataFrame:
    """Previous-token, duplicate-token and induction heads measured on repeated random tokens.

    An induction head needs prefix matching ≥ `thresholds.induction` and (with `with_copying`) an OV
    copying score > `thresholds.copying`.
    """
    scores = repeated_token_scores(model, prompts)
    evidence = ["previous_token", "duplicate_token", "induction"]
    if with_copying:
        candidates = scores[scores["induction"] >= thresholds.induction]
        copy = copying_scores(model, list(zip(candidates["layer"], candidates["head"])))
        scores = scores.merge(copy, on=["layer", "head"], how="left")
        evidence.append("copying")
    meta = {"prompts": int(prompts.tokens.shape[0]), "half": prompts.half}
    frames = [
        _rows(scores, "previous_token", "previous_token", thresholds.previous_token, evidence),
        _rows(scores, "duplicate_token", "duplicate_token", thresholds.duplicate_token, evidence),
        _rows(scores, "induction", "induction", thresholds.induction, evidence,
              extra=(scores["copying"] > thresholds.copying) if with_copying else None),
    ]
    out = pd.concat([f for f in frames if not f.empty] or [frames[0]], ignore_index=True)
    out["evidence"] = [json.dumps({**json.loads(e), **meta, "measured_on": "repeated random tokens"},
                                  sort_keys=True) for e in out["evidence"]]
    return out


# ------------------------------------------------------------------ IOI roles

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


def ioi_head_scores(model: Any, prompts: IOIPrompts, *, fwd_hooks: list | None = None,
                    final_scale: torch.Tensor | None = None) -> pd.DataFrame:
    """Per head on IOI prompts: attention END→IO, END→S2, S2→S1, S2→S1+1, S1+1→S1, and the direct logit
    attribution of the head's END output onto W_U[IO] − W_U[S] (mean over prompts).

    `fwd_hooks` run during the forward (ablations); `final_scale` [batch] freezes the final norm's scale
    at END (e.g. to the clean run's), so DLA changes reflect the heads and not the norm.
    """
    _check_ioi(prompts)
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


def final_norm_scale(model: Any, prompts: IOIPrompts) -> torch.Tensor | None:
    """The final norm's scale at END per prompt ([batch]), or None for models without a final norm."""
    with torch.no_grad():
        _, cache = model.run_with_cache(prompts.tokens, names_filter=lambda n: n == "ln_final.hook_scale")
    if "ln_final.hook_scale" not in cache:
        return None
    rows = torch.arange(prompts.tokens.shape[0])
    return cache["ln_final.hook_scale"][rows, prompts.positions["END"].long()].reshape(-1)


def detect_name_movers(scores: pd.DataFrame, thresholds: RoleThresholds = RoleThresholds(), *,
                       include_s_suppression: bool = True) -> pd.DataFrame:
    """Name movers and negative name movers from `ioi_head_scores`: attend END→IO and push the IO−S
    logit difference up (name mover) or down (negative name mover).

    With `include_s_suppression`, heads that attend END→S2 (more than END→IO) and raise IO−S are labelled
    `s_suppression`: they lower the subject's logit, the copy-suppression behaviour of McDougall et al.
    2023 (arXiv 2310.04625). Not one of Wang et al.'s GPT-2 classes; our addition, since SmolLM2 has them.
    """
    attends = scores["attn_end_io"] >= thresholds.name_mover_attention
    ev = ["attn_end_io", "attn_end_s2", "dla_io_minus_s"]
    nm = _rows(scores, "name_mover", "dla_io_minus_s", thresholds.name_mover_dla, ev, extra=attends)
    neg = _rows(scores, "negative_name_mover", "dla_io_minus_s", thresholds.name_mover_dla, ev, sign=-1.0,
                extra=attends)
    frames = [nm, neg]
    if include_s_suppression:
        on_s2 = (scores["attn_end_s2"] >= thresholds.name_mover_attention) & (scores["attn_end_s2"] > scores["attn_end_io"])
        frames.append(_rows(scores, "s_suppression", "dla_io_minus_s", thresholds.name_mover_dla, ev, extra=on_s2))
    return _with_meta(pd.concat(frames, ignore_index=True), {"measured_on": "IOI prompts"})


def detect_ioi_attention_roles(scores: pd.DataFrame, thresholds: RoleThresholds = RoleThresholds()) -> pd.DataFrame:
    """Duplicate-token (S2→S1), induction (S2→S1+1) and previous-token (S1+1→S1) heads measured at the
    IOI positions of `ioi_head_scores` — the task-specific counterpart of `detect_repeated_token_roles`."""
    ev = ["attn_s2_s1", "attn_s2_s1p1", "attn_s1p1_s1"]
    frames = [_rows(scores, "duplicate_token", "attn_s2_s1", thresholds.duplicate_token, ev),
              _rows(scores, "induction", "attn_s2_s1p1", thresholds.induction, ev),
              _rows(scores, "previous_token", "attn_s1p1_s1", thresholds.previous_token, ev)]
    return _with_meta(pd.concat(frames, ignore_index=True), {"measured_on": "IOI prompts"})


def detect_backup_name_movers(model: Any, prompts: IOIPrompts, name_movers: list[tuple[int, int]],
                              thresholds: RoleThresholds = RoleThresholds(),
                              clean_scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """Heads that take over when the name movers are knocked out (Wang et al. §3.4).

    The name movers' outputs at END are mean-ablated (replaced by their mean over the prompts; Wang et
    al. use the mean over an ABC dataset) with the final norm's scale frozen to the clean run's; a head
    that is not itself a name mover is a backup name mover if its DLA onto IO−S rises by at least
    `thresholds.backup_dla_increase` to at least `name_mover_dla` (it then writes IO; a negative name
    mover that merely stops suppressing does not count) and it then attends END→IO at least
    `name_mover_attention`.
    """
    if not name_movers:
        return pd.DataFrame(columns=ROLE_COLUMNS)
    clean = clean_scores if clean_scores is not None else ioi_head_scores(model, prompts)
    end = prompts.positions["END"].long()
    rows_idx = torch.arange(prompts.tokens.shape[0])
    by_layer: dict[int, list[int]] = {}
    for layer, head in name_movers:
        by_layer.setdefault(int(layer), []).append(int(head))

    def make_hook(heads: list[int]):
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            z = z.clone()
            at_end = z[rows_idx, end]  # [batch, head, d_head]
            at_end[:, heads] = at_end[:, heads].mean(0, keepdim=True)
            z[rows_idx, end] = at_end
            return z
        return hook

    hooks = [(hook_name("z", layer), make_hook(heads)) for layer, heads in by_layer.items()]
    ablated = ioi_head_scores(model, prompts, fwd_hooks=hooks, final_scale=final_norm_scale(model, prompts))
    merged = clean.merge(ablated, on=["layer", "head"], suffixes=("", "_ablated"))
    merged["dla_increase"] = merged["dla_io_minus_s_ablated"] - merged["dla_io_minus_s"]
    nm = {(int(a), int(b)) for a, b in name_movers}
    is_other = pd.Series([(int(a), int(b)) not in nm for a, b in zip(merged["layer"], merged["head"])],
                         index=merged.index)
    attends = merged["attn_end_io_ablated"] >= thresholds.name_mover_attention
    moves_io = merged["dla_io_minus_s_ablated"] >= thresholds.name_mover_dla
    ev = ["dla_io_minus_s", "dla_io_minus_s_ablated", "attn_end_io", "attn_end_io_ablated"]
    out = _rows(merged, "backup_name_mover", "dla_increase", thresholds.backup_dla_increase, ev,
                extra=is_other & attends & moves_io)
    return _with_meta(out, {"ablated": [head_node(a, b) for a, b in sorted(nm)], "ablation": "mean over prompts at END"})


def detect_s_inhibition(path_effects: pd.DataFrame, name_movers: list[tuple[int, int]] | list[str],
                        thresholds: RoleThresholds = RoleThresholds()) -> pd.DataFrame:
    """S-inhibition heads from precomputed path patching (columns `sender`, `receiver`, `channel`,
    `effect`): a sender's score is the summed *signed* effect of its paths into the name movers' queries
    (a head that works against the behaviour does not qualify); the summed |effect| is kept as evidence.

    A `receiver` may be a `,`-joined set (as `patching.path.path_patching` writes for joint receivers):
    such a row counts when every receiver in it is a name mover.
    """
    missing = [c for c in ("sender", "receiver", "channel", "effect") if c not in path_effects.columns]
    if missing:
        raise ValueError(f"path-patching effects lack column(s) {missing}; have {list(path_effects.columns)}")
    targets = {n if isinstance(n, str) else head_node(*n) for n in name_movers}
    targets = {parse_node(n).name for n in targets}
    if path_effects["effect"].isna().any():
        raise ValueError("path-patching effects contain NaN; drop or fill them first")
    def to_movers(receiver: Any) -> bool:
        names = [parse_node(r).name for r in str(receiver).split(",") if r.strip()]
        return bool(names) and all(n in targets for n in names)

    into_q = path_effects[(path_effects["channel"] == "q") & path_effects["receiver"].map(to_movers)]
    rows = []
    for sender, group in into_q.groupby("sender"):
        node = parse_node(str(sender))
        if node.kind != "head":
            continue
        rows.append({"layer": node.layer, "head": node.head, "s_inhibition": float(group["effect"].sum()),
                     "abs_effect": float(group["effect"].abs().sum()),
                     "effects": {str(r): round(float(e), 6) for r, e in zip(group["receiver"], group["effect"])}})
    frame = pd.DataFrame(rows, columns=["layer", "head", "s_inhibition", "abs_effect", "effects"])
    return _with_meta(_rows(frame, "s_inhibition", "s_inhibition", thresholds.s_inhibition,
                            ["s_inhibition", "abs_effect", "effects"]),
                      {"measured_on": "path patching into name-mover queries"})


def _with_meta(frame: pd.DataFrame, meta: dict[str, Any]) -> pd.DataFrame:
    frame = frame.reset_index(drop=True)
    frame["evidence"] = [json.dumps({**json.loads(e), **meta}, sort_keys=True) for e in frame["evidence"]]
    return frame


# ------------------------------------------------------------------ roles onto circuits

def role_strength(score: float, threshold: float) -> float:
    """How far a score clears its threshold (score / threshold; the raw score for thresholds ≤ 0)."""
    return float(score / threshold) if threshold > 0 else float(score)


def assign_roles(graph: nx.MultiDiGraph, roles: pd.DataFrame, *, add_missing: bool = False) -> nx.MultiDiGraph:
    """A copy of the circuit with roles written on its head nodes.

    `role` is the role with the largest `role_strength`; `roles` (JSON list) holds all, strongest first;
    `evidence` (JSON object) gains a `roles` entry mapping each role to its score, threshold and evidence.
    Heads not in the circuit are skipped unless `add_missing`.
    """
    missing = [c for c in ROLE_COLUMNS if c not in roles.columns]
    if missing:
        raise ValueError(f"role table lacks column(s) {missing}; use a detector's output")
    out = graph.copy()
    per_node: dict[str, list[dict[str, Any]]] = {}
    for _, row in roles.iterrows():
        name = head_node(int(row["layer"]), int(row["head"]))
        per_node.setdefault(name, []).append({"role": str(row["role"]), "score": float(row["score"]),
                                              "threshold": float(row["threshold"]),
                                              "evidence": json.loads(row["evidence"] or "{}")})
    for name, found in per_node.items():
        if name not in out:
            if not add_missing:
                continue
            from circuitlab.graphs.circuit import add_node
            add_node(out, name)
        best: dict[str, dict[str, Any]] = {}
        for entry in found:
            if entry["role"] not in best or role_strength(entry["score"], entry["threshold"]) > \
                    role_strength(best[entry["role"]]["score"], best[entry["role"]]["threshold"]):
                best[entry["role"]] = entry
        ranked = sorted(best.values(), key=lambda e: -role_strength(e["score"], e["threshold"]))
        data = out.nodes[name]
        evidence = json.loads(data.get("evidence", "{}") or "{}")
        evidence["roles"] = {e["role"]: {k: e[k] for k in ("score", "threshold", "evidence")} for e in ranked}
        data["role"] = ranked[0]["role"]
        data["roles"] = json.dumps([e["role"] for e in ranked])
        data["evidence"] = json.dumps(evidence, sort_keys=True)
    return out


def thresholds_dict(thresholds: RoleThresholds) -> dict[str, float]:
    """The thresholds as a plain dict (for run records)."""
    return {k: float(v) for k, v in asdict(thresholds).items()}


__all__ = [
    "ROLES", "ROLE_COLUMNS", "RoleThresholds", "RepeatedTokens", "IOIPrompts", "repeated_random_tokens",
    "repeated_token_scores", "copying_scores", "detect_repeated_token_roles", "ioi_head_scores",
    "detect_name_movers", "detect_ioi_attention_roles", "detect_backup_name_movers", "detect_s_inhibition",
    "assign_roles", "role_strength", "thresholds_dict",
]
