"""The one normalisation of patching results: 0 = the corrupted run, 1 = the clean run.

`normalize(m, clean, corrupt) = (m − corrupt) / (clean − corrupt)`. A denoising patch that restores the
behaviour scores 1; with noising (corrupting a clean run), the fraction of the behaviour a component carries is
`1 − normalize(m_noised)`. Works on floats, NumPy arrays and tensors alike.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def normalize(value: T, clean: float, corrupt: float) -> T:
    """(value − corrupt) / (clean − corrupt); a ValueError when clean equals corrupt (nothing to normalise by)."""
    gap = clean - corrupt
    if gap == 0:
        raise ValueError(f"clean and corrupt metrics are equal ({clean:.4g}): normalized effects are undefined; "
                         "check the corruption or the task")
    return (value - corrupt) / gap  # type: ignore[operator]


__all__ = ["normalize"]
