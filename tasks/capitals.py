"""Capital lookup (factual recall, ROME-style): "The capital of France is" → " Paris".

Corruption: the country is replaced by another country with the same number of tokens (so the prompts
align), whose capital differs. Metric: logit of the correct capital − logit of the corrupt country's
capital, at END. Roles: `subject_first`, `subject_last` (the country's first/last token), `END`.

Answers are the capital with a leading space. By default only capitals that are a single token are used
(`answer_tokens="single"`; the dropped count is logged and kept in `info`); `answer_tokens="first"` uses the
first token of longer names instead. `filter_correct=True` (needs a model) keeps only prompts whose top-1
next token is the capital; `info["facts_kept"]` and `info["prompts_kept"]` report what survived.

Lengths: prompts of every token length are used, right-padded into one batch (`attention_mask`, per-prompt
END); `prompt_length=` keeps only prompts of one length.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd
import torch
from torch import Tensor

from circuitlab.tasks import data
from circuitlab.tasks.base import PromptPairs, Task, check_aligned, require_n
from circuitlab.tasks.ioi import logit_diff_at, logit_diff_tokens
from circuitlab.tasks.tokens import (
    ModelOrTokenizer, Rendered, TokenSource, options_from, pad_id_for, pad_right, render, resolve,
)

log = logging.getLogger("circuitlab.tasks")


@dataclass(frozen=True)
class CapitalsOptions:
    """Options of `CapitalsTask.generate`.

    facts: (country, capital) pairs (default `data.CAPITALS`); templates: prompt shapes with a `{country}`
    slot (a space before the slot is part of the country token); answer_tokens: "single" or "first";
    filter_correct: keep only prompts the model completes with the capital (top-1); prompt_length: token
    length to keep (BOS included); batch_size: prompts per forward when filtering.
    """

    facts: Sequence[tuple[str, str]] | None = None
    templates: Sequence[str] | None = None
    answer_tokens: str = "single"
    filter_correct: bool = False
    prompt_length: int | None = None
    batch_size: int = 64
    prepend_bos: bool | None = None


@dataclass(frozen=True)
class _Candidate:
    country: str
    capital: str
    answer: int
    template_id: int
    rendered: Rendered


class CapitalsTask(Task):
    """Country → capital recall; corrupt with a same-length country; metric logit diff (correct − corrupt capital)."""

    name = "capitals"
    description = "Capital lookup (factual recall): logit diff correct capital − corrupt country's capital at END"
    roles = ("subject_first", "subject_last", "END")
    metric_name = "logit_diff"

    def _answers(self, facts: Sequence[tuple[str, str]], src: TokenSource, mode: str) -> dict[tuple[str, str], int]:
        if mode not in ("single", "first"):
            raise ValueError(f"answer_tokens must be 'single' or 'first', got {mode!r}")
        out: dict[tuple[str, str], int] = {}
        dropped = []
        for country, capital in dict.fromkeys((str(c), str(k)) for c, k in facts):
            ids = src.encode(" " + capital)
            if len(ids) == 1 or (mode == "first" and ids):
                out[(country, capital)] = ids[0]
            else:
                dropped.append(capital)
        if dropped:
            log.info("capitals: %d of %d capitals are not single tokens and were dropped: %s",
                     len(dropped), len(out) + len(dropped), dropped[:10])
        if len(out) < 2:
            raise ValueError(f"only {len(out)} capitals are single tokens for this tokenizer (need 2); dropped "
                             f"{dropped[:20]}. Use answer_tokens='first' or pass facts with one-token capitals.")
        return out

    def _model_correct(self, cands: list[_Candidate], src: TokenSource, batch_size: int) -> list[bool]:
        """Whether the model's top-1 next token after each candidate prompt is its capital."""
        model = src.model
        if model is None:
            raise ValueError("filter_correct=True needs a model (a TransformerBridge), not just a tokenizer")
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, c in enumerate(cands):
            by_len[len(c.rendered.ids)].append(i)
        correct = [False] * len(cands)
        device = getattr(model.cfg, "device", None) or "cpu"
        with torch.no_grad():
            for idxs in by_len.values():
                for start in range(0, len(idxs), batch_size):
                    chunk = idxs[start:start + batch_size]
                    tokens = torch.tensor([cands[i].rendered.ids for i in chunk], device=device)
                    top = model(tokens)[:, -1, :].argmax(-1).tolist()
                    for i, t in zip(chunk, top):
                        correct[i] = t == cands[i].answer
        return correct

    def generate(self, model_or_tokenizer: ModelOrTokenizer, n: int, *, seed: int = 0,
                 **options: object) -> PromptPairs:
        """`n` distinct capital-lookup pairs; options: see `CapitalsOptions`."""
        opts = options_from(CapitalsOptions, options, self.name)
        src = resolve(model_or_tokenizer, prepend_bos=opts.prepend_bos)
        src.require_tokenizer(self.name)
        facts = list(opts.facts) if opts.facts is not None else list(data.CAPITALS)
        templates = list(opts.templates) if opts.templates is not None else list(data.CAPITAL_TEMPLATES)
        if not templates:
            raise ValueError("templates=[] leaves no capital template")
        answers = self._answers(facts, src, opts.answer_tokens)

        cands: list[_Candidate] = []
        for (country, capital), answer in answers.items():
            for t_id, template in enumerate(templates):
                if "{country}" not in template:
                    raise ValueError(f"capital template {template!r} has no {{country}} slot")
                values = {"country": country}
                cands.append(_Candidate(country, capital, answer, t_id, render(template, values, src)))
        info: dict[str, Any] = dict(seed=seed, answer_tokens=opts.answer_tokens, facts_total=len(facts),
                                    facts_with_token_answer=len(answers), filter_correct=opts.filter_correct,
                                    bos_id=src.bos_id)
        if opts.filter_correct:
            ok = self._model_correct(cands, src, opts.batch_size)
            info["prompts_checked"] = len(cands)
            cands = [c for c, good in zip(cands, ok) if good]
            info["prompts_correct"] = len(cands)
            info["facts_correct"] = len({c.country for c in cands})
            log.info("capitals: the model gets %d of %d prompts right (%d of %d facts)", len(cands),
                     info["prompts_checked"], info["facts_correct"], len(answers))

        # A candidate can be corrupted by another fact rendered with the same template and the same country
        # token count (hence identical length and slot span), whose capital token differs.
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, c in enumerate(cands):
            span = c.rendered.spans["country"]
            groups[(c.template_id, span[1] - span[0])].append(i)
        partners: dict[int, list[int]] = {}
        for members in groups.values():
            for i in members:
                ps = [j for j in members if cands[j].answer != cands[i].answer and cands[j].country != cands[i].country]
                if ps:
                    partners[i] = ps
        if not partners:
            raise ValueError("no capital fact has a same-length partner country with a different capital; "
                             "add facts or templates" + (" or drop filter_correct" if opts.filter_correct else ""))
        lengths = {i: len(cands[i].rendered.ids) for i in partners}
        pool = [i for i in partners if opts.prompt_length is None or lengths[i] == opts.prompt_length]
        if not pool:
            raise ValueError(f"no capital prompt has {opts.prompt_length} tokens; lengths: {sorted(set(lengths.values()))}")
        info.update(prompts_available=len(pool), facts_kept=len({cands[i].country for i in pool}),
                    templates_kept=sorted({cands[i].template_id for i in pool}))
        log.info("capitals: %d prompts (%d facts) to draw from", len(pool), info["facts_kept"])
        require_n(n, len(pool), "capital prompts" + (" the model gets right" if opts.filter_correct else ""))

        rng = random.Random(seed)
        chosen = rng.sample(pool, n)
        rows, clean_ids, corrupt_ids, clean_texts, corrupt_texts = [], [], [], [], []
        pos: dict[str, list[int]] = {r: [] for r in self.roles}
        wrong = []
        for i in chosen:
            c = cands[i]
            j = rng.choice(partners[i])
            k = cands[j]
            check_aligned([c.rendered.ids], [k.rendered.ids], [c.rendered.text], [k.rendered.text])
            clean_ids.append(c.rendered.ids)
            corrupt_ids.append(k.rendered.ids)
            clean_texts.append(c.rendered.text)
            corrupt_texts.append(k.rendered.text)
            first, end = c.rendered.spans["country"]
            pos["subject_first"].append(first)
            pos["subject_last"].append(end - 1)
            pos["END"].append(len(c.rendered.ids) - 1)
            wrong.append([k.answer])
            rows.append(dict(country=c.country, capital=c.capital, corrupt_country=k.country,
                             corrupt_capital=k.capital, template_id=c.template_id, template=templates[c.template_id]))
        pad = pad_id_for(src)
        clean_padded, mask = pad_right(clean_ids, pad)
        info.update(prompt_length=max(map(len, clean_ids)), prompt_lengths=sorted({len(c) for c in clean_ids}),
                    pad_id=pad)
        return PromptPairs(
            task=self.name,
            clean_tokens=torch.tensor(clean_padded),
            corrupt_tokens=torch.tensor(pad_right(corrupt_ids, pad)[0]),
            attention_mask=None if mask is None else torch.tensor(mask),
            answer_ids=torch.tensor([[cands[i].answer] for i in chosen]),
            wrong_ids=torch.tensor(wrong),
            positions={k: torch.tensor(v) for k, v in pos.items()},
            clean_texts=clean_texts,
            corrupt_texts=corrupt_texts,
            meta=pd.DataFrame(rows),
            info=info,
        )

    def metric_at(self, logits_at: Tensor, pairs: PromptPairs) -> Tensor:
        """Correct capital logit − corrupt country's capital logit at END: `[..., B, 1, V]` → `[..., B]`."""
        return logit_diff_at(logits_at, pairs)

    def metric_tokens(self, pairs: PromptPairs) -> Tensor:
        return logit_diff_tokens(pairs)
