"""Causal tests of heads for in-context learning: ablation of the ICL score, exact patching on repeated tokens.

- `icl_ablation`: the ICL score (`tasks.corpus.icl_score`) with each head ablated, zero or mean: the head's
  `hook_z` is replaced by zeros, or by its mean over the evaluation sequences at each position (the engine's
  convention). `delta_icl` = ablated − base: positive = the head carried in-context learning.
- `joint_icl_ablation`: the same with a set of heads ablated together; `fraction_removed` = delta / −base.
- `repeated_tokens_patching`: the exact activation-patching effect of every head's output (all positions,
  clean into corrupt) on the repeated-tokens task, through the engine (`patching.activation`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.activation import PatchingConfig, activation_patching
from circuitlab.patching.components import head_node, hook_name
from circuitlab.patching.loss import loss_by_position
from circuitlab.tasks.corpus import icl_positions, icl_score
from circuitlab.tasks.repeated import RepeatedTokensTask

ABLATION_COLUMNS = ["layer", "head", "ablation", "icl", "base_icl", "delta_icl", "late_loss", "early_loss"]
ABLATIONS = ("zero", "mean")


def _group(heads: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(int(layer), []).append(int(head))
    return out


def ablation_hooks(model: TransformerBridge, heads: Iterable[tuple[int, int]], kind: str, tokens: Tensor | None = None,
                   means: dict[int, Tensor] | None = None) -> list[tuple[str, Callable[..., Tensor]]]:
    """Forward hooks that zero- or mean-ablate `heads`' `hook_z` ([batch, pos, head, d_head]).

    Mean ablation needs `means[layer]` ([pos, head, d_head]) or `tokens` to compute them from.
    """
    if kind not in ABLATIONS:
        raise ValueError(f"ablation {kind!r} is unknown: use one of {ABLATIONS}")
    groups = _group(heads)
    if kind == "mean" and means is None:
        if tokens is None:
            raise ValueError("mean ablation needs the tokens (or precomputed means) to average over")
        means = head_means(model, tokens)
    hooks = []
    for layer, head_list in groups.items():
        def hook(z: Tensor, hook: Any = None, _heads: list[int] = head_list, _layer: int = layer) -> Tensor:
            z = z.clone()
            if kind == "zero":
                z[:, :, _heads] = 0.0
            else:
                z[:, :, _heads] = means[_layer][None, : z.shape[1], _heads].to(z.dtype)
            return z
        hooks.append((hook_name("z", layer), hook))
    return hooks


def head_means(model: TransformerBridge, tokens: Tensor, batch_size: int = 64) -> dict[int, Tensor]:
    """Mean of each layer's `hook_z` over the sequences, per position: {layer: [pos, head, d_head]}.

    Read by recording hooks during `loss_by_position` (so it runs on the fast fused forward where that is checked
    equal to the bridge, and on the bridge's hooks otherwise)."""
    sums: dict[int, Tensor] = {}

    def record(layer: int) -> Any:
        def hook(z: Tensor, hook: Any = None) -> Tensor:
            part = z.detach().double().sum(0)
            sums[layer] = sums[layer] + part if layer in sums else part
            return z
        return hook

    hooks = [(hook_name("z", layer), record(layer)) for layer in range(model.cfg.n_layers)]
    loss_by_position(model, tokens, batch_size=batch_size, fwd_hooks=hooks)
    return {layer: (total / tokens.shape[0]).float() for layer, total in sums.items()}


def _row(layer: int, head: int, kind: str, losses: Tensor, base: float, late: int, early: int,
         width: int) -> dict[str, Any]:
    value = icl_score(losses, late, early, width)
    return {"layer": layer, "head": head, "ablation": kind, "icl": value, "base_icl": base, "delta_icl": value - base,
            "late_loss": float(losses[late]), "early_loss": float(losses[early])}


def icl_ablation(model: TransformerBridge, tokens: Tensor, *, heads: Sequence[tuple[int, int]] | None = None,
                 kinds: Sequence[str] = ABLATIONS, late: int | None = None, early: int | None = None,
                 width: int = 1, batch_size: int = 64) -> pd.DataFrame:
    """The ICL score with each head ablated alone (columns `ABLATION_COLUMNS`); `attrs` hold the base losses."""
    if late is None or early is None:
        late, early = icl_positions(tokens.shape[1])
    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)] if heads is None else heads
    base_losses = loss_by_position(model, tokens, batch_size=batch_size)
    base = icl_score(base_losses, late, early, width)
    means = head_means(model, tokens, batch_size) if "mean" in kinds else None
    rows = []
    for kind in kinds:
        for layer, head in heads:
            hooks = ablation_hooks(model, [(layer, head)], kind, means=means)
            rows.append(_row(layer, head, kind, loss_by_position(model, tokens, batch_size=batch_size, fwd_hooks=hooks),
                             base, late, early, width))
    frame = pd.DataFrame(rows, columns=ABLATION_COLUMNS)
    frame.attrs.update(base_icl=base, late=late, early=early, width=width)
    return frame


@dataclass(frozen=True)
class JointAblation:
    """The ICL score with a set of heads ablated together: `icl`, the unablated `base_icl`, `delta_icl` = icl −
    base, and `fraction_removed` = delta / −base (NaN when the base score is not negative)."""

    heads: tuple[str, ...]
    ablation: str
    icl: float
    base_icl: float
    delta_icl: float
    fraction_removed: float


@dataclass(frozen=True)
class SetsAblation:
    """Ablating each of `sets` same-size sets of heads together: the mean and largest `fraction_removed`, and the
    set that removed the most (`worst_set`)."""

    sets: int
    mean_fraction_removed: float
    max_fraction_removed: float
    worst_set: tuple[str, ...]


@dataclass(frozen=True)
class InductionAblation:
    """The phase study's joint ablation of one model (`graphs.phase.joint_induction_ablation`): the labelled
    `induction_heads`, their K-composition `partners` and the `other_heads` outside that circuit; then, for zero
    and mean ablation, the induction heads together (`*_induction`) and as many other heads (`*_others`: outside
    the circuit; `*_any_other`: any non-induction head). When nothing could be measured, `reason` says why and
    the measurements are None. JSON (`to_dict`): the measured keys only, `from_dict` reads it back."""

    induction_heads: tuple[str, ...]
    partners: dict[str, str | None]
    other_heads: tuple[str, ...]
    reason: str | None = None
    base_icl: float | None = None
    zero_induction: JointAblation | None = None
    zero_others: SetsAblation | None = None
    zero_any_other: SetsAblation | None = None
    mean_induction: JointAblation | None = None
    mean_others: SetsAblation | None = None
    mean_any_other: SetsAblation | None = None

    def to_dict(self) -> dict[str, object]:
        """The summary.json object (fields that are None left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> InductionAblation:
        """The record of a summary.json `joint_ablation` entry written by `to_dict`."""
        def part(name: str) -> JointAblation | SetsAblation | None:
            value = data.get(name)
            if value is None:
                return None
            assert isinstance(value, Mapping), f"{name} must be a JSON object, got {value!r}"
            kind = JointAblation if name.endswith("_induction") else SetsAblation
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
        names = [f"{k}_{o}" for k in ("zero", "mean") for o in ("induction", "others", "any_other")]
        heads, partners, others = data["induction_heads"], data["partners"], data["other_heads"]
        assert isinstance(heads, list) and isinstance(partners, Mapping) and isinstance(others, list)
        base, reason = data.get("base_icl"), data.get("reason")
        return cls(induction_heads=tuple(heads), partners=dict(partners), other_heads=tuple(others),
                   reason=None if reason is None else str(reason), base_icl=None if base is None else float(base),
                   **{n: part(n) for n in names})


def joint_icl_ablation(model: TransformerBridge, tokens: Tensor, heads: Sequence[tuple[int, int]], kind: str = "zero",
                       *,
                       late: int | None = None, early: int | None = None, width: int = 1, batch_size: int = 64,
                       base: float | None = None, means: dict[int, Tensor] | None = None) -> JointAblation:
    """ICL score with all `heads` ablated together (`JointAblation`).

    `means` (`head_means` of the same tokens) saves recomputing them for each set under mean ablation."""
    if late is None or early is None:
        late, early = icl_positions(tokens.shape[1])
    if base is None:
        base = icl_score(loss_by_position(model, tokens, batch_size=batch_size), late, early, width)
    hooks = ablation_hooks(model, heads, kind, tokens=tokens, means=means)
    value = icl_score(loss_by_position(model, tokens, batch_size=batch_size, fwd_hooks=hooks), late, early, width)
    removed = (value - base) / -base if base < 0 else float("nan")
    return JointAblation(tuple(head_node(l, h) for l, h in heads), kind, value, base, value - base, removed)


def repeated_tokens_patching(model: TransformerBridge, *, n: int = 16, seq_len: int = 20, seed: int = 0,
                             token_range: tuple[int, int] | None = None) -> pd.DataFrame:
    """Exact per-head patching effect (`z`, all positions, clean into corrupt) on repeated random tokens.

    The task's metric is the mean log-prob of the repeated half; effect 1 = the head alone restores it.
    """
    task = RepeatedTokensTask()
    options: dict[str, Any] = {"seq_len": seq_len}
    if token_range is not None:
        options["token_range"] = token_range
    pairs = task.generate(model, n, seed=seed, **options)
    return activation_patching(model, task, pairs, "z", positions="all", config=PatchingConfig())


__all__ = ["ABLATIONS", "ABLATION_COLUMNS", "InductionAblation", "JointAblation", "SetsAblation", "ablation_hooks",
           "head_means", "icl_ablation", "joint_icl_ablation", "repeated_tokens_patching"]
