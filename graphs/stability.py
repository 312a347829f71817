"""Stability of a discovered circuit: rediscover it on bootstrap resamples of the prompts.

Circuits found by attribution vary a lot across prompt samples (Méloux et al. 2025). `inclusion_frequency`
draws `n_resamples` bootstrap resamples of the discovery prompts (seeded), reruns a discovery function on each
(any `find_faithful_circuit` method) and reports how often each node or edge is in the chosen circuit. A
component in every resample's circuit has frequency 1.0; the report lists the frequencies beside the circuit.

`jaccard` and `overlap` summarise how alike circuits found on different prompts are: the Jaccard overlap
|A ∩ B| / |A ∪ B| of each circuit with a reference circuit (mean and 95% percentile interval over circuits).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from circuitlab.patching.context_subset import subset_context
from circuitlab.patching.edges import EdgeContext
from circuitlab.patching.stats import resamples


def inclusion_frequency(ctx: EdgeContext, discover: Callable[[EdgeContext], Sequence[str]], *,
                        n_resamples: int = 10, seed: int = 0, reference: Sequence[str] = ()) -> pd.DataFrame:
    """How often each item is in the circuit `discover` returns on bootstrap resamples of the prompts.

    Columns: item, frequency (fraction of resamples), in_reference (item in `reference`, e.g. the circuit found
    on all prompts). Sorted by frequency, most stable first.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    counts: dict[str, int] = {}
    for indices in resamples(int(ctx.clean_values.shape[0]), n_resamples, seed=seed):  # the bootstrap's resamples
        found = set(discover(subset_context(ctx, indices.tolist())))
        for item in found:
            counts[item] = counts.get(item, 0) + 1
    items = sorted(set(counts) | set(reference))
    ref = set(reference)
    frame = pd.DataFrame({"item": items, "frequency": [counts.get(i, 0) / n_resamples for i in items],
                          "in_reference": [i in ref for i in items]})
    return frame.sort_values(["frequency", "item"], ascending=[False, True], ignore_index=True)


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    """|A ∩ B| / |A ∪ B| (1.0 for two empty circuits: they agree)."""
    a, b = set(a), set(b)
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def overlap(reference: Iterable[str], circuits: Sequence[Iterable[str]]) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile) of each circuit's Jaccard overlap with `reference`; NaNs without circuits."""
    ref = set(reference)
    values = np.array([jaccard(ref, c) for c in circuits], dtype=float)
    if not len(values):
        return float("nan"), float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


__all__ = ["inclusion_frequency", "jaccard", "overlap", "subset_context"]
