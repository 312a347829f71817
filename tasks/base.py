"""The task data model: `PromptPairs` (aligned clean/corrupt prompts with answers and token roles) and `Task`.

A task turns a tokenizer (or a model) into clean/corrupt prompt pairs whose tokens line up position by
position, so that any activation of the clean run can be patched into the corrupt run at the same place.

Conventions shared by every task:
- `clean_tokens`/`corrupt_tokens` include the BOS token when the model prepends one (position 0), so every
  position in `positions` indexes these tensors directly.
- Prompts may have different token lengths: they are right-padded to the longest and `attention_mask`
  (1 = real token, 0 = padding) says where each ends; it is None when all prompts have one length. The
  clean and corrupt prompt of one pair always have the same length, so they stay aligned token by token,
  and role positions (END included) are per prompt.
- `answer_ids` / `wrong_ids` are 2-D `[batch, K]`. Single-token answers have K = 1. A value of -1 is
  padding (used by greater-than, whose answer sets have different sizes per prompt).
- The metric reads logits only at `Task.read_positions(pairs)` (`[batch, R]`); `Task.metric_at` takes the
  logits gathered there, with any number of leading batch dimensions (stacked patched runs).
"""

from __future__ import annotations

import json
import logging
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence, Union

import numpy as np
import pandas as pd
import torch
from circuitlab.tasks.tokens import ModelOrTokenizer
from torch import Tensor

log = logging.getLogger("circuitlab.tasks")

PAD_ID = -1
IndexLike = Union[int, slice, Sequence[int], Sequence[bool], Tensor, np.ndarray]


class TaskUnsupportedError(ValueError):
    """The task cannot be built for this tokenizer/model (e.g. it splits years into single digits)."""


def _as_long(x: Any, name: str) -> Tensor:
    t = torch.as_tensor(x)
    if t.dtype != torch.long:
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"PromptPairs.{name} must hold integer token ids, got dtype {t.dtype}")
        t = t.long()
    return t


def _json_scalar(value: Any) -> Any:
    """A value as strict JSON: numpy scalars to Python, NaN/inf to null (a bare NaN is not JSON), containers
    element by element, everything else unchanged."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_scalar(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_scalar(v) for v in value]
    return value


@dataclass
class PromptPairs:
    """Clean/corrupt prompt pairs of one task, aligned token by token.

    `positions[role]` is a LongTensor [batch] of indices into `clean_tokens` (BOS included); the corrupt
    prompt has the same role at the same index. `meta` has one row per pair (template, names, …) and
    `info` holds batch-level facts (filter counts, options used).
    """

    task: str
    clean_tokens: Tensor
    corrupt_tokens: Tensor
    answer_ids: Tensor
    wrong_ids: Tensor
    positions: dict[str, Tensor]
    clean_texts: list[str]
    corrupt_texts: list[str]
    meta: pd.DataFrame
    attention_mask: Tensor | None = None
    info: dict[str, object] = field(default_factory=dict)
    reference_logprobs: Tensor | None = None  # [batch, R, V] clean log-probs for KL metrics (not saved)

    def __post_init__(self) -> None:
        self.clean_tokens = _as_long(self.clean_tokens, "clean_tokens")
        self.corrupt_tokens = _as_long(self.corrupt_tokens, "corrupt_tokens")
        self.answer_ids = _as_long(self.answer_ids, "answer_ids")
        self.wrong_ids = _as_long(self.wrong_ids, "wrong_ids")
        self.positions = {str(k): _as_long(v, f"positions[{k!r}]") for k, v in self.positions.items()}
        if self.attention_mask is not None:
            self.attention_mask = _as_long(self.attention_mask, "attention_mask")
        self.clean_texts, self.corrupt_texts = list(self.clean_texts), list(self.corrupt_texts)
        if self.clean_tokens.ndim != 2:
            raise ValueError(f"clean_tokens must be [batch, seq], got shape {tuple(self.clean_tokens.shape)}")
        if self.corrupt_tokens.shape != self.clean_tokens.shape:
            raise ValueError(f"clean and corrupt tokens must have identical shapes, got "
                             f"{tuple(self.clean_tokens.shape)} and {tuple(self.corrupt_tokens.shape)}")
        batch, seq = self.clean_tokens.shape
        for name in ("answer_ids", "wrong_ids"):
            t = getattr(self, name)
            if t.ndim != 2 or t.shape[0] != batch:
                raise ValueError(f"{name} must be [batch={batch}, K], got shape {tuple(t.shape)}")
        for role, pos in self.positions.items():
            if pos.shape != (batch,):
                raise ValueError(f"positions[{role!r}] must be [batch={batch}], got shape {tuple(pos.shape)}")
            if batch and (int(pos.min()) < 0 or int(pos.max()) >= seq):
                raise ValueError(f"positions[{role!r}] points outside the sequence (length {seq}): {pos.tolist()}")
        if self.attention_mask is not None and self.attention_mask.shape != self.clean_tokens.shape:
            raise ValueError("attention_mask must have the shape of clean_tokens")
        if self.attention_mask is not None and batch and seq:
            mask = self.attention_mask
            if bool((mask[:, 1:] > mask[:, :-1]).any()) or bool((mask[:, 0] == 0).any()):
                raise ValueError("attention_mask must be right padding: each row 1…1 then 0…0, starting with 1")
            lengths = mask.sum(1)
            for role, pos in self.positions.items():
                if bool((pos >= lengths).any()):
                    raise ValueError(f"positions[{role!r}] points into the padding of some prompts")
        if len(self.clean_texts) != batch or len(self.corrupt_texts) != batch:
            raise ValueError(f"need {batch} clean and corrupt texts, got {len(self.clean_texts)} and "
                             f"{len(self.corrupt_texts)}")
        if self.meta is None:
            self.meta = pd.DataFrame(index=range(batch))
        if len(self.meta) != batch:
            raise ValueError(f"meta must have one row per pair ({batch}), got {len(self.meta)}")

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.clean_tokens.shape[0])

    def __repr__(self) -> str:
        return (f"PromptPairs(task={self.task!r}, n={len(self)}, seq_len={self.seq_len}, "
                f"roles={self.roles}, answer K={self.answer_ids.shape[1]}, wrong K={self.wrong_ids.shape[1]})")

    @property
    def seq_len(self) -> int:
        """Padded token length of the batch (BOS included); see `lengths` for each prompt's own."""
        return int(self.clean_tokens.shape[1])

    @property
    def lengths(self) -> Tensor:
        """Token length of each prompt without padding (BOS included), LongTensor [batch]."""
        if self.attention_mask is None:
            return torch.full((len(self),), self.seq_len, dtype=torch.long, device=self.device)
        return self.attention_mask.sum(1)

    @property
    def roles(self) -> list[str]:
        """Role names with a position, in insertion order (e.g. IO, S1, S1+1, S2, END)."""
        return list(self.positions)

    @property
    def device(self) -> torch.device:
        return self.clean_tokens.device

    def _index(self, index: IndexLike) -> Tensor:
        n = len(self)
        if isinstance(index, int):
            if not -n <= index < n:
                raise IndexError(f"pair index {index} out of range for {n} pairs")
            return torch.tensor([index % n])
        if isinstance(index, slice):
            return torch.arange(n)[index]
        idx = torch.as_tensor(np.asarray(index.cpu() if isinstance(index, Tensor) else index))
        if idx.dtype == torch.bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean mask must have length {n}, got {tuple(idx.shape)}")
            return idx.nonzero().flatten()
        idx = idx.long().flatten()
        if len(idx) and (int(idx.max()) >= n or int(idx.min()) < -n):
            raise IndexError(f"pair indices {idx.tolist()} out of range for {n} pairs")
        return idx % max(n, 1)

    def subset(self, index: IndexLike) -> PromptPairs:
        """The pairs at `index` (int, slice, index list/tensor or boolean mask), as a new PromptPairs."""
        idx = self._index(index)
        dev_idx = idx.to(self.device)
        rows = idx.tolist()
        return PromptPairs(
            task=self.task,
            clean_tokens=self.clean_tokens[dev_idx],
            corrupt_tokens=self.corrupt_tokens[dev_idx],
            answer_ids=self.answer_ids[dev_idx],
            wrong_ids=self.wrong_ids[dev_idx],
            positions={k: v[dev_idx] for k, v in self.positions.items()},
            clean_texts=[self.clean_texts[i] for i in rows],
            corrupt_texts=[self.corrupt_texts[i] for i in rows],
            meta=self.meta.iloc[rows].reset_index(drop=True),
            attention_mask=None if self.attention_mask is None else self.attention_mask[dev_idx],
            info=dict(self.info),
            reference_logprobs=None if self.reference_logprobs is None else self.reference_logprobs[idx],
        )

    def to(self, device: str | torch.device) -> PromptPairs:
        """A copy with every tensor on `device` (texts and meta are shared)."""
        return PromptPairs(
            task=self.task,
            clean_tokens=self.clean_tokens.to(device),
            corrupt_tokens=self.corrupt_tokens.to(device),
            answer_ids=self.answer_ids.to(device),
            wrong_ids=self.wrong_ids.to(device),
            positions={k: v.to(device) for k, v in self.positions.items()},
            clean_texts=self.clean_texts,
            corrupt_texts=self.corrupt_texts,
            meta=self.meta,
            attention_mask=None if self.attention_mask is None else self.attention_mask.to(device),
            info=dict(self.info),
            reference_logprobs=self.reference_logprobs,
        )

    def valid_answer_ids(self, row: int) -> tuple[list[int], list[int]]:
        """Answer and wrong token ids of one pair with the -1 padding removed."""
        a = [i for i in self.answer_ids[row].tolist() if i != PAD_ID]
        w = [i for i in self.wrong_ids[row].tolist() if i != PAD_ID]
        return a, w

    # ------------------------------------------------------------------ JSONL
    def save_jsonl(self, path: str | os.PathLike[str]) -> Path:
        """Write one JSON object per pair (texts, ids, answers, {role: index}, meta, task info)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        dtypes = {str(c): str(t) for c, t in self.meta.dtypes.items()}
        cols = list(self.meta.columns)
        with open(path, "w", encoding="utf-8") as handle:
            for i in range(len(self)):
                record = {
                    "task": self.task,
                    "clean_text": self.clean_texts[i],
                    "corrupt_text": self.corrupt_texts[i],
                    "clean_ids": self.clean_tokens[i].tolist(),
                    "corrupt_ids": self.corrupt_tokens[i].tolist(),
                    "answer_ids": self.answer_ids[i].tolist(),
                    "wrong_ids": self.wrong_ids[i].tolist(),
                    "positions": {k: int(v[i]) for k, v in self.positions.items()},
                    "attention_mask": None if self.attention_mask is None else self.attention_mask[i].tolist(),
                    "meta": {str(c): _json_scalar(self.meta.iloc[i][c]) for c in cols},
                    "meta_dtypes": dtypes,
                    "info": _json_scalar(self.info),
                }
                handle.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        return path

    @classmethod
    def load_jsonl(cls, path: str | os.PathLike[str]) -> PromptPairs:
        """Read a file written by `save_jsonl` back into an identical PromptPairs."""
        path = Path(path)
        records = []
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno} is not valid JSON ({exc})") from exc
        if not records:
            raise ValueError(f"{path} holds no prompt pairs")
        tasks = {r["task"] for r in records}
        if len(tasks) != 1:
            raise ValueError(f"{path} mixes pairs of several tasks: {sorted(tasks)}")
        roles = list(records[0]["positions"])
        for lineno, r in enumerate(records, 1):
            if list(r["positions"]) != roles:
                raise ValueError(f"{path}: pair {lineno} has roles {list(r['positions'])}, expected {roles}")
        dtypes = records[0].get("meta_dtypes", {})
        meta = pd.DataFrame([r.get("meta", {}) for r in records])
        if len(meta.columns) == 0:
            meta = pd.DataFrame(index=range(len(records)))
        for col, dtype in dtypes.items():
            if col in meta.columns:
                meta[col] = meta[col].astype(dtype)
        masks = [r.get("attention_mask") for r in records]
        return cls(
            task=records[0]["task"],
            clean_tokens=torch.tensor([r["clean_ids"] for r in records], dtype=torch.long),
            corrupt_tokens=torch.tensor([r["corrupt_ids"] for r in records], dtype=torch.long),
            answer_ids=torch.tensor([r["answer_ids"] for r in records], dtype=torch.long),
            wrong_ids=torch.tensor([r["wrong_ids"] for r in records], dtype=torch.long),
            positions={k: torch.tensor([r["positions"][k] for r in records], dtype=torch.long) for k in roles},
            clean_texts=[r["clean_text"] for r in records],
            corrupt_texts=[r["corrupt_text"] for r in records],
            meta=meta,
            attention_mask=None if masks[0] is None else torch.tensor(masks, dtype=torch.long),
            info=records[0].get("info", {}) or {},
        )


def gather_at(logits: Tensor, positions: Tensor) -> Tensor:
    """Logits `[..., B, S, V]` read at per-prompt positions `[B, R]` → `[..., B, R, V]` (differentiable)."""
    if logits.ndim < 3:
        raise ValueError(f"logits must be [..., batch, seq, vocab], got shape {tuple(logits.shape)}")
    batch = positions.shape[0]
    if logits.shape[-3] != batch:
        raise ValueError(f"logits have batch {logits.shape[-3]} but the pairs have {batch} prompts")
    positions = positions.to(logits.device)
    rows = torch.arange(batch, device=logits.device)[:, None]
    return logits[..., rows, positions, :]


def gather_ids(values: Tensor, ids: Tensor) -> Tensor:
    """Pick vocab entries: values `[..., B, V]`, ids `[B, K]` (-1 = padding, read as 0) → `[..., B, K]`."""
    ids = ids.to(values.device).clamp(min=0)
    index = ids.expand(*values.shape[:-2], *ids.shape)
    return values.gather(-1, index)


class Task(ABC):
    """A patching task: generates aligned prompt pairs and scores logits with a per-prompt metric.

    Subclasses set `name`, `description`, `roles`, `metric_name` and implement `generate` and `metric_at`;
    `read_positions` defaults to the END position.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    roles: ClassVar[tuple[str, ...]] = ()
    metric_name: ClassVar[str] = ""

    @abstractmethod
    def generate(self, model_or_tokenizer: ModelOrTokenizer, n: int, *, seed: int = 0,
                 **options: object) -> PromptPairs:
        """Make `n` distinct clean/corrupt pairs for this model's tokenizer; same seed → same pairs."""

    def read_positions(self, pairs: PromptPairs) -> Tensor:
        """Sequence positions `[B, R]` whose logits the metric reads (default: the END position, R = 1)."""
        return pairs.positions["END"][:, None]

    @abstractmethod
    def metric_at(self, logits_at: Tensor, pairs: PromptPairs) -> Tensor:
        """Per-prompt metric `[..., B]` from logits already gathered at `read_positions` (`[..., B, R, V]`)."""

    def metric_tokens(self, pairs: PromptPairs) -> Tensor | None:
        """The vocabulary ids whose logits `metric_at` reads (1-D), or None when it may read any (a softmax, KL).
        Patched forwards then compute only those logits (the others are NaN, so a metric that reads one fails
        loudly instead of returning a wrong number)."""
        return None

    def gather(self, logits: Tensor, pairs: PromptPairs) -> Tensor:
        """Full logits `[..., B, S, V]` → the logits the metric reads, `[..., B, R, V]`."""
        return gather_at(logits, self.read_positions(pairs))

    def metric(self, logits: Tensor, pairs: PromptPairs) -> Tensor:
        """Per-prompt metric `[..., B]` from full logits `[..., B, S, V]`."""
        return self.metric_at(self.gather(logits, pairs), pairs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, metric={self.metric_name!r})"


def check_aligned(clean: Sequence[Sequence[int]], corrupt: Sequence[Sequence[int]],
                  clean_texts: Sequence[str], corrupt_texts: Sequence[str]) -> None:
    """Reject pairs whose clean and corrupt token lengths differ, naming the offending texts."""
    bad = [(c, k, len(a), len(b)) for a, b, c, k in zip(clean, corrupt, clean_texts, corrupt_texts) if len(a) != len(b)]
    if bad:
        shown = "; ".join(f"{c!r} ({la} tokens) vs {k!r} ({lb} tokens)" for c, k, la, lb in bad[:3])
        raise ValueError(f"{len(bad)} clean/corrupt pair(s) do not align token by token: {shown}. "
                         "Use words that are single tokens for this tokenizer.")


def require_n(n: int, available: int, what: str) -> None:
    """Error when more distinct prompts are asked for than the task can produce."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if n > available:
        raise ValueError(f"asked for {n} prompts but only {available} distinct {what} can be made; "
                         f"ask for at most {available} or widen the options (templates, pools).")

