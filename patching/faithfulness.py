"""Faithfulness of edge circuits: MIB-style curves, CPR and CMD with bootstrap confidence intervals.

For the top-k edges at k in `PERCENTS` (% of all edges), the circuit C_k keeps those edges clean and
corrupts every other edge (exact edge patching). Normalized faithfulness
f(k) = (m(C_k) - m(empty)) / (m(full) - m(empty)), where m(empty) is the corrupted run and m(full) the
clean one. CPR (integrated circuit performance ratio) is the area under f over the fraction of edges kept,
with circuits from signed scores (higher is better); CMD (circuit-model distance) is the area under
|1 - f| with circuits from absolute scores (0 is best). Confidence intervals resample prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from circuitlab.patching.edges import EdgeContext, evaluate_edge_masks
from circuitlab.patching.normalize import checked_gap, normalize
from circuitlab.patching.stats import bootstrap, percentile_ci

PERCENTS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)


@dataclass
class FaithfulnessResult:
    """The curve (one row per percent and selection) and the two areas with their intervals."""

    curve: pd.DataFrame  # percent, n_edges, selection (signed/absolute), faithfulness, ci_low, ci_high
    cpr: float
    cpr_ci: tuple[float, float]
    cmd: float
    cmd_ci: tuple[float, float]


def top_k_masks(scores: Tensor, percents: tuple[float, ...] = PERCENTS, *, absolute: bool = False) -> tuple[Tensor, list[int]]:
    """Edge masks [len(percents), n_edges] keeping the top-k% edges by score (or |score|)."""
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("edge scores contain NaN or inf; fix the scoring run before building circuits")
    key = scores.abs() if absolute else scores
    order = torch.argsort(key, descending=True)
    n = scores.numel()
    masks, counts = torch.zeros(len(percents), n), []
    for i, pct in enumerate(percents):
        k = max(1, int(round(n * pct / 100.0))) if pct > 0 else 0
        masks[i, order[:k]] = 1.0
        counts.append(k)
    return masks, counts


def _area(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.trapezoid(y, x)) if hasattr(np, "trapezoid") else float(np.trapz(y, x))


def faithfulness_curve(ctx: EdgeContext, scores: Tensor, *, percents: tuple[float, ...] = PERCENTS,
                       n_boot: int = 1000, seed: int = 0, memory_budget_mb: float = 1024.0,
                       progress: bool = False) -> FaithfulnessResult:
    """Evaluate top-k circuits exactly and summarise them as MIB's CPR and CMD with bootstrap intervals."""
    masks, counts = curve_masks(scores, percents)
    values = evaluate_edge_masks(ctx, masks, memory_budget_mb=memory_budget_mb, progress=progress, full_is_clean=True)
    return curve_from_values(values, ctx.clean_values, ctx.corrupt_values, counts, percents=percents,
                             n_boot=n_boot, seed=seed)


def curve_masks(scores: Tensor, percents: tuple[float, ...] = PERCENTS) -> tuple[Tensor, list[int]]:
    """The circuits a faithfulness curve evaluates: top-k by signed score, then by |score| ([2P, n_edges])."""
    signed, counts = top_k_masks(scores, percents)
    absolute, _ = top_k_masks(scores, percents, absolute=True)
    return torch.cat([signed, absolute]), counts


def curve_from_values(values: Tensor, clean_values: Tensor, corrupt_values: Tensor, counts: list[int], *,
                      percents: tuple[float, ...] = PERCENTS, n_boot: int = 1000, seed: int = 0) -> FaithfulnessResult:
    """CPR/CMD and the curve from per-prompt metrics of the `curve_masks` circuits ([2P, batch])."""
    values = values.cpu().numpy()
    clean, corrupt = clean_values.cpu().numpy(), corrupt_values.cpu().numpy()
    x = np.asarray(percents) / 100.0
    checked_gap(clean.mean(), corrupt.mean())  # the full sample; resamples may widen the interval instead

    def curve(idx: np.ndarray) -> np.ndarray:
        return normalize(values[:, idx].mean(1), clean[idx].mean(), corrupt[idx].mean(), strict=False)

    curves_arr = bootstrap(curve, clean.shape[0], n_boot=n_boot, seed=seed)  # [1 + n_boot, 2P]
    n_p = len(percents)
    cprs = np.array([_area(x, c[:n_p]) for c in curves_arr])
    cmds = np.array([_area(x, np.abs(1.0 - c[n_p:])) for c in curves_arr])
    bounds = percentile_ci(curves_arr)  # [2, 2P]
    rows = []
    for j, (pct, k) in enumerate(zip(percents, counts)):
        for sel, col in (("signed", j), ("absolute", n_p + j)):
            rows.append({"percent": pct, "n_edges": k, "selection": sel, "faithfulness": float(curves_arr[0, col]),
                         "ci_low": float(bounds[0, col]), "ci_high": float(bounds[1, col])})
    return FaithfulnessResult(pd.DataFrame(rows), float(cprs[0]), percentile_ci(cprs), float(cmds[0]),
                              percentile_ci(cmds))
