"""Every method over prompt batches, so memory stays flat in the number of prompts.

`Batches(model, task, pairs, batch_size=...)` (or `batch_size_for(model, pairs, memory_budget_mb)`) splits the
prompts into batches (each trimmed to its own longest prompt), builds one context per batch, runs the method
and adds up exact sums: per-prompt metrics are concatenated, means are weighted by batch size. The results
equal the single-batch ones to float rounding (tested). Mean ablation takes its means over every prompt in a
first pass (`Batches.means`, exact sums over batches). Only one batch's activations are alive at a time,
ACDC too (it rebuilds each batch's context at every step). When every prompt fits in one batch, its context
(the clean and corrupt runs) is built once and kept for every later call (`Batches.keeps_contexts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import pandas as pd
import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.activation import (
    PatchingConfig, Positions, _position_dim, _site_activation, activation_patching,
)
from circuitlab.patching.components import canonical_kind
from circuitlab.patching.edges import ablated_context, with_positions
from circuitlab.patching.engine import EngineContext, engine_context, make_runner
from circuitlab.patching.normalize import normalize
from circuitlab.patching.path import Receivers, Senders, path_patching
from circuitlab.patching.prompts import Prompts
from circuitlab.patching.runner import Runner
from circuitlab.patching.topology import ComputationalGraph, PositionalGraph, role_segment_names, sender_nodes
from circuitlab.tasks.base import PromptPairs, Task
from circuitlab.tasks.batching import prompt_batches

# Bytes per prompt and token, in units of 4 * d_model: two sender caches (clean, corrupt), the receiver-input
# gradient leaves with their autograd intermediates (~6 per receiver), and slack for the forward's temporaries.
_LEAF_FACTOR = 6


def bytes_per_prompt(model: TransformerBridge, seq_len: int) -> float:
    """Estimated peak bytes one prompt adds to an edge-engine run with gradients (the heaviest method)."""
    cfg = model.cfg
    n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
    attn_only = bool(getattr(cfg, "attn_only", False))
    n_senders = len(sender_nodes(n_layers, n_heads, attn_only))
    receivers = n_senders - 1 + 2 * n_layers * n_heads + 1  # every head reads q, k, v (per query head); logits
    return 4.0 * seq_len * int(cfg.d_model) * (2 * n_senders + _LEAF_FACTOR * receivers)


def batch_size_for(model: TransformerBridge, pairs: PromptPairs, memory_budget_mb: float) -> int:
    """Prompts per batch so that one batch of the heaviest method fits in `memory_budget_mb` (at least 1)."""
    per = bytes_per_prompt(model, int(pairs.clean_tokens.shape[1]))
    return max(1, int(memory_budget_mb * 2**20 // per))


@dataclass(eq=False)
class Batches(Prompts):
    """A dataset split into prompt batches, with the batched forms of every method (`patching.prompts.Prompts`)."""

    model: TransformerBridge
    task: Task
    pairs: PromptPairs
    batch_size: int | None = None
    runner: Runner | None = None
    ablation: str | None = None  # edge methods: None (corrupted prompts), "zero" or "mean" (see with_ablation)
    edge_positions: str | None = None  # edge methods: position-aware edges by role (see with_positions)
    _kept: dict[Any, EngineContext] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.runner is None:
            self.runner = make_runner(self.model)[0]  # the fast runner, or the exact hook backend

    def parts(self, *, trim: bool = True) -> Iterator[PromptPairs]:
        """The prompt batches (trimmed of unused padding unless `trim=False`)."""
        if trim:
            yield from prompt_batches(self.pairs, self.batch_size)
            return
        size = self.batch_size or max(self.n, 1)
        for start in range(0, self.n, size):
            yield self.pairs.subset(slice(start, start + size))

    def with_ablation(self, ablation: str | None) -> Batches:
        """The same batches whose edge methods replace the corrupted run by an ablation of the clean one
        (`patching.edges.ablated_context`); `mean` is the mean over every prompt of the dataset, not the batch's."""
        if ablation not in (None, "zero", "mean"):
            raise ValueError(f"ablation {ablation!r} is unknown: use None, 'zero' or 'mean'")
        out = replace(self, ablation=ablation)
        out._kept = self._kept  # the same prompts: share the kept contexts
        return out

    def with_positions(self, mode: str | None) -> Batches:
        """The same batches whose edge methods see position-aware edges (`patching.edges.with_positions`); only
        `roles`, whose segments mean the same tokens in every batch."""
        if mode not in (None, "roles"):
            raise ValueError(f"edge positions {mode!r} over prompt batches: use roles (absolute positions differ "
                             "between batches), or one batch (a larger --memory-budget)")
        out = replace(self, edge_positions=mode)
        out._kept = self._kept
        return out

    @property
    def graph(self) -> ComputationalGraph:
        base = ComputationalGraph.from_model(self.model)
        return PositionalGraph(base, role_segment_names(list(self.pairs.positions))) if self.edge_positions else base

    # ------------------------------------------------------------------ exact means over batches
    def means(self, keys: Sequence[tuple[str, int]], *, run: str = "corrupt") -> dict[tuple[str, int], Tensor]:
        """Per-position means over every prompt of the activations at `keys` (`(kind, layer)`; `senders` for the
        edge engine's sender outputs) in the clean or corrupted run, each position averaged over the prompts
        that are real there: what `activation.prompt_mean` gives on one batch, summed exactly over batches at
        the dataset's full width ([1, pos, ...]; patterns [1, head, pos, pos])."""
        width, sums, count = self.pairs.seq_len, {}, None
        collect = [k for k in keys if k[0] not in ("resid_pre", "resid_mid", "senders")]
        for part in self.parts():
            ctx = self.context(part, collect)
            mask = part.attention_mask if part.attention_mask is not None else torch.ones_like(part.clean_tokens)
            mask = mask.to(ctx.clean_values.dtype)
            for key in keys:
                if key[0] == "senders":
                    act = (ctx.clean if run == "clean" else ctx.corrupt).senders
                else:
                    act = _site_activation(ctx.clean_run if run == "clean" else ctx.corrupt_run, *key)
                pdim = 2 if key[0] == "pattern" else (1 if key[0] == "senders" else _position_dim(key[0]))
                shape = [1] * act.dim()
                shape[0], shape[pdim] = mask.shape
                total = (act * mask.to(act.device).reshape(shape)).sum(0, keepdim=True)
                pad = [0, 0] * act.dim()
                for dim in ([pdim, pdim + 1] if key[0] == "pattern" else [pdim]):  # zeros beyond this batch
                    pad[2 * (act.dim() - 1 - dim) + 1] = width - act.shape[dim]
                total = torch.nn.functional.pad(total, pad)
                sums[key] = total if key not in sums else sums[key] + total
            counts = torch.nn.functional.pad(mask.sum(0), (0, width - mask.shape[1]))
            count = counts if count is None else count + counts
            del ctx
        out = {}
        for key, total in sums.items():
            pdim = 2 if key[0] == "pattern" else (1 if key[0] == "senders" else _position_dim(key[0]))
            shape = [1] * total.dim()
            shape[pdim] = width
            out[key] = total / count.clamp(min=1.0).to(total.device, total.dtype).reshape(shape)
        return out

    # ------------------------------------------------------------------ contexts, each built once when they fit
    def keeps_contexts(self) -> bool:
        """Whether built contexts are kept for reuse: when every prompt fits in one batch (the batch size is what
        --memory-budget allows), so the clean and corrupt forwards run once per run; otherwise each batch's
        context is rebuilt when needed (recomputed, and counted by bench/run_cost.py) to keep memory flat."""
        return self.batch_size is None or self.batch_size >= self.n

    def context(self, part: PromptPairs, collect: Sequence[tuple[str, int]] = ()) -> EngineContext:
        """The engine context of one prompt batch: built (two forwards), or the kept one when `keeps_contexts`."""
        key = (tuple(part.clean_tokens.shape), part.clean_tokens.cpu().numpy().tobytes(),
               part.corrupt_tokens.cpu().numpy().tobytes())
        ctx = self._kept.get(key) if self.keeps_contexts() else None
        if ctx is None:
            ctx = engine_context(self.model, self.task, part, runner=self.runner, collect=collect, check_gap=False)
            if self.keeps_contexts():
                self._kept[key] = ctx
        else:
            ctx.ensure_collected(collect)
        ctx.means = None
        return ctx

    def edge_contexts(self) -> Iterator[EngineContext]:
        senders = None
        if self.ablation == "mean":  # the corrupted senders' mean over the whole dataset (two passes)
            senders = self.means([("senders", 0)])[("senders", 0)]
        for part in self.parts():
            ctx = self.context(part)
            if self.ablation is not None:
                width = part.seq_len
                ctx = ablated_context(ctx, self.ablation, means=None if senders is None else senders[:, :width])
            yield with_positions(ctx, self.edge_positions) if self.edge_positions else ctx

    # ------------------------------------------------------------------ activation and path patching
    def sweep(self, run: Callable[[PromptPairs, EngineContext], pd.DataFrame], collect: Sequence[tuple[str, int]] = (),
              trim: bool = True, means: dict[tuple[str, int], Tensor] | None = None) -> pd.DataFrame:
        """`run(batch_pairs, context)` per batch (a frame with a `metric` column, same rows for every batch),
        combined: metric = Σ n_b · metric_b / n; effect from the combined baselines. `trim=False` keeps every
        batch at the full padded width (for absolute positions). `means` (from `means`) replace each batch's
        own means in mean ablation."""
        total, clean, corrupt, first = None, 0.0, 0.0, None
        for part in self.parts(trim=trim):
            ctx = self.context(part, collect)
            ctx.means = means
            frame = run(part, ctx)
            weight = len(part) / self.n
            metric = frame["metric"].to_numpy() * weight
            total = metric if total is None else total + metric
            clean += ctx.clean_metric * weight
            corrupt += ctx.corrupt_metric * weight
            first = frame if first is None else first
            del ctx
        out = first.copy()
        out["effect"] = normalize(total, clean, corrupt)
        out["metric"] = total
        out.attrs.update(clean_metric=clean, corrupt_metric=corrupt)
        return out

    def activation_patching(self, component: str = "z", *, positions: Positions = "all",
                            layers: Sequence[int] | None = None,
                            heads: Sequence[int] | None = None, config: PatchingConfig | None = None,
                            collect: Sequence[tuple[str, int]] = ()) -> pd.DataFrame:
        """`activation.activation_patching` over prompt batches (absolute positions keep the full padded width)."""
        means = None
        if config is not None and config.resolved_source() == "mean":  # the mean over every prompt, not the batch's
            kind = canonical_kind(component)
            means = self.means([(kind, layer) for layer in (layers if layers is not None else range(self.runner.n_layers))])
        absolute = not position_independent(positions)
        return self.sweep(
            lambda part, ctx: activation_patching(self.model, self.task, part, component, positions=positions,
                                                  layers=layers, heads=heads, config=config, context=ctx),
            collect, trim=not absolute, means=means)

    def path_patching(self, senders: Senders = "heads", receivers: Receivers = None, channel: str = "q",
                      **kwargs: object) -> pd.DataFrame:
        """`path.path_patching` over prompt batches."""
        absolute = not (position_independent(kwargs.get("sender_positions")) and position_independent(kwargs.get("receiver_positions")))
        return self.sweep(
            lambda part, ctx: path_patching(self.model, self.task, part, senders, receivers, channel, context=ctx,
                                            **kwargs),
            (), trim=not absolute)


def position_independent(positions: Positions) -> bool:
    """True for position specs that mean the same tokens in any batch (all, None, role names, negative integers:
    counted from each prompt's own end)."""
    if positions is None or positions == "all":
        return True
    if isinstance(positions, str):
        return positions != "each"
    if isinstance(positions, int):
        return positions < 0
    if isinstance(positions, (list, tuple)):
        return all((isinstance(p, str) and p not in ("each", "all")) or (isinstance(p, int) and p < 0)
                   for p in positions)
    return False
