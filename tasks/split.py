"""Held-out prompts: split a task's pairs so that discovery and evaluation share no template.

A circuit found on some prompts is a claim about the behaviour, so it is measured on prompts it was not
found on. Splitting pairs at random would leave the same sentence frames on both sides; here whole templates
go to one side: the templates present in a generated pool are shuffled (seeded) and dealt to the held-out
side until it has `heldout_fraction` of them, the rest stay for discovery. Tasks record their template in
`pairs.meta` (`template_id` for IOI and capitals).

`rephrased_split` extends this to every task: tasks with one template or none get a declared rephrasing
(`REPHRASINGS`: greater-than's held-out prompts use another sentence frame, repeated tokens another sequence
length and fresh random tokens); pair files without a template column are split by row (stated in `info`).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from circuitlab.tasks.base import PromptPairs, Task
from circuitlab.tasks.batching import trim_padding

if TYPE_CHECKING:  # annotations only: tasks never import or run a model
    from transformer_lens.model_bridge import TransformerBridge

TEMPLATE_KEYS = ("template_id", "template")


def template_key(pairs: PromptPairs) -> str:
    """The `pairs.meta` column naming each pair's template; a clear error when the task has none."""
    for key in TEMPLATE_KEYS:
        if key in pairs.meta.columns:
            return key
    raise ValueError(f"task {pairs.task!r} records no template in pairs.meta (looked for {TEMPLATE_KEYS}); "
                     "split its prompts with a different seed instead, or add a template column")


def split_pairs(pairs: PromptPairs, n_discovery: int, n_heldout: int, *, seed: int = 0,
                heldout_fraction: float = 0.5) -> tuple[PromptPairs, PromptPairs]:
    """(discovery, held-out) pairs from `pairs` with disjoint templates (see the module docstring)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    key = template_key(pairs)
    templates = sorted(set(pairs.meta[key].tolist()), key=str)
    if len(templates) < 2:
        raise ValueError(f"only {len(templates)} template in the pool: a template-disjoint split needs at least 2 "
                         "(use more templates, e.g. family='mixed')")
    random.Random(seed).shuffle(templates)
    n_held = min(len(templates) - 1, max(1, round(heldout_fraction * len(templates))))
    held = set(templates[:n_held])
    is_held = pairs.meta[key].isin(held).to_numpy()
    disc_rows = [i for i in range(len(pairs)) if not is_held[i]][:n_discovery]
    held_rows = [i for i in range(len(pairs)) if is_held[i]][:n_heldout]
    if len(disc_rows) < n_discovery or len(held_rows) < n_heldout:
        raise ValueError(f"the pool of {len(pairs)} pairs has {int((~is_held).sum())} discovery and {int(is_held.sum())} "
                         f"held-out pairs; need {n_discovery} and {n_heldout}: generate a larger pool")

    return trim_padding(pairs.subset(disc_rows)), trim_padding(pairs.subset(held_rows))  # each to its own width


def heldout_split(task: Task, model: TransformerBridge, n_discovery: int, n_heldout: int, *, seed: int = 0,
                  heldout_fraction: float = 0.5, **options: object) -> tuple[PromptPairs, PromptPairs]:
    """Generate a pool of the task's pairs and split it by template into (discovery, held-out)."""
    pool = task.generate(model, 3 * (n_discovery + n_heldout), seed=seed, **options)
    disc, held = split_pairs(pool, n_discovery, n_heldout, seed=seed, heldout_fraction=heldout_fraction)
    disc.info = dict(disc.info, split="discovery", heldout_fraction=heldout_fraction)
    held.info = dict(held.info, split="heldout", heldout_fraction=heldout_fraction)
    return disc, held


def validation_split(task: Task, model: TransformerBridge, n_discovery: int, n_validation: int, n_heldout: int, *, seed: int = 0,
                     heldout_fraction: float = 0.5, pool_n: int | None = None,
                     **options: object) -> tuple[PromptPairs, PromptPairs, PromptPairs]:
    """(discovery, validation, held-out) pairs with pairwise disjoint templates: held-out templates are dealt as in
    `split_pairs`; the discovery side's templates are dealt again, in proportion to `n_validation`, to a
    validation set (for choosing a circuit's size, `graphs.selection.select_validated`), so the held-out prompts
    that a report states stay unseen by discovery and by selection. The pool is `pool_n` generated pairs (default
    three times all asked for; a pair file: its row count, so every row may be dealt)."""
    pool = task.generate(model, pool_n or 3 * (n_discovery + n_validation + n_heldout), seed=seed, **options)
    key = template_key(pool)
    templates = sorted(set(pool.meta[key].tolist()), key=str)
    if len(templates) < 3:
        raise ValueError(f"only {len(templates)} templates in the pool: a three-way template split needs at least 3")
    random.Random(seed).shuffle(templates)
    n_held = min(len(templates) - 2, max(1, round(heldout_fraction * len(templates))))
    rest = templates[n_held:]
    n_val = min(len(rest) - 1, max(1, round(len(rest) * n_validation / max(1, n_discovery + n_validation))))
    groups = (set(rest[n_val:]), set(rest[:n_val]), set(templates[:n_held]))
    out = []
    for name, group, n in zip(("discovery", "validation", "heldout"), groups, (n_discovery, n_validation, n_heldout)):
        rows = [i for i, t in enumerate(pool.meta[key].tolist()) if t in group][:n]
        if len(rows) < n:
            raise ValueError(f"the pool of {len(pool)} pairs has {len(rows)} {name} pairs; need {n}: ask for fewer")
        part = trim_padding(pool.subset(rows))
        part.info = dict(part.info, split=name)
        out.append(part)
    return out[0], out[1], out[2]


REPHRASINGS: dict[str, tuple[dict[str, object], dict[str, object]]] = {  # task -> (discovery options, held-out options)
    "greater_than": ({}, {"template": "The {noun} began in the year 17{YY} and ended in the year 17"}),
    "repeated_tokens": ({"seq_len": 20}, {"seq_len": 14}),
}


def rephrased_split(task: Task, model: TransformerBridge, n_discovery: int, n_heldout: int, *, seed: int = 0
                    ) -> tuple[PromptPairs, PromptPairs]:
    """(discovery, held-out) pairs that share no template: `heldout_split` for tasks recording templates, the
    task's `REPHRASINGS` entry otherwise, and a seeded row split for a pair file without templates."""
    if task.name in REPHRASINGS:
        disc_options, held_options = REPHRASINGS[task.name]
        disc = task.generate(model, n_discovery, seed=seed, **disc_options)
        held = task.generate(model, n_heldout, seed=seed + 1, **held_options)
        disc.info = dict(disc.info, split="discovery", rephrasing=disc_options)
        held.info = dict(held.info, split="heldout", rephrasing=held_options)
        return disc, held
    if task.name in ("ioi", "capitals"):
        return heldout_split(task, model, n_discovery, n_heldout, seed=seed)
    pool = task.generate(model, None, seed=seed)  # a pair file: every row
    if any(key in pool.meta.columns for key in TEMPLATE_KEYS):
        return split_pairs(pool, n_discovery, n_heldout, seed=seed)
    if len(pool) < n_discovery + n_heldout:
        raise ValueError(f"{task.name}: {len(pool)} rows, need {n_discovery} discovery + {n_heldout} held-out")
    rows = list(range(len(pool)))
    random.Random(seed).shuffle(rows)
    disc, held = (trim_padding(pool.subset(sorted(rows[:n_discovery]))),
                  trim_padding(pool.subset(sorted(rows[n_discovery:n_discovery + n_heldout]))))
    disc.info = dict(disc.info, split="discovery (rows: the file records no template)")
    held.info = dict(held.info, split="heldout (rows: the file records no template)")
    return disc, held


def shared_templates(a: PromptPairs, b: PromptPairs) -> set[object]:
    """Templates present in both sets of pairs (empty for a proper held-out split)."""
    key = template_key(a)
    return set(a.meta[key].tolist()) & set(b.meta[template_key(b)].tolist())


__all__ = ["REPHRASINGS", "heldout_split", "rephrased_split", "shared_templates", "split_pairs", "template_key",
           "validation_split"]
