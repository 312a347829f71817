"""The one engine context: everything computed once per (model, task, pairs), shared by every method.

`engine_context(model, task, pairs)` picks the runner (the fast `Runner` where it reproduces the model, checked
against the bridge at construction; otherwise the exact hook backend, with the reason recorded), runs the clean
and the corrupted prompts once each, and keeps what every method needs from those two runs:

- `clean_run` / `corrupt_run` (`RunState`): residual streams, keys/values and collected sites, for activation
  and path patching (partial runs start from them);
- `clean` / `corrupt` (`GraphActivations`, built from the same two runs on first use): sender outputs and
  receiver streams for edge patching, EAP, EAP-IG, ACDC and faithfulness;
- the baselines: per-prompt metrics `clean_values` / `corrupt_values`, their means, logits at the read
  positions.

`prepare` (activation/path patching) and `prepare_edges` (edge methods) both return this context, so one
context serves every method; `PatchingContext` and `EdgeContext` are names of this class.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.edge_runner import EdgeRunner, GraphActivations
from circuitlab.patching.hook_backend import HookRunner, ModelRunner
from circuitlab.patching.hook_edges import GraphRunner, HookEdgeRunner
from circuitlab.patching.normalize import checked_gap, normalize
from circuitlab.patching.prefix import first_false, windowed
from circuitlab.patching.runner import RunState, Runner, UnsupportedModelError, at_positions
from circuitlab.patching.topology import ComputationalGraph, PositionSplit
from circuitlab.tasks.base import PromptPairs, Task


def _check_pairs(pairs: Any, runner: Any) -> None:  # right padding: causal models never see a later pad; others mask it
    clean, corrupt, mask = pairs.clean_tokens, pairs.corrupt_tokens, getattr(pairs, "attention_mask", None)
    if clean.shape != corrupt.shape:
        raise ValueError(f"clean tokens {tuple(clean.shape)} and corrupt tokens {tuple(corrupt.shape)} differ in shape; "
                         "patching needs aligned prompts")
    if mask is not None and bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("prompts must be right-padded (attention_mask rows 1…1 then 0…0): pad after the text")
    if mask is not None and not runner.causal and not bool(mask.bool().all()) and not hasattr(runner, "with_key_mask"):
        raise ValueError(f"padded prompts on a bidirectional model need the fast runner to mask the padding, but "
                         f"{runner.arch.name} runs on the {runner.backend} backend: use prompts of one length")


def _metric_values(task: Any, pairs: Any, logits_at: Tensor) -> Tensor:
    values = task.metric_at(logits_at, pairs)
    expected = tuple(logits_at.shape[:-2])
    if not torch.is_tensor(values) or tuple(values.shape) != expected:
        raise ValueError(f"task metric must return one value per prompt, shape {expected}; "
                         f"got {getattr(values, 'shape', type(values))}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"task metric returned NaN/inf for {int((~torch.isfinite(values)).sum())} prompts (a task "
                         "whose metric_tokens leaves out a logit its metric reads gets NaN there)")
    return values


def _gather_logits(runner: Any, resid_final: Tensor, read: Tensor, pos0: int = 0,
                   vocab: Tensor | None = None) -> Tensor:
    """Logits at absolute read positions [B, R] from a window of final residuals starting at pos0. With `vocab`
    (the ids the task's metric reads, `EngineContext.metric_vocab`) only those logits are computed; the others
    are NaN: the unembedding is a large matrix, and a patched forward's metric reads a few of its columns."""
    return read_logits(runner, at_positions(resid_final, read, pos0), vocab)


def read_logits(runner: ModelRunner, picked: Tensor, vocab: Tensor | None = None) -> Tensor:
    """Logits of final streams already at the read positions [..., R, d_model] (`Runner.run(read=...)`), only at
    the `vocab` ids when given (NaN elsewhere; see `_gather_logits`)."""
    if vocab is None:
        return runner.unembed(picked)
    out = torch.full((*picked.shape[:-1], runner.W_U.shape[1]), float("nan"), dtype=picked.dtype, device=picked.device)
    out[..., vocab] = runner.unembed(picked, vocab)
    return out


def metric_vocab(runner: ModelRunner, task: Task, pairs: PromptPairs) -> Tensor | None:
    """The vocabulary ids the task's metric reads on these pairs (`Task.metric_tokens`), for the fast runner; None
    (every logit) for the hook backend or a task that does not say."""
    if getattr(runner, "backend", "fast") != "fast" or not isinstance(task, Task):
        return None
    ids = task.metric_tokens(pairs)
    return None if ids is None else ids.to(runner.W_U.device).long()


BACKENDS = ("auto", "fast", "hook")


def make_runner(model: TransformerBridge, backend: str = "auto") -> tuple[ModelRunner, str, str]:
    """(runner, backend, reason). `auto`: the fast Runner where its self-check passes, else the exact hook backend;
    `fast`: the fast Runner or a ValueError saying why it cannot run this model; `hook`: the hook backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown: use one of {', '.join(BACKENDS)}")
    if backend == "hook":
        runner = HookRunner(model)
        runner.backend_reason = "asked for (backend hook)"
        return runner, "hook", runner.backend_reason
    try:
        return Runner(model), "fast", ""
    except UnsupportedModelError as exc:
        reason = str(exc)
    except (AttributeError, TypeError, KeyError, NotImplementedError) as exc:  # a module layout we do not know
        reason = f"the fast runner cannot read this architecture ({type(exc).__name__}: {exc})"
    if backend == "fast":
        raise ValueError(f"backend fast cannot run this model: {reason}. Use --backend auto or hook")
    runner = HookRunner(model)
    runner.backend_reason = reason
    return runner, "hook", reason


def make_edge_runner(model: TransformerBridge, runner: ModelRunner) -> GraphRunner:
    """The graph-form runner for a runner: `edge_runner.EdgeRunner` (fast) or `hook_edges.HookEdgeRunner` (hooks)."""
    if getattr(runner, "backend", "fast") == "hook":
        return HookEdgeRunner(model, runner)
    return EdgeRunner(model, runner)


def _site_sets(runner: Any, collect: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """Sites every context collects (head and MLP outputs at every layer, which edge methods need) plus more."""
    keys = {("z", layer) for layer in range(runner.n_layers)}
    if not runner.attn_only:
        keys |= {("mlp_out", layer) for layer in range(runner.n_layers)}
    return tuple(sorted(keys | set(collect)))


class EngineContext:
    """One (model, task, pairs): runner, one clean and one corrupted run, baselines; see the module docstring."""

    def __init__(self, edge_runner: EdgeRunner, task: Task, pairs: PromptPairs, clean: GraphActivations | None = None,
                 corrupt: GraphActivations | None = None, read_positions: Tensor | None = None,
                 clean_values: Tensor | None = None, corrupt_values: Tensor | None = None, *,
                 clean_run: RunState | None = None, corrupt_run: RunState | None = None,
                 collected: Iterable[tuple[str, int]] = (), backend: str = "fast", backend_reason: str = "") -> None:
        self.edge_runner, self.task, self.pairs = edge_runner, task, pairs
        self._clean, self._corrupt = clean, corrupt
        self.read_positions = read_positions
        self.clean_values, self.corrupt_values = clean_values, corrupt_values
        self.clean_run, self.corrupt_run = clean_run, corrupt_run
        self.collected = set(collected)
        self.backend, self.backend_reason = backend, backend_reason
        self.means: dict[tuple[str, int], Tensor] | None = None  # mean ablation's means when this is one batch of many
        self.split: PositionSplit | None = None  # position-aware edges (`patching.edges.with_positions`)
        self._graph: ComputationalGraph | None = None
        self._shared_prefix: int | None = None
        self.metric_vocab = metric_vocab(self.runner, task, pairs)

    # ------------------------------------------------------------------ what every method reads
    @property
    def runner(self) -> ModelRunner:
        return self.edge_runner.runner

    @property
    def graph(self) -> ComputationalGraph:
        """The model's graph, or its position-aware split (`topology.PositionalGraph`) when `split` is set."""
        return self._graph if self._graph is not None else self.edge_runner.graph

    @property
    def clean(self) -> GraphActivations:
        if self._clean is None:
            self._clean = self.edge_runner.from_run(self.clean_run)
        return self._clean

    @clean.setter
    def clean(self, value: GraphActivations) -> None:
        self._clean = value

    @property
    def corrupt(self) -> GraphActivations:
        if self._corrupt is None:
            self._corrupt = self.edge_runner.from_run(self.corrupt_run)
        return self._corrupt

    @corrupt.setter
    def corrupt(self, value: GraphActivations) -> None:
        self._corrupt = value

    @property
    def clean_metric(self) -> float:
        return float(self.clean_values.mean())

    @property
    def corrupt_metric(self) -> float:
        return float(self.corrupt_values.mean())

    @property
    def clean_logits_at(self) -> Tensor:
        return _gather_logits(self.runner, self.clean_run.resid_final, self.read_positions, 0, self.metric_vocab)

    @property
    def corrupt_logits_at(self) -> Tensor:
        return _gather_logits(self.runner, self.corrupt_run.resid_final, self.read_positions, 0, self.metric_vocab)

    @property
    def shared_prefix(self) -> int:
        """Leading positions where the clean and corrupted runs are identical (every sender output equal, bit for
        bit, in every prompt), at most the first read position; 0 without the corrupted run's keys/values (an
        ablated context) or on a runner that cannot start mid-prompt. Causal attention: a forward that mixes the
        two runs (edge or node circuits) equals both there, so it may start at this position from the corrupted
        run's keys/values (`patching.edges`, `patching.node_masks`)."""
        if self._shared_prefix is None:
            self._shared_prefix = 0
            if self.corrupt_run is not None and windowed(self.runner):
                same = (self.clean.senders == self.corrupt.senders).flatten(2).all(2).all(0)  # [pos]
                limit = min(int(same.numel()), int(self.read_positions.min()))
                self._shared_prefix = first_false(same[:limit])
        return self._shared_prefix

    @property
    def batch(self) -> int:
        return int(self.pairs.clean_tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.pairs.clean_tokens.shape[1])

    def normalize(self, value: Tensor | float) -> Tensor | float:
        """(value - m(corrupt)) / (m(clean) - m(corrupt)) (`patching.normalize`); an error where the two runs
        give the same metric."""
        return normalize(value, self.clean_metric, self.corrupt_metric)

    def ensure_collected(self, keys: Iterable[tuple[str, int]]) -> None:
        """Make sure clean and corrupt activations at these sites are cached (re-running once if needed)."""
        if self.clean_run is None:
            raise ValueError("this context holds no runs of its own (an ablated or subset context): "
                             "use a context from engine_context() for activation or path patching")
        missing = [k for k in keys if k not in self.collected]
        if not missing:
            return
        keys_all = tuple(sorted(self.collected | set(missing)))
        with torch.no_grad():
            self.clean_run = self.runner.full_run(self.pairs.clean_tokens, collect=keys_all)
            self.corrupt_run = self.runner.full_run(self.pairs.corrupt_tokens, collect=keys_all)
        self.collected = set(keys_all)

    def describe(self) -> dict[str, str]:
        """Which backend computed this context and why (for run records and reports)."""
        return {"backend": self.backend, "reason": self.backend_reason}


def engine_context(model: TransformerBridge, task: Task, pairs: PromptPairs, *, runner: ModelRunner | None = None,
                   collect: Iterable[tuple[str, int]] = (),
                   check_gap: bool = True) -> EngineContext:
    """Run the clean and corrupted prompts once each and compute the baselines (see the module docstring).

    `runner`: reuse one (e.g. across prompt batches); `collect`: extra `(kind, layer)` sites to cache;
    `check_gap`: refuse prompt sets whose clean and corrupted metrics are equal (normalized effects undefined).
    """
    if runner is None:
        runner, backend, reason = make_runner(model)
    else:
        backend, reason = getattr(runner, "backend", "fast"), getattr(runner, "backend_reason", "")
    _check_pairs(pairs, runner)
    mask = getattr(pairs, "attention_mask", None)
    if mask is not None and not runner.causal and not bool(mask.bool().all()):
        runner = runner.with_key_mask(mask)  # bidirectional: real tokens must not attend to the padding
    keys = _site_sets(runner, collect)
    read = task.read_positions(pairs).to(pairs.clean_tokens.device)
    if read.dim() != 2 or read.shape[0] != pairs.clean_tokens.shape[0]:
        raise ValueError(f"task.read_positions must be [batch, R]; got {tuple(read.shape)}")
    if int(read.max()) >= pairs.clean_tokens.shape[1] or int(read.min()) < 0:
        raise ValueError("task.read_positions points outside the prompt")
    with torch.no_grad():
        clean = runner.full_run(pairs.clean_tokens, collect=keys)
        corrupt = runner.full_run(pairs.corrupt_tokens, collect=keys)
        clean_values = _metric_values(task, pairs, _gather_logits(runner, clean.resid_final, read))
        corrupt_values = _metric_values(task, pairs, _gather_logits(runner, corrupt.resid_final, read))
    m_clean, m_corrupt = float(clean_values.mean()), float(corrupt_values.mean())
    if check_gap:
        checked_gap(m_clean, m_corrupt)
    return EngineContext(make_edge_runner(model, runner), task, pairs, None, None, read, clean_values, corrupt_values,
                         clean_run=clean, corrupt_run=corrupt, collected=keys, backend=backend, backend_reason=reason)


__all__ = ["BACKENDS", "EngineContext", "engine_context", "make_edge_runner", "make_runner"]
