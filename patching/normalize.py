"""The one normalisation of patching results: 0 = the corrupted run, 1 = the clean run.

`normalize(m, clean, corrupt) = (m − corrupt) / (clean − corrupt)`: a denoising patch that restores the
behaviour scores 1. Two readings of the same ratio:
- `normalize_difference(d, gap) = d / gap` with gap = clean − corrupt: a metric *difference* (an attribution score,
  an exact edge effect m(clean) − m(edge corrupted)) as a fraction of the gap;
- `noising_share(m_noised, clean, corrupt) = (clean − m_noised) / (clean − corrupt) = 1 − normalize(m_noised)`:
  with noising (corrupting part of a clean run), the fraction of the behaviour the corrupted part carries.

Every function refuses a gap that is not finite or within `GAP_TOL` of zero (the corruption does not change the
metric, so any ratio would be noise), elementwise for arrays and tensors. Works on floats, NumPy arrays and
tensors alike.
"""

from __future__ import annotations

from typing import Any, TYPE_CHECKING, TypeVar, Union

import numpy as np

if TYPE_CHECKING:  # annotations only: this module does its arithmetic without importing torch or pandas
    import pandas as pd
    from torch import Tensor

T = TypeVar("T")
# a metric value or an array of them: a float, a numpy array, a tensor or a pandas Series
Values = Union[float, "np.ndarray", "Tensor", "pd.Series"]
GAP_TOL = 1e-9


def _bad(gap: Any) -> tuple[int, int]:
    """(how many entries of the gap are unusable, how many there are)."""
    if hasattr(gap, "detach"):  # a tensor, without importing torch here
        flat = gap.detach().double().cpu().numpy().reshape(-1)
    else:
        flat = np.asarray(gap, dtype=float).reshape(-1)
    bad = ~np.isfinite(flat) | (np.abs(flat) <= GAP_TOL)
    return int(bad.sum()), int(flat.size)


def checked_gap(clean: Values, corrupt: Values) -> Values:
    """clean − corrupt, or a ValueError naming the values when it cannot normalise (see the module docstring)."""
    gap = clean - corrupt
    n_bad, n = _bad(gap)
    if n_bad:
        where = "" if n == 1 else f" for {n_bad} of {n} entries"
        shown = float(clean) if n == 1 else clean
        raise ValueError(f"clean and corrupt metrics are equal (or not finite){where} (clean={shown!r:.60}, "
                         f"corrupt={corrupt!r:.60}): normalized effects are undefined; check the corruption or "
                         "the task")
    return gap


def normalize(value: T, clean: Values, corrupt: Values, *, strict: bool = True) -> T:
    """(value − corrupt) / (clean − corrupt): 0 = the corrupted run, 1 = the clean run.

    `strict=False` divides whatever the gap (±inf or NaN where it is zero): only for bootstrap resamples, whose
    full sample was checked, so that one unlucky resample widens the interval instead of failing the run."""
    if strict:
        return (value - corrupt) / checked_gap(clean, corrupt)  # type: ignore[operator]
    with np.errstate(divide="ignore", invalid="ignore"):
        return (value - corrupt) / (clean - corrupt)  # type: ignore[operator]


def normalize_difference(difference: T, gap: Values) -> T:
    """A metric difference as a fraction of the gap m(clean) − m(corrupt)."""
    return difference / checked_gap(gap, 0.0)  # type: ignore[operator]


def noising_share(value: T, clean: Values, corrupt: Values) -> T:
    """(clean − value) / (clean − corrupt): the share of the behaviour that noising removed."""
    return (clean - value) / checked_gap(clean, corrupt)  # type: ignore[operator]


def is_normalizable(clean: Values, corrupt: Values) -> bool:
    """Whether `normalize` accepts this clean/corrupt pair (for callers that report NaN instead of raising)."""
    return _bad(clean - corrupt)[0] == 0


__all__ = ["GAP_TOL", "checked_gap", "is_normalizable", "noising_share", "normalize", "normalize_difference"]
