"""Held-out prompts: split a task's pairs so that discovery and evaluation share no template.

A circuit found on some prompts is a claim about the behaviour, so it is measured on prompts it was not
found on. Splitting pairs at random would leave the same sentence frames on both sides; here whole templates
go to one side: the templates present in a generated pool are shuffled (seeded) and dealt to the held-out
side until it has `heldout_fraction` of them, the rest stay for discovery. Tasks record their template in
`pairs.meta` (`template_id` for IOI and capitals).
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


def shared_templates(a: PromptPairs, b: PromptPairs) -> set[object]:
    """Templates present in both sets of pairs (empty for a proper held-out split)."""
    key = template_key(a)
    return set(a.meta[key].tolist()) & set(b.meta[template_key(b)].tolist())


__all__ = ["heldout_split", "shared_templates", "split_pairs", "template_key"]
