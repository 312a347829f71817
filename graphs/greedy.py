"""Greedy refinement of a circuit by exact gains in faithfulness.

Start from a circuit (typically the smallest faithful prefix of an attribution ranking,
`graphs.selection.select_by_faithfulness`). Then:

1. grow: while faithfulness is below `target`, measure adding each of the `candidates` best-ranked items not
   yet in the circuit (one batched exact evaluation) and add the one with the largest gain;
2. prune: measure removing each member (one batched evaluation), then try removals from the cheapest up,
   one exact evaluation each, keeping a removal when faithfulness stays at or above `target`.

Every step is an exact evaluation (`CircuitEvaluator`), so the result's faithfulness is measured, not
estimated. Items never enter unless they are in the ranking's candidates (scores clear of noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from torch import Tensor

from circuitlab.graphs.selection import CircuitEvaluator, candidate_order, normalized


@dataclass
class GreedyResult:
    """The refined circuit, its faithfulness, and what each step did."""

    items: list[str]
    faithfulness: float
    reached: bool
    steps: list[dict] = field(default_factory=list)
    evaluations: int = 0


def _faith(evaluator: CircuitEvaluator, masks: Tensor, batch: int) -> np.ndarray:
    values = np.concatenate([evaluator.values(masks[i:i + batch]) for i in range(0, masks.shape[0], batch)])
    return normalized(values, evaluator.clean_values, evaluator.corrupt_values, n_boot=0)[0]


def greedy_refine(evaluator: CircuitEvaluator, start: Sequence[str], scores: Tensor, target: float = 0.8, *,
                  candidates: int = 32, max_add: int = 64, absolute: bool = True, batch: int = 16) -> GreedyResult:
    """Grow then prune `start` by exact faithfulness gains (see the module docstring)."""
    order = candidate_order(scores, absolute=absolute)
    pool = [evaluator.items[i] for i in order]
    current = evaluator.mask(start)
    steps: list[dict] = []
    evaluations = 1
    f = float(_faith(evaluator, current.unsqueeze(0), batch)[0])
    for _ in range(max_add):
        if f >= target:
            break
        outside = [name for name in pool if current[evaluator.items.index(name)] == 0][:candidates]
        if not outside:
            break
        trials = current.unsqueeze(0).repeat(len(outside), 1)
        for row, name in enumerate(outside):
            trials[row, evaluator.items.index(name)] = 1.0
        gains = _faith(evaluator, trials, batch)
        evaluations += len(outside)
        best = int(np.argmax(gains))
        if gains[best] <= f:
            break
        current = trials[best]
        steps.append({"action": "add", "item": outside[best], "faithfulness": float(gains[best])})
        f = float(gains[best])
    if f >= target:
        members = [evaluator.items[i] for i in current.nonzero().flatten().tolist()]
        trials = current.unsqueeze(0).repeat(len(members), 1)
        for row, name in enumerate(members):
            trials[row, evaluator.items.index(name)] = 0.0
        without = _faith(evaluator, trials, batch)
        evaluations += len(members)
        for row in np.argsort(-without):  # cheapest removal first
            if without[row] < target:
                break
            name = members[int(row)]
            trial = current.clone()
            trial[evaluator.items.index(name)] = 0.0
            value = float(_faith(evaluator, trial.unsqueeze(0), batch)[0])
            evaluations += 1
            if value >= target:
                current, f = trial, value
                steps.append({"action": "remove", "item": name, "faithfulness": value})
    items = [evaluator.items[i] for i in current.nonzero().flatten().tolist()]
    return GreedyResult(items, f, f >= target, steps, evaluations)


__all__ = ["GreedyResult", "greedy_refine"]
