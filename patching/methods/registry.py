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


RANKINGS = ("scores", "own", "single-effect", "masks")


@dataclass(frozen=True)
class CircuitSearch:
    """A circuit search (`graphs.faithful.find_faithful_circuit` runs it): it ranks heads (`level` node; MLPs
    recomputed) or edges (`edge`), and the circuit is the smallest faithful prefix of that ranking. `ranks`: what
    it ranks: `scores`, the edge scores of the registered method `scores` (a run's are reused when the run used
    that method, or one in `reuses`); `own`, the run method's own edge scores, whatever the method;
    `single-effect`, each head's exact single noising effect; `masks`, learned hard-concrete masks. `refine`: the
    prefix is then refined by exact gains (`graphs.greedy`). `label`: how the report names the ranking
    (`{scores}`: the method whose scores were ranked); `run_alias`: `--method NAME` is short for EAP-IG scores with
    this search; `benchmark`: run by `bench/circuits.py` by default; `leaderboard_order`: its place in
    `circuitlab bench leaderboard`'s default, cheapest-first order (None: not run there by default)."""

    name: str
    level: str
    ranks: str
    label: str
    scores: str | None = None
    reuses: tuple[str, ...] = ()
    refine: bool = False
    run_alias: bool = False
    benchmark: bool = True
    leaderboard_order: int | None = None

    def __post_init__(self) -> None:
        if self.level not in LEVELS or self.ranks not in RANKINGS or (self.ranks == "scores") != bool(self.scores):
            raise ValueError(f"circuit search {self.name!r}: level in {LEVELS}, ranks in {RANKINGS}, and `scores` "
                             "names a method exactly when it ranks `scores`")

    def can_reuse(self, method: str) -> bool:
        """Whether this search can rank the edge scores a run of `method` already computed."""
        return self.ranks == "own" or method == self.scores or method in self.reuses

    def ranking_label(self, method: str | None = None) -> str:
        """The report's name of the ranking; `method`: the run method whose scores were reused (None: computed)."""
        return self.label.format(scores=method or self.scores or self.name)


SEARCHES: dict[str, CircuitSearch] = {s.name: s for s in (
    CircuitSearch("greedy", "node", "scores", "{scores} (greedy starts from its faithful prefix)", scores="eap-ig",
                  reuses=("eap",), refine=True, run_alias=True, leaderboard_order=6),
    CircuitSearch("node-pruning", "node", "masks", "learned node masks", run_alias=True, leaderboard_order=7),
    CircuitSearch("edge-pruning", "edge", "masks", "learned edge masks", run_alias=True, leaderboard_order=8),
    CircuitSearch("single-effect", "node", "single-effect", "single-head noising effect", run_alias=True),
    CircuitSearch("eap", "node", "scores", "{scores} node scores", scores="eap"),
    CircuitSearch("eap-ig", "node", "scores", "{scores} node scores", scores="eap-ig"),
    CircuitSearch("eap-edges", "edge", "scores", "eap-edges", scores="eap", benchmark=False),
    CircuitSearch("eap-ig-edges", "edge", "scores", "eap-ig-edges", scores="eap-ig"),
    CircuitSearch("ranking-edges", "edge", "own", "{scores} edge ranking", benchmark=False),
)}


@dataclass(frozen=True)
class Method:
    """A discovery method. `level`: `edge` (scores every edge) or `node` (every head and MLP); `exact`: scores
    are exact patching effects, not estimates; `max_edges`: the largest graph it runs on unless forced (None =
    any); `circuit`: how `--circuit-method auto` finds the run's circuit from this method (a `graphs.faithful`
    method; `ranking-edges` = the smallest faithful prefix of this method's own edge ranking); `benchmark`:
    run by the methods benchmark by default; `leaderboard_order`: its place in `circuitlab bench leaderboard`'s
    default, cheapest-first order (None: not run there by default); `score`: the method itself."""

    name: str
    level: str
    exact: bool
    note: str
    score: Score
    max_edges: int | None = None
    circuit: str = "ranking-edges"
    benchmark: bool = True
    leaderboard_order: int | None = None

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"method {self.name!r}: level must be one of {LEVELS}, got {self.level!r}")
        if self.circuit not in SEARCHES:
            raise ValueError(f"method {self.name!r}: circuit search {self.circuit!r} is unknown: use one of "
                             f"{', '.join(SEARCHES)}")


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


def search_names(level: str | None = None, *, benchmark: bool | None = None) -> tuple[str, ...]:
    """Circuit search names (of one level; only those the circuits benchmark runs by default with
    `benchmark=True`), in declaration order."""
    return tuple(n for n, s in SEARCHES.items()
                 if (level is None or s.level == level) and (benchmark is None or s.benchmark == benchmark))


def get_search(name: str) -> CircuitSearch:
    """The circuit search called `name`; a ValueError listing the known ones otherwise."""
    if name not in SEARCHES:
        raise ValueError(f"unknown circuit method {name!r}: use one of {', '.join(SEARCHES)}")
    return SEARCHES[name]


def alias_names() -> tuple[str, ...]:
    """Circuit searches `circuitlab run --method` also accepts, as short for EAP-IG scores with that search."""
    return tuple(n for n, s in SEARCHES.items() if s.run_alias)


def leaderboard_searches() -> tuple[str, ...]:
    """Circuit searches the leaderboard runs as methods of their own (their ranking, their circuit)."""
    return tuple(n for n, s in SEARCHES.items() if s.leaderboard_order is not None)


def leaderboard_names() -> tuple[str, ...]:
    """The leaderboard's default methods, cheapest first (so a partial run has the most cells): registered
    methods and circuit searches with a `leaderboard_order`."""
    ranked = [(m.leaderboard_order, n) for n, m in METHODS.items() if m.leaderboard_order is not None]
    ranked += [(SEARCHES[n].leaderboard_order, n) for n in leaderboard_searches()]
    return tuple(n for _, n in sorted(ranked))


def run_method_names() -> tuple[str, ...]:
    """Everything `circuitlab run --method` accepts: the registered methods, then the circuit-search aliases."""
    return method_names() + alias_names()


__all__ = ["METHODS", "RANKINGS", "SEARCHES", "CircuitSearch", "Method", "MethodOptions", "MethodScores", "Score",
           "alias_names", "get_method", "get_search", "leaderboard_names", "leaderboard_searches", "method_names",
           "register", "run_method_names", "search_names"]
