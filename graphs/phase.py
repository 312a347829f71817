"""Finding the induction-head phase change in a per-checkpoint table (Olsson et al. 2022, arXiv 2209.11895).

Three signatures should share one window of training steps:
1. the top induction (prefix-matching) score jumps: the window runs from the last checkpoint with the top
   score below `low` to the first checkpoint at or above `high` (defaults 0.2 and 0.5);
2. the ICL score drops: the checkpoint interval with the steepest fall of the ICL score, and the share of
   the whole run's ICL change that happens inside the window;
3. the training loss bump: the smoothed training loss falls faster inside the window than in the span of
   equal length before it (`loss_slope_ratio` > 1), visible as a bump in the loss curve.
A model without induction heads (one layer) has no window: `found` is False and the rest says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class PhaseWindow:
    """The detected phase-change window and the evidence for it (steps are optimizer steps)."""

    found: bool
    start: int | None
    end: int | None
    total_steps: int
    fraction_of_training: float | None
    top_induction_before: float | None
    top_induction_after: float | None
    icl_before: float | None
    icl_after: float | None
    icl_final: float
    icl_change_in_window: float | None  # share of the run's total ICL change inside the window
    steepest_icl_drop: tuple[int, int]  # checkpoint interval with the largest ICL decrease
    steepest_icl_drop_in_window: bool
    loss_slope_ratio: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["steepest_icl_drop"] = list(self.steepest_icl_drop)
        return out


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centered moving average (edges use the available points)."""
    if window <= 1 or len(values) == 0:
        return values.astype(float)
    kernel = np.ones(window)
    num = np.convolve(values, kernel, mode="same")
    den = np.convolve(np.ones_like(values, dtype=float), kernel, mode="same")
    return num / den


def _loss_slope_ratio(log: pd.DataFrame | None, start: int, end: int) -> float | None:
    if log is None or log.empty or end <= start:
        return None
    steps = log["step"].to_numpy(int)
    loss = smooth(log["loss"].to_numpy(float), max(1, len(log) // 50))
    width = end - start
    prior = max(int(steps.min()), start - width)

    def slope(a: int, b: int) -> float | None:
        inside = (steps >= a) & (steps <= b)
        if inside.sum() < 2:
            return None
        return float((loss[inside][0] - loss[inside][-1]) / max(1, b - a))

    s_in, s_before = slope(start, end), slope(prior, start)
    if s_in is None or s_before is None or s_before <= 0:
        return None
    return s_in / s_before


def detect_phase_change(table: pd.DataFrame, train_log: pd.DataFrame | None = None, *, low: float = 0.2,
                        high: float = 0.5, induction_column: str = "top_induction",
                        icl_column: str = "icl_score") -> PhaseWindow:
    """The phase-change window of one training run from its per-checkpoint table (`step`, top induction, ICL)."""
    for col in ("step", induction_column, icl_column):
        if col not in table.columns:
            raise ValueError(f"per-checkpoint table lacks column {col!r}; have {list(table.columns)}")
    t = table.sort_values("step").reset_index(drop=True)
    steps = t["step"].to_numpy(int)
    ind = t[induction_column].to_numpy(float)
    icl = t[icl_column].to_numpy(float)
    total = int(steps.max())
    drops = np.diff(icl)
    k = int(np.argmin(drops)) if len(drops) else 0
    steep = (int(steps[k]), int(steps[min(k + 1, len(steps) - 1)]))
    above = np.nonzero(ind >= high)[0]
    base = dict(total_steps=total, icl_final=float(icl[-1]), steepest_icl_drop=steep)
    if len(above) == 0:
        return PhaseWindow(False, None, None, fraction_of_training=None, top_induction_before=None,
                           top_induction_after=None, icl_before=None, icl_after=None, icl_change_in_window=None,
                           steepest_icl_drop_in_window=False, loss_slope_ratio=None,
                           reason=f"the top induction score never reached {high} (max {ind.max():.3f})", **base)
    j = int(above[0])
    below = np.nonzero(ind[:j] < low)[0]
    if len(below) == 0:
        return PhaseWindow(False, None, int(steps[j]), fraction_of_training=None, top_induction_before=None,
                           top_induction_after=float(ind[j]), icl_before=None, icl_after=float(icl[j]),
                           icl_change_in_window=None, steepest_icl_drop_in_window=False, loss_slope_ratio=None,
                           reason=f"the top induction score was never below {low} before reaching {high}", **base)
    i = int(below[-1])
    start, end = int(steps[i]), int(steps[j])
    change = icl[-1] - icl[0]
    in_window = (icl[j] - icl[i]) / change if abs(change) > 1e-12 else float("nan")
    return PhaseWindow(True, start, end, fraction_of_training=(end - start) / total if total else None,
                       top_induction_before=float(ind[i]), top_induction_after=float(ind[j]),
                       icl_before=float(icl[i]), icl_after=float(icl[j]), icl_change_in_window=float(in_window),
                       steepest_icl_drop_in_window=bool(start <= steep[0] and steep[1] <= end),
                       loss_slope_ratio=_loss_slope_ratio(train_log, start, end),
                       reason=f"top induction score {ind[i]:.3f} at step {start} → {ind[j]:.3f} at step {end}", **base)


__all__ = ["PhaseWindow", "detect_phase_change", "smooth"]
