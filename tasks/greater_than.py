"""Greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" → a year > 32.

Two ways of writing a year 17YY are supported, chosen from the tokenizer (`year_tokens`), recorded in
`info["year_mode"]`:

- "two_digit" (GPT-2): ' 17' + 'YY', one token per two-digit year. The next token at END is the whole end
  year's YY. Metric (prob_diff): Σ_{y > YY} p(y) − Σ_{y ≤ YY} p(y) over the 100 two-digit year tokens at END.
- "digit" (SmolLM2): one token per digit, '1', '7', 'Y', 'Y' (strictly: YY adds two single-digit tokens to the
  prefix's tokens, however the century itself is split). The prompt still ends after the century,
  so the next token is the end year's tens digit d. Metric (prob_diff): Σ_{d > t} p(d) − Σ_{d < t} p(d) over
  the ten digit tokens at END, t the tens digit of the start year's YY. This is the faithful analogue: a tens
  digit above t makes the end year greater whatever the units, one below makes it smaller; d = t leaves the
  answer to the units digit, so it counts on neither side. YY is kept to 10..89 (t in 1..8) so that both
  sides have digits.

Any other tokenization (e.g. one that merges '17' with some following digits, or cl100k-style three-digit number
chunks) raises `TaskUnsupportedError`.
Corruption "01": the start year becomes 1701, so (nearly) every end year is "greater".

Answer representation: `answer_ids[b]` are the year (or digit) tokens on the greater side and `wrong_ids[b]`
those on the smaller side, each in increasing order and right-padded with -1 to width 100 (`PAD_ID`).
Roles: `noun` (last token of the noun), `XX1` (the token just before YY: " 17", or the '7' in digit mode),
`YY` (the start year's YY token; in digit mode its first token, the tens digit), `END`.
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
    ModelOrTokenizer, Rendered, TokenSource, options_from, pad_id_for, pad_right, render, resolve,
)

WIDTH = 100
DIGIT_YEARS = (10, 89)  # digit mode: the start year's tens digit must have digits both above and below it


@dataclass(frozen=True)
class GreaterThanOptions:
    """Options of `GreaterThanTask.generate`: nouns, the YY range (inclusive; digit mode keeps 10..89 of it), the
    century digits, the template (slots {noun}, {YY}; must end with the century), prompt_length, prepend_bos."""

    nouns: Sequence[str] | None = None
    years: tuple[int, int] = (2, 98)
    century: int = 17
    template: str | None = None
    prompt_length: int | None = None
    prepend_bos: bool | None = None


@dataclass(frozen=True)
class YearTokens:
    """How a tokenizer writes YY after the century: mode "two_digit" (`ids[yy]` = the token of "00" … "99") or
    "digit" (`ids[d]` = the token of the digit d, ten of them)."""

    mode: str
    ids: list[int]


def _shown(src: TokenSource, ids: Sequence[int]) -> list[str]:
    return [src.decode([i]) for i in ids]


def _two_digit_ids(src: TokenSource, century: int, prefix: str, base: list[int]) -> tuple[list[int], str]:
    """("00" … "99" ids, "") if every year is ' {century}' + one two-digit token, else ([], what went wrong)."""
    cent = src.encode(f" {century}")
    if len(cent) != 1 or base[-1:] != cent:
        return [], f"{prefix!r} → {_shown(src, base)} does not end in one ' {century}' token"
    ids: list[int] = []
    for yy in range(100):
        full = src.encode(f"{prefix}{yy:02d}")
        if full[:len(base)] != base or len(full) != len(base) + 1 or src.decode(full[-1:]).strip() != f"{yy:02d}":
            return [], f"'{century}{yy:02d}' → {_shown(src, full[len(base) - 1:])}"
        ids.append(full[-1])
    return (ids, "") if len(set(ids)) == 100 else ([], "two years share a token")


def _digit_ids(src: TokenSource, century: int, prefix: str, base: list[int]) -> tuple[list[int], str]:
    """(ids of '0' … '9', "") if every year adds two single-digit tokens to the prefix's tokens, else
    ([], what went wrong)."""
    found: dict[str, int] = {}
    for yy in range(100):
        full = src.encode(f"{prefix}{yy:02d}")
        tail = full[len(base):]
        if full[:len(base)] != base or len(tail) != 2 or _shown(src, tail) != list(f"{yy:02d}") or any(
                found.setdefault(ch, t) != t for ch, t in zip(f"{yy:02d}", tail)):
            return [], f"'{century}{yy:02d}' → {_shown(src, full[max(0, len(base) - 2):])}"
    ids = [found[str(d)] for d in range(10)]
    return (ids, "") if len(set(ids)) == 10 else ([], "two digits share a token")


def year_tokens(src: TokenSource, century: int = 17, context: str = "The war lasted from the year") -> YearTokens:
    """The tokenizer's year mode and tokens (see the module docstring); TaskUnsupportedError if it fits neither."""
    prefix = f"{context} {century}"
    base = src.encode(prefix)
    ids, two_digit_problem = _two_digit_ids(src, century, prefix, base)
    if ids:
        return YearTokens("two_digit", ids)
    ids, digit_problem = _digit_ids(src, century, prefix, base)
    if ids:
        return YearTokens("digit", ids)
    raise TaskUnsupportedError(
        f"greater-than supports two tokenizations of a year {century}YY: ' {century}' + 'YY' (one token per two-digit "
        f"year, like GPT-2) or one token per digit ('1', '7', 'Y', 'Y', like SmolLM2); this tokenizer writes "
        f"neither: two-digit: {two_digit_problem}; digit: {digit_problem}. Use another task or a tokenizer of "
        "either kind.")


def year_token_ids(src: TokenSource, century: int = 17, context: str = "The war lasted from the year") -> list[int]:
    """Token ids of "00" … "99" as they follow " {century}"; TaskUnsupportedError unless the mode is two-digit."""
    years = year_tokens(src, century, context)
    if years.mode != "two_digit":
        raise TaskUnsupportedError(f"this tokenizer writes years digit by digit (year mode {years.mode!r}): there "
                                   "are no two-digit year tokens; use `year_tokens` for its digit tokens")
    return years.ids


def side_ids(years: YearTokens, yy: int) -> tuple[list[int], list[int]]:
    """(greater, smaller) answer tokens for a start year YY: years above / up to YY (two-digit), or digits above /
    below YY's tens digit (digit mode: the tens digit itself is on neither side)."""
    if years.mode == "two_digit":
        return years.ids[yy + 1:], years.ids[:yy + 1]
    return years.ids[yy // 10 + 1:], years.ids[:yy // 10]


def year_span(r: Rendered, yy: int, years: YearTokens, src: TokenSource) -> int:
    """The first position of YY in a rendered prompt, after checking that it holds YY's token(s)."""
    y0, y1 = r.spans["YY"]
    want = [years.ids[yy]] if years.mode == "two_digit" else [years.ids[yy // 10], years.ids[yy % 10]]
    if r.ids[y0:y1] != want:
        raise TaskUnsupportedError(f"the year in {r.text!r} is not written as {_shown(src, want)} ({years.mode} "
                                   f"mode) but as {_shown(src, r.ids[y0:y1])}: choose another template")
    return y0


def check_next_digit(r: Rendered, years: YearTokens, src: TokenSource) -> None:
    """Digit mode: each digit written after the prompt must be one more token, its digit token."""
    text_ids = r.ids[src.n_prefix:]
    for d, tid in enumerate(years.ids):
        if src.encode(f"{r.text}{d}") != text_ids + [tid]:
            raise TaskUnsupportedError(f"in {r.text!r} the next digit {d} does not become the single token "
                                       f"{src.decode([tid])!r}: choose a template ending in the century")


class GreaterThanTask(Task):
    """Year comparison; metric prob_diff = P(greater) − P(not greater) at END (module docstring), "01" corruption."""

    name = "greater_than"
    description = "Greater-than (Hanna et al. 2023): P(year > YY) − P(year ≤ YY) at END"
    roles = ("noun", "XX1", "YY", "END")
    metric_name = "prob_diff"

    def generate(self, model_or_tokenizer: ModelOrTokenizer, n: int, *, seed: int = 0,
                 **options: object) -> PromptPairs:
        """`n` distinct (noun, YY) prompts in the tokenizer's year mode; TaskUnsupportedError if it has none."""
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
        years_tok = year_tokens(src, century)
        digit = years_tok.mode == "digit"
        if digit:
            lo, hi = max(lo, DIGIT_YEARS[0]), min(hi, DIGIT_YEARS[1])
            if lo > hi:
                raise ValueError(f"years={tuple(opts.years)} has no YY in {DIGIT_YEARS[0]}..{DIGIT_YEARS[1]}: this "
                                 "tokenizer writes years digit by digit, so the start year's tens digit must be 1..8 "
                                 "(digits both above and below it); ask for years overlapping that range")
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
        if digit:
            for noun in kept:
                check_next_digit(ref[noun], years_tok, src)
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
            y0 = year_span(clean, yy, years_tok, src)
            if year_span(corrupt, 1, years_tok, src) != y0:
                raise TaskUnsupportedError(f"the years of {clean.text!r} and {corrupt.text!r} are not at the same "
                                           "position: choose another template")
            clean_ids.append(clean.ids)
            corrupt_ids.append(corrupt.ids)
            clean_texts.append(clean.text)
            corrupt_texts.append(corrupt.text)
            pos["noun"].append(clean.spans["noun"][1] - 1)
            pos["XX1"].append(y0 - 1)
            pos["YY"].append(y0)
            pos["END"].append(len(clean.ids) - 1)
            greater, smaller = side_ids(years_tok, yy)
            answers.append(greater + [PAD_ID] * (WIDTH - len(greater)))
            wrongs.append(smaller + [PAD_ID] * (WIDTH - len(smaller)))
            rows.append(dict(noun=noun, year=yy, century=century, start_year=century * 100 + yy,
                             **(dict(tens=yy // 10) if digit else {})))
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
                      nouns_dropped=len(nouns) - len(kept), year_mode=years_tok.mode,
                      **{"digit_token_ids" if digit else "year_token_ids": years_tok.ids}, bos_id=src.bos_id),
        )

    def metric_at(self, logits_at: Tensor, pairs: PromptPairs) -> Tensor:
        """P(greater) − P(not greater) at END (years, or tens digits in digit mode): `[..., B, 1, V]` →
        `[..., B]`."""
        if logits_at.ndim < 3 or logits_at.shape[-2] != 1:
            raise ValueError(f"expected logits at one position, [..., batch, 1, vocab]; got {tuple(logits_at.shape)}")
        probs = logits_at[..., 0, :].softmax(-1)

        def mass(ids: Tensor) -> Tensor:
            ids = ids.to(probs.device)
            picked = probs.gather(-1, ids.clamp(min=0).expand(*probs.shape[:-2], *ids.shape))
            return (picked * (ids != PAD_ID)).sum(-1)

        return mass(pairs.answer_ids) - mass(pairs.wrong_ids)
