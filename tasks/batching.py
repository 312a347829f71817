"""Prompt batches: split `PromptPairs` into batches, each trimmed to its own longest prompt.

Methods that iterate over batches accumulate exact sums (`n_b · mean_b`), so any batch size gives the
single-batch numbers; batch size 1 runs every prompt alone, unpadded.
"""

from __future__ import annotations

from typing import Iterator

from circuitlab.tasks.base import PromptPairs


def trim_padding(pairs: PromptPairs) -> PromptPairs:
    """The pairs without trailing positions that are padding in every prompt (mask dropped when none is left)."""
    if pairs.attention_mask is None or len(pairs) == 0:
        return pairs
    longest = int(pairs.lengths.max())
    mask = pairs.attention_mask[:, :longest]
    return PromptPairs(
        task=pairs.task, clean_tokens=pairs.clean_tokens[:, :longest], corrupt_tokens=pairs.corrupt_tokens[:, :longest],
        answer_ids=pairs.answer_ids, wrong_ids=pairs.wrong_ids, positions=dict(pairs.positions),
        clean_texts=pairs.clean_texts, corrupt_texts=pairs.corrupt_texts, meta=pairs.meta,
        attention_mask=None if bool(mask.bool().all()) else mask, info=dict(pairs.info),
        reference_logprobs=pairs.reference_logprobs)


def prompt_batches(pairs: PromptPairs, batch_size: int | None) -> Iterator[PromptPairs]:
    """Consecutive batches of at most `batch_size` pairs (None = one batch), each trimmed of unused padding."""
    n = len(pairs)
    if batch_size is None or batch_size >= n:
        yield trim_padding(pairs)
        return
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield trim_padding(pairs.subset(slice(start, start + batch_size)))
