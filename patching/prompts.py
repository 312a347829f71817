"""The one prompt-batch protocol: what every method reads, the same for one batch of prompts or many.

`Prompts` is implemented by `OneBatch` (one engine context holding every prompt) and by `patching.batched.Batches`
(the prompts in batches, one batch's activations alive at a time). A method written against `Prompts` runs on
both: `edge_contexts()` yields one engine context per batch, `weighted(f)` is the all-prompt mean of a per-batch
mean (Σ_b n_b/n · f(b); one batch: f itself), `baseline()` the per-prompt clean and corrupt metrics, and the
engine's sweeps (`activation_patching`, `path_patching`, edge-mask evaluation, faithfulness curves) are summed
exactly over batches. `as_prompts(x)` accepts either (or a bare engine context) and returns a `Prompts`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterator, Sequence

import pandas as pd
import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.activation import PatchingConfig, Positions, activation_patching
from circuitlab.patching.attribution import exact_edge_scores, oracle_frame, oracle_sample
from circuitlab.patching.edges import ablated_context, evaluate_edge_masks, with_positions
from circuitlab.patching.engine import EngineContext
from circuitlab.patching.faithfulness import FaithfulnessResult, curve_from_values, curve_masks
from circuitlab.patching.path import Receivers, Senders, path_patching
from circuitlab.patching.topology import ComputationalGraph
from circuitlab.tasks.base import PromptPairs, Task


class Prompts(ABC):
    """A dataset of prompt pairs on one model, as one batch or many (see the module docstring)."""

    model: TransformerBridge
    task: Task
    pairs: PromptPairs

    @abstractmethod
    def edge_contexts(self) -> Iterator[EngineContext]:
        """One engine context per prompt batch (edge methods: corrupted run replaced by the ablation, if any)."""

    @abstractmethod
    def with_ablation(self, ablation: str | None) -> Prompts:
        """The same prompts whose edge methods replace the corrupted run by `zero` or `mean` ablation."""

    @abstractmethod
    def with_positions(self, mode: str | None) -> Prompts:
        """The same prompts whose edge methods see position-aware edges (`roles`, `each`; None: plain edges)."""

    @abstractmethod
    def activation_patching(self, component: str = "z", *, positions: Positions = "all",
                            layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                            config: PatchingConfig | None = None,
                            collect: Sequence[tuple[str, int]] = ()) -> pd.DataFrame:
        """`activation.activation_patching` over every prompt."""

    @abstractmethod
    def path_patching(self, senders: Senders = "heads", receivers: Receivers = None, channel: str = "q",
                      **kwargs: object) -> pd.DataFrame:
        """`path.path_patching` over every prompt."""

    @property
    def n(self) -> int:
        return len(self.pairs)

    @property
    def graph(self) -> ComputationalGraph:
        return ComputationalGraph.from_model(self.model)

    def weighted(self, per_batch: Callable[[EngineContext], Tensor]) -> Tensor:
        """Σ_b (n_b / n) · f(batch b): the all-prompt mean of a quantity that is a mean over a batch."""
        total = None
        for ctx in self.edge_contexts():
            value = per_batch(ctx) * (ctx.read_positions.shape[0] / self.n)
            total = value if total is None else total + value
        return total

    def baseline(self) -> tuple[Tensor, Tensor]:
        """Per-prompt clean and corrupt metric values [n] each."""
        clean, corrupt = [], []
        for ctx in self.edge_contexts():
            clean.append(ctx.clean_values.cpu())
            corrupt.append(ctx.corrupt_values.cpu())
        return torch.cat(clean), torch.cat(corrupt)

    def exact_edge_scores(self, edges: Sequence[int] | Sequence[str] | Tensor, *, progress: bool = False) -> Tensor:
        return self.weighted(lambda ctx: exact_edge_scores(ctx, edges, progress=progress))

    def evaluate_edge_masks(self, masks: Tensor, *, memory_budget_mb: float = 1024.0, progress: bool = False) -> Tensor:
        """Per-prompt metric [C, n] of each circuit (edge vectors [C, n_edges])."""
        return torch.cat([evaluate_edge_masks(ctx, masks, memory_budget_mb=memory_budget_mb, progress=progress).cpu()
                          for ctx in self.edge_contexts()], dim=1)

    def oracle_check(self, scores: Tensor, *, n_edges: int = 200, seed: int = 0,
                     progress: bool = False) -> tuple[float, pd.DataFrame]:
        """Spearman ρ and table of approximate vs exact scores on a seeded sample of edges."""
        graph = self.graph
        chosen = oracle_sample(graph, scores, n_edges=n_edges, seed=seed)
        return oracle_frame(graph, scores, chosen, self.exact_edge_scores(chosen.tolist(), progress=progress))

    def faithfulness_curve(self, scores: Tensor, *, percents: Sequence[float], n_boot: int = 1000, seed: int = 0,
                           memory_budget_mb: float = 1024.0, progress: bool = False) -> FaithfulnessResult:
        """The faithfulness curve of the top-k% edges by `scores` (`patching.faithfulness`), over every prompt."""
        masks, counts = curve_masks(scores, tuple(percents))
        values, clean, corrupt = [], [], []
        for ctx in self.edge_contexts():
            values.append(evaluate_edge_masks(ctx, masks, memory_budget_mb=memory_budget_mb, progress=progress,
                                              full_is_clean=True).cpu())
            clean.append(ctx.clean_values.cpu())
            corrupt.append(ctx.corrupt_values.cpu())
        return curve_from_values(torch.cat(values, 1), torch.cat(clean), torch.cat(corrupt), counts,
                                 percents=tuple(percents), n_boot=n_boot, seed=seed)


class OneBatch(Prompts):
    """Every prompt in one engine context (`engine_context`); `edges` is the context edge methods read (the
    same one, or its ablated form after `with_ablation`)."""

    def __init__(self, context: EngineContext, edges: EngineContext | None = None) -> None:
        self.context, self.edges = context, edges if edges is not None else context
        self.model, self.task, self.pairs = context.runner.model, context.task, context.pairs

    @property
    def graph(self) -> ComputationalGraph:
        return self.context.graph

    def edge_contexts(self) -> Iterator[EngineContext]:
        yield self.edges

    def with_ablation(self, ablation: str | None) -> OneBatch:
        return OneBatch(self.context, None if ablation is None else ablated_context(self.context, ablation))

    def with_positions(self, mode: str | None) -> OneBatch:
        if mode is None:
            return self
        return OneBatch(with_positions(self.context, mode), with_positions(self.edges, mode))

    def activation_patching(self, component: str = "z", *, positions: Positions = "all",
                            layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                            config: PatchingConfig | None = None,
                            collect: Sequence[tuple[str, int]] = ()) -> pd.DataFrame:
        own = self.context if self.context.clean_run is not None else None  # an ablated context holds no runs
        if own is not None:
            own.ensure_collected(collect)
        return activation_patching(self.model, self.task, self.pairs, component, positions=positions, layers=layers,
                                   heads=heads, config=config, context=own)

    def path_patching(self, senders: Senders = "heads", receivers: Receivers = None, channel: str = "q",
                      **kwargs: object) -> pd.DataFrame:
        return path_patching(self.model, self.task, self.pairs, senders, receivers, channel, context=self.context,
                             **kwargs)


def as_prompts(source: Prompts | EngineContext) -> Prompts:
    """Prompts as given, or one engine context as `OneBatch`."""
    if isinstance(source, Prompts):
        return source
    if isinstance(source, EngineContext):
        return OneBatch(source)
    raise TypeError(f"expected prompt batches (patching.prompts.Prompts) or an engine context, got "
                    f"{type(source).__name__}")


__all__ = ["OneBatch", "Prompts", "as_prompts"]
