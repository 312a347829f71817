"""The prompts of a `circuitlab run`: discovery pairs, held-out pairs and (with --validation-n) validation pairs.

`split_prompts` draws the discovery and held-out pairs from disjoint templates (tasks that record templates), or
from another seed (tasks without templates; the report says so, and says when the two sets overlap because the
task has too few distinct prompts). With --validation-n it draws three template-disjoint sets instead
(`tasks.split.validation_split`): the circuit's size is then chosen on the discovery and validation pairs and the
held-out pairs stay unseen by both; a task that cannot give three such sets is a `ConfigError`, never a fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformer_lens.model_bridge import TransformerBridge

from circuitlab.reports.checks import ConfigError
from circuitlab.reports.summaries import SplitSummary
from circuitlab.tasks.base import PromptPairs, Task
from circuitlab.tasks.custom import RecordsTask
from circuitlab.tasks.split import heldout_split, template_key, validation_split

HELDOUT_SEED_OFFSET = 1_000_003
SPLITS = {"templates": "drawn from templates the discovery pairs do not use",
          "validation": "drawn from templates that neither the discovery nor the validation pairs use",
          "seed": "drawn with another seed (this task records no templates, so they may share templates)",
          "overlapping": "drawn with another seed but OVERLAPPING the discovery pairs (too few distinct prompts): "
                         "this is not a held-out test"}
THREE_WAY = "discovery/validation/held-out by template"


@dataclass(frozen=True)
class RunPrompts:
    """The run's prompt pairs and how they were split (`split`: a key of `SPLITS`); `validation` only with
    --validation-n."""

    discovery: PromptPairs
    heldout: PromptPairs
    split: str
    validation: PromptPairs | None = None

    def summary(self) -> SplitSummary | None:
        """run.json's `split` (the three sizes and each part's templates); None without validation pairs."""
        if self.validation is None:
            return None
        parts = (self.discovery, self.validation, self.heldout)
        names = [tuple(sorted({str(t) for t in part.meta[template_key(part)].tolist()})) for part in parts]
        return SplitSummary(how=THREE_WAY, discovery=len(self.discovery), validation=len(self.validation),
                            heldout=len(self.heldout), discovery_templates=names[0], validation_templates=names[1],
                            heldout_templates=names[2])


def heldout_label(task: Task, discovery: PromptPairs, heldout: PromptPairs, split: str | None) -> str:
    """How the console names the held-out numbers: `held-out` only when the pairs are held out; otherwise why
    not and what to do (a small file gives the same rows for discovery and held-out pairs)."""
    if split != "overlapping":
        return "held-out"
    if isinstance(task, RecordsTask):
        source = f"the file has {len(task.records)} rows"
    else:
        distinct = len(set(map(tuple, discovery.clean_tokens.tolist())) | set(map(tuple, heldout.clean_tokens.tolist())))
        source = f"the task gave {distinct} distinct prompts"
    return f"not held out: {source}; use --heldout-n / more rows"


def split_prompts(task: Task, model: TransformerBridge, n: int, n_heldout: int, seed: int, options: dict[str, object],
                  n_validation: int | None = None) -> RunPrompts:
    """The run's discovery and held-out pairs (and `n_validation` validation pairs: `three_way_prompts`)."""
    if n_validation is not None:
        return three_way_prompts(task, model, n, n_validation, n_heldout, seed, options)
    try:
        disc, held = heldout_split(task, model, n, n_heldout, seed=seed, **options)
        return RunPrompts(disc, held, "templates")
    except ValueError:
        pass  # no template column, or too few pairs in the pool: held-out pairs from another seed
    disc = task.generate(model, n, seed=seed, **options)
    held = task.generate(model, n_heldout, seed=seed + HELDOUT_SEED_OFFSET, **options)
    shared = set(disc.clean_texts) & set(held.clean_texts)
    return RunPrompts(disc, held, "overlapping" if shared else "seed")


def three_way_prompts(task: Task, model: TransformerBridge, n: int, n_validation: int, n_heldout: int, seed: int,
                      options: dict[str, object]) -> RunPrompts:
    """Discovery, validation and held-out pairs with pairwise disjoint templates (`tasks.split.validation_split`;
    a pair file's pool is every row); a `ConfigError` naming --validation-n when the task cannot give them."""
    pool_n = len(task.records) if isinstance(task, RecordsTask) else None
    try:
        disc, val, held = validation_split(task, model, n, n_validation, n_heldout, seed=seed, pool_n=pool_n, **options)
    except ValueError as exc:
        raise ConfigError(
            f"--validation-n {n_validation}: task {task.name!r} cannot give discovery, validation and held-out pairs "
            f"from disjoint templates ({exc}); it needs a template column (pairs.meta template_id or template, e.g. "
            "ioi, capitals, or a pair file with meta {\"template\": ...}) and at least 3 templates with enough pairs: "
            "use such a task, ask for fewer pairs (--n, --validation-n, --heldout-n), or leave out --validation-n"
        ) from None
    return RunPrompts(disc, held, "validation", val)


__all__ = ["HELDOUT_SEED_OFFSET", "RunPrompts", "SPLITS", "THREE_WAY", "heldout_label", "split_prompts",
           "three_way_prompts"]
