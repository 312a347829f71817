"""The one registry of discovery methods: each `Method` carries its level, exactness, limits and its `score`.

A method is one file in this folder that calls `register(Method(...))`; `discover()`, `circuitlab run --method`,
sweeps and the benchmark all look methods up here (`get_method`). `score(prompts, options)` reads the prompts
through the one prompt-batch protocol (`patching.prompts.Prompts`: one batch or many, the same calls), so each
method is written once, and returns `MethodScores` (one score per edge, or per node) that `graphs.discovery`
turns into tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from circuitlab.patching.prompts import Prompts

LEVELS = ("edge", "node")
ABLATIONS = (None, "zero", "mean")


@dataclass(frozen=True)
class MethodOptions:
    """Options every method may read. `steps`: EAP-IG integration steps. `acdc_threshold` / `acdc_objective`
    (`kl` or `metric`, the latter as a fraction of |m(clean) − m(corrupt)|). `ablation` (`zero`/`mean`): replace the
    corrupted run by zeros or by the mean over the corrupted prompts. `seed` seeds random choices;
    `memory_budget_mb` bounds one batched forward."""

    steps: int = 5
    acdc_threshold: float = 0.05
    acdc_objective: str = "kl"
    ablation: str | None = None
    seed: int = 0
    memory_budget_mb: float = 1024.0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.acdc_objective not in ("kl", "metric"):
            raise ValueError(f"acdc_objective {self.acdc_objective!r} is unknown: use 'kl' or 'metric'")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation {self.ablation!r} is unknown: use None, 'zero' or 'mean'")


@dataclass(frozen=True)
class MethodScores:
    """What a method measured: `edges`, one score per edge of the graph [n_edges] (node-level methods that
    derive node scores from edges give them too), with `kept` edges for methods that prune (ACDC); or `nodes`,
    one score per head/MLP name in the graph's sender order (exact node methods)."""

    edges: Tensor | None = None
    kept: Tensor | None = None
    nodes: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if (self.edges is None) == (self.nodes is None):
            raise ValueError("MethodScores holds either edge scores or node scores")


Score = Callable[[Prompts, MethodOptions], MethodScores]


@dataclass(frozen=True)
class Method:
    """A discovery method. `level`: `edge` (scores every edge) or `node` (every head and MLP); `exact`: scores
    are exact patching effects, not estimates; `max_edges`: the largest graph it runs on unless forced (None =
    any); `circuit`: how `--circuit-method auto` finds the run's circuit from this method (a `graphs.faithful`
    method; `ranking-edges` = the smallest faithful prefix of this method's own edge ranking); `benchmark`:
    run by the methods benchmark by default; `score`: the method itself."""

    name: str
    level: str
    exact: bool
    note: str
    score: Score
    max_edges: int | None = None
    circuit: str = "ranking-edges"
    benchmark: bool = True

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"method {self.name!r}: level must be one of {LEVELS}, got {self.level!r}")


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (a name may be registered once)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def method_names(level: str | None = None) -> tuple[str, ...]:
    """Registered method names (of one level), in registration order."""
    return tuple(n for n, m in METHODS.items() if level is None or m.level == level)


def get_method(name: str) -> Method:
    """The registered method called `name`; a ValueError listing the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "MethodOptions", "MethodScores", "Score", "get_method", "method_names", "register"]
