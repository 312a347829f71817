"""Exact edge patching on the model's computational graph (`patching.topology`), on any bridge the Runner
reproduces, and the evaluation of circuits given as edge masks.

Edge patching: receiver v reads `sum_u c_uv * a_u + (1 - c_uv) * a_u^corrupt` (plus biases), where `a_u` is
sender u's output in the same forward pass and c_uv is the edge's mask (1 = in the circuit). With every
mask at 1 the run is the clean run; at 0, the corrupted run. Many circuits (masks) run in one batched
forward. This is the mask formulation of auto-circuit, computed here from the bridge's weights, so it
works on HF-backed and TL-native bridges alike (no `hook_result` / split q-k-v inputs needed).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.activation import mean_ablation
from circuitlab.patching.edge_runner import EdgeRunner, GraphActivations
from circuitlab.patching.engine import EngineContext, _gather_logits, _metric_values, engine_context
from circuitlab.patching.runner import Runner
from circuitlab.patching.topology import PositionalGraph, PositionSplit, position_split
from circuitlab.tasks.base import PromptPairs, Task

EdgeContext = EngineContext  # the one engine context serves edge methods too


def _logits_at(runner: Runner, resid: Tensor, read: Tensor) -> Tensor:
    lead = resid.shape[0] // read.shape[0]
    idx = read.repeat(lead, 1)
    return runner.unembed(torch.gather(resid, 1, idx[..., None].expand(-1, -1, resid.shape[-1])))


def prepare_edges(model: TransformerBridge, task: Task, pairs: PromptPairs, *, runner: Runner | None = None,
                  positions: str | None = None) -> EdgeContext:
    """The engine context for edge methods: clean and corrupted prompts run once (see `patching.engine`);
    `positions` (`roles`, `each`): position-aware edges (`with_positions`)."""
    ctx = engine_context(model, task, pairs, runner=runner, check_gap=False)
    return with_positions(ctx, positions) if positions else ctx


def with_positions(ctx: EdgeContext, mode: str | PositionSplit) -> EdgeContext:
    """The same runs with position-aware edges (`topology.PositionalGraph`): every edge split by the segments of
    `mode` (`roles`: each role and the spans between roles; `each`: every position), so edge patching, EAP,
    EAP-IG and faithfulness work at (sender, segment) -> (receiver, segment) granularity. Needs the fast runner
    (the hook backend patches whole receivers)."""
    if ctx.backend == "hook":
        raise ValueError(f"position-aware edges run on the fast runner; {ctx.edge_runner.arch.name} runs on the hook "
                         f"backend ({ctx.backend_reason or 'asked for'}): use edge positions none")
    split = mode if isinstance(mode, PositionSplit) else position_split(mode, dict(ctx.pairs.positions), ctx.seq_len)
    if tuple(split.index.shape) != (ctx.batch, ctx.seq_len):
        raise ValueError(f"position split is {tuple(split.index.shape)}; these prompts are {(ctx.batch, ctx.seq_len)}")
    out = copy.copy(ctx)
    out.split = PositionSplit(split.names, split.index.to(ctx.pairs.clean_tokens.device))
    out._graph = PositionalGraph(ctx.edge_runner.graph, split.names)
    return out


def circuits_per_forward(ctx: EdgeContext, memory_budget_mb: float) -> int:
    """Masked circuits one forward may stack on this context's prompts within `memory_budget_mb` (at least 1)."""
    batch, seq = ctx.pairs.clean_tokens.shape
    per_circuit = 4.0 * batch * seq * ctx.graph.n_senders * ctx.edge_runner.runner.d_model * 2
    return max(1, int(memory_budget_mb * 2**20 // per_circuit))


def segments(ctx: EdgeContext) -> dict[str, PositionSplit]:
    """The masked forward's position split argument: {} for plain edges (every backend), else {"segments": split}."""
    return {} if ctx.split is None else {"segments": ctx.split}


def evaluate_edge_masks(ctx: EdgeContext, edge_masks: Tensor, *, memory_budget_mb: float = 1024.0,
                        progress: bool = False, full_is_clean: bool = False) -> Tensor:
    """Per-prompt metric [C, batch] for each circuit given as an edge vector [C, n_edges] (1 = keep clean); each
    distinct circuit runs once, and with `full_is_clean` the whole graph is not run but read as the clean run."""
    if edge_masks.dim() == 1:
        edge_masks = edge_masks.unsqueeze(0)
    if edge_masks.shape[-1] != ctx.graph.n_edges:
        raise ValueError(f"edge masks have {edge_masks.shape[-1]} entries; this graph has {ctx.graph.n_edges} edges")
    if not bool(torch.isfinite(edge_masks).all()):
        raise ValueError("edge masks contain NaN or inf")
    return distinct_circuits(ctx, edge_masks, lambda masks: _evaluate(ctx, masks, memory_budget_mb, progress),
                             full_is_clean=full_is_clean)


def distinct_circuits(ctx: EdgeContext, masks: Tensor, evaluate: Callable[[Tensor], Tensor], *,
                      full_is_clean: bool = False) -> Tensor:
    """Per-prompt metric [C, batch] of circuits given as 0/1 vectors [C, n] (edges or senders), with `evaluate`
    run once per distinct circuit (a faithfulness curve holds the full circuit twice: signed and absolute top
    100%). With `full_is_clean`, a circuit keeping everything clean is read as the clean run (`ctx.clean_values`),
    which it is: the run-time evaluators use this; the engine's own tests run it."""
    unique, inverse = torch.unique(masks, dim=0, return_inverse=True)
    full = (unique == 1).all(1) & full_is_clean
    out = torch.empty(len(unique), ctx.read_positions.shape[0], dtype=ctx.clean_values.dtype,
                      device=ctx.clean_values.device)
    out[full] = ctx.clean_values
    if not bool(full.all()):
        out[~full] = evaluate(unique[~full]).to(out.dtype)
    return out[inverse]


def _evaluate(ctx: EdgeContext, edge_masks: Tensor, memory_budget_mb: float, progress: bool) -> Tensor:
    step = circuits_per_forward(ctx, memory_budget_mb)
    batch, reads = ctx.pairs.clean_tokens.shape[0], ctx.read_positions.shape[1]
    out = []
    starts = range(0, edge_masks.shape[0], step)
    if progress:
        starts = tqdm(starts, desc="edge patching", unit="fwd", disable=None)  # a bar on a terminal only
    with torch.no_grad():
        for start in starts:
            chunk = edge_masks[start:start + step]
            pos0 = ctx.shared_prefix  # 0 on the hook backend and for ablated contexts
            kw = {"pos0": pos0, "past": ctx.corrupt_run.kv} if pos0 else {}
            if isinstance(ctx.edge_runner, EdgeRunner):  # the hook backend's copies have no sparse form
                kw["sparse"] = True
            final = ctx.edge_runner.masked(ctx.pairs.clean_tokens, ctx.corrupt, ctx.graph.mask(chunk), **kw,
                                           **segments(ctx))
            logits = _gather_logits(ctx.edge_runner.runner, final, ctx.read_positions, 0, ctx.metric_vocab)
            out.append(_metric_values(ctx.task, ctx.pairs, logits.view(chunk.shape[0], batch, reads, -1)))
    return torch.cat(out, dim=0)


def ablated_context(ctx: EdgeContext, ablation: str = "zero", *, means: Tensor | None = None) -> EdgeContext:
    """The same clean run with every corrupted sender replaced by zero or by its mean over the corrupted prompts
    (`activation.mean_ablation`, the one mean ablation of prompt pairs; `means` [1, pos, n_senders, d_model]: a dataset's means
    when the context is one batch of many, `batched.Batches.means`).

    Zero ablation (ACDC's alternative to corrupted prompts) exposes edges that carry the same value in clean
    and corrupted runs (e.g. purely positional queries). The residual streams of the "corrupted" run keep the
    model's biases (b_O), which belong to no sender. m(empty circuit) is recomputed by edge patching.
    """
    if ablation not in ("zero", "mean"):
        raise ValueError(f"ablation {ablation!r} is unknown: use 'zero' or 'mean'")
    clean, g = ctx.clean, ctx.graph
    if ablation == "zero":
        senders = torch.zeros_like(clean.senders)
    elif means is not None:
        senders = means.to(clean.senders.device, clean.senders.dtype).expand_as(clean.senders).contiguous()
    else:
        senders = mean_ablation(ctx.corrupt.senders, getattr(ctx.pairs, "attention_mask", None)).contiguous()
    cumulative = torch.cumsum(clean.senders - senders, dim=2)  # removed contribution of senders [0..i]

    def shifted(resid: Tensor, n_before: int) -> Tensor:
        return resid - cumulative[:, :, n_before - 1]

    pre = [shifted(clean.resid_pre[layer], g.senders_before(g.attn_receivers(layer).start))
           for layer in range(g.n_layers)]
    if g.attn_only:
        mid = list(pre)
    else:
        mid = [shifted(clean.resid_mid[layer], g.senders_before(g.mlp_receiver(layer))) for layer in range(g.n_layers)]
    final = shifted(clean.resid_final, g.n_senders)
    corrupt = GraphActivations(senders, pre, mid, final)
    out = EdgeContext(ctx.edge_runner, ctx.task, ctx.pairs, clean, corrupt, ctx.read_positions, ctx.clean_values,
                      ctx.clean_values, backend=ctx.backend, backend_reason=ctx.backend_reason)
    out.split, out._graph = ctx.split, ctx._graph
    out.corrupt_values = evaluate_edge_masks(out, torch.zeros(1, out.graph.n_edges))[0]
    return out
