"""Counterfactual datasets for interchange interventions: base/source prompts and the causal model's answer.

A row pairs a *base* prompt with a *source* prompt that differs in one high-level variable (IOI's `io`, the
capitals' `country`, ...), and names the token(s) the causal model predicts for the base prompt when that
variable takes the source's value (`expected`), and what the base prompt alone should give (`base_answer`).
Base and source are tokenized separately: they may differ in length, and every role has a position on each
side (`base_positions`, `source_positions`; `END` is each prompt's last token).

File schema (`.jsonl` or `.csv`, one row per pair; errors as for pair files, `tasks.records.DataError`):
`base`, `source` (texts), `expected` (text/id/list: the token the intervened base run should predict),
`variable` (name), optional `base_answer`, `roles` ({name: substring or [start, end]}, resolved in base and
source separately; `{name: {"base": " Mary", "source": " Anna"}}` marks each side's own text; CSV
`role:NAME`/`span:NAME`), `meta`. The `counterfactuals.jsonl` a localisation
run writes (`base_ids`, `source_ids`, `expected_id`, `positions: {"base": {...}, "source": {...}}`, `split`) is
itself valid input.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from circuitlab.tasks.base import PAD_ID
from circuitlab.tasks.custom import role_position
from circuitlab.tasks.records import DataError, answer_values, csv_row, decoded_lines, jsonl_objects
from circuitlab.tasks.tokens import ModelOrTokenizer, TokenSource, pad_id_for, pad_right, resolve


@dataclass
class Counterfactuals:
    """Base/source prompt pairs for one variable, right-padded per side, with expected and base answers.

    `expected_ids` / `base_answer_ids` are `[batch, K]` (-1 pads; a base answer of all -1 is unknown);
    `base_positions[role]` / `source_positions[role]` are `[batch]` indices into each side's tokens;
    `split` holds "train"/"test" per row once a split was chosen (empty before).
    """

    task: str
    variable: str
    base_tokens: Tensor
    source_tokens: Tensor
    expected_ids: Tensor
    base_answer_ids: Tensor
    base_positions: dict[str, Tensor]
    source_positions: dict[str, Tensor]
    base_texts: list[str]
    source_texts: list[str]
    meta: pd.DataFrame
    base_mask: Tensor | None = None
    source_mask: Tensor | None = None
    split: list[str] = field(default_factory=list)
    info: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = int(self.base_tokens.shape[0])
        if self.source_tokens.shape[0] != n or self.expected_ids.shape[0] != n or self.base_answer_ids.shape[0] != n:
            raise ValueError("base, source, expected and base answers must have one row per pair")
        if list(self.base_positions) != list(self.source_positions):
            raise ValueError(f"base roles {list(self.base_positions)} differ from source roles {list(self.source_positions)}")
        if "END" not in self.base_positions:
            raise ValueError("counterfactuals need an END role (each prompt's last token) on both sides")
        if self.split and len(self.split) != n:
            raise ValueError(f"split must have one entry per pair ({n}), got {len(self.split)}")

    def __len__(self) -> int:
        return int(self.base_tokens.shape[0])

    @property
    def roles(self) -> list[str]:
        return list(self.base_positions)

    def subset(self, index: Sequence[int]) -> Counterfactuals:
        """The pairs at `index` (a list of row numbers), each side trimmed to its longest remaining prompt."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        rows = idx.tolist()

        def trim(tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
            tokens, mask = tokens[idx], None if mask is None else mask[idx]
            if mask is None or not len(rows):
                return tokens, mask
            width = int(mask.sum(1).max())
            tokens, mask = tokens[:, :width], mask[:, :width]
            return tokens, (None if bool(mask.all()) else mask)

        base, base_mask = trim(self.base_tokens, self.base_mask)
        source, source_mask = trim(self.source_tokens, self.source_mask)
        return Counterfactuals(
            task=self.task, variable=self.variable, base_tokens=base, source_tokens=source,
            expected_ids=self.expected_ids[idx], base_answer_ids=self.base_answer_ids[idx],
            base_positions={k: v[idx] for k, v in self.base_positions.items()},
            source_positions={k: v[idx] for k, v in self.source_positions.items()},
            base_texts=[self.base_texts[i] for i in rows], source_texts=[self.source_texts[i] for i in rows],
            meta=self.meta.iloc[rows].reset_index(drop=True), base_mask=base_mask, source_mask=source_mask,
            split=[self.split[i] for i in rows] if self.split else [], info=dict(self.info))

    def with_split(self, test_fraction: float = 0.5, *, seed: int = 0) -> Counterfactuals:
        """A copy whose rows are assigned to `train`/`test` (seeded shuffle; at least one row in each)."""
        n = len(self)
        if n < 2:
            raise ValueError(f"a train/test split needs at least 2 counterfactual pairs, got {n}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
        n_test = min(n - 1, max(1, int(round(n * test_fraction))))
        test = set(order[:n_test])
        out = self.subset(range(n))
        out.split = ["test" if i in test else "train" for i in range(n)]
        return out

    def part(self, split: str) -> Counterfactuals:
        """The rows of one split (`train` or `test`)."""
        if not self.split:
            raise ValueError("these counterfactuals have no train/test split yet: call with_split() first")
        return self.subset([i for i, s in enumerate(self.split) if s == split])

    def save_jsonl(self, path: str | os.PathLike[str]) -> Path:
        """One JSON object per pair (texts, ids, expected and base answers, positions on both sides, split)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blen = self.base_mask.sum(1).tolist() if self.base_mask is not None else [self.base_tokens.shape[1]] * len(self)
        slen = self.source_mask.sum(1).tolist() if self.source_mask is not None else [self.source_tokens.shape[1]] * len(self)
        with open(path, "w", encoding="utf-8") as handle:
            for i in range(len(self)):
                expected = [t for t in self.expected_ids[i].tolist() if t != PAD_ID]
                base_answer = [t for t in self.base_answer_ids[i].tolist() if t != PAD_ID]
                record = {
                    "task": self.task, "variable": self.variable, "base": self.base_texts[i],
                    "source": self.source_texts[i], "base_ids": self.base_tokens[i, :int(blen[i])].tolist(),
                    "source_ids": self.source_tokens[i, :int(slen[i])].tolist(),
                    "expected_id": expected[0] if len(expected) == 1 else expected,
                    "base_answer_id": base_answer[0] if len(base_answer) == 1 else base_answer,
                    "positions": {"base": {k: int(v[i]) for k, v in self.base_positions.items()},
                                  "source": {k: int(v[i]) for k, v in self.source_positions.items()}},
                    "split": self.split[i] if self.split else None,
                    "meta": {str(c): _plain(self.meta.iloc[i][c]) for c in self.meta.columns},
                }
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        return path


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


@dataclass
class CounterfactualRow:
    """One side-by-side pair before padding: token ids and role positions per side, answer ids."""

    base_ids: list[int]
    source_ids: list[int]
    expected: list[int]
    base_answer: list[int]
    base_positions: dict[str, int]
    source_positions: dict[str, int]
    base_text: str = ""
    source_text: str = ""
    meta: dict[str, object] = field(default_factory=dict)
    split: str | None = None


def assemble(rows: Sequence[CounterfactualRow], *, task: str, variable: str, pad_id: int,
             info: Mapping[str, object] | None = None) -> Counterfactuals:
    """Pad rows into one `Counterfactuals` (END added as each prompt's last token where missing)."""
    if not rows:
        raise ValueError("no counterfactual pairs to assemble")
    for r in rows:
        r.base_positions.setdefault("END", len(r.base_ids) - 1)
        r.source_positions.setdefault("END", len(r.source_ids) - 1)
    roles = list(rows[0].base_positions)
    base, base_mask = pad_right([r.base_ids for r in rows], pad_id)
    source, source_mask = pad_right([r.source_ids for r in rows], pad_id)

    def ids(lists: list[list[int]]) -> Tensor:
        width = max(1, max(len(x) for x in lists))
        return torch.tensor([x + [PAD_ID] * (width - len(x)) for x in lists], dtype=torch.long)

    splits = [r.split for r in rows]
    return Counterfactuals(
        task=task, variable=variable, base_tokens=torch.tensor(base), source_tokens=torch.tensor(source),
        expected_ids=ids([r.expected for r in rows]), base_answer_ids=ids([r.base_answer for r in rows]),
        base_positions={k: torch.tensor([r.base_positions[k] for r in rows]) for k in roles},
        source_positions={k: torch.tensor([r.source_positions[k] for r in rows]) for k in roles},
        base_texts=[r.base_text for r in rows], source_texts=[r.source_text for r in rows],
        meta=pd.DataFrame([r.meta for r in rows]) if any(r.meta for r in rows) else pd.DataFrame(index=range(len(rows))),
        base_mask=None if base_mask is None else torch.tensor(base_mask),
        source_mask=None if source_mask is None else torch.tensor(source_mask),
        split=[str(s) for s in splits] if all(s in ("train", "test") for s in splits) else [],
        info=dict(info or {}))


# --------------------------------------------------------------------------------------------- files
def _token_ids(values: list[str | int], src: TokenSource, source: str, row: int, name: str) -> list[int]:
    out = []
    for value in values:
        if isinstance(value, int):
            if not 0 <= value < src.d_vocab:
                raise DataError(source, row, name, f"token id {value} is outside the vocabulary (size {src.d_vocab})",
                                "use an id of this model's tokenizer")
            out.append(value)
            continue
        tokens = src.encode(value) if src.tokenizer is not None else []
        if len(tokens) != 1:
            shown = [src.decode([t]) for t in tokens]
            raise DataError(source, row, name, f"{value!r} is {len(tokens)} tokens {shown}, but interchange accuracy "
                            "compares one next token", "use a word that is one token for this tokenizer (often with "
                            "a leading space), or give its token id")
        out.append(tokens[0])
    return out


def _side_spec(spec: Any, side: str) -> Any:
    """A role's spec for one side: `{"base": ..., "source": ...}` gives each side its own text or span."""
    if isinstance(spec, dict) and set(spec) == {"base", "source"}:
        return spec[side]
    return spec


def _row(obj: Mapping[str, Any], src: TokenSource, source: str, row: int) -> CounterfactualRow:
    """Check one file row and tokenize it (roles resolved in base and source separately)."""
    if "base_ids" in obj or "source_ids" in obj:  # a saved counterfactuals.jsonl: ids and positions as they are
        ids = {}
        for key in ("base_ids", "source_ids"):
            value = obj.get(key)
            if not isinstance(value, list) or not value or not all(isinstance(v, int) and 0 <= v < src.d_vocab for v in value):
                raise DataError(source, row, key, f"must be a non-empty list of token ids of this model, got "
                                f"{str(value)[:60]!r}", "write a JSON list of integers, or give the texts only")
            ids[key] = value
        positions = obj.get("positions") or {}
        if not isinstance(positions, dict) or set(positions) != {"base", "source"}:
            raise DataError(source, row, "positions", "must be {\"base\": {role: index}, \"source\": {role: index}}",
                            "write both sides' role positions")
        expected = answer_values(obj.get("expected_id", obj.get("expected")), source, row, "expected_id", required=True)
        base_answer = answer_values(obj.get("base_answer_id", obj.get("base_answer")), source, row, "base_answer_id",
                                    required=False)
        out = CounterfactualRow(ids["base_ids"], ids["source_ids"], _token_ids(expected, src, source, row, "expected_id"),
                                _token_ids(base_answer, src, source, row, "base_answer_id"),
                                {str(k): int(v) for k, v in positions["base"].items()},
                                {str(k): int(v) for k, v in positions["source"].items()},
                                str(obj.get("base", "")), str(obj.get("source", "")), dict(obj.get("meta") or {}),
                                obj.get("split"))
    else:
        texts = {}
        for key in ("base", "source"):
            value = obj.get(key)
            if not isinstance(value, str) or not value.strip():
                raise DataError(source, row, key, f"must be a non-empty text, got {value!r}",
                                "every row needs 'base', 'source', 'expected' and 'variable'")
            texts[key] = value
        if src.tokenizer is None:
            raise DataError(source, row, "base", "is text but the model has no tokenizer", "give base_ids/source_ids")
        expected = answer_values(obj.get("expected"), source, row, "expected", required=True)
        base_answer = answer_values(obj.get("base_answer"), source, row, "base_answer", required=False)
        roles = obj.get("roles") or {}
        if not isinstance(roles, dict):
            raise DataError(source, row, "roles", f"must be an object {{name: substring or [start, end]}}, got {roles!r}",
                            "write e.g. {\"IO\": \" Mary\"}")
        if "END" in roles:
            raise DataError(source, row, "roles.END", "END is always each prompt's last token (where the answer is read)",
                            "drop the END role")
        meta = obj.get("meta") or {}
        if not isinstance(meta, dict):
            raise DataError(source, row, "meta", f"must be an object, got {meta!r}", "write e.g. {\"template\": 3}")
        side_ids = {k: src.with_bos(src.encode(t)) for k, t in texts.items()}
        side_pos: dict[str, dict[str, int]] = {}
        for side in ("base", "source"):
            side_pos[side] = {str(role): role_position(source, row, str(role), _side_spec(spec, side), texts[side],
                                                       side_ids[side], src, side=side)
                              for role, spec in roles.items()}
        out = CounterfactualRow(side_ids["base"], side_ids["source"], _token_ids(expected, src, source, row, "expected"),
                                _token_ids(base_answer, src, source, row, "base_answer"), side_pos["base"],
                                side_pos["source"], texts["base"], texts["source"], dict(meta))
    variable = obj.get("variable")
    if not isinstance(variable, str) or not variable:
        raise DataError(source, row, "variable", f"must name the high-level variable, got {variable!r}",
                        "write e.g. \"variable\": \"io\"")
    out.meta = dict(out.meta, variable=variable)
    for side, ids, pos in (("base", out.base_ids, out.base_positions), ("source", out.source_ids, out.source_positions)):
        for role, p in pos.items():
            if not 0 <= p < len(ids):
                raise DataError(source, row, "positions", f"role {role} at {p} is outside the {side} prompt "
                                f"({len(ids)} tokens)", "fix the position or drop it")
    return out


def read_counterfactuals(path: str | os.PathLike[str], model_or_tokenizer: ModelOrTokenizer) -> Counterfactuals:
    """Every row of a counterfactual `.jsonl`/`.csv` file, checked and tokenized; a `DataError` on the first bad one."""
    path = Path(path)
    source = str(path)
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise DataError(source, None, None, f"has suffix {path.suffix!r}", "use a .jsonl or .csv file")
    if not path.is_file():
        raise DataError(source, None, None, "does not exist", "check the path")
    src = resolve(model_or_tokenizer)
    lines = decoded_lines(path.read_bytes(), source)
    objs: list[tuple[int, Mapping[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO("\n".join(line for _, line in lines)))
        for raw in reader:
            if any((v or "").strip() for k, v in raw.items() if k is not None):
                objs.append((reader.line_num, csv_row(raw, source, reader.line_num, answers=("expected", "base_answer"),
                                                      known=("base", "source", "variable", "metric", "split"))))
    else:
        objs += jsonl_objects(lines, source, '{"base": ..., "source": ..., ...}')
    if not objs:
        raise DataError(source, None, None, "holds no rows", "add one row per base/source pair")
    rows = [_row(obj, src, source, lineno) for lineno, obj in objs]
    variables = {r.meta["variable"] for r in rows}
    if len(variables) > 1:
        bad = next(lineno for (lineno, _), r in zip(objs, rows) if r.meta["variable"] != rows[0].meta["variable"])
        raise DataError(source, bad, "variable", f"rows name several variables {sorted(variables)}",
                        "use one variable per file")
    roles = sorted(rows[0].base_positions)
    for (lineno, _), r in zip(objs, rows):
        if sorted(r.base_positions) != roles:
            raise DataError(source, lineno, "roles", f"names roles {sorted(r.base_positions)}, but the first row names "
                            f"{roles}", "give every row the same roles")
    return assemble(rows, task=path.stem, variable=rows[0].meta["variable"], pad_id=pad_id_for(src),
                    info=dict(source=source))
