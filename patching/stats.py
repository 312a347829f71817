"""The one bootstrap of circuitlab: resample prompts with replacement, seeded, percentile intervals.

Every confidence interval in runs and reports (metric means, faithfulness curves, CPR/CMD) comes from
`bootstrap`: a statistic of prompt indices evaluated on the full sample and on `n_boot` resamples.
(scipy.stats.bootstrap resamples data arrays; our statistics are curves of ratios of paired means over
several arrays, so resampling indices once and sharing them keeps every interval consistent.)
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def resamples(n: int, n_resamples: int, *, seed: int = 0) -> list[np.ndarray]:
    """`n_resamples` seeded resamples of the indices 0..n-1 with replacement (each of size n): what `bootstrap`
    evaluates a statistic on, and what `graphs.stability` rediscovers circuits on."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n, n) for _ in range(max(0, n_resamples))]


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray | float], n: int, *, n_boot: int = 1000,
              seed: int = 0) -> np.ndarray:
    """[1 + n_boot, ...]: `statistic(indices)` on all n prompts (row 0), then on seeded resamples."""
    if n < 1:
        raise ValueError(f"bootstrap needs at least one prompt, got {n}")
    samples = [np.arange(n)] + resamples(n, n_boot, seed=seed)
    return np.stack([np.asarray(statistic(idx), dtype=float) for idx in samples])


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float] | np.ndarray:
    """The central `level` interval of bootstrap rows 1.. (NaN without resamples); per column for 2-D input."""
    boot = np.asarray(samples, dtype=float)[1:]
    tail = (1.0 - level) / 2.0
    if len(boot) == 0:
        nan = np.full(boot.shape[1:], np.nan)
        return (float("nan"), float("nan")) if nan.ndim == 0 else np.stack([nan, nan])
    lo, hi = np.quantile(boot, tail, axis=0), np.quantile(boot, 1.0 - tail, axis=0)
    return (float(lo), float(hi)) if np.ndim(lo) == 0 else np.stack([lo, hi])


def bootstrap_ci(values: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of a mean (NaN for fewer than two values)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or n_boot < 1:
        return (float("nan"), float("nan"))
    return percentile_ci(bootstrap(lambda idx: values[idx].mean(), len(values), n_boot=n_boot, seed=seed))


__all__ = ["bootstrap", "bootstrap_ci", "percentile_ci", "resamples"]
