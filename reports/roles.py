"""Measuring head roles for a run: IOI roles on IOI prompts, repeated-token roles on any model.

Thin orchestration over `graphs.roles`; returns one table in `graphs.roles.ROLE_COLUMNS`.
"""

from __future__ import annotations

from typing import Any, Callable

import pandas as pd

from circuitlab.graphs.roles import (ROLE_COLUMNS, IOIPrompts, RoleThresholds, detect_backup_name_movers,
                          detect_ioi_attention_roles, detect_name_movers, detect_repeated_token_roles,
                          detect_s_inhibition, ioi_head_scores, repeated_random_tokens)
from circuitlab.patching.activation import PatchingConfig
from circuitlab.patching.components import head_node

S_INHIBITION_CANDIDATES = 8


def _bos_id(model: Any) -> int | None:
    tok = getattr(model, "tokenizer", None)
    if tok is None or not bool(getattr(model.cfg, "default_prepend_bos", True)):
        return None
    return getattr(tok, "bos_token_id", None)


def repeated_token_roles(model: Any, thresholds: RoleThresholds, *, seed: int = 0) -> pd.DataFrame:
    """Previous-token, duplicate-token and induction heads on repeated random tokens (needs no tokenizer)."""
    bos = _bos_id(model)
    d_vocab = int(model.cfg.d_vocab)
    n_ctx = int(getattr(model.cfg, "n_ctx", 64) or 64)
    half = max(2, min(10, (n_ctx - 1) // 2))
    low = 1000 if d_vocab > 4000 else (1 if bos == 0 else 0)  # skip special and byte tokens of big vocabularies
    prompts = repeated_random_tokens(d_vocab, half, 8, seed=seed, bos_id=bos, low=low)
    return detect_repeated_token_roles(model, prompts, thresholds)


def ioi_roles(model: Any, task: Any, pairs: Any, thresholds: RoleThresholds, *, context: Any,
              memory_budget_mb: float, say: Callable[[str], None]) -> list[pd.DataFrame]:
    """Name movers (+ negative, backup), IOI-position attention roles and S-inhibition (path patching)."""
    from circuitlab.patching.path import path_patching

    prompts = IOIPrompts(pairs.clean_tokens, pairs.positions, pairs.answer_ids, pairs.wrong_ids)
    scores = ioi_head_scores(model, prompts)
    movers = detect_name_movers(scores, thresholds)
    nm = [(int(r.layer), int(r.head)) for r in movers.itertuples() if r.role == "name_mover"]
    frames = [movers, detect_ioi_attention_roles(scores, thresholds)]
    if nm:
        frames.append(detect_backup_name_movers(model, prompts, nm, thresholds, clean_scores=scores))
        first = min(layer for layer, _ in nm)
        below = scores[scores["layer"] < first].sort_values("attn_end_s2", ascending=False)
        candidates = [head_node(int(r.layer), int(r.head)) for r in below.head(S_INHIBITION_CANDIDATES).itertuples()]
        if candidates:
            receivers = [head_node(layer, head) for layer, head in nm]
            say(f"  S-inhibition: path patching {len(candidates)} candidate heads into {len(receivers)} name movers' queries")
            kwargs = dict(senders=candidates, receivers=receivers, channel="q", receiver_positions="END",
                          config=PatchingConfig(direction="noise", chunk_size=4, memory_budget_mb=memory_budget_mb))
            if hasattr(context, "path_patching"):  # prompt batches (patching.batched.Batches)
                path = context.path_patching(**kwargs)
            else:
                path = path_patching(model, task, pairs, context=context, **kwargs)
            effects = path[["sender", "receiver", "channel", "effect"]].copy()
            effects["effect"] = 1.0 - effects["effect"]  # noising: the path's share of the clean behaviour
            frames.append(detect_s_inhibition(effects, receivers, thresholds))
    return frames


def detect_roles(model: Any, task: Any, pairs: Any, *, context: Any, memory_budget_mb: float, seed: int,
                 say: Callable[[str], None]) -> pd.DataFrame:
    """All roles this model and task allow: IOI roles when the task is IOI, repeated-token roles always."""
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
