"""A task from a researcher's own rows: `load_task("pairs.jsonl")`, `from_records([...])`.

`RecordsTask.generate(model_or_tokenizer, n)` tokenizes the first `n` rows (all by default), checks what
needs the tokenizer (clean and corrupt token lengths, single-token answers, roles found) and returns
right-padded `PromptPairs` with a per-prompt `END` (the last token) and one position per role. Schema and
metrics: `tasks.records`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TYPE_CHECKING

import pandas as pd
import torch
from torch import Tensor

from circuitlab.tasks.base import PAD_ID, PromptPairs, Task, gather_ids, require_n
from circuitlab.tasks.records import METRICS, DataError, Record, check_consistent, parse_record, read_records
from circuitlab.tasks.tokens import ModelOrTokenizer, TokenSource, is_bridge, pad_id_for, pad_right, resolve

if TYPE_CHECKING:  # annotations only: tasks never import or run a model
    from transformer_lens.model_bridge import TransformerBridge


class RecordsTask(Task):
    """Clean/corrupt pairs given as rows; metric logit diff, probability diff or KL at each prompt's END."""

    description = "Your own clean/corrupt pairs (from rows or a file)"

    def __init__(self, records: Sequence[Record], *, source: str = "<records>", name: str = "custom",
                 metric: str | None = None) -> None:
        if not records:
            raise DataError(source, None, None, "holds no rows", "give at least one clean/corrupt pair")
        check_consistent(records, source)
        chosen = metric or records[0].metric or "logit_diff"
        if chosen not in METRICS:
            raise ValueError(f"metric {chosen!r} is unknown: use one of {', '.join(METRICS)}")
        if chosen != "kl":
            for rec in records:
                for key, values in (("answer", rec.answer), ("wrong", rec.wrong)):
                    if not values:
                        raise DataError(source, rec.row, key, f"is missing (metric {chosen} needs it)",
                                        f"give the {'correct' if key == 'answer' else 'wrong'} next token as text "
                                        "(e.g. \" Mary\") or token id, or use metric kl")
        self.records, self.source, self.name, self.metric_name = list(records), source, name, chosen
        first = records[0]
        self.roles = tuple(r for r in (first.positions or first.roles) if r != "END") + ("END",)

    def __repr__(self) -> str:
        return f"RecordsTask(source={self.source!r}, rows={len(self.records)}, metric={self.metric_name!r})"

    # ------------------------------------------------------------------ tokenizing
    def _answer_ids(self, rec: Record, name: str, values: list[str | int], src: TokenSource) -> list[int]:
        ids = []
        for value in values:
            if isinstance(value, int):
                if not 0 <= value < src.d_vocab:
                    raise DataError(self.source, rec.row, name, f"token id {value} is outside the vocabulary "
                                    f"(size {src.d_vocab})", "use an id of this model's tokenizer")
                ids.append(value)
                continue
            if src.tokenizer is None:
                raise DataError(self.source, rec.row, name, f"is a text ({value!r}) but the model has no tokenizer",
                                "give token ids instead")
            tokens = src.encode(value)
            if len(tokens) != 1:
                shown = [src.decode([t]) for t in tokens]
                raise DataError(self.source, rec.row, name, f"{value!r} is {len(tokens)} tokens {shown}, but "
                                f"{self.metric_name} needs one token per answer",
                                "use a word that is one token for this tokenizer (often with a leading space), or give its first "
                                "token id")
            ids.append(tokens[0])
        return ids

    def _role_position(self, rec: Record, role: str, spec: Any, src: TokenSource, ids: list[int]) -> int:
        return role_position(self.source, rec.row, role, spec, rec.clean, ids, src)

    def _row_pair(self, rec: Record, src: TokenSource) -> tuple[list[int], list[int], dict[str, int]]:
        if rec.clean_ids is not None and rec.corrupt_ids is not None:
            clean, corrupt, positions = rec.clean_ids, rec.corrupt_ids, dict(rec.positions or {})
            bad = [i for i in clean + corrupt if not 0 <= i < src.d_vocab]
            if bad:
                raise DataError(self.source, rec.row, "clean_ids", f"token id {bad[0]} is outside the vocabulary "
                                f"(size {src.d_vocab})", "these ids belong to another model: drop the *_ids fields")
        else:
            if src.tokenizer is None:
                raise DataError(self.source, rec.row, "clean", "is text but the model has no tokenizer",
                                "boot the model with a tokenizer or give clean_ids/corrupt_ids")
            clean, corrupt = src.with_bos(src.encode(rec.clean)), src.with_bos(src.encode(rec.corrupt))
            positions = {role: self._role_position(rec, role, spec, src, clean) for role, spec in rec.roles.items()}
        if len(clean) != len(corrupt):
            raise DataError(self.source, rec.row, "corrupt", f"has {len(corrupt)} tokens but the clean prompt has "
                            f"{len(clean)} ({rec.corrupt!r} vs {rec.clean!r})",
                            "make both prompts the same number of tokens (swap words for words of equal token count)")
        if rec.positions is None or "END" not in positions:
            positions["END"] = len(clean) - 1
        for role, pos in positions.items():
            if not 0 <= pos < len(clean):
                raise DataError(self.source, rec.row, "positions", f"role {role} at {pos} is outside the prompt "
                                f"({len(clean)} tokens)", "fix the position or drop it")
        return clean, corrupt, positions

    def generate(self, model_or_tokenizer: ModelOrTokenizer, n: int | None = None, *, seed: int = 0,
                 **options: object) -> PromptPairs:
        """The first `n` rows (all when n is None) as padded PromptPairs; `seed` is recorded, nothing is random."""
        if options:
            raise ValueError(f"a task from rows takes no options, got {sorted(options)}")
        if n is None:
            n = len(self.records)
        require_n(n, len(self.records), f"rows in {self.source}")
        src = resolve(model_or_tokenizer)
        rows = self.records[:n]
        clean, corrupt, positions, answers, wrongs = [], [], [], [], []
        for rec in rows:
            c, k, p = self._row_pair(rec, src)
            clean.append(c), corrupt.append(k), positions.append(p)
            answers.append(self._answer_ids(rec, "answer", rec.answer, src))
            wrongs.append(self._answer_ids(rec, "wrong", rec.wrong, src))
        pad = pad_id_for(src)
        clean_t, mask = pad_right(clean, pad)
        corrupt_t, _ = pad_right(corrupt, pad)
        width_a, width_w = max(1, max(map(len, answers))), max(1, max(map(len, wrongs)))
        pairs = PromptPairs(
            task=self.name,
            clean_tokens=torch.tensor(clean_t), corrupt_tokens=torch.tensor(corrupt_t),
            answer_ids=torch.tensor([a + [PAD_ID] * (width_a - len(a)) for a in answers]),
            wrong_ids=torch.tensor([w + [PAD_ID] * (width_w - len(w)) for w in wrongs]),
            positions={role: torch.tensor([p[role] for p in positions]) for role in self.roles},
            clean_texts=[r.clean for r in rows], corrupt_texts=[r.corrupt for r in rows],
            meta=pd.DataFrame([dict(r.meta, row=r.row) for r in rows]),
            attention_mask=None if mask is None else torch.tensor(mask),
            info=dict(source=self.source, metric=self.metric_name, seed=seed, pad_id=pad, bos_id=src.bos_id,
                      prompt_lengths=sorted({len(c) for c in clean})),
        )
        if self.metric_name == "kl":
            if not is_bridge(model_or_tokenizer):
                raise ValueError("metric kl needs the model (not only a tokenizer) to compute the clean distributions")
            self.attach_reference(model_or_tokenizer, pairs)
        return pairs

    # ------------------------------------------------------------------ metrics
    def attach_reference(self, model: TransformerBridge, pairs: PromptPairs, batch_size: int = 16) -> None:
        """For the KL metric: store the clean run's log-probabilities at END in `pairs.reference_logprobs`."""
        out = []
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                part = pairs.subset(slice(start, start + batch_size))
                logits = model(part.clean_tokens.to(model.cfg.device))  # right padding: real positions exact
                out.append(torch.log_softmax(self.gather(logits, part).float(), -1).cpu())
        pairs.reference_logprobs = torch.cat(out)

    def metric_at(self, logits_at: Tensor, pairs: PromptPairs) -> Tensor:
        """Per-prompt metric `[..., B]` from logits at END `[..., B, 1, V]` (see `tasks.records` for each)."""
        last = logits_at[..., 0, :]
        if self.metric_name == "kl":
            ref = getattr(pairs, "reference_logprobs", None)
            if ref is None:
                raise ValueError("metric kl needs the clean distributions: call task.attach_reference(model, pairs)")
            logp = torch.log_softmax(last, -1)
            ref = ref[..., 0, :].to(logp.device, logp.dtype)
            return -(ref.exp() * (ref - logp)).sum(-1)
        values = torch.softmax(last, -1) if self.metric_name == "prob_diff" else last
        answer, wrong = pairs.answer_ids, pairs.wrong_ids
        a = gather_ids(values, answer) * (answer != PAD_ID).to(values.device)
        w = gather_ids(values, wrong) * (wrong != PAD_ID).to(values.device)
        if self.metric_name == "prob_diff":
            return a.sum(-1) - w.sum(-1)
        a_n = (answer != PAD_ID).sum(-1).clamp(min=1).to(values.device)
        w_n = (wrong != PAD_ID).sum(-1).clamp(min=1).to(values.device)
        return a.sum(-1) / a_n - w.sum(-1) / w_n


def role_position(source: str, row: int, role: str, spec: str | Mapping[str, object] | Sequence[int], text: str,
                  ids: list[int], src: TokenSource, *,
                  side: str = "clean") -> int:
    """The token index where a role's marked text (substring, {"text", "occurrence"} or [start, end]) starts in
    `text` (tokenized as `ids`); a `DataError` naming the row and role otherwise. `side` names the prompt."""
    if isinstance(spec, str):
        spec = {"text": spec}
    if isinstance(spec, dict):
        needle, occurrence = spec.get("text"), int(spec.get("occurrence", 1))
        start = -1
        for _ in range(max(occurrence, 1)):
            start = text.find(needle, start + 1) if isinstance(needle, str) and needle else -1
            if start < 0:
                break
        if start < 0:
            raise DataError(source, row, f"roles.{role}", f"{needle!r} does not occur"
                            f"{'' if occurrence == 1 else f' {occurrence} times'} in the {side} text {text!r}",
                            f"give a substring of the {side} prompt (mind leading spaces) or a [start, end] span")
    elif isinstance(spec, list) and len(spec) == 2 and all(isinstance(v, int) for v in spec):
        start, end = spec
        if not 0 <= start < end <= len(text):
            raise DataError(source, row, f"roles.{role}", f"span {spec} is outside the {side} text "
                            f"({len(text)} characters)", "give [start, end] character offsets with start < end")
    else:
        raise DataError(source, row, f"roles.{role}", f"{spec!r} is neither a substring nor a span",
                        f"write a substring of the {side} text or [start, end]")
    prefix = src.encode(text[:start])
    if ids[src.n_prefix:src.n_prefix + len(prefix)] != prefix and start > 0 and text[start - 1] == " ":
        prefix = src.encode(text[:start - 1])  # "Mary" marked inside the token " Mary"
    if ids[src.n_prefix:src.n_prefix + len(prefix)] != prefix or len(prefix) + src.n_prefix >= len(ids):
        raise DataError(source, row, f"roles.{role}", f"the text at character {start} is inside a token "
                        f"of {text!r}", "mark text that starts a token (usually with its leading space)")
    return src.n_prefix + len(prefix)


def from_records(records: Iterable[Mapping[str, object]], *, metric: str | None = None, name: str = "custom",
                 source: str = "<records>") -> RecordsTask:
    """A task from rows (dicts in the file schema of `tasks.records`), checked row by row (rows count from 1)."""
    parsed = [parse_record(obj, source, i) if isinstance(obj, Mapping) else _not_a_row(obj, source, i)
              for i, obj in enumerate(records, 1)]
    return RecordsTask(parsed, source=source, name=name, metric=metric)


def _not_a_row(obj: Any, source: str, row: int) -> Record:
    raise DataError(source, row, None, f"is a {type(obj).__name__}, not a mapping", "give one dict per pair")


def load_task(path: str | os.PathLike[str], *, metric: str | None = None) -> RecordsTask:
    """A task from a `.jsonl` or `.csv` dataset (schema: `tasks.records`); errors name file, row and field."""
    path = Path(path)
    return RecordsTask(read_records(path), source=str(path), name=path.stem, metric=metric)


def looks_like_path(name: str) -> bool:
    """True when a --task value names a dataset file rather than a built-in task."""
    return str(name).lower().endswith((".jsonl", ".csv", ".json")) or os.sep in str(name)
