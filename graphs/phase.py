"""Finding the induction-head phase change in a per-checkpoint table (Olsson et al. 2022, arXiv 2209.11895).

Three signatures should share one window of training steps:
1. the top induction (prefix-matching) score jumps: the window runs from the last checkpoint with the top
   score below `low` to the first checkpoint at or above `high` (defaults 0.2 and 0.5);
2. the ICL score drops: the steepest fall of the ICL score over equal-width intervals (the evenly spaced
   checkpoints) lies in the window; also the share of the whole run's ICL change inside the window. The fall
   from initialisation to the first grid step (every model, one layer too, starts using its context) and
   the steepest fall between any two checkpoints are reported beside it;
3. the training loss bump: the smoothed training loss falls faster inside the window than in the span of
   equal length before it (`loss_slope_ratio` > 1), visible as a bump in the loss curve.
A model without induction heads (one layer) has no window: `found` is False and the rest says why.

Also the per-checkpoint measurements a phase study records (`measure_checkpoint`), the head labels
(`label_heads`), the causal tables (`causal_tables`, `joint_induction_ablation`) and their join (`attach_causal`);
`reports.phase` trains, caches and renders around them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Iterable, Sequence

import itertools
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.graphs.ablation import (InductionAblation, JointAblation, SetsAblation, head_means, icl_ablation,
                                       joint_icl_ablation, repeated_tokens_patching)
from circuitlab.graphs.induction import ProbeOptions, composition_scores, head_scores
from circuitlab.graphs.roles import RoleThresholds, previous_token_mask
from circuitlab.patching.components import head_node, parse_node
from circuitlab.patching.loss import loss_by_position
from circuitlab.patching.models import load_model
from circuitlab.tasks.corpus import icl_positions, icl_score, icl_standard_error


@dataclass(frozen=True)
class PhaseWindow:
    """The detected phase-change window and the evidence for it (steps are optimizer steps).

    ICL drops are compared over equal-width intervals: the evenly spaced checkpoints (`grid`, spacing
    `grid_spacing`); `steepest_icl_drop` is the grid interval with the largest fall of the ICL score, and
    `steepest_icl_drop_in_window` says whether it lies inside the window (or holds it, if the window is shorter
    than one interval). Between initialisation and the first grid step every model starts using its context at
    all (`early_icl_change`); `steepest_icl_drop_any` is the largest fall between any two consecutive checkpoints,
    whatever their distance, which is usually that early transient.
    """

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
    steepest_icl_drop: tuple[int, int]  # grid interval with the largest ICL decrease
    steepest_icl_drop_value: float | None
    steepest_icl_drop_in_window: bool
    grid_spacing: int | None
    steepest_icl_drop_any: tuple[int, int]  # consecutive checkpoints (any spacing) with the largest decrease
    steepest_icl_drop_any_value: float | None
    early_icl_change: float | None  # ICL at the first grid step minus ICL at step 0
    loss_slope_ratio: float | None
    reason: str

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["steepest_icl_drop"] = list(self.steepest_icl_drop)
        out["steepest_icl_drop_any"] = list(self.steepest_icl_drop_any)
        return out


def even_grid(steps: Iterable[int]) -> list[int]:
    """The evenly spaced checkpoints among `steps`: the longest run of positive steps spaced by the most common
    gap between consecutive checkpoints (the linear part of `checkpoint_steps`, or Pythia's every-1000 steps)."""
    s = sorted({int(x) for x in steps})
    gaps = np.diff(s)
    if len(gaps) == 0:
        return [x for x in s if x > 0]
    values, counts = np.unique(gaps, return_counts=True)
    gap = int(values[np.argmax(counts)])
    runs, run = [], []
    for x in s:
        if x > 0 and x % gap == 0 and (not run or x - run[-1] == gap):
            run.append(x)
        elif x > 0 and x % gap == 0:
            runs.append(run)
            run = [x]
    runs.append(run)
    return max(runs, key=len)


def steepest_drop(steps: np.ndarray, values: np.ndarray) -> tuple[tuple[int, int], float | None]:
    """The consecutive pair of `steps` over which `values` fall the most, and that change (None: < 2 points)."""
    if len(steps) < 2:
        return (int(steps[0]) if len(steps) else 0,) * 2, None
    drops = np.diff(values)
    k = int(np.argmin(drops))
    return (int(steps[k]), int(steps[k + 1])), float(drops[k])


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
                        icl_column: str = "icl_score", grid: Sequence[int] | None = None) -> PhaseWindow:
    """The phase-change window of one training run from its per-checkpoint table (`step`, top induction, ICL).

    `grid`: the evenly spaced checkpoint steps over which ICL drops are compared (default `even_grid(steps)`).
    """
    for col in ("step", induction_column, icl_column):
        if col not in table.columns:
            raise ValueError(f"per-checkpoint table lacks column {col!r}; have {list(table.columns)}")
    t = table.sort_values("step").reset_index(drop=True)
    steps = t["step"].to_numpy(int)
    ind = t[induction_column].to_numpy(float)
    icl = t[icl_column].to_numpy(float)
    total = int(steps.max())
    grid = sorted(int(g) for g in (even_grid(steps) if grid is None else grid) if g in set(steps.tolist()))
    on_grid = np.isin(steps, grid)
    steep, steep_value = steepest_drop(steps[on_grid], icl[on_grid])
    steep_any, steep_any_value = steepest_drop(steps, icl)
    early = float(icl[steps == grid[0]][0] - icl[0]) if grid and steps[0] == 0 else None
    base = dict(total_steps=total, icl_final=float(icl[-1]), steepest_icl_drop=steep,
                steepest_icl_drop_value=steep_value, grid_spacing=int(grid[1] - grid[0]) if len(grid) > 1 else None,
                steepest_icl_drop_any=steep_any, steepest_icl_drop_any_value=steep_any_value, early_icl_change=early)
    above = np.nonzero(ind >= high)[0]
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
    nested = (start <= steep[0] and steep[1] <= end) or (steep[0] <= start and end <= steep[1])
    return PhaseWindow(True, start, end, fraction_of_training=(end - start) / total if total else None,
                       top_induction_before=float(ind[i]), top_induction_after=float(ind[j]),
                       icl_before=float(icl[i]), icl_after=float(icl[j]), icl_change_in_window=float(in_window),
                       steepest_icl_drop_in_window=bool(steep_value is not None and nested),
                       loss_slope_ratio=_loss_slope_ratio(train_log, start, end),
                       reason=f"top induction score {ind[i]:.3f} at step {start} → {ind[j]:.3f} at step {end}", **base)


# ------------------------------------------------------------------ measurements of a phase study

def icl_width(n_ctx: int) -> int:
    """Indices averaged on each side of the ICL score in a study: n_ctx/32 (8 at 256), at least 1."""
    return max(1, n_ctx // 32)


def measure_checkpoint(model: TransformerBridge, tokens: torch.Tensor, probe: ProbeOptions) -> tuple[dict[str, object],
                       pd.DataFrame]:
    """The per-checkpoint row (ICL, losses, top scores) and the per-head table of one model."""
    late, early = icl_positions(tokens.shape[1])
    width = icl_width(tokens.shape[1])
    per_sequence = loss_by_position(model, tokens, per_sequence=True)
    losses = per_sequence.mean(0)
    heads = head_scores(model, probe)
    heads["k_comp_from_prev"] = float("nan")
    if model.cfg.n_layers > 1:
        comp = composition_scores(model).set_index(["sender", "receiver"])["k_comp"]
        for idx, row in heads.iterrows():
            if row["qk_via"]:
                heads.loc[idx, "k_comp_from_prev"] = float(comp[(row["qk_via"], head_node(int(row["layer"]), int(row["head"])))])
    top = heads.loc[heads["induction"].idxmax()]
    return {"icl_score": icl_score(losses, late, early, width),
            "icl_se": icl_standard_error(per_sequence, late, early, width), "late": late, "early": early, "icl_width": width,
            "late_loss": float(losses[late]),
            "early_loss": float(losses[early]), "mean_loss": float(losses[1:].mean()),
            "top_induction": float(top["induction"]), "top_induction_head": head_node(int(top["layer"]), int(top["head"])),
            "top_previous_token": float(heads["previous_token"].max()),
            "top_ov_copying": float(heads["ov_copying"].max())}, heads


def label_heads(heads: pd.DataFrame, thresholds: RoleThresholds = RoleThresholds()) -> pd.Series:
    """`induction`, `previous_token` or `` per head row.

    Induction: induction score ≥ `thresholds.induction` and a copying OV circuit; previous-token:
    `graphs.roles.previous_token_mask` (the same rule `circuitlab run` labels by).
    """
    ind = (heads["induction"] >= thresholds.induction) & (heads["ov_copying"] > thresholds.copying)
    prev = previous_token_mask(heads, thresholds)
    return pd.Series(["induction" if a else "previous_token" if b else "" for a, b in zip(ind, prev)],
                     index=heads.index)


def causal_tables(name: str, step: int, path: Path, tokens: torch.Tensor, heads: pd.DataFrame,
                  token_range: tuple[int, int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-head ICL ablation (zero and mean) and exact repeated-token patching of one checkpoint."""
    model = load_model(str(path))
    abl = icl_ablation(model, tokens, width=icl_width(tokens.shape[1])).assign(model=name, step=step)
    patch = repeated_tokens_patching(model, n=16, seq_len=20, token_range=token_range).assign(model=name, step=step)
    return abl, patch


def induction_partners(heads: pd.DataFrame, composition: pd.DataFrame) -> dict[str, str | None]:
    """For each labelled induction head, the layer-0 head with the highest K-composition into it, if that head is
    labelled previous-token (else None): the induction circuit's other half."""
    labels = {head_node(int(r.layer), int(r.head)): r.label for r in heads.itertuples()}
    out: dict[str, str | None] = {}
    for node, label in labels.items():
        if label != "induction":
            continue
        into = composition[(composition["receiver"] == node) & (composition["sender_layer"] == 0)]
        top = str(into.loc[into["k_comp"].idxmax(), "sender"]) if len(into) else None
        out[node] = top if top is not None and labels.get(top) == "previous_token" else None
    return out


def _sets_summary(combos: list[tuple[tuple[int, int], ...]], fracs: list[float]) -> SetsAblation:
    worst = combos[fracs.index(max(fracs))]
    return SetsAblation(sets=len(combos), mean_fraction_removed=sum(fracs) / len(fracs),
                        max_fraction_removed=max(fracs), worst_set=tuple(head_node(l, h) for l, h in worst))


def joint_induction_ablation(model_path: Path, tokens: torch.Tensor, heads: pd.DataFrame, seed: int,
                             max_sets: int = 20) -> InductionAblation:
    """Ablate the labelled induction heads together, and as many heads outside the induction circuit.

    The circuit is the induction heads and their K-composition partners (`induction_partners`); `*_others` are
    every same-size set of the remaining heads (or `max_sets` seeded random ones), `*_any_other` the same over all
    non-induction heads, partners included (what ablating a random set of other heads does).
    """
    model = load_model(str(model_path))
    labelled = [(int(r.layer), int(r.head)) for r in heads.itertuples() if r.label == "induction"]
    partners = induction_partners(heads, composition_scores(model))
    in_circuit = set(labelled) | {(parse_node(p).layer, parse_node(p).head) for p in partners.values() if p}
    others = [(int(r.layer), int(r.head)) for r in heads.itertuples() if (int(r.layer), int(r.head)) not in in_circuit]
    anyother = [(int(r.layer), int(r.head)) for r in heads.itertuples() if r.label != "induction"]
    found = InductionAblation(induction_heads=tuple(head_node(l, h) for l, h in labelled), partners=partners,
                              other_heads=tuple(head_node(l, h) for l, h in others))
    if not labelled or len(others) < len(labelled):
        return replace(found, reason="no labelled induction heads" if not labelled
                       else "too few heads outside the circuit")
    width = icl_width(tokens.shape[1])
    base = icl_score(loss_by_position(model, tokens), width=width)
    rng = random.Random(seed)
    means = head_means(model, tokens)
    measured: dict[str, JointAblation | SetsAblation] = {}
    for kind in ("zero", "mean"):
        measured[f"{kind}_induction"] = joint_icl_ablation(model, tokens, labelled, kind, base=base, width=width,
                                                           means=means)
        cache: dict[tuple[tuple[int, int], ...], float] = {}
        for key, pool in (("others", others), ("any_other", anyother)):
            combos = list(itertools.combinations(pool, len(labelled)))
            if len(combos) > max_sets:
                combos = rng.sample(combos, max_sets)
            for c in combos:
                if c not in cache:
                    cache[c] = joint_icl_ablation(model, tokens, list(c), kind, base=base, width=width,
                                                  means=means).fraction_removed
            measured[f"{kind}_{key}"] = _sets_summary(combos, [cache[c] for c in combos])
    return replace(found, base_icl=base, **measured)  # type: ignore[arg-type]


def attach_causal(heads: pd.DataFrame, ablations: list[pd.DataFrame], patches: list[pd.DataFrame]) -> pd.DataFrame:
    """The per-head table with its causal columns (`delta_icl_zero`, `delta_icl_mean`, `patch_effect`; NaN where
    not measured) and `node` names."""
    heads = heads.copy()
    heads["node"] = [head_node(int(l), int(h)) for l, h in zip(heads["layer"], heads["head"])]
    key = ["model", "step", "layer", "head"]
    if ablations:
        abl = pd.concat(ablations, ignore_index=True)
        wide = abl.pivot_table(index=key, columns="ablation", values="delta_icl").add_prefix("delta_icl_").reset_index()
        heads = heads.merge(wide, on=key, how="left")
    if patches:
        pat = pd.concat(patches, ignore_index=True)[key + ["effect"]].rename(columns={"effect": "patch_effect"})
        heads = heads.merge(pat, on=key, how="left")
    for col in ("delta_icl_zero", "delta_icl_mean", "patch_effect"):
        if col not in heads:
            heads[col] = float("nan")
    return heads


__all__ = ["PhaseWindow", "attach_causal", "causal_tables", "detect_phase_change", "even_grid", "icl_width",
           "induction_partners", "joint_induction_ablation", "label_heads", "measure_checkpoint", "smooth",
           "steepest_drop"]
