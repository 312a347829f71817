"""Choosing a circuit by measured faithfulness: the smallest prefix of a ranking that reaches a target.

A ranking (attribution scores, learned mask logits, single-component effects) orders candidate items: heads
(`a3.h5`), MLPs (`m2`) or edges (`a0.h1->a5.h5<q>`). The circuit is the shortest prefix whose *exact*
faithfulness, f = (m(C) - m(corrupt)) / (m(clean) - m(corrupt)) with every item outside C at its corrupted-run
value (`patching.node_masks` for nodes, `patching.edges` for edges), reaches `target`. Items whose score is
zero or within noise of zero (|score| <= `noise` x the largest |score|) are never candidates: they are not
added to fill a size. Intervals are 95% bootstrap intervals over prompts.

`CircuitEvaluator` holds what the measurement needs for one set of prompts; build one for the discovery
prompts and one for held-out prompts (`node_evaluator`, `edge_evaluator`) and evaluate the same circuit on
both (`CircuitEvaluator.faithfulness`).

`select_validated` chooses the size on a *validation* set instead (prompts the ranking was not computed on, e.g.
discovery templates set aside; never the test prompts a report states): the smallest prefix whose exact
faithfulness lies within [target, 2 - target] on the validation prompts and on the prompts it was ranked on,
over one or both orders (signed scores, |scores|). Small edge circuits are noisy: on SmolLM2 IOI the
smallest discovery-faithful EAP-IG edge prefix (32,798 edges, 0.82) gave 0.72 on held-out templates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from circuitlab.patching.edges import EdgeContext, circuits_per_forward, evaluate_edge_masks
from circuitlab.patching.node_masks import evaluate_node_masks
from circuitlab.patching.normalize import normalize
from circuitlab.patching.stats import bootstrap, percentile_ci

NOISE = 1e-6


@dataclass
class CircuitEvaluator:
    """Exact per-prompt metric of circuits given as 0/1 vectors over `items`, with clean/corrupt baselines."""

    items: list[str]
    run: Callable[[Tensor], Tensor]  # masks [C, n_items] -> per-prompt metric [C, batch]
    clean_values: Tensor
    corrupt_values: Tensor
    level: str = "node"
    _seen: dict[bytes, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def mask(self, names: Sequence[str]) -> Tensor:
        index = {name: i for i, name in enumerate(self.items)}
        vec = torch.zeros(len(self.items))
        for name in names:
            if name not in index:
                raise ValueError(f"{name!r} is not one of this evaluator's {self.level} items (e.g. {self.items[0]!r})")
            vec[index[name]] = 1.0
        return vec

    def values(self, masks: Tensor) -> np.ndarray:
        """Per-prompt metric [C, batch] as float64. A circuit measured before is not run again (selection,
        refinement and reporting often measure the same circuit more than once)."""
        masks = masks if masks.dim() == 2 else masks.unsqueeze(0)
        keys = [str(row.dtype).encode() + row.detach().cpu().numpy().tobytes() for row in masks]
        new, pending = [], set()
        for i, key in enumerate(keys):
            if key not in self._seen and key not in pending:
                new.append(i)
                pending.add(key)
        if new:
            rows = self.run(masks[new]).detach().cpu().double().numpy()
            self._seen.update({keys[i]: row for i, row in zip(new, rows)})
        return np.stack([self._seen[key] for key in keys])

    def faithfulness(self, names_or_mask: Sequence[str] | Tensor, *, n_boot: int = 1000, seed: int = 0
                     ) -> tuple[float, tuple[float, float]]:
        """Exact faithfulness of one circuit and its 95% bootstrap interval over prompts."""
        mask = names_or_mask if isinstance(names_or_mask, Tensor) else self.mask(names_or_mask)
        f, lo, hi = normalized(self.values(mask), self.clean_values, self.corrupt_values, n_boot=n_boot, seed=seed)
        return float(f[0]), (float(lo[0]), float(hi[0]))


def normalized(values: np.ndarray, clean: Tensor, corrupt: Tensor, *, n_boot: int = 1000, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Faithfulness of each row of `values` [C, batch] with 95% bootstrap bounds (resampling prompts)."""
    c = clean.detach().cpu().double().numpy()
    k = corrupt.detach().cpu().double().numpy()
    point = normalize(values.mean(1), c.mean(), k.mean())
    if n_boot < 1 or values.shape[1] < 2:
        nan = np.full_like(point, np.nan)
        return point, nan, nan

    def faithfulness(idx: np.ndarray) -> np.ndarray:
        return normalize(values[:, idx].mean(1), c[idx].mean(), k[idx].mean(), strict=False)

    lo, hi = percentile_ci(bootstrap(faithfulness, values.shape[1], n_boot=n_boot, seed=seed))
    return point, lo, hi


def distance(f: float) -> float:
    """How far a circuit's faithfulness is from the full model's (1): undershoot and overshoot count alike."""
    return abs(1.0 - f)


def within(f: float, target: float) -> bool:
    """The two-sided criterion (greedy refinement, bench/circuits.py): f in [target, 2 - target], |1 - f| <= 1 - target.
    A circuit that overshoots (f = 1.49: it removed heads that oppose the behaviour) does not explain it either."""
    return distance(f) <= 1.0 - target


def node_evaluator(ctx: EdgeContext, *, heads_only: bool = True, chunk: int | None = None,
                   memory_budget_mb: float = 1024.0) -> CircuitEvaluator:
    """Node circuits over heads (MLPs and embeddings recomputed) or over heads and MLPs; `chunk` circuits per
    forward (default: as many as `memory_budget_mb` allows, at most 8)."""
    g = ctx.graph
    chunk = chunk or min(8, circuits_per_forward(ctx, memory_budget_mb))
    learn = g.senders_of(*(("head",) if heads_only else ("head", "mlp")))
    idx = torch.tensor(learn, dtype=torch.long)

    def run(masks: Tensor) -> Tensor:
        full = torch.ones(masks.shape[0], g.n_senders)
        full[:, idx] = masks.float()
        return evaluate_node_masks(ctx, full, chunk=chunk, full_is_clean=True)

    return CircuitEvaluator([g.sender_names[i] for i in learn], run, ctx.clean_values, ctx.corrupt_values, "node")


def edge_evaluator(ctx: EdgeContext, *, memory_budget_mb: float = 1024.0) -> CircuitEvaluator:
    """Edge circuits over every edge of the graph (exact edge patching)."""
    return CircuitEvaluator(list(ctx.graph.edge_names),
                            lambda masks: evaluate_edge_masks(ctx, masks.float(), memory_budget_mb=memory_budget_mb,
                                                              full_is_clean=True),
                            ctx.clean_values, ctx.corrupt_values, "edge")


def batched_evaluator(make: Callable[[EdgeContext], CircuitEvaluator],
                      contexts: Callable[[], Iterable[EdgeContext]]) -> CircuitEvaluator:
    """One evaluator over prompt batches: `contexts()` yields each batch's context (`patching.batched.Batches`:
    the kept context when every prompt fits in one batch, else built as it is needed, so only one batch's
    activations are alive), `make` turns one into an evaluator; per-prompt metrics are concatenated
    in batch order, so faithfulness and its bootstrap equal those of one context over every prompt."""
    first, clean, corrupt = None, [], []
    for ctx in contexts():
        part = make(ctx)
        first = first or part
        if part.items != first.items:
            raise ValueError("prompt batches give different items; every batch must come from one model")
        clean.append(part.clean_values.detach().cpu())
        corrupt.append(part.corrupt_values.detach().cpu())
    if first is None:
        raise ValueError("no prompt batches: nothing to evaluate")

    def run(masks: Tensor) -> Tensor:
        return torch.cat([make(ctx).run(masks).detach().cpu() for ctx in contexts()], dim=1)

    return CircuitEvaluator(first.items, run, torch.cat(clean), torch.cat(corrupt), first.level)


@dataclass
class FaithfulCircuit:
    """The chosen circuit, its exact faithfulness with interval, and the faithfulness-vs-size curve."""

    items: list[str]
    faithfulness: float
    ci: tuple[float, float]
    target: float
    reached: bool
    candidates: int  # items with a score clear of noise
    curve: pd.DataFrame = field(default_factory=pd.DataFrame)  # size, faithfulness, ci_low, ci_high
    added: list[str] = field(default_factory=list)  # entered by exact gain, not by the ranking (`graphs.greedy`)
    validation: tuple[float, tuple[float, float]] | None = None  # on validation prompts (`select_validated`)

    @property
    def size(self) -> int:
        return len(self.items)


def candidate_order(scores: Tensor, *, absolute: bool = True, noise: float = NOISE) -> list[int]:
    """Indices ranked by score (or |score|), dropping scores that are zero or within noise of zero."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or inf; fix the scoring run before selecting a circuit")
    key = scores.abs() if absolute else scores
    floor = max(noise * float(scores.abs().max()) if len(scores) else 0.0, 0.0)
    order = torch.argsort(key, descending=True, stable=True).tolist()
    return [i for i in order if float(key[i]) > floor]


def size_grid(n: int) -> list[int]:
    """Circuit sizes to try first: 1, 2, 3, 4, 6, 9, 13, 20, ... (about x1.5 apart) and n."""
    sizes, k = set(), 1.0
    while k < n:
        sizes.add(int(round(k)))
        k = max(k + 1, k * 1.5)
    sizes.add(n)
    return sorted(s for s in sizes if 1 <= s <= n)


def select_by_faithfulness(evaluator: CircuitEvaluator, scores: Tensor, target: float = 0.8, *,
                           absolute: bool = True, noise: float = NOISE, require_lower: bool = False,
                           stable: bool = True, n_boot: int = 1000, seed: int = 0, batch: int = 16) -> FaithfulCircuit:
    """Smallest prefix of the ranking `scores` (one per evaluator item) whose exact faithfulness >= target.

    Sizes on a geometric grid are measured first (that is the returned curve); the crossing is then located
    by bisection between the last grid size below target and the first one at or above it. With
    `require_lower` the bootstrap lower bound, not the point estimate, must reach the target. With `stable`
    (default) the crossing is the first grid size from which every larger grid size also reaches the target:
    faithfulness is not monotone in the prefix size, and a lucky small prefix (measured 0.84 on 16 SmolLM2 IOI
    pairs with 2 heads, 0.45 on held-out pairs) is noise rather than a circuit.
    """
    if len(scores) != len(evaluator.items):
        raise ValueError(f"{len(scores)} scores for {len(evaluator.items)} {evaluator.level} items")
    order = candidate_order(scores, absolute=absolute, noise=noise)
    if not order:
        raise ValueError("every score is zero (or within noise of zero): nothing to select; check the scoring run")

    def masks_for(sizes: Sequence[int]) -> Tensor:
        m = torch.zeros(len(sizes), len(evaluator.items))
        for row, k in enumerate(sizes):
            m[row, order[:k]] = 1.0
        return m

    def measure(sizes: Sequence[int]) -> pd.DataFrame:
        values = np.concatenate([evaluator.values(masks_for(sizes[i:i + batch])) for i in range(0, len(sizes), batch)])
        f, lo, hi = normalized(values, evaluator.clean_values, evaluator.corrupt_values, n_boot=n_boot, seed=seed)
        return pd.DataFrame({"size": list(sizes), "faithfulness": f, "ci_low": lo, "ci_high": hi})

    def ok(row: pd.Series) -> bool:
        value = row["ci_low"] if require_lower and not np.isnan(row["ci_low"]) else row["faithfulness"]
        return bool(value >= target)

    curve = measure(size_grid(len(order)))
    passes = [ok(curve.iloc[i]) for i in range(len(curve))]
    hits = [i for i in range(len(curve)) if (all(passes[i:]) if stable else passes[i])]
    if not hits:
        best = curve.iloc[-1]
        return FaithfulCircuit([evaluator.items[i] for i in order], float(best["faithfulness"]),
                               (float(best["ci_low"]), float(best["ci_high"])), target, False, len(order), curve)
    first = hits[0]
    lo_size = int(curve.iloc[first - 1]["size"]) if first > 0 else 0
    hi_row = curve.iloc[first]
    hi_size = int(hi_row["size"])
    extra = []
    while hi_size - lo_size > 1:  # bisection: lo fails, hi passes
        mid = (lo_size + hi_size) // 2
        row = measure([mid]).iloc[0]
        extra.append(row)
        if ok(row):
            hi_size, hi_row = mid, row
        else:
            lo_size = mid
    if extra:
        curve = pd.concat([curve, pd.DataFrame(extra)], ignore_index=True).sort_values("size", ignore_index=True)
    return FaithfulCircuit([evaluator.items[i] for i in order[:hi_size]], float(hi_row["faithfulness"]),
                           (float(hi_row["ci_low"]), float(hi_row["ci_high"])), target, True, len(order), curve)


def select_validated(evaluator: CircuitEvaluator, validation: CircuitEvaluator, scores: Tensor, target: float = 0.8, *,
                     orders: Sequence[bool] = (False, True), noise: float = NOISE, n_boot: int = 1000, seed: int = 0,
                     batch: int = 4, extra_sizes: Sequence[int] = ()) -> FaithfulCircuit:
    """Smallest prefix of the ranking whose exact faithfulness is `within` the target band on both `evaluator`'s
    prompts and `validation`'s (same items, other prompts), trying each order in `orders` (False: signed scores,
    True: |scores|) and keeping the smaller circuit (a later order is only measured below the size found so far).

    The `size_grid` sizes are measured on the discovery prompts; validation prompts are measured where discovery
    is within the band, smallest first (`batch` sizes at a time), up to the first size within on both; the crossing
    is then narrowed by bisection between the grid size below it and it (both sets checked). The returned curve
    holds both sets' faithfulness (`validation`, `validation_low`, `validation_high`: NaN where not measured) and
    the order (`absolute`); with no size passing, the prefix closest to 1 on validation is returned, not reached.
    `extra_sizes` join the grid (e.g. the number of gates a mask learner left open: its own circuit)."""
    if validation.items != evaluator.items:
        raise ValueError("the validation evaluator must have the same items as the discovery evaluator")
    if len(scores) != len(evaluator.items):
        raise ValueError(f"{len(scores)} scores for {len(evaluator.items)} {evaluator.level} items")
    best: FaithfulCircuit | None = None
    for absolute in orders:
        order = candidate_order(scores, absolute=absolute, noise=noise)
        if not order:
            continue
        limit = best.size if best is not None and best.reached else None
        found = _validated_prefix(evaluator, validation, order, target, absolute, n_boot, seed, batch, limit,
                                  extra_sizes)
        if found is not None and (best is None or _better(found, best)):
            best = found
    if best is None:
        raise ValueError("every score is zero (or within noise of zero): nothing to select; check the scoring run")
    return best


def _better(a: FaithfulCircuit, b: FaithfulCircuit) -> bool:
    if a.reached != b.reached:
        return a.reached
    if a.reached:
        return a.size < b.size
    return distance(a.validation[0]) < distance(b.validation[0])


def _validated_prefix(evaluator: CircuitEvaluator, validation: CircuitEvaluator, order: list[int], target: float,
                      absolute: bool, n_boot: int, seed: int, batch: int, limit: int | None,
                      extra_sizes: Sequence[int] = ()) -> FaithfulCircuit | None:
    """One order's smallest prefix within the band on both sets (see `select_validated`); sizes below `limit`
    only, and None when none of them passes there."""
    def measure(ev: CircuitEvaluator, sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        masks = torch.zeros(len(sizes), len(evaluator.items))
        for row, k in enumerate(sizes):
            masks[row, order[:k]] = 1.0
        return normalized(ev.values(masks), ev.clean_values, ev.corrupt_values, n_boot=n_boot, seed=seed)

    def rows(sizes: Sequence[int]) -> pd.DataFrame:
        f, lo, hi = measure(evaluator, sizes)
        nan = np.full(len(sizes), np.nan)
        return pd.DataFrame({"size": list(sizes), "faithfulness": f, "ci_low": lo, "ci_high": hi, "validation": nan,
                             "validation_low": nan, "validation_high": nan, "absolute": absolute})

    def fill(curve: pd.DataFrame, index: Sequence[int]) -> None:
        if index:
            f, lo, hi = measure(validation, [int(curve.at[i, "size"]) for i in index])
            curve.loc[list(index), ["validation", "validation_low", "validation_high"]] = np.stack([f, lo, hi], 1)

    def ok(row: pd.Series) -> bool:
        return within(float(row["faithfulness"]), target) and within(float(row["validation"]), target)

    grid = set(size_grid(len(order))) | {int(k) for k in extra_sizes if 1 <= int(k) <= len(order)}
    sizes = [k for k in sorted(grid) if limit is None or k < limit]
    if not sizes:
        return None
    curve = rows(sizes)
    candidates = [i for i in range(len(curve)) if within(float(curve.at[i, "faithfulness"]), target)]
    first = None
    for at in range(0, len(candidates), batch):
        fill(curve, candidates[at:at + batch])
        hits = [i for i in candidates[at:at + batch] if ok(curve.loc[i])]
        if hits:
            first = hits[0]
            break
    if first is None:
        if limit is not None:
            return None
        fill(curve, [i for i in range(len(curve)) if np.isnan(curve.at[i, "validation"])])
        row = curve.loc[curve["validation"].map(lambda f: distance(float(f))).idxmin()]
        size = int(row["size"])
        return FaithfulCircuit([evaluator.items[i] for i in order[:size]], float(row["faithfulness"]),
                               (float(row["ci_low"]), float(row["ci_high"])), target, False, len(order), curve,
                               validation=_validation(row))
    lo_size = int(curve.at[first - 1, "size"]) if first > 0 else 0
    hi_row = curve.loc[first]
    hi_size, extra = int(hi_row["size"]), []
    while hi_size - lo_size > 1:  # lo fails, hi passes
        mid = (lo_size + hi_size) // 2
        row = rows([mid])
        if within(float(row.at[0, "faithfulness"]), target):
            fill(row, [0])
        extra.append(row.iloc[0])
        if ok(row.iloc[0]):
            hi_size, hi_row = mid, row.iloc[0]
        else:
            lo_size = mid
    if extra:
        curve = pd.concat([curve, pd.DataFrame(extra)], ignore_index=True).sort_values("size", ignore_index=True)
    return FaithfulCircuit([evaluator.items[i] for i in order[:hi_size]], float(hi_row["faithfulness"]),
                           (float(hi_row["ci_low"]), float(hi_row["ci_high"])), target, True, len(order), curve,
                           validation=_validation(hi_row))


def _validation(row: pd.Series) -> tuple[float, tuple[float, float]]:
    return float(row["validation"]), (float(row["validation_low"]), float(row["validation_high"]))


__all__ = ["CircuitEvaluator", "FaithfulCircuit", "batched_evaluator", "candidate_order", "edge_evaluator", "node_evaluator",
           "distance", "normalized", "select_by_faithfulness", "select_validated", "size_grid", "within", "NOISE"]
