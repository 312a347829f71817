"""Sharding one large sweep across workers, each with its own model copy: an activation-patching sweep (e.g.
head × position) or the exact scores of many edges (the edge oracle).

Both are split by layer: the engine groups and chunks patches per (layer, start position) and edges per
receiver (layer, channel), so a shard holding some layers runs exactly the batched forwards that one process
would run for those layers, and the merged result equals the single-process one. Workers are reached through any `map(fn, items)` (an executor's
`map`, e.g. `reports.executors.RayExecutor().map`; the builtin sequential map by default), so this module
knows nothing about Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import Tensor

from circuitlab.patching.activation import PatchingConfig, Positions, RESULT_COLUMNS, activation_patching, prepare
from circuitlab.patching.attribution import exact_edge_scores
from circuitlab.patching.components import parse_edge, parse_node
from circuitlab.patching.edges import prepare_edges
from circuitlab.patching.engine import make_runner
from circuitlab.patching.models import load_model
from circuitlab.tasks.base import PromptPairs, Task

MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]


@dataclass(frozen=True)
class PatchShard:
    """One worker's share: what to load (`model` as `load_model` takes it), the task and pairs, and its layers."""

    model: str
    task: Task
    pairs: PromptPairs
    component: str
    positions: Positions
    layers: tuple[int, ...]
    heads: tuple[int, ...] | None
    config: PatchingConfig
    device: str = "cpu"
    threads: int = 1
    backend: str = "auto"  # patching.engine.make_runner: auto, fast or hook


def split_layers(layers: Sequence[int], n_shards: int) -> list[tuple[int, ...]]:
    """Contiguous, balanced, non-empty runs of `layers` (at most `n_shards` of them)."""
    layers = list(layers)
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    if not layers:
        raise ValueError("no layers to shard")
    n = min(n_shards, len(layers))
    size, extra = divmod(len(layers), n)
    out, start = [], 0
    for i in range(n):
        stop = start + size + (1 if i < extra else 0)
        out.append(tuple(layers[start:stop]))
        start = stop
    return out


def run_shard(shard: PatchShard) -> pd.DataFrame:
    """Load the model and patch this shard's layers (runs in a worker; the frame keeps clean/corrupt metrics)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(shard.threads)
    try:
        model = load_model(shard.model, device=shard.device)
        pairs = shard.pairs.to(shard.device) if hasattr(shard.pairs, "to") else shard.pairs
        context = prepare(model, shard.task, pairs, runner=make_runner(model, shard.backend)[0])
        frame = activation_patching(model, shard.task, pairs, shard.component, positions=shard.positions,
                                    layers=list(shard.layers), heads=None if shard.heads is None else list(shard.heads),
                                    config=shard.config, context=context)
    finally:
        torch.set_num_threads(previous)
    frame["clean_metric"] = frame.attrs["clean_metric"]
    frame["corrupt_metric"] = frame.attrs["corrupt_metric"]
    return frame


def merge_shards(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate shard results in shard order; every shard must agree on the clean and corrupt metrics."""
    if not frames:
        raise ValueError("no shard results to merge")
    clean = {float(f["clean_metric"].iloc[0]) for f in frames if len(f)}
    corrupt = {float(f["corrupt_metric"].iloc[0]) for f in frames if len(f)}
    if len(clean) != 1 or len(corrupt) != 1:
        raise RuntimeError(f"shards disagree on the baseline metrics (clean {sorted(clean)}, corrupt "
                           f"{sorted(corrupt)}): the workers do not hold the same model or pairs")
    frame = pd.concat([f[RESULT_COLUMNS] for f in frames], ignore_index=True)
    frame.attrs.update(clean_metric=clean.pop(), corrupt_metric=corrupt.pop())
    return frame


def sharded_activation_patching(model: str, task: Task, pairs: PromptPairs, component: str = "z", *,
                                positions: Positions = "all",
                                layers: Sequence[int] | None = None, n_layers: int | None = None,
                                heads: Sequence[int] | None = None, config: PatchingConfig | None = None,
                                n_shards: int = 2, map_fn: MapFn | None = None, device: str = "cpu",
                                threads: int = 1, backend: str = "auto") -> pd.DataFrame:
    """`activation_patching` split over `n_shards` workers by layer; the same table as one process.

    `model` is a name or directory for `load_model` (each worker loads its own copy); give `layers`, or
    `n_layers` for all of them. `map_fn(fn, items)` runs the shards (an executor's `map`; default in order here).
    """
    if layers is None:
        if n_layers is None:
            raise ValueError("give layers (or n_layers to patch every layer)")
        layers = range(n_layers)
    shards = [PatchShard(model, task, pairs, component, positions, part, None if heads is None else tuple(heads),
                         config or PatchingConfig(), device, threads, backend)
              for part in split_layers(list(layers), n_shards)]
    results = (map_fn or (lambda fn, items: [fn(x) for x in items]))(run_shard, shards)
    return merge_shards(results)


@dataclass(frozen=True)
class EdgeShard:
    """One worker's share of an exact edge scoring: the model to load, task, pairs and its edges (names)."""

    model: str
    task: Task
    pairs: PromptPairs
    edges: tuple[str, ...]
    chunk_size: int = 16
    device: str = "cpu"
    threads: int = 1


def _receiver_layer(edge: str) -> int:
    node = parse_node(parse_edge(edge)[1])
    return 1 << 30 if node.layer is None else int(node.layer)  # logits read after the last layer


def split_edges(edges: Sequence[str], n_shards: int) -> list[list[int]]:
    """Indices into `edges`, grouped so each receiver layer stays in one shard (order kept within a shard)."""
    layer_of = [_receiver_layer(e) for e in edges]
    parts = split_layers(sorted(set(layer_of)), n_shards)
    return [[i for i, layer in enumerate(layer_of) if layer in set(part)] for part in parts]


def run_edge_shard(shard: EdgeShard) -> Tensor:
    """Load the model and score this shard's edges exactly (`attribution.exact_edge_scores`); runs in a worker."""
    previous = torch.get_num_threads()
    torch.set_num_threads(shard.threads)
    try:
        model = load_model(shard.model, device=shard.device)
        ctx = prepare_edges(model, shard.task, shard.pairs)
        return exact_edge_scores(ctx, list(shard.edges), chunk_size=shard.chunk_size).cpu()
    finally:
        torch.set_num_threads(previous)


def sharded_exact_edge_scores(model: str, task: Task, pairs: PromptPairs, edges: Sequence[str], *, n_shards: int = 2,
                              map_fn: MapFn | None = None, chunk_size: int = 16, device: str = "cpu",
                              threads: int = 1) -> Tensor:
    """`attribution.exact_edge_scores` for many edges (names), split over `n_shards` workers by receiver layer."""
    edges = list(edges)
    groups = split_edges(edges, n_shards)
    shards = [EdgeShard(model, task, pairs, tuple(edges[i] for i in g), chunk_size, device, threads) for g in groups]
    results = (map_fn or (lambda fn, items: [fn(x) for x in items]))(run_edge_shard, shards)
    out = torch.empty(len(edges))
    for group, values in zip(groups, results):
        out[torch.tensor(group, dtype=torch.long)] = values.to("cpu", out.dtype)  # shards may run on a GPU
    return out


__all__ = ["PatchShard", "EdgeShard", "split_layers", "split_edges", "run_shard", "run_edge_shard", "merge_shards",
           "sharded_activation_patching", "sharded_exact_edge_scores"]
