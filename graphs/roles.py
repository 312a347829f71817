"""Role detectors for attention heads, measured on prompts through the bridge — never read off head indices.

Every detector returns a tidy DataFrame with columns `layer`, `head`, `role`, `score`, `threshold`,
`evidence` (JSON string) holding the heads whose score reaches the threshold; the `*_scores` functions of
`graphs.role_scores` return the raw per-head measurements for every head. `detect_roles` runs every detector a
model and task allow (what `circuitlab run` records); `assign_roles` writes roles onto circuit nodes.

Scores (attention scores are mean attention probabilities, in [0, 1]; a uniform head scores ~1/T):

| role                  | score                                                                              |
|-----------------------|------------------------------------------------------------------------------------|
| previous_token        | attention from position i to i-1 on repeated random tokens (also labelled when i-1 |
|                       | is the most-attended key at more than half of the positions: `previous_token_mask`)|
| duplicate_token       | attention from a token of the repeat to its earlier occurrence                     |
| induction             | prefix matching: attention from a repeated token to the token after its earlier   |
|                       | occurrence (Olsson et al. 2022, arXiv 2209.11895); role also needs copying > 0     |
| copying (evidence)    | OV-circuit copying: sum(λ)/sum(|λ|) of the eigenvalues of W_E W_V W_O W_U on a     |
|                       | token sample (Olsson et al.); +1 = pure copying, −1 = pure anti-copying            |
| name_mover            | attention END→IO ≥ attention threshold and direct logit attribution onto IO−S ≥    |
|                       | DLA threshold (Wang et al. 2022, arXiv 2211.00593); score = DLA; not s_suppression |
| negative_name_mover   | same attention, DLA ≤ −threshold; score = −DLA                                     |
| s_suppression         | attends END→S2 (≥ attention threshold, more than to IO) and DLA ≥ threshold: lowers|
|                       | the subject's logit (copy suppression, arXiv 2310.04625); our addition             |
| backup_name_mover     | DLA onto IO−S rises by ≥ threshold when the name movers are mean-ablated at END,   |
|                       | and the head then attends END→IO; score = the rise                                 |
| s_inhibition          | path patching: summed signed effect of the head on name movers' queries (channel |
|                       | q); the summed |effect| is shown as evidence (`abs_effect`)                        |

The measurements behind the scores are in `graphs.role_scores`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Callable

import networkx as nx
import pandas as pd
import torch
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.graphs.circuit import add_node, evidence_json
from circuitlab.graphs.role_scores import (IOIPrompts, RepeatedTokens, copying_scores, final_norm_scale,
                                           ioi_head_scores, repeated_random_tokens, repeated_token_scores,
                                           z_end_mean)
from circuitlab.patching.activation import PatchingConfig
from circuitlab.patching.components import head_node, hook_name, parse_node
from circuitlab.patching.engine import EngineContext
from circuitlab.patching.normalize import noising_share
from circuitlab.patching.path import path_patching
from circuitlab.patching.prompts import Prompts, as_prompts
from circuitlab.tasks.base import PromptPairs, Task

ROLES = ("name_mover", "negative_name_mover", "backup_name_mover", "s_suppression", "s_inhibition", "induction",
         "duplicate_token", "previous_token")
ROLE_COLUMNS = ["layer", "head", "role", "score", "threshold", "evidence"]


@dataclass(frozen=True)
class RoleThresholds:
    """Thresholds of the role scores (see the module docstring for what each score is)."""

    previous_token: float = 0.4
    previous_token_top: float = 0.5
    duplicate_token: float = 0.3
    induction: float = 0.3
    copying: float = 0.0
    name_mover_attention: float = 0.2
    name_mover_dla: float = 0.1
    backup_dla_increase: float = 0.05
    s_inhibition: float = 0.05


def previous_token_mask(scores: pd.DataFrame, thresholds: RoleThresholds = RoleThresholds()) -> pd.Series:
    """Which heads are previous-token heads: mean attention to i−1 ≥ `thresholds.previous_token`, or i−1 is the
    most-attended key at more than `thresholds.previous_token_top` of the query positions (`previous_token_top`
    column, when measured). A head that spreads attention over the last few tokens yet favours the previous one
    is a previous-token head (a trained layer-0 head: 0.38 mean, top at 91 % of positions)."""
    mask = scores["previous_token"] >= thresholds.previous_token
    if "previous_token_top" in scores:
        mask |= scores["previous_token_top"].fillna(0.0) > thresholds.previous_token_top
    return mask


def _rows(df: pd.DataFrame, role: str, column: str, threshold: float, evidence_columns: list[str],
          sign: float = 1.0, extra: pd.Series | None = None, keep: pd.Series | None = None) -> pd.DataFrame:
    """Rows of `df` whose `sign * column` reaches the threshold (or that `keep` selects), and `extra` if given."""
    keep = sign * df[column] >= threshold if keep is None else keep
    if extra is not None:
        keep &= extra
    out = []
    for _, row in df[keep].iterrows():
        evidence = {c: _plain(row[c]) for c in evidence_columns if c in row and not _is_nan(row[c])}
        out.append({"layer": int(row["layer"]), "head": int(row["head"]), "role": role,
                    "score": float(sign * row[column]), "threshold": float(threshold),
                    "evidence": evidence_json(evidence)})
    return pd.DataFrame(out, columns=ROLE_COLUMNS).sort_values("score", ascending=False, ignore_index=True)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and value != value


def _plain(value: Any) -> Any:
    if isinstance(value, (float, int, str, bool)) or value is None:
        return round(value, 6) if isinstance(value, float) else value
    if hasattr(value, "item"):
        return round(float(value.item()), 6)
    return value


# ------------------------------------------------------------------ repeated-token roles

def detect_repeated_token_roles(model: TransformerBridge, prompts: RepeatedTokens,
                                thresholds: RoleThresholds = RoleThresholds(), *,
                                with_copying: bool = True) -> pd.DataFrame:
    """Previous-token, duplicate-token and induction heads measured on repeated random tokens.

    An induction head needs prefix matching ≥ `thresholds.induction` and (with `with_copying`) an OV
    copying score > `thresholds.copying`.
    """
    scores = repeated_token_scores(model, prompts)
    evidence = ["previous_token", "previous_token_top", "duplicate_token", "induction"]
    if with_copying:
        candidates = scores[scores["induction"] >= thresholds.induction]
        copy = copying_scores(model, list(zip(candidates["layer"], candidates["head"])))
        scores = scores.merge(copy, on=["layer", "head"], how="left")
        evidence.append("copying")
    meta = {"prompts": int(prompts.tokens.shape[0]), "half": prompts.half}
    frames = [
        _rows(scores, "previous_token", "previous_token", thresholds.previous_token, evidence,
              keep=previous_token_mask(scores, thresholds)),
        _rows(scores, "duplicate_token", "duplicate_token", thresholds.duplicate_token, evidence),
        _rows(scores, "induction", "induction", thresholds.induction, evidence,
              extra=(scores["copying"] > thresholds.copying) if with_copying else None),
    ]
    out = pd.concat([f for f in frames if not f.empty] or [frames[0]], ignore_index=True)
    out["evidence"] = [evidence_json({**json.loads(e), **meta, "measured_on": "repeated random tokens"})
                       for e in out["evidence"]]
    return out


# ------------------------------------------------------------------ IOI roles

def detect_name_movers(scores: pd.DataFrame, thresholds: RoleThresholds = RoleThresholds(), *,
                       include_s_suppression: bool = True) -> pd.DataFrame:
    """Name movers and negative name movers from `ioi_head_scores`: attend END→IO and push the IO−S
    logit difference up (name mover) or down (negative name mover).

    With `include_s_suppression`, heads that attend END→S2 (more than END→IO) and raise IO−S are labelled
    `s_suppression` (and not also `name_mover`, which they would be by attention to IO alone): they lower the subject's logit, the copy-suppression behaviour of McDougall et al.
    2023 (arXiv 2310.04625). Not one of Wang et al.'s GPT-2 classes; our addition, since SmolLM2 has them.
    """
    attends = scores["attn_end_io"] >= thresholds.name_mover_attention
    on_s2 = (scores["attn_end_s2"] >= thresholds.name_mover_attention) & (scores["attn_end_s2"] > scores["attn_end_io"])
    on_s2 &= include_s_suppression
    ev = ["attn_end_io", "attn_end_s2", "dla_io_minus_s"]
    # one role per head: a head that raises IO−S is a name mover or an S-suppression head by the name it attends
    # more (its score, the DLA, is the same for both); both attentions stay in the evidence
    nm = _rows(scores, "name_mover", "dla_io_minus_s", thresholds.name_mover_dla, ev, extra=attends & ~on_s2)
    neg = _rows(scores, "negative_name_mover", "dla_io_minus_s", thresholds.name_mover_dla, ev, sign=-1.0,
                extra=attends)
    frames = [nm, neg]
    if include_s_suppression:
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


def detect_backup_name_movers(model: TransformerBridge, prompts: IOIPrompts, name_movers: list[tuple[int, int]],
                              thresholds: RoleThresholds = RoleThresholds(),
                              clean_scores: pd.DataFrame | None = None, *, batch_size: int | None = None) -> pd.DataFrame:
    """Heads that take over when the name movers are knocked out (Wang et al. §3.4).

    The name movers' outputs at END are mean-ablated (replaced by their mean over the prompts; Wang et
    al. use the mean over an ABC dataset) with the final norm's scale frozen to the clean run's; a head
    that is not itself a name mover is a backup name mover if its DLA onto IO−S rises by at least
    `thresholds.backup_dla_increase` to at least `name_mover_dla` (it then writes IO; a negative name
    mover that merely stops suppressing does not count) and it then attends END→IO at least
    `name_mover_attention`. `batch_size`: prompts per forward; the means are over every prompt (one pass per
    name-mover layer, each with the earlier layers' ablations in place, as in one forward).
    """
    if not name_movers:
        return pd.DataFrame(columns=ROLE_COLUMNS)
    clean = clean_scores if clean_scores is not None else ioi_head_scores(model, prompts, batch_size=batch_size)
    by_layer: dict[int, list[int]] = {}
    for layer, head in name_movers:
        by_layer.setdefault(int(layer), []).append(int(head))
    means: dict[int, torch.Tensor] = {}

    def make_hook(end: torch.Tensor, heads: list[int], mean: torch.Tensor):
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            z = z.clone()
            rows_idx = torch.arange(z.shape[0])
            at_end = z[rows_idx, end]  # [batch, head, d_head]
            at_end[:, heads] = mean[heads].to(z.dtype)
            z[rows_idx, end] = at_end
            return z
        return hook

    def hooks(part: IOIPrompts) -> list:
        end = part.positions["END"].long()
        return [(hook_name("z", layer), make_hook(end, by_layer[layer], mean)) for layer, mean in means.items()]

    for layer in sorted(by_layer):  # each layer's mean with the earlier layers already ablated
        means[layer] = z_end_mean(model, prompts, layer, fwd_hooks=hooks, batch_size=batch_size)
    ablated = ioi_head_scores(model, prompts, fwd_hooks=hooks, batch_size=batch_size,
                              final_scale=final_norm_scale(model, prompts, batch_size=batch_size))
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
    frame["evidence"] = [evidence_json({**json.loads(e), **meta}) for e in frame["evidence"]]
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
        data["evidence"] = evidence_json(evidence)
    return out


def thresholds_dict(thresholds: RoleThresholds) -> dict[str, float]:
    """The thresholds as a plain dict (for run records)."""
    return {k: float(v) for k, v in asdict(thresholds).items()}


# ------------------------------------------------------------------ all roles of a model and task

S_INHIBITION_CANDIDATES = 8


def _bos_id(model: Any) -> int | None:
    tok = getattr(model, "tokenizer", None)
    if tok is None or not bool(getattr(model.cfg, "default_prepend_bos", True)):
        return None
    return getattr(tok, "bos_token_id", None)


def repeated_token_roles(model: TransformerBridge, thresholds: RoleThresholds, *, seed: int = 0) -> pd.DataFrame:
    """Previous-token, duplicate-token and induction heads on repeated random tokens (needs no tokenizer)."""
    bos = _bos_id(model)
    d_vocab = int(model.cfg.d_vocab)
    n_ctx = int(getattr(model.cfg, "n_ctx", 64) or 64)
    half = max(2, min(10, (n_ctx - 1) // 2))
    low = 1000 if d_vocab > 4000 else (1 if bos == 0 else 0)  # skip special and byte tokens of big vocabularies
    prompts = repeated_random_tokens(d_vocab, half, 8, seed=seed, bos_id=bos, low=low)
    return detect_repeated_token_roles(model, prompts, thresholds)


def ioi_roles(model: TransformerBridge, task: Task, pairs: PromptPairs, thresholds: RoleThresholds, *,
              context: Prompts | EngineContext | None = None,
              memory_budget_mb: float = 1024.0, say: Callable[[str], None] | None = None) -> list[pd.DataFrame]:
    """Name movers (+ negative, backup), IOI-position attention roles and S-inhibition (path patching)."""
    mask = getattr(pairs, "attention_mask", None)
    if mask is not None and not bool(mask.bool().all()) and getattr(model.cfg, "attention_dir", "causal") != "causal":
        raise ValueError("IOI role scores run the bridge's own forward, which does not mask the padding of a "
                         "bidirectional model: use IOI prompts of one length (or --no-roles)")
    prompts = IOIPrompts(pairs.clean_tokens, pairs.positions, pairs.answer_ids, pairs.wrong_ids)
    batch_size = getattr(context, "batch_size", None)  # prompt batches: role scores run in the same batches
    scores = ioi_head_scores(model, prompts, batch_size=batch_size)
    movers = detect_name_movers(scores, thresholds)
    nm = [(int(r.layer), int(r.head)) for r in movers.itertuples() if r.role == "name_mover"]
    frames = [movers, detect_ioi_attention_roles(scores, thresholds)]
    if nm:
        frames.append(detect_backup_name_movers(model, prompts, nm, thresholds, clean_scores=scores,
                                                batch_size=batch_size))
        first = min(layer for layer, _ in nm)
        below = scores[scores["layer"] < first].sort_values("attn_end_s2", ascending=False)
        candidates = [head_node(int(r.layer), int(r.head)) for r in below.head(S_INHIBITION_CANDIDATES).itertuples()]
        if candidates:
            receivers = [head_node(layer, head) for layer, head in nm]
            if say is not None:
                say(f"  S-inhibition: path patching {len(candidates)} candidate heads into {len(receivers)} name movers' queries")
            kwargs = dict(senders=candidates, receivers=receivers, channel="q", receiver_positions="END",
                          config=PatchingConfig(direction="noise", chunk_size=4, memory_budget_mb=memory_budget_mb))
            if context is not None:  # one engine context or prompt batches: the one prompt-batch protocol
                path = as_prompts(context).path_patching(**kwargs)
            else:
                path = path_patching(model, task, pairs, **kwargs)
            effects = path[["sender", "receiver", "channel"]].copy()  # noising: the path's share of the behaviour
            effects["effect"] = noising_share(path["metric"], path.attrs["clean_metric"], path.attrs["corrupt_metric"])
            frames.append(detect_s_inhibition(effects, receivers, thresholds))
    return frames


def detect_roles(model: TransformerBridge, task: Task, pairs: PromptPairs, *,
                 context: Prompts | EngineContext | None = None, memory_budget_mb: float = 1024.0,
                 seed: int = 0, say: Callable[[str], None] | None = None) -> pd.DataFrame:
    """All roles this model and task allow: IOI roles when the task is IOI, repeated-token roles always.

    `context` is an engine context or prompt batches for the S-inhibition path patching (None: built from
    `pairs`); `say` receives progress lines. One table in `ROLE_COLUMNS`, sorted by layer, head and role."""
    thresholds = RoleThresholds()
    frames = [repeated_token_roles(model, thresholds, seed=seed)]
    if task.name == "ioi" and getattr(model, "tokenizer", None) is not None:
        frames += ioi_roles(model, task, pairs, thresholds, context=context, memory_budget_mb=memory_budget_mb,
                            say=say)
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=ROLE_COLUMNS)
    out = pd.concat(frames, ignore_index=True)[ROLE_COLUMNS]
    return out.sort_values(["layer", "head", "role"], ignore_index=True)
