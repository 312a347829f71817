"""Task specs of the ground-truth models: clean/corrupt token pairs (ids, no tokenizer), read positions, metric.

A spec is plain JSON (`task.json` beside each model) naming a generator and its parameters, so a benchmark can
regenerate exactly the same data from a seed. Kinds:

- `logit_diff` (categorical answers): metric = mean over rows and read positions of
  logit[answer] - logit[wrong], where `wrong` is the answer of the corrupted input; accuracy = argmax == answer.
- `regression` (one numeric output, Tracr numerical SOps): the single output logit is the value; metric =
  -mean squared error to the clean target; accuracy = |value - target| < `tol`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

GENERATORS = ("induction", "reverse", "frac_prevs", "marker")


@dataclass(frozen=True)
class TaskBatch:
    """Clean/corrupt inputs and what the metric reads. All rows share `read_pos`."""

    clean: Tensor  # [n, seq] long
    corrupt: Tensor  # [n, seq] long
    read_pos: Tensor  # [P] long
    answer: Tensor  # [n, P]: long token ids (logit_diff) or float targets (regression)
    wrong: Tensor | None  # [n, P] long for logit_diff (the corrupt input's answer), None for regression


@dataclass(frozen=True)
class TaskSpec:
    """How to make data for a ground-truth model and how to score its logits."""

    generator: str
    kind: str  # "logit_diff" | "regression"
    seq_len: int
    params: dict[str, object] = field(default_factory=dict)
    tol: float = 0.02

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise ValueError(f"unknown task generator {self.generator!r}: use one of {GENERATORS}")
        if self.kind not in ("logit_diff", "regression"):
            raise ValueError(f"unknown task kind {self.kind!r}: use 'logit_diff' or 'regression'")

    def to_json(self) -> dict[str, object]:
        return dict(generator=self.generator, kind=self.kind, seq_len=self.seq_len, params=self.params, tol=self.tol)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> "TaskSpec":
        return cls(data["generator"], data["kind"], int(data["seq_len"]), dict(data.get("params", {})),
                   float(data.get("tol", 0.02)))

    @classmethod
    def load(cls, path: str | Path) -> "TaskSpec":
        return cls.from_json(json.loads(Path(path).read_text()))

    def make_pairs(self, n: int, seed: int = 0) -> TaskBatch:
        """`n` clean/corrupt pairs, reproducible from `seed`."""
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        gen = torch.Generator().manual_seed(seed)
        return _MAKERS[self.generator](self, n, gen)

    def readout(self, logits: Tensor, batch: TaskBatch) -> Tensor:
        """Logits at the read positions: [n, P, vocab_out]."""
        return logits[:, batch.read_pos, :]

    def metric(self, logits: Tensor, batch: TaskBatch) -> Tensor:
        """Scalar metric (higher = more like the clean behaviour): mean logit difference, or -MSE."""
        out = self.readout(logits, batch)
        if self.kind == "regression":
            return -((out[..., 0] - batch.answer.to(out.dtype)) ** 2).mean()
        good = out.gather(-1, batch.answer[..., None])[..., 0]
        bad = out.gather(-1, batch.wrong[..., None])[..., 0]
        return (good - bad).mean()

    def accuracy(self, logits: Tensor, batch: TaskBatch) -> float:
        """Fraction of (row, read position) answers the model gets right."""
        out = self.readout(logits, batch)
        if self.kind == "regression":
            return float(((out[..., 0] - batch.answer.to(out.dtype)).abs() < self.tol).float().mean())
        return float((out.argmax(-1) == batch.answer).float().mean())


def _randint(gen: torch.Generator, low: int, high: int, shape: tuple[int, ...]) -> Tensor:
    return torch.randint(low, high, shape, generator=gen)


def _induction(spec: TaskSpec, n: int, gen: torch.Generator) -> TaskBatch:
    """BOS, random tokens with `A B` at i and `C D` at j; the last token is A (clean) or C (corrupt).

    A and C occur nowhere else, so the clean answer is B and the corrupt one is D (all four distinct).
    """
    vocab, T, bos = int(spec.params["d_vocab"]), spec.seq_len, int(spec.params["bos"])
    content = [t for t in range(vocab) if t != bos]
    clean = torch.empty(n, T, dtype=torch.long)
    corrupt = torch.empty(n, T, dtype=torch.long)
    answer = torch.empty(n, 1, dtype=torch.long)
    wrong = torch.empty(n, 1, dtype=torch.long)
    for row in range(n):
        perm = torch.randperm(len(content), generator=gen)[:4].tolist()
        a, b, c, d = (content[k] for k in perm)
        while True:
            i, j = _randint(gen, 1, T - 2, (2,)).tolist()
            if abs(i - j) >= 2:
                break
        fill = [t for t in content if t not in (a, c)]
        seq = [bos] + [fill[k] for k in _randint(gen, 0, len(fill), (T - 1,)).tolist()]
        seq[i], seq[i + 1], seq[j], seq[j + 1] = a, b, c, d
        seq[T - 1] = a
        clean[row] = torch.tensor(seq)
        seq[T - 1] = c
        corrupt[row] = torch.tensor(seq)
        answer[row, 0], wrong[row, 0] = b, d
    return TaskBatch(clean, corrupt, torch.tensor([T - 1]), answer, wrong)


def _reverse(spec: TaskSpec, n: int, gen: torch.Generator) -> TaskBatch:
    """BOS + random tokens; corrupt changes every token; answers are the reversed tokens (output ids)."""
    ids = [int(x) for x in spec.params["token_ids"]]
    out_ids = [int(x) for x in spec.params["output_ids"]]  # output id of each entry of token_ids
    bos, L = int(spec.params["bos"]), spec.seq_len - 1
    clean_idx = _randint(gen, 0, len(ids), (n, L))
    shift = _randint(gen, 1, len(ids), (n, L))
    corrupt_idx = (clean_idx + shift) % len(ids)
    as_ids = torch.tensor(ids)
    as_out = torch.tensor(out_ids)
    col = torch.full((n, 1), bos, dtype=torch.long)
    clean = torch.cat([col, as_ids[clean_idx]], 1)
    corrupt = torch.cat([col, as_ids[corrupt_idx]], 1)
    return TaskBatch(clean, corrupt, torch.arange(1, L + 1), as_out[clean_idx.flip(1)], as_out[corrupt_idx.flip(1)])


def _frac_prevs(spec: TaskSpec, n: int, gen: torch.Generator) -> TaskBatch:
    """BOS + random tokens; target[p] = fraction of tokens[1..p] equal to the target token."""
    ids = [int(x) for x in spec.params["token_ids"]]
    target_id, bos, L = int(spec.params["target_id"]), int(spec.params["bos"]), spec.seq_len - 1
    as_ids = torch.tensor(ids)
    col = torch.full((n, 1), bos, dtype=torch.long)
    clean = torch.cat([col, as_ids[_randint(gen, 0, len(ids), (n, L))]], 1)
    corrupt = torch.cat([col, as_ids[_randint(gen, 0, len(ids), (n, L))]], 1)
    hits = (clean[:, 1:] == target_id).double().cumsum(1)
    target = hits / torch.arange(1, L + 1, dtype=torch.float64)
    return TaskBatch(clean, corrupt, torch.arange(1, L + 1), target.float(), None)


def _marker(spec: TaskSpec, n: int, gen: torch.Generator) -> TaskBatch:
    """BOS, random content, marker M at i, value at i+1, query token Q last: answer = token after M.

    Corrupt: the same sequence with the marker moved to another position j (answer = token after it).
    """
    vocab, T = int(spec.params["d_vocab"]), spec.seq_len
    bos, marker, query = int(spec.params["bos"]), int(spec.params["marker"]), int(spec.params["query"])
    content = [t for t in range(vocab) if t not in (bos, marker, query)]
    clean = torch.empty(n, T, dtype=torch.long)
    corrupt = torch.empty(n, T, dtype=torch.long)
    answer = torch.empty(n, 1, dtype=torch.long)
    wrong = torch.empty(n, 1, dtype=torch.long)
    for row in range(n):
        body = [content[k] for k in _randint(gen, 0, len(content), (T - 2,)).tolist()]
        while True:
            i, j = _randint(gen, 1, T - 2, (2,)).tolist()
            if i != j and body[i] != body[j]:  # body[i] is the token after M placed at i-1 (0-based body)
                break
        seq = [bos] + body + [query]
        c = list(seq)
        seq[i] = marker
        c[j] = marker
        clean[row], corrupt[row] = torch.tensor(seq), torch.tensor(c)
        answer[row, 0], wrong[row, 0] = seq[i + 1], c[j + 1]
    return TaskBatch(clean, corrupt, torch.tensor([T - 1]), answer, wrong)


_MAKERS = {"induction": _induction, "reverse": _reverse, "frac_prevs": _frac_prevs, "marker": _marker}
