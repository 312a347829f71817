"""`Pipeline`: what every stage of `circuitlab run` reads: the run's config, its result so far, the stage cache,
and the heavy objects built once and lazily (the model, the runner, the prompt batches). The stages
(`reports.run`, `reports.faithful`, `reports.resume`) take it and return the `RunResult` fields they fill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from transformer_lens.model_bridge import TransformerBridge

from circuitlab.graphs.scores import EdgeScores, NodeScores
from circuitlab.patching.batched import Batches, batch_size_for
from circuitlab.patching.engine import make_runner
from circuitlab.patching.hook_backend import ModelRunner
from circuitlab.patching.models import load_model
from circuitlab.patching.topology import ComputationalGraph, PositionalGraph, role_segment_names
from circuitlab.reports.config import ConfigError, RunConfig
from circuitlab.reports.result import RunResult
from circuitlab.reports.save import StageCache
from circuitlab.reports.summaries import EngineRecord
from circuitlab.tasks.base import PromptPairs, Task


@dataclass
class Pipeline:
    """The run's configuration, its result so far, and the heavy objects built lazily (model, contexts)."""

    cfg: RunConfig
    result: RunResult
    cache: StageCache
    say: Callable[[str], None]
    progress: bool
    task: Task | None = None
    key_parts: dict[str, str] = field(default_factory=dict)
    _model: TransformerBridge | None = None
    _batches: dict[str, Batches] = field(default_factory=dict)
    _runner: tuple[ModelRunner, str, str] | None = None  # (runner, backend, why), `patching.engine.make_runner`

    def model(self) -> TransformerBridge:
        if self._model is None:
            self.say(f"loading model {self.cfg.model} on {self.cfg.device}")
            start = time.time()
            self._model = load_model(self.cfg.model, device=self.cfg.device)
            self.result.timings["load_model"] = round(time.time() - start, 3)
        return self._model

    def pairs(self) -> PromptPairs:
        return self.result.pairs.to(self.cfg.device)

    def batches(self, which: str = "discovery") -> Batches:
        """The discovery (or `heldout`, or --validation-n's `validation`) prompts in batches sized by --batch-size or
        --memory-budget; every stage iterates over them, and when they fit in one batch its clean and corrupt runs
        are computed once per run."""
        if which not in self._batches:
            model = self.model()
            pairs = self.pairs() if which == "discovery" else self._other_pairs(which).to(self.cfg.device)
            size = self.cfg.batch_size or batch_size_for(model, pairs, self.cfg.memory_budget)
            self._batches[which] = Batches(model, self.task, pairs, batch_size=size, runner=self.runner())
            n_batches = -(-len(pairs) // size)
            self.say(f"  {len(pairs)} {which} pairs in {n_batches} batch{'es' if n_batches > 1 else ''} of <= {size}")
        return self._batches[which]

    def _other_pairs(self, which: str) -> PromptPairs:
        """The held-out or validation pairs of the result (a clear error for any other name, or pairs not drawn)."""
        pairs = self.result.heldout_pairs if which == "heldout" else (
            self.result.validation_pairs if which == "validation" else None)
        if pairs is None:
            raise ValueError(f"no {which!r} prompt pairs in this run (discovery, heldout, or validation with "
                             "--validation-n)")
        return pairs

    def runner(self) -> ModelRunner:
        """The runner `--backend` asks for (auto: the fast runner where it reproduces the model, else the exact hook
        backend; `patching.engine.make_runner`)."""
        if self._runner is None:
            try:
                self._runner = make_runner(self.model(), self.cfg.backend)
            except ValueError as exc:  # --backend fast on a model it does not reproduce
                raise ConfigError(str(exc)) from None
        return self._runner[0]

    def engine(self) -> EngineRecord:
        """Which backend runs this model and why, with the architecture description (for run.json)."""
        runner = self.runner()
        _, backend, reason = self._runner
        return EngineRecord(backend=backend, requested=self.cfg.backend, reason=reason,
                            architecture=runner.arch.as_dict())

    def head_and_mlp_kinds(self) -> list[str]:
        return ["z"] + ([] if getattr(self.model().cfg, "attn_only", False) else ["mlp_out"])

    def graph(self) -> ComputationalGraph:  # the graph of the run's edge scores: position-aware with --edge-positions
        m = self.result.model
        base = ComputationalGraph(m.n_layers, m.n_heads, m.n_key_value_heads, m.attn_only, m.parallel_attn_mlp)
        roles = self.cfg.edge_positions != "none"
        return PositionalGraph(base, role_segment_names(list(self.result.pairs.positions))) if roles else base

    def edge_batches(self, which: str = "discovery") -> Batches:  # `batches`, position-aware with --edge-positions
        return self.batches(which).with_positions(None if self.cfg.edge_positions == "none" else self.cfg.edge_positions)

    def stage(self, name: str, compute: Callable[[Pipeline], dict[str, object]]) -> None:
        """Fill the result from a stage: its saved output when cached (and verified), else `compute` (then saved)."""
        cached = self.cache.has(name)
        if name in self.cache.problems:
            self.say(f"[{name}] not resuming: {self.cache.problems.pop(name)}; recomputing")
        if cached:
            values, seconds = self.cache.load(name)
            self.result.resumed.append(name)
            self.say(f"[{name}] resumed from saved results")
        else:
            self.say(f"[{name}] ...")
            start = time.time()
            values = compute(self)
            seconds = time.time() - start
            self.say(f"[{name}] done in {seconds:.1f} s")  # the one line per stage where no progress bar is drawn
            self.cache.save(name, values, seconds)
        self.result.update(values)
        self.result.timings[name] = round(seconds, 3)

    def scores(self) -> tuple[EdgeScores | None, NodeScores]:
        """The method's typed scores, rebuilt from the result's tables: (EdgeScores or None, NodeScores)."""
        graph, base = self.graph(), self.result.baseline
        gap = float(base["clean"].mean() - base["corrupt"].mean())
        edges = EdgeScores.from_frame(graph, self.result.edges, gap) if self.result.edges is not None else None
        return edges, NodeScores(graph, self.result.nodes, self.cfg.method)


__all__ = ["Pipeline"]
