"""Path patching (Wang et al. 2022): the effect of sender components on receivers through one channel.

Two passes per sender set, both exact:
1. Base run with every attention head's output frozen to its base value, except the senders, which take
   their source value (MLPs recompute). Record the receivers' inputs (the residual stream entering the
   receiver layer; the final residual stream for `logits`).
2. Base run again, with only the receivers' chosen input (query, key or value of receiver heads, at the
   receiver positions) recomputed from the residual stream recorded in pass 1. Measure the task metric.

`direction="noise"` (base = clean, source = corrupted) is the paper's "patch new into orig"; `denoise` is
the reverse. Effects are normalized like activation patching: 0 = corrupted run, 1 = clean run.

With grouped-query attention, receivers are named by query head (`a9.h6`); through `k`/`v` only the key or
value *as that query head reads it* is recomputed: the other query heads of its group keep the base key/value
(the per-query-head convention of `patching.edges`).

Result columns: `sender` (node name; `+`-joined for sets), `receiver` (`,`-joined), `channel`
(q/k/v/logits), `layer`, `head` (sender's, -1 for sets/MLPs), `position`, `role`, `metric`, `effect`,
`direction`, `source`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence, Union

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.activation import (
    PatchingConfig, PatchingContext, Positions, _gather_logits, _metric_values, _source_activation,
    ensure_collected, prepare, resolve_position,
)
from circuitlab.patching.components import Node, parse_node
from circuitlab.tasks.base import PromptPairs, Task

PATH_COLUMNS = ["sender", "receiver", "channel", "layer", "head", "position", "role", "metric", "effect",
                "direction", "source"]
CHANNELS = ("q", "k", "v", "logits")
# sender sets: "heads", "all", a node name, or a list of node names / lists of names (patched together)
Senders = Union[str, Sequence[Union[str, Sequence[str]]]]
Receivers = Union[str, Sequence[str], None]  # receiver heads (names), or None for the logits channel


@dataclass(frozen=True)
class SenderSet:
    """One sender set: nodes (heads / MLPs) patched together."""

    nodes: tuple[Node, ...]

    @property
    def name(self) -> str:
        return "+".join(node.name for node in self.nodes)

    @property
    def min_layer(self) -> int:
        return min(int(node.layer) for node in self.nodes)


def _resolve_positions(pairs: Any, spec: Any, what: str) -> tuple[Tensor | None, str]:
    """Per-prompt positions [batch] for a role / integer, or None for all positions."""
    if spec is None or spec == "all":
        return None, ""
    positions, _, _ = resolve_position(pairs, spec, what)
    return positions, spec if isinstance(spec, str) else ""


def _parse_senders(model_layers: int, n_heads: int, senders: Any, attn_only: bool) -> list[SenderSet]:
    if isinstance(senders, str) and senders in ("heads", "all"):
        sets = [SenderSet((Node("head", layer, head),)) for layer in range(model_layers) for head in range(n_heads)]
        if senders == "all" and not attn_only:
            sets += [SenderSet((Node("mlp", layer),)) for layer in range(model_layers)]
        return sets
    items = [senders] if isinstance(senders, str) else list(senders)
    out = []
    for item in items:
        names = [item] if isinstance(item, str) else list(item)
        nodes = tuple(parse_node(name) for name in names)
        for node in nodes:
            if node.kind not in ("head", "mlp"):
                raise ValueError(f"sender {node.name!r} must be a head (a{{l}}.h{{h}}) or an MLP (m{{l}})")
            if not 0 <= int(node.layer) < model_layers or (node.kind == "head" and not 0 <= int(node.head) < n_heads):
                raise ValueError(f"sender {node.name!r} is not in this model ({model_layers} layers, {n_heads} heads)")
            if node.kind == "mlp" and attn_only:
                raise ValueError(f"sender {node.name!r}: the model is attention-only")
        if not nodes:
            raise ValueError("an empty sender set was given")
        out.append(SenderSet(nodes))
    if not out:
        raise ValueError("no senders given")
    return out


def _parse_receivers(model_layers: int, n_heads: int, receivers: Any, channel: str) -> list[Node]:
    if channel not in CHANNELS:
        raise ValueError(f"channel {channel!r} is unknown: use one of {', '.join(CHANNELS)}")
    if channel == "logits":
        if receivers not in (None, "logits", ["logits"], ("logits",)):
            raise ValueError("with channel 'logits' the receiver is the logits; omit receivers")
        return [Node("logits")]
    items = [receivers] if isinstance(receivers, str) else list(receivers or [])
    nodes = [parse_node(name) for name in items]
    if not nodes:
        raise ValueError(f"channel {channel!r} needs receiver heads such as ['a9.h9']")
    for node in nodes:
        if node.kind != "head" or not 0 <= int(node.layer) < model_layers or not 0 <= int(node.head) < n_heads:
            raise ValueError(f"receiver {node.name!r} must be a head of this model for channel {channel!r}")
    return nodes


class _PathRun:
    """Shared state of one path-patching sweep."""

    def __init__(self, ctx: PatchingContext, config: PatchingConfig, receivers: list[Node], channel: str,
                 sender_pos: Tensor | None, receiver_pos: Tensor | None) -> None:
        self.ctx, self.config, self.receivers, self.channel = ctx, config, receivers, channel
        self.runner = ctx.runner
        self.sender_pos, self.receiver_pos = sender_pos, receiver_pos
        self.source = config.resolved_source()
        layers = range(self.runner.n_layers)
        ensure_collected(ctx, [("z", layer) for layer in layers] +
                         ([] if self.runner.attn_only else [("mlp_out", layer) for layer in layers]))
        self.base = ctx.corrupt_run if config.direction == "denoise" else ctx.clean_run
        self.recv_layers = sorted({int(node.layer) for node in receivers}) if channel != "logits" else []

    def _source(self, kind: str, layer: int) -> Tensor:
        return _source_activation(self.ctx, kind, layer, self.source)

    def _pos_mask(self, positions: Tensor | None, batch: int, seq: int, device: torch.device) -> Tensor:
        if positions is None:
            return torch.ones(batch, seq, dtype=torch.bool, device=device)
        mask = torch.zeros(batch, seq, dtype=torch.bool, device=device)
        mask[torch.arange(batch), positions.to(device)] = True
        return mask

    def pass_one(self, chunk: Sequence[SenderSet]) -> dict[int | str, Tensor]:
        """Frozen-heads run with senders patched; returns receiver-layer residuals for each copy."""
        runner, base = self.runner, self.base
        n, batch, seq = len(chunk), self.ctx.batch, self.ctx.seq_len
        device = base.resid_pre[0].device
        start = min(s.min_layer for s in chunk)
        stop = runner.n_layers if self.channel == "logits" else max(self.recv_layers)
        pos_mask = self._pos_mask(self.sender_pos, batch, seq, device)
        hooks = {}
        for layer in range(start, stop):
            head_mask = torch.zeros(n, batch, seq, runner.n_heads, dtype=torch.bool, device=device)
            mlp_mask = torch.zeros(n, batch, seq, dtype=torch.bool, device=device)
            for i, sender_set in enumerate(chunk):
                for node in sender_set.nodes:
                    if node.layer != layer:
                        continue
                    if node.kind == "head":
                        head_mask[i, :, :, node.head] = pos_mask
                    else:
                        mlp_mask[i] = pos_mask
            base_z, src_z = base.acts[("z", layer)], self._source("z", layer)
            hooks[("z", layer)] = _frozen_hook(head_mask, src_z, base_z, n, batch)
            if bool(mlp_mask.any()):
                hooks[("mlp_out", layer)] = _replace_hook(mlp_mask, self._source("mlp_out", layer), n, batch)
        captured: dict[int | str, Tensor] = {}
        for layer in self.recv_layers:
            def capture(resid: Tensor, layer: int = layer) -> Tensor:
                captured[layer] = resid
                return resid
            hooks[("resid_pre", layer)] = capture
        with torch.no_grad():
            resid = runner.run(base.resid_pre[start].repeat(n, 1, 1), start_layer=start, past=base.kv,
                               hooks=hooks, stop_layer=stop)
        captured["final" if self.channel == "logits" else stop] = resid
        return captured

    def pass_two(self, captured: dict[int | str, Tensor], n: int) -> Tensor:
        """Receivers' inputs recomputed from pass one; returns mean metric per copy [n]."""
        runner, base, ctx = self.runner, self.base, self.ctx
        batch, seq, reads = ctx.batch, ctx.seq_len, ctx.read_positions.shape[1]
        device = base.resid_pre[0].device
        recv_mask = self._pos_mask(self.receiver_pos, batch, seq, device)
        with torch.no_grad():
            if self.channel == "logits":
                final = base.resid_final.repeat(n, 1, 1)
                mask = recv_mask.repeat(n, 1)[..., None]
                resid = torch.where(mask, captured["final"], final)
            else:
                hooks = {}
                for layer in self.recv_layers:
                    heads = sorted({int(node.head) for node in self.receivers if node.layer == layer})
                    key = self.channel if self.channel == "q" else f"{self.channel}_q"
                    hooks[(key, layer)] = _receiver_hook(runner, self.channel, layer, heads,
                                                                  captured[layer], recv_mask, n, batch)
                start = self.recv_layers[0]
                resid = runner.run(base.resid_pre[start].repeat(n, 1, 1), start_layer=start, past=base.kv,
                                   hooks=hooks)
            logits_at = _gather_logits(runner, resid, ctx.read_positions, 0, ctx.metric_vocab)
            values = _metric_values(ctx.task, ctx.pairs, logits_at.view(n, batch, reads, -1))
        return values.mean(1)


def _frozen_hook(mask: Tensor, src: Tensor, base: Tensor, n: int, batch: int):
    def hook(act: Tensor) -> Tensor:
        chosen = torch.where(mask[..., None], src.unsqueeze(0), base.unsqueeze(0))
        return chosen.reshape(n * batch, *act.shape[1:])
    return hook


def _replace_hook(mask: Tensor, src: Tensor, n: int, batch: int):
    def hook(act: Tensor) -> Tensor:
        shaped = act.reshape(n, batch, *act.shape[1:])
        return torch.where(mask[..., None], src.unsqueeze(0), shaped).reshape(act.shape)
    return hook


def _receiver_hook(runner: Any, channel: str, layer: int, heads: list[int], resid: Tensor, recv_mask: Tensor,
                   n: int, batch: int):
    if hasattr(runner, "receiver_values"):  # the hook backend: the bridge computes them from the stream
        alt = runner.receiver_values(channel, layer, resid)
    else:
        project = {"q": runner.project_q, "k": runner.project_k, "v": runner.project_v}[channel]
        # q: the `q` site (before any query norm); k/v: as the query head reads them (after any key norm)
        alt = project(layer, runner.ln1[layer](resid), **({"normed": False} if channel == "q" else {}))
    if channel != "q":  # per query head: expand the key/value heads to the query heads that read them
        alt = alt.repeat_interleave(runner.group, dim=2)
    head_mask = torch.zeros(alt.shape[2], dtype=torch.bool, device=alt.device)
    head_mask[heads] = True
    mask = recv_mask.repeat(n, 1)[:, :, None] & head_mask[None, None, :]

    def hook(act: Tensor) -> Tensor:
        return torch.where(mask[..., None], alt, act)
    return hook


def path_patching(model: TransformerBridge, task: Task, pairs: PromptPairs, senders: Senders = "heads",
                  receivers: Receivers = None,
                  channel: str = "q", *, sender_positions: Positions = None, receiver_positions: Positions = None,
                  config: PatchingConfig | None = None, context: PatchingContext | None = None) -> pd.DataFrame:
    """Effect of each sender set on `receivers` through `channel` (q/k/v of receiver heads, or `logits`).

    `senders`: "heads" (every head alone), "all" (every head and MLP alone), a node name (`"a7.h3"`), or a
    list whose items are node names or lists of names (sets patched together). Sender sets at or above the
    first receiver layer are skipped (they cannot reach the receivers). Positions: None/"all", a task role
    (`"END"`) or an integer.
    """
    config = config or PatchingConfig()
    ctx = context or prepare(model, task, pairs)
    runner = ctx.runner
    recv = _parse_receivers(runner.n_layers, runner.n_heads, receivers, channel)
    sets = _parse_senders(runner.n_layers, runner.n_heads, senders, runner.attn_only)
    limit = runner.n_layers if channel == "logits" else min(int(node.layer) for node in recv)

    kept = [s for s in sets if all(int(node.layer) < limit for node in s.nodes)]
    if not kept:
        raise ValueError(f"no sender lies below the receivers (layer {limit}); senders must be in earlier layers")
    sender_pos, _ = _resolve_positions(pairs, sender_positions, "sender")
    receiver_pos, receiver_role = _resolve_positions(pairs, receiver_positions, "receiver")
    run = _PathRun(ctx, config, recv, channel, sender_pos, receiver_pos)
    kept.sort(key=lambda s: s.min_layer)
    values = torch.empty(len(kept))
    chunks: list[list[int]] = []
    for index, sender_set in enumerate(kept):
        if chunks and len(chunks[-1]) < config.chunk_size and kept[chunks[-1][0]].min_layer == sender_set.min_layer:
            chunks[-1].append(index)
        else:
            chunks.append([index])
    iterator: Iterable[list[int]] = chunks
    if config.progress:
        iterator = tqdm(chunks, desc="path patching", unit="fwd", disable=None)  # a bar on a terminal only
    for members in iterator:
        chunk = [kept[i] for i in members]
        values[torch.tensor(members)] = run.pass_two(run.pass_one(chunk), len(chunk)).cpu()
    receiver_name = ",".join(node.name for node in recv)
    receiver_label = receiver_positions if isinstance(receiver_positions, int) else None  # NA: all / a role
    rows = []
    for sender_set, value in zip(kept, values.tolist()):
        single = sender_set.nodes[0] if len(sender_set.nodes) == 1 else None
        rows.append({"sender": sender_set.name, "receiver": receiver_name, "channel": channel,
                     "layer": sender_set.min_layer, "head": single.head if single is not None and single.kind == "head" else -1,
                     "position": receiver_label, "role": receiver_role, "metric": value, "effect": float(ctx.normalize(value)),
                     "direction": config.direction, "source": run.source})
    frame = pd.DataFrame(rows, columns=PATH_COLUMNS)
    frame["position"] = frame["position"].astype("Int64")  # the receiver position; NA (written empty): all / a role
    frame.attrs.update(clean_metric=ctx.clean_metric, corrupt_metric=ctx.corrupt_metric)
    return frame
