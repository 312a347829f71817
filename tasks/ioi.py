"""Indirect object identification (Wang et al. 2022): "When Mary and John went to the store, John gave a
drink to" → " Mary".

Roles (positions in the BOS-included tokens): `IO` (the indirect object's first mention), `S1` (the
subject's first mention), `S1+1` (the token after it), `S2` (the subject's second mention), `END` (the last
token, where the answer is predicted). Metric: logit difference IO − S at END.

Templates: by default the 15 BABA templates of Wang et al. (2022) and their ABBA variants, of every token
length (`template_set="paraphrase"` gives our own 15 paraphrases). Prompts of different lengths are
right-padded into one batch (`attention_mask`, per-prompt END); `prompt_length=` keeps only templates of
one length instead. `meta` records the template, its id and the name order (BABA/ABBA) of every pair.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd
import torch
from torch import Tensor

from circuitlab.tasks import data
from circuitlab.tasks.base import PromptPairs, Task, check_aligned, gather_ids, require_n
from circuitlab.tasks.tokens import (
    ModelOrTokenizer, filter_single_tokens, options_from, pad_id_for, pad_right, render, resolve,
)

log = logging.getLogger("circuitlab.tasks")

CORRUPTIONS = ("abc", "s2_io_flip")
FAMILIES = ("mixed", "BABA", "ABBA")


@dataclass(frozen=True)
class IOIOptions:
    """Options of `IOITask.generate`.

    corruption: "abc" (IO, S1, S2 replaced by three other names, the paper's pABC) or "s2_io_flip" (the
    second subject mention becomes the IO name). family: "mixed", "BABA" or "ABBA" templates. templates:
    your own BABA-order templates with slots {S} (twice), {IO}, {PLACE}, {OBJECT}. template_set: "wang2022"
    (default) or "paraphrase". prompt_length: keep only templates of this token length (BOS included);
    default: every length, padded. names/places/objects:
    your own pools (filtered to single tokens). prepend_bos: override the BOS convention.
    """

    corruption: str = "abc"
    family: str = "mixed"
    template_family: str | None = None
    templates: Sequence[str] | str | None = None
    template_set: str = "wang2022"
    prompt_length: int | None = None
    names: Sequence[str] | None = None
    places: Sequence[str] | None = None
    objects: Sequence[str] | None = None
    prepend_bos: bool | None = None


def _indexed(template: str) -> str:
    """Name the two {S} mentions {S1} and {S2} (and a second {OBJECT} {OBJECT2}) so each can be filled."""
    if template.count("{S}") != 2 or template.count("{IO}") != 1:
        raise ValueError(f"an IOI template needs {{S}} twice and {{IO}} once: {template!r}")
    first = template.index("{S}")
    second = template.index("{S}", first + 3)
    out = template[:first] + "{S1}" + template[first + 3:second] + "{S2}" + template[second + 3:]
    if out.count("{OBJECT}") == 2:
        at = out.index("{OBJECT}", out.index("{OBJECT}") + 1)
        out = out[:at] + "{OBJECT2}" + out[at + len("{OBJECT}"):]
    return out


class IOITask(Task):
    """Indirect object identification with ABC or S2↔IO corruption; metric logit diff IO − S at END."""

    name = "ioi"
    description = "Indirect object identification (Wang et al. 2022): logit diff IO − S at END"
    roles = ("IO", "S1", "S1+1", "S2", "END")
    metric_name = "logit_diff"

    def _templates(self, opts: IOIOptions) -> list[tuple[str, int, str]]:
        """(family, index, template) for the requested family; ABBA variants derive from BABA ones."""
        family = opts.template_family or opts.family
        if opts.template_set not in data.IOI_TEMPLATE_SETS:
            raise ValueError(f"unknown IOI template_set {opts.template_set!r}: use one of {list(data.IOI_TEMPLATE_SETS)}")
        baba: Sequence[str] = data.IOI_TEMPLATE_SETS[opts.template_set]
        if isinstance(opts.templates, str):
            family = opts.templates
        elif opts.templates is not None:
            baba = list(opts.templates)
            if not baba:
                raise ValueError("templates=[] leaves no IOI template")
        if family not in FAMILIES:
            raise ValueError(f"unknown IOI template family {family!r}: use one of {FAMILIES}")
        out: list[tuple[str, int, str]] = []
        for i, t in enumerate(baba):
            if family in ("mixed", "BABA"):
                out.append(("BABA", i, t))
            if family in ("mixed", "ABBA"):
                out.append(("ABBA", i, data.abba_from_baba(t)))
        return out

    def generate(self, model_or_tokenizer: ModelOrTokenizer, n: int, *, seed: int = 0,
                 **options: object) -> PromptPairs:
        """`n` distinct IOI pairs; options: see `IOIOptions` (corruption, family, templates, pools, …)."""
        opts = options_from(IOIOptions, options, self.name)
        if opts.corruption not in CORRUPTIONS:
            raise ValueError(f"unknown IOI corruption {opts.corruption!r}: use one of {CORRUPTIONS}")
        src = resolve(model_or_tokenizer, prepend_bos=opts.prepend_bos)
        src.require_tokenizer(self.name)
        names = filter_single_tokens(opts.names or data.IOI_NAMES, src, what="IOI names",
                                     minimum=5 if opts.corruption == "abc" else 2)
        places = filter_single_tokens(opts.places or data.IOI_PLACES, src, what="IOI places")
        objects = filter_single_tokens(opts.objects or data.IOI_OBJECTS, src, what="IOI objects")
        name_list, place_list, object_list = list(names), list(places), list(objects)

        # Token length of each template with a reference filling; all lengths unless prompt_length is given.
        templates = self._templates(opts)
        ref = dict(S1=name_list[0], S2=name_list[0], IO=name_list[1], PLACE=place_list[0], OBJECT=object_list[0],
                   OBJECT2=object_list[0])
        lengths = {k: len(render(_indexed(t), ref, src).ids) for k, (_, _, t) in enumerate(templates)}
        kept = [k for k in lengths if opts.prompt_length is None or lengths[k] == opts.prompt_length]
        if not kept:
            raise ValueError(f"no IOI template has {opts.prompt_length} tokens; template lengths: "
                             f"{sorted(set(lengths.values()))}")
        dropped = len(templates) - len(kept)
        if dropped:
            log.info("IOI: kept %d of %d templates with %d tokens (others have other lengths)",
                     len(kept), len(templates), opts.prompt_length)

        n_names = len(name_list)
        capacity = len(kept) * n_names * (n_names - 1) * len(place_list) * len(object_list)
        require_n(n, capacity, "IOI prompts")

        rng = random.Random(seed)
        seen: set[str] = set()
        rows: list[dict[str, Any]] = []
        clean_ids: list[list[int]] = []
        corrupt_ids: list[list[int]] = []
        positions: dict[str, list[int]] = {r: [] for r in self.roles}
        texts: list[str] = []
        corrupt_texts: list[str] = []
        attempts = 0
        while len(rows) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise RuntimeError(f"could not draw {n} distinct IOI prompts after {attempts} tries")
            k = kept[rng.randrange(len(kept))]
            family, t_index, template = templates[k]
            io, s = rng.sample(name_list, 2)
            place, obj = rng.choice(place_list), rng.choice(object_list)
            values = dict(IO=io, S1=s, S2=s, PLACE=place, OBJECT=obj, OBJECT2=obj)
            if opts.corruption == "abc":
                c_io, c_s1, c_s2 = rng.sample([x for x in name_list if x not in (io, s)], 3)
            else:
                c_io, c_s1, c_s2 = io, s, io
            corrupt_values = dict(IO=c_io, S1=c_s1, S2=c_s2, PLACE=place, OBJECT=obj, OBJECT2=obj)
            indexed = _indexed(template)
            clean = render(indexed, values, src)
            if clean.text in seen:
                continue
            corrupt = render(indexed, corrupt_values, src)
            check_aligned([clean.ids], [corrupt.ids], [clean.text], [corrupt.text])
            if opts.prompt_length is not None and len(clean.ids) != opts.prompt_length:
                continue  # an unusual merge changed the length; draw again
            seen.add(clean.text)
            clean_ids.append(clean.ids)
            corrupt_ids.append(corrupt.ids)
            sp = clean.spans
            positions["IO"].append(sp["IO"][0])
            positions["S1"].append(sp["S1"][0])
            positions["S1+1"].append(sp["S1"][1])
            positions["S2"].append(sp["S2"][0])
            positions["END"].append(len(clean.ids) - 1)
            rows.append(dict(template_id=t_index, family=family, order=family, template=template, IO=io, S=s, place=place,
                             object=obj, corrupt_IO=c_io, corrupt_S1=c_s1, corrupt_S2=c_s2,
                             corruption=opts.corruption))
            texts.append(clean.text)
            corrupt_texts.append(corrupt.text)
        pad = pad_id_for(src)
        clean_padded, mask = pad_right(clean_ids, pad)
        corrupt_padded, _ = pad_right(corrupt_ids, pad)
        return PromptPairs(
            task=self.name,
            clean_tokens=torch.tensor(clean_padded),
            corrupt_tokens=torch.tensor(corrupt_padded),
            attention_mask=None if mask is None else torch.tensor(mask),
            answer_ids=torch.tensor([[names[r["IO"]]] for r in rows]),
            wrong_ids=torch.tensor([[names[r["S"]]] for r in rows]),
            positions={k: torch.tensor(v) for k, v in positions.items()},
            clean_texts=texts,
            corrupt_texts=corrupt_texts,
            meta=pd.DataFrame(rows),
            info=dict(seed=seed, corruption=opts.corruption, family=opts.template_family or opts.family,
                      template_set=opts.template_set, prompt_length=max(len(c) for c in clean_ids),
                      prompt_lengths=sorted({len(c) for c in clean_ids}), pad_id=pad,
                      templates_kept=len(kept), templates_dropped=dropped,
                      n_names=n_names, n_places=len(place_list), n_objects=len(object_list),
                      names_dropped=len(set(opts.names or data.IOI_NAMES)) - n_names,
                      places_dropped=len(set(opts.places or data.IOI_PLACES)) - len(place_list),
                      objects_dropped=len(set(opts.objects or data.IOI_OBJECTS)) - len(object_list),
                      bos_id=src.bos_id),
        )

    def metric_at(self, logits_at: Tensor, pairs: PromptPairs) -> Tensor:
        """Logit of the IO name minus logit of the subject name at END: `[..., B, 1, V]` → `[..., B]`."""
        return logit_diff_at(logits_at, pairs)

    def metric_tokens(self, pairs: PromptPairs) -> Tensor:
        return logit_diff_tokens(pairs)


def logit_diff_tokens(pairs: PromptPairs) -> Tensor:
    """The vocabulary ids `logit_diff_at` reads (padding ids -1 read as 0, as `gather_ids` does)."""
    return torch.cat([pairs.answer_ids[:, :1], pairs.wrong_ids[:, :1]]).clamp(min=0).flatten().unique()


def logit_diff_at(logits_at: Tensor, pairs: PromptPairs) -> Tensor:
    """answer − wrong logit at the single read position (K = 1 answers): `[..., B, 1, V]` → `[..., B]`."""
    if logits_at.ndim < 3 or logits_at.shape[-2] != 1:
        raise ValueError(f"expected logits gathered at one position, [..., batch, 1, vocab]; got {tuple(logits_at.shape)}")
    last = logits_at[..., 0, :]
    return gather_ids(last, pairs.answer_ids[:, :1])[..., 0] - gather_ids(last, pairs.wrong_ids[:, :1])[..., 0]
