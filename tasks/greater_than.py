"""Greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" → a year > 32.

Needs a tokenizer that writes a year 17YY as the two tokens " 17" + "YY" for every YY in 00–99 (GPT-2
does). Tokenizers that split numbers into digits (SmolLM2, Llama) cannot express the task as one
next-token prediction: `generate` raises `TaskUnsupportedError` saying so, with the tokenization it saw.

Corruption "01": the start year becomes 1701, so every candidate year is "greater". Metric (prob_diff):
Σ_{y > YY} p(y) − Σ_{y ≤ YY} p(y) over the 100 two-digit year tokens at END.

Answer representation: `answer_ids[b]` are the year tokens y > YY and `wrong_ids[b]` the year tokens
y ≤ YY, each listed in increasing year order and right-padded with -1 to width 100 (`PAD_ID`).
Roles: `noun` (last token of the noun), `XX1` (the " 17" of the start year), `YY`, `END`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from torch import Tensor

from circuitlab.tasks import data
from circuitlab.tasks.base import PAD_ID, PromptPairs, Task, TaskUnsupportedError, check_aligned, require_n
from circuitlab.tasks.tokens import (
    ModelOrTokenizer, TokenSource, options_from, pad_id_for, pad_right, render, resolve,
)

WIDTH = 100


@dataclass(frozen=True)
class GreaterThanOptions:
    """Options of `GreaterThanTask.generate`: nouns, the YY range (inclusive), the century digits, the
    template (slots {noun}, {YY}; must end with the century), prompt_length, prepend_bos."""

    nouns: Sequence[str] | None = None
    years: tuple[int, int] = (2, 98)
    century: int = 17
    template: str | None = None
    prompt_length: int | None = None
    prepend_bos: bool | None = None


def year_token_ids(src: TokenSource, century: int = 17, context: str = "The war lasted from the year") -> list[int]:
    """Token ids of "00" … "99" as they follow " {century}"; raise TaskUnsupportedError if years don't split so."""
    prefix = f"{context} {century}"
    base = src.encode(prefix)
    cent = src.encode(f" {century}")
    problems = []
    if len(cent) != 1 or base[-1:] != cent:
        problems.append(f"{prefix!r} → {[src.decode([i]) for i in base]} does not end in one ' {century}' token")
    ids: list[int] = []
    for yy in range(100):
        full = src.encode(f"{prefix}{yy:02d}")
        if full[:len(base)] != base or len(full) != len(base) + 1 or src.decode(full[-1:]).strip() != f"{yy:02d}":
            problems.append(f"'{century}{yy:02d}' → {[src.decode([i]) for i in full[len(base) - 1:]]}")
            break
        ids.append(full[-1])
    if not problems and len(set(ids)) != 100:
        problems.append("two years share a token")
    if problems:
        raise TaskUnsupportedError(
            "greater-than needs a tokenizer that writes a year 17YY as ' 17' + 'YY' (one token per two-digit "
            f"year, like GPT-2); this one does not: {problems[0]}. Digit-by-digit tokenizers (SmolLM2, Llama) "
            "cannot pose the task as a single next-token choice; use another task or a GPT-2-style tokenizer.")
    return ids


class GreaterThanTask(Task):
    """Year comparison; metric prob_diff = P(year > YY) − P(year ≤ YY) at END, "01" corruption."""

    name = "greater_than"
    description = "Greater-than (Hanna et al. 2023): P(year > YY) − P(year ≤ YY) at END"
    roles = ("noun", "XX1", "YY", "END")
    metric_name = "prob_diff"

    def generate(self, model_or_tokenizer: ModelOrTokenizer, n: int, *, seed: int = 0,
                 **options: object) -> PromptPairs:
        """`n` distinct (noun, YY) prompts; raises TaskUnsupportedError for digit-splitting tokenizers."""
        opts = options_from(GreaterThanOptions, options, self.name)
        src = resolve(model_or_tokenizer, prepend_bos=opts.prepend_bos)
        src.require_tokenizer(self.name)
        century = int(opts.century)
        if not 10 <= century <= 99:
            raise ValueError(f"century must be two digits, got {century}")
        lo, hi = opts.years
        if not 2 <= lo <= hi <= 98:
            raise ValueError(f"years must lie in 2..98 (so that both answer sets and the '01' corruption make "
                             f"sense), got {opts.years}")
        year_ids = year_token_ids(src, century)
        template = opts.template or data.GREATER_THAN_TEMPLATE.replace("17", str(century))
        if not template.endswith(str(century)):
            raise ValueError(f"the greater-than template must end with the century {century}: {template!r}")
        nouns = list(dict.fromkeys(opts.nouns or data.GREATER_THAN_NOUNS))
        if not nouns:
            raise ValueError("nouns=[] leaves no greater-than prompt")
        ref = {noun: render(template, {"noun": noun, "YY": "32"}, src) for noun in nouns}
        lengths = {noun: len(r.ids) for noun, r in ref.items()}
        kept = [noun for noun in nouns if opts.prompt_length is None or lengths[noun] == opts.prompt_length]
        if not kept:
            raise ValueError(f"no greater-than prompt has {opts.prompt_length} tokens; lengths: "
                             f"{sorted(set(lengths.values()))}")
        years = list(range(lo, hi + 1))
        require_n(n, len(kept) * len(years), "greater-than prompts (nouns × years)")

        rng = random.Random(seed)
        combos = rng.sample([(noun, yy) for noun in kept for yy in years], n)
        clean_ids, corrupt_ids, clean_texts, corrupt_texts, rows = [], [], [], [], []
        pos: dict[str, list[int]] = {r: [] for r in self.roles}
        answers, wrongs = [], []
        for noun, yy in combos:
            clean = render(template, {"noun": noun, "YY": f"{yy:02d}"}, src)
            corrupt = render(template, {"noun": noun, "YY": "01"}, src)
            check_aligned([clean.ids], [corrupt.ids], [clean.text], [corrupt.text])
            y0, y1 = clean.spans["YY"]
            if y1 - y0 != 1 or clean.ids[y0] != year_ids[yy] or corrupt.ids[y0] != year_ids[1]:
                raise TaskUnsupportedError(f"the year in {clean.text!r} is not a single two-digit token here")
            clean_ids.append(clean.ids)
            corrupt_ids.append(corrupt.ids)
            clean_texts.append(clean.text)
            corrupt_texts.append(corrupt.text)
            pos["noun"].append(clean.spans["noun"][1] - 1)
            pos["XX1"].append(y0 - 1)
            pos["YY"].append(y0)
            pos["END"].append(len(clean.ids) - 1)
            greater = year_ids[yy + 1:]
            smaller = year_ids[:yy + 1]
            answers.append(greater + [PAD_ID] * (WIDTH - len(greater)))
            wrongs.append(smaller + [PAD_ID] * (WIDTH - len(smaller)))
            rows.append(dict(noun=noun, year=yy, century=century, start_year=century * 100 + yy))
        pad = pad_id_for(src)
        clean_padded, mask = pad_right(clean_ids, pad)
        return PromptPairs(
            task=self.name,
            clean_tokens=torch.tensor(clean_padded),
            corrupt_tokens=torch.tensor(pad_right(corrupt_ids, pad)[0]),
            attention_mask=None if mask is None else torch.tensor(mask),
            answer_ids=torch.tensor(answers),
            wrong_ids=torch.tensor(wrongs),
            positions={k: torch.tensor(v) for k, v in pos.items()},
            clean_texts=clean_texts,
            corrupt_texts=corrupt_texts,
            meta=pd.DataFrame(rows),
            info=dict(seed=seed, century=century, years=[lo, hi], prompt_length=max(map(len, clean_ids)),
                      prompt_lengths=sorted({len(c) for c in clean_ids}), pad_id=pad, nouns_kept=len(kept),
                      nouns_dropped=len(nouns) - len(kept), year_token_ids=year_ids, bos_id=src.bos_id),
        )

    def metric_at(self, logits_at: Tensor, pairs: PromptPairs) -> Tensor:
        """P(year > YY) − P(year ≤ YY) at END: `[..., B, 1, V]` → `[..., B]`."""
        if logits_at.ndim < 3 or logits_at.shape[-2] != 1:
            raise ValueError(f"expected logits at one position, [..., batch, 1, vocab]; got {tuple(logits_at.shape)}")
        probs = logits_at[..., 0, :].softmax(-1)

        def mass(ids: Tensor) -> Tensor:
            ids = ids.to(probs.device)
            picked = probs.gather(-1, ids.clamp(min=0).expand(*probs.shape[:-2], *ids.shape))
            return (picked * (ids != PAD_ID)).sum(-1)

        return mass(pairs.answer_ids) - mass(pairs.wrong_ids)
