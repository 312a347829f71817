"""Repeated random tokens (induction, Olsson et al. 2022): `[BOS] r_1 … r_L r_1 … r_L`.

The clean prompt is a random sequence followed by its repetition; the corrupt prompt replaces the first
occurrence with fresh random tokens (disjoint from the originals), so the repeated half can no longer be
copied. Within one sequence tokens are drawn without replacement, so every repeated token has exactly one
earlier occurrence.

Roles: `first_start`, `first_end`, `second_start`, `second_end` (inclusive spans of the two occurrences) and
`END` (= `second_end`). The metric reads the positions `second_start … second_end − 1`, each predicting the
next token of the repeated half (the first repeated token is not predictable by induction, so it is not
scored): R = seq_len − 1. `answer_ids` `[B, R]` are those next tokens; `wrong_ids` `[B, R]` are the corrupt
prompt's first-half tokens at the same offsets (what a copy of the corrupt first half would predict).

Models without a tokenizer (tiny native models) sample from `range(cfg.d_vocab)` and get no BOS unless
`bos_id=` is given; their texts are written as `<id> <id> …`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from circuitlab.tasks.base import PromptPairs, Task, require_n
from circuitlab.tasks.tokens import ModelOrTokenizer, options_from, resolve

METRICS = ("mean_logprob", "mean_logit")


@dataclass(frozen=True)
class RepeatedTokensOptions:
    """Options of `RepeatedTokensTask.generate`.

    seq_len: length of the random half; token_range: (low, high) ids to draw from (default: the whole
    vocabulary minus special tokens); bos_id / prepend_bos: override the BOS convention.
    """

    seq_len: int = 20
    token_range: tuple[int, int] | None = None
    bos_id: int | None = None
    prepend_bos: bool | None = None


class RepeatedTokensTask(Task):
    """Induction on repeated random tokens; metric: mean log-prob (or logit) of the repeated half's tokens."""

    name = "repeated_tokens"
    description = "Repeated random tokens (induction): mean log-prob of the correct next token over the repeat"
    roles = ("first_start", "first_end", "second_start", "second_end", "END")
    metric_name = "mean_logprob"

    def __init__(self, metric: str = "mean_logprob") -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown repeated-tokens metric {metric!r}: use one of {METRICS}")
        self.metric_name = metric

    def generate(self, model_or_tokenizer: ModelOrTokenizer, n: int, *, seed: int = 0,
                 **options: object) -> PromptPairs:
        """`n` distinct repeated-token pairs; options: see `RepeatedTokensOptions`."""
        opts = options_from(RepeatedTokensOptions, options, self.name)
        src = resolve(model_or_tokenizer, prepend_bos=opts.prepend_bos, bos_id=opts.bos_id)
        length = opts.seq_len
        if not isinstance(length, int) or length < 2:
            raise ValueError(f"seq_len must be an integer ≥ 2, got {length!r}")
        vocab_limit = src.d_vocab if src.tokenizer is None else min(src.d_vocab, len(src.tokenizer))
        low, high = opts.token_range if opts.token_range is not None else (0, vocab_limit)
        if not 0 <= low < high <= vocab_limit:
            raise ValueError(f"token_range {(low, high)} must satisfy 0 ≤ low < high ≤ vocabulary size {vocab_limit}")
        excluded = set(getattr(src.tokenizer, "all_special_ids", []) or []) if src.tokenizer is not None else set()
        if src.bos_id is not None:
            excluded.add(src.bos_id)
        allowed = torch.tensor([i for i in range(low, high) if i not in excluded], dtype=torch.long)
        if len(allowed) < 2 * length:
            raise ValueError(f"seq_len={length} needs {2 * length} distinct tokens (clean and fresh corrupt halves) "
                             f"but only {len(allowed)} are allowed; lower seq_len or widen token_range")
        capacity = math.perm(len(allowed), length)
        require_n(n, capacity, f"random sequences of {length} tokens")
        total = src.n_prefix + 2 * length
        n_ctx = getattr(getattr(src.model, "cfg", None), "n_ctx", None)
        if n_ctx is not None and total > n_ctx:
            raise ValueError(f"prompts of {total} tokens exceed the model's context ({n_ctx}); lower seq_len")

        gen = torch.Generator().manual_seed(int(seed))
        seen: set[tuple[int, ...]] = set()
        firsts, fresh = [], []
        attempts = 0
        while len(firsts) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise RuntimeError(f"could not draw {n} distinct sequences after {attempts} tries")
            picks = allowed[torch.randperm(len(allowed), generator=gen)[:2 * length]]
            key = tuple(picks[:length].tolist())
            if key in seen:
                continue
            seen.add(key)
            firsts.append(picks[:length])
            fresh.append(picks[length:])
        first = torch.stack(firsts)
        other = torch.stack(fresh)
        prefix = torch.full((n, src.n_prefix), src.bos_id if src.bos_id is not None else 0, dtype=torch.long)
        clean = torch.cat([prefix, first, first], dim=1)
        corrupt = torch.cat([prefix, other, first], dim=1)
        p = src.n_prefix
        const = lambda v: torch.full((n,), v, dtype=torch.long)  # noqa: E731
        positions = {"first_start": const(p), "first_end": const(p + length - 1), "second_start": const(p + length),
                     "second_end": const(p + 2 * length - 1), "END": const(p + 2 * length - 1)}
        return PromptPairs(
            task=self.name,
            clean_tokens=clean,
            corrupt_tokens=corrupt,
            answer_ids=first[:, 1:].clone(),
            wrong_ids=other[:, 1:].clone(),
            positions=positions,
            clean_texts=[src.decode(row[p:].tolist()) for row in clean],
            corrupt_texts=[src.decode(row[p:].tolist()) for row in corrupt],
            meta=pd.DataFrame({"seq_len": [length] * n, "sample": list(range(n))}),
            info=dict(seed=seed, seq_len=length, token_range=[low, high], n_allowed_tokens=len(allowed),
                      bos_id=src.bos_id),
        )

    def read_positions(self, pairs: PromptPairs) -> Tensor:
        """Positions `second_start … second_end − 1` (each predicts the next repeated token): `[B, seq_len − 1]`."""
        start, end = pairs.positions["second_start"], pairs.positions["second_end"]
        width = int((end - start)[0]) if len(pairs) else 0
        if len(pairs) and not bool(((end - start) == width).all()):
            raise ValueError("repeated-token pairs must share one seq_len per batch")
        return start[:, None] + torch.arange(width, device=start.device)[None, :]

    def metric_at(self, logits_at: Tensor, pairs: PromptPairs) -> Tensor:
        """Mean log-prob (or logit) of the correct next token over the repeat: `[..., B, R, V]` → `[..., B]`."""
        if logits_at.shape[-2] != pairs.answer_ids.shape[1]:
            raise ValueError(f"expected logits at {pairs.answer_ids.shape[1]} read positions, got {logits_at.shape[-2]}")
        values = logits_at.log_softmax(-1) if self.metric_name == "mean_logprob" else logits_at
        ids = pairs.answer_ids.to(values.device)
        picked = values.gather(-1, ids[..., None].expand(*values.shape[:-1], 1))[..., 0]
        return picked.mean(-1)

    @staticmethod
    def per_position_loss(logits: Tensor, tokens: Tensor) -> Tensor:
        """Next-token cross-entropy at each position: logits `[..., B, S, V]`, tokens `[B, S]` → `[..., B, S−1]`.

        Entry t is the loss of predicting token t+1 from position t: plot it for in-context-learning curves.
        """
        logprobs = logits[..., :-1, :].log_softmax(-1)
        targets = tokens[:, 1:].to(logits.device)
        return -logprobs.gather(-1, targets.expand(*logprobs.shape[:-1])[..., None])[..., 0]

    def half_losses(self, logits: Tensor, pairs: PromptPairs) -> tuple[Tensor, Tensor]:
        """Mean next-token loss `[..., B]` on the first half and on the repeat (each half's first token excluded)."""
        loss = self.per_position_loss(logits, pairs.clean_tokens)
        fs, fe = int(pairs.positions["first_start"][0]), int(pairs.positions["first_end"][0])
        ss, se = int(pairs.positions["second_start"][0]), int(pairs.positions["second_end"][0])
        # loss[..., t] predicts token t+1: the first half's tokens fs+1..fe are predicted at fs..fe-1.
        return loss[..., fs:fe].mean(-1), loss[..., ss:se].mean(-1)

