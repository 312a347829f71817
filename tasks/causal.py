"""Causal models of the built-in tasks: their high-level variables and the counterfactual data they imply.

Each task's causal model says how the answer follows from a few variables; interchanging one variable between
a base and a source prompt gives the answer the model *should* then produce (Geiger et al. 2021):

- ioi: `io` (the indirect object's name; the answer is io), `s` (which name is repeated; the answer is the other
  of the two first mentions), `order` (whether the first or the second first mention is repeated: ABBA/BABA).
- capitals: `country` (the answer is the country's capital).
- greater_than: `year` (YY of the start year; the answer is any two-digit year above it: a set; on digit-by-digit
  tokenizers any tens digit above YY's, with YY in 10..89 and base and source tens digits different).
- repeated_tokens: `next` (the token that followed the earlier occurrence of the last token; the answer).

`causal_model("ioi").counterfactuals(model, "io", n=64, seed=0)` returns `tasks.counterfactual.Counterfactuals`
with every role's position on both sides. No model forward happens here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from circuitlab.tasks import data
from circuitlab.tasks.base import require_n
from circuitlab.tasks.counterfactual import CounterfactualRow, Counterfactuals, assemble
from circuitlab.tasks.greater_than import DIGIT_YEARS, side_ids, year_span, year_tokens
from circuitlab.tasks.ioi import _indexed
from circuitlab.tasks.registry import _ALIASES
from circuitlab.tasks.tokens import (
    ModelOrTokenizer, Rendered, TokenSource, filter_single_tokens, pad_id_for, render, resolve,
)

Builder = Callable[[TokenSource, str, random.Random], CounterfactualRow]


@dataclass(frozen=True)
class CausalModel:
    """A task's high-level variables (name → what it is) and a builder of one counterfactual row per call."""

    task: str
    variables: dict[str, str]
    make_builder: Callable[[TokenSource], Builder]

    def counterfactuals(self, model_or_tokenizer: ModelOrTokenizer, variable: str, n: int, *,
                        seed: int = 0) -> Counterfactuals:
        """`n` distinct base/source pairs differing in `variable` (seeded), each with the causal model's answer."""
        if variable not in self.variables:
            raise ValueError(f"task {self.task!r} has no variable {variable!r}: its causal model has "
                             f"{sorted(self.variables)}")
        require_n(n, 10**9, "counterfactual pairs")
        src = resolve(model_or_tokenizer)
        build = self.make_builder(src)
        rng = random.Random(seed)
        rows: list[CounterfactualRow] = []
        seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
        attempts = 0
        while len(rows) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise ValueError(f"could only draw {len(rows)} distinct {self.task}/{variable} counterfactual pairs "
                                 f"of the {n} asked for; ask for fewer")
            row = build(src, variable, rng)
            key = (tuple(row.base_ids), tuple(row.source_ids))
            if key in seen:
                continue
            seen.add(key)
            rows.append(row)
        return assemble(rows, task=self.task, variable=variable, pad_id=pad_id_for(src),
                        info=dict(seed=seed, variable=variable, description=self.variables[variable]))


def _ioi_builder(src: TokenSource) -> Builder:
    src.require_tokenizer("ioi")
    names = list(filter_single_tokens(data.IOI_NAMES, src, what="IOI names", minimum=4))
    places = list(filter_single_tokens(data.IOI_PLACES, src, what="IOI places"))
    objects = list(filter_single_tokens(data.IOI_OBJECTS, src, what="IOI objects"))
    name_id = {name: src.encode(" " + name)[0] for name in names}
    templates = data.IOI_TEMPLATE_SETS["wang2022"]

    def roles(r: Rendered) -> dict[str, int]:
        sp = r.spans
        return {"IO": sp["IO"][0], "S1": sp["S1"][0], "S1+1": sp["S1"][1], "S2": sp["S2"][0], "END": len(r.ids) - 1}

    def fill(template: str, family: str, io: str, s1: str, s2: str, place: str, obj: str) -> Rendered:
        text = template if family == "BABA" else data.abba_from_baba(template)
        return render(_indexed(text), dict(IO=io, S1=s1, S2=s2, PLACE=place, OBJECT=obj, OBJECT2=obj), src)

    def build(src: TokenSource, variable: str, rng: random.Random) -> CounterfactualRow:
        template = rng.choice(list(templates))
        family = rng.choice(["BABA", "ABBA"])
        io, s, c, d = rng.sample(names, 4)
        place, obj = rng.choice(places), rng.choice(objects)
        base = fill(template, family, io, s, s, place, obj)
        if variable == "io":  # a new indirect object: the answer follows it
            source, expected, other_family = fill(template, family, c, s, s, place, obj), c, family
        elif variable == "s":  # the other first mention is repeated: the answer is the base's subject
            source, expected, other_family = fill(template, family, io, s, io, place, obj), s, family
        else:  # order: a prompt of the other family (new names) repeats the other first mention
            other_family = "ABBA" if family == "BABA" else "BABA"
            source, expected = fill(template, other_family, c, d, d, place, obj), s
        return CounterfactualRow(base.ids, source.ids, [name_id[expected]], [name_id[io]], roles(base), roles(source),
                                 base.text, source.text,
                                 dict(template=template, base_order=family, source_order=other_family, base_io=io,
                                      base_s=s, expected=expected))

    return build


def _capitals_builder(src: TokenSource) -> Builder:
    src.require_tokenizer("capitals")
    facts = [(c, k, src.single_token(" " + k)) for c, k in data.CAPITALS]
    facts = [(c, k, t) for c, k, t in facts if t is not None]
    if len(facts) < 2:
        raise ValueError("fewer than 2 capitals are single tokens for this tokenizer: no capitals counterfactuals")

    def roles(r: Rendered) -> dict[str, int]:
        first, end = r.spans["country"]
        return {"subject_first": first, "subject_last": end - 1, "END": len(r.ids) - 1}

    def build(src: TokenSource, variable: str, rng: random.Random) -> CounterfactualRow:
        (bc, bk, bt), (sc, sk, st) = rng.sample(facts, 2)
        while st == bt:
            sc, sk, st = rng.choice(facts)
        base_t, source_t = rng.choice(data.CAPITAL_TEMPLATES), rng.choice(data.CAPITAL_TEMPLATES)
        base, source = render(base_t, {"country": bc}, src), render(source_t, {"country": sc}, src)
        return CounterfactualRow(base.ids, source.ids, [st], [bt], roles(base), roles(source), base.text, source.text,
                                 dict(base_country=bc, source_country=sc, expected=sk))

    return build


def _greater_than_builder(src: TokenSource) -> Builder:
    src.require_tokenizer("greater_than")
    years = year_tokens(src, 17)
    digit = years.mode == "digit"
    template = data.GREATER_THAN_TEMPLATE

    def roles(r: Rendered, yy: int) -> dict[str, int]:
        y0 = year_span(r, yy, years, src)
        return {"noun": r.spans["noun"][1] - 1, "XX1": y0 - 1, "YY": y0, "END": len(r.ids) - 1}

    def build(src: TokenSource, variable: str, rng: random.Random) -> CounterfactualRow:
        if digit:  # tens digits 1..8 and different, or the interchange would not change the answer
            yb, ys = rng.sample(range(DIGIT_YEARS[0], DIGIT_YEARS[1] + 1), 2)
            while yb // 10 == ys // 10:
                ys = rng.randrange(DIGIT_YEARS[0], DIGIT_YEARS[1] + 1)
        else:
            yb, ys = rng.sample(range(2, 99), 2)
        base = render(template, {"noun": rng.choice(data.GREATER_THAN_NOUNS), "YY": f"{yb:02d}"}, src)
        source = render(template, {"noun": rng.choice(data.GREATER_THAN_NOUNS), "YY": f"{ys:02d}"}, src)
        return CounterfactualRow(base.ids, source.ids, side_ids(years, ys)[0], side_ids(years, yb)[0],
                                 roles(base, yb), roles(source, ys), base.text, source.text,
                                 dict(base_year=yb, source_year=ys))

    return build


def _repeated_builder(src: TokenSource, length: int = 10) -> Builder:
    vocab = src.d_vocab if src.tokenizer is None else min(src.d_vocab, len(src.tokenizer))
    excluded = set(getattr(src.tokenizer, "all_special_ids", []) or []) if src.tokenizer is not None else set()
    if src.bos_id is not None:
        excluded.add(src.bos_id)
    allowed = [i for i in range(vocab) if i not in excluded]
    if len(allowed) < length + 1:
        raise ValueError(f"repeated-token counterfactuals need {length + 1} distinct tokens, the vocabulary has {len(allowed)}")
    p = src.n_prefix

    def build(src: TokenSource, variable: str, rng: random.Random) -> CounterfactualRow:
        picks = rng.sample(allowed, length + 1)
        seq, new = picks[:length], picks[length]
        m = rng.randrange(2, length)  # the repeat stops after x_m: the answer is x_{m+1}
        base = src.with_bos(seq + seq[:m])
        changed = seq[:m] + [new] + seq[m + 1:]
        source = src.with_bos(changed + changed[:m])
        pos = {"match": p + m - 1, "next": p + m, "END": p + length + m - 1}
        return CounterfactualRow(base, source, [new], [seq[m]], dict(pos), dict(pos), src.decode(base[p:]),
                                 src.decode(source[p:]), dict(repeat_length=m))

    return build


CAUSAL_MODELS: dict[str, CausalModel] = {
    "ioi": CausalModel("ioi", {"io": "the indirect object's name (the answer)",
                               "s": "which name is repeated (the answer is the other one)",
                               "order": "whether the first or second first mention is repeated (ABBA/BABA)"},
                       _ioi_builder),
    "capitals": CausalModel("capitals", {"country": "the country (the answer is its capital)"}, _capitals_builder),
    "greater_than": CausalModel("greater_than", {"year": "the start year's YY (the answer is any later year)"},
                                _greater_than_builder),
    "repeated_tokens": CausalModel("repeated_tokens", {"next": "the token after the earlier occurrence (the answer)"},
                                   _repeated_builder),
}


def causal_model(task: str) -> CausalModel:
    """The causal model of a built-in task by name or alias; a ValueError listing the known ones otherwise."""
    key = _ALIASES.get(str(task).strip().lower(), str(task).strip().lower())
    if key not in CAUSAL_MODELS:
        raise ValueError(f"task {task!r} has no causal model: known are {sorted(CAUSAL_MODELS)} (or give a "
                         "counterfactual file)")
    return CAUSAL_MODELS[key]
