"""The model's computational graph: which node reads which, in ACDC / EAP-IG / MIB names.

The one place topology is defined. Nodes are `input`, `a{l}.h{h}`, `m{l}` and `logits`. A sender's output is its
own contribution to the residual stream: the embeddings for `input`, `z_h @ W_O[h]` for a head (the attention
bias b_O belongs to no head), the MLP's output. Receivers read their own copy of the residual stream: every
head's query, key and value (`<q>`, `<k>`, `<v>`), every MLP, and the logits. With grouped-query attention,
`a{l}.h{h}<k>` is the key *as query head h reads it*: every query head has its own copy of its group's key/value
input, so a k/v edge belongs to exactly one query-head node (the convention of EAP-IG and MIB files, and the one
the circuit builder, ACDC, path patching and MIB import/export use).

Order: a sender writes at its `send_rank` (input −1, heads of layer l at l, the MLP of layer l at l + ½); a
receiver reads every sender of lower rank than its `read_rank` (heads of layer l at l, the MLP of layer l at
l + ½, or at l in parallel blocks (GPT-J, GPT-NeoX) where it reads what its layer's heads read; logits last).
`can_read` on names and `ComputationalGraph` on indices both follow from these two ranks.

Position-aware graphs (Haklay et al. 2025): a `PositionSplit` groups each prompt's token positions into named
segments (one per role, and the spans between roles, for prompts aligned by role); `PositionalGraph` splits every
edge u->v into one edge per segment, `u->v<c>@SEG`: receiver v reads u's clean output at the positions of that
segment only. The residual stream is position-wise, so these are all the edges: information moves between
positions only inside attention (a query at one segment reads keys/values at others).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.architecture import Architecture, describe
from circuitlab.patching.components import Node, edge_name, head_node, mlp_node, parse_edge, parse_node


def send_rank(node: Node) -> float:
    """Where a node writes into the residual stream, in computation order (logits write nothing: inf)."""
    if node.kind == "input":
        return -1.0
    if node.kind == "head":
        return float(node.layer)
    if node.kind == "mlp":
        return node.layer + 0.5
    return math.inf


def read_rank(node: Node, parallel: bool = False) -> float:
    """Where a node reads the residual stream: it reads every sender whose `send_rank` is lower."""
    if node.kind == "input":
        return -math.inf
    if node.kind == "head":
        return float(node.layer)
    if node.kind == "mlp":
        return node.layer + (0.0 if parallel else 0.5)
    return math.inf


def can_read(src: str, dst: str, parallel: bool = False) -> bool:
    """Whether node `dst` reads the output of node `src` (`parallel`: attention and MLP read the same stream)."""
    return send_rank(parse_node(src)) < read_rank(parse_node(dst), parallel)


def sort_key(name: str) -> tuple[float, int]:
    """Order nodes as the model computes them: input, then per layer heads before the MLP, then logits."""
    node = parse_node(name)
    return (send_rank(node), node.head if node.kind == "head" else 0)


def sender_nodes(n_layers: int, n_heads: int, attn_only: bool = False) -> list[str]:
    """Sender nodes in computation order: input, then per layer its heads and (unless attention-only) its MLP."""
    out = ["input"]
    for layer in range(n_layers):
        out += [head_node(layer, h) for h in range(n_heads)]
        if not attn_only:
            out.append(mlp_node(layer))
    return out


class ComputationalGraph:
    """Senders, receivers and valid edges of a model, with names and index maps."""

    def __init__(self, n_layers: int, n_heads: int, n_kv: int, attn_only: bool = False, parallel: bool = False):
        self.n_layers, self.n_heads, self.n_kv = n_layers, n_heads, n_kv
        self.attn_only, self.parallel = attn_only, parallel
        self.group = n_heads // n_kv
        self.send_stride = n_heads + (0 if attn_only else 1)
        self.recv_stride = 3 * n_heads + (0 if attn_only else 1)
        self.sender_names: list[str] = sender_nodes(n_layers, n_heads, attn_only)
        self.sender_layer: list[float] = [send_rank(parse_node(name)) for name in self.sender_names]
        self.receiver_names: list[str] = []  # the receiving node
        self.receiver_channels: list[str] = []
        for layer in range(n_layers):
            for channel in ("q", "k", "v"):
                self.receiver_names += [head_node(layer, h) for h in range(n_heads)]
                self.receiver_channels += [channel] * n_heads
            if not attn_only:
                self.receiver_names.append(mlp_node(layer))
                self.receiver_channels.append("resid")
        self.receiver_names.append("logits")
        self.receiver_channels.append("resid")
        self.n_senders, self.n_receivers = len(self.sender_names), len(self.receiver_names)
        # senders are in computation order, so those a receiver reads are a prefix of them
        self._senders_before = [bisect.bisect_left(self.sender_layer, read_rank(parse_node(name), parallel))
                                for name in self.receiver_names]
        valid = torch.zeros(self.n_senders, self.n_receivers, dtype=torch.bool)
        for r in range(self.n_receivers):
            valid[: self.senders_before(r), r] = True
        self.valid = valid
        send_idx, recv_idx = valid.nonzero(as_tuple=True)
        order = torch.argsort(recv_idx * self.n_senders + send_idx)  # receivers in topological order
        self.edge_sender, self.edge_receiver = send_idx[order], recv_idx[order]
        self.edge_names = [edge_name(self.sender_names[s], self.receiver_names[r], self.receiver_channels[r])
                           for s, r in zip(self.edge_sender.tolist(), self.edge_receiver.tolist())]
        self._edge_index = {name: i for i, name in enumerate(self.edge_names)}
        self._sender_index = {name: i for i, name in enumerate(self.sender_names)}

    @classmethod
    def from_model(cls, model: TransformerBridge) -> ComputationalGraph:
        return cls.from_architecture(describe(model))

    @classmethod
    def from_architecture(cls, arch: Architecture) -> ComputationalGraph:
        """The graph of an `architecture.Architecture` (the one place topology comes from)."""
        return cls(arch.n_layers, arch.n_heads, arch.n_kv, arch.attn_only, arch.parallel)

    def receiver_info(self, receiver: int) -> tuple[int, str, int]:
        """(layer, channel, query head) of a receiver; channel `mlp` (head -1) or `logits` (layer n_layers)."""
        if receiver == self.logits_receiver:
            return self.n_layers, "logits", -1
        layer, offset = divmod(receiver, self.recv_stride)
        if offset >= 3 * self.n_heads:
            return layer, "mlp", -1
        channel, head = divmod(offset, self.n_heads)
        return layer, "qkv"[channel], head

    # ------------------------------------------------------------------ index arithmetic
    def head_sender(self, layer: int, head: int) -> int:
        return 1 + layer * self.send_stride + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * self.send_stride + self.n_heads

    def attn_receivers(self, layer: int) -> slice:
        """Receiver indices of layer's heads: all queries, then all keys, then all values (per query head)."""
        start = layer * self.recv_stride
        return slice(start, start + 3 * self.n_heads)

    def mlp_receiver(self, layer: int) -> int:
        return layer * self.recv_stride + 3 * self.n_heads

    @property
    def logits_receiver(self) -> int:
        return self.n_receivers - 1

    def senders_before(self, receiver: int) -> int:
        """How many senders (a prefix of the sender order) write into this receiver's input (`can_read`)."""
        return self._senders_before[receiver]

    def sender_index(self, name: str) -> int:
        """Position of a sender node (`input`, `a{l}.h{h}`, `m{l}`) in the sender order."""
        if name not in self._sender_index:
            raise ValueError(f"{name!r} is not a sender of this model's graph ({self.n_layers} layers, "
                             f"{self.n_heads} heads{', attention only' if self.attn_only else ''})")
        return self._sender_index[name]

    def senders_of(self, *kinds: str) -> list[int]:
        """Indices of the senders of the given node kinds (`head`, `mlp`, `input`), in graph order."""
        return [i for i, name in enumerate(self.sender_names) if parse_node(name).kind in kinds]

    @property
    def n_edges(self) -> int:
        return len(self.edge_names)

    def edge_index(self, name: str) -> int:
        """Position of an edge in the canonical order; a clear error for unknown names."""
        if name in self._edge_index:
            return self._edge_index[name]
        src, dst, channel = parse_edge(name)  # raises on malformed names
        canonical = edge_name(src, dst, channel if channel != "resid" else None)
        if canonical in self._edge_index:
            return self._edge_index[canonical]
        raise ValueError(f"edge {name!r} is not in this model's graph ({self.n_layers} layers, {self.n_heads} heads)")

    def mask(self, edges: Tensor) -> Tensor:
        """Edge vectors [..., n_edges] to sender × receiver matrices [..., n_senders, n_receivers]."""
        out = torch.zeros(*edges.shape[:-1], self.n_senders, self.n_receivers, dtype=edges.dtype, device=edges.device)
        out[..., self.edge_sender, self.edge_receiver] = edges
        return out

    def edges_vector(self, names: Sequence[str], value: float = 1.0) -> Tensor:
        """A 0/1 edge vector with `names` set."""
        vec = torch.zeros(self.n_edges)
        for name in names:
            vec[self.edge_index(name)] = value
        return vec


def node_totals(senders: Sequence[str], receivers: Sequence[str], scores: Sequence[float] | Tensor, *,
                absolute: bool) -> dict[str, float]:
    """Node scores from edge scores, the one definition: a node's score is the sum of its outgoing edges' scores
    (of their |scores| with `absolute`); `logits`, which sends nothing, gets the sum over its incoming edges.
    NaN scores count as 0. Signed sums are attribution patching's node scores (a node's effect is the sum of its
    edges' effects, to first order); absolute sums say how much of a circuit flows through a node."""
    values = torch.nan_to_num(torch.as_tensor(scores, dtype=torch.float64).detach().cpu(), nan=0.0)
    if absolute:
        values = values.abs()
    totals: dict[str, float] = {}
    for src, dst, value in zip(senders, receivers, values.tolist()):
        totals[src] = totals.get(src, 0.0) + value
        if dst == "logits":
            totals["logits"] = totals.get("logits", 0.0) + value
    return totals


# ---------------------------------------------------------------------- position-aware graphs

POSITION_MODES = ("roles", "each")


@dataclass(frozen=True)
class PositionSplit:
    """Each prompt's token positions grouped into named segments: `index` [batch, pos] is a position's segment
    (0 .. len(names) - 1). Padding positions belong to the segment before them; no real token reads them."""

    names: tuple[str, ...]
    index: Tensor

    def __post_init__(self) -> None:
        if self.index.dim() != 2 or (self.index.numel() and (int(self.index.min()) < 0
                                                             or int(self.index.max()) >= len(self.names))):
            raise ValueError(f"a position split needs a [batch, pos] index into its {len(self.names)} segments")

    def subset(self, idx: Tensor) -> PositionSplit:
        """The split of prompts `idx` (repeats allowed)."""
        return PositionSplit(self.names, self.index[idx.to(self.index.device)])

    def positions(self, segment: int) -> Tensor:
        """Flat indices (batch * pos + pos) of the positions in one segment."""
        return (self.index.flatten() == segment).nonzero().flatten()


def role_segment_names(roles: Sequence[str]) -> tuple[str, ...]:
    """Segments of a role split: `start` (before any role), each role, and `ROLE..` (after it, up to the next)."""
    out = ["start"]
    for role in roles:
        out += [role, f"{role}.."]
    return tuple(out)


def position_split(mode: str, positions: dict[str, Tensor], seq_len: int) -> PositionSplit:
    """A split of prompts with role `positions` ({role: [batch]} token indices; `END` is each prompt's last
    token): `roles` (segments named by `role_segment_names`, the same for every prompt set of the task, so
    scores found on one set apply to another) or `each` (absolute positions `p0`, `p1`, ...: for prompts of one
    template only, where a position means the same token everywhere)."""
    if mode not in POSITION_MODES:
        raise ValueError(f"edge positions {mode!r} are unknown: use one of {', '.join(POSITION_MODES)} (or none)")
    if not positions:
        raise ValueError("these prompts name no roles: position-aware edges need prompts aligned by role")
    batch = int(next(iter(positions.values())).shape[0])
    if mode == "each":
        names = tuple(f"p{p}" for p in range(seq_len))
        return PositionSplit(names, torch.arange(seq_len).unsqueeze(0).expand(batch, -1).clone())
    roles = list(positions)
    names = role_segment_names(roles)
    index = torch.zeros(batch, seq_len, dtype=torch.long)
    for b in range(batch):
        at = sorted((int(positions[r][b]), i) for i, r in enumerate(roles))
        for (pos, i), nxt in zip(at, at[1:] + [(seq_len, -1)]):
            index[b, pos + 1:nxt[0]] = 2 + 2 * i  # the span after a role, up to the next role
        for pos, i in reversed(at):  # two roles on one token: the first named keeps it
            index[b, pos] = 1 + 2 * i
    return PositionSplit(names, index)


class PositionalGraph(ComputationalGraph):
    """A graph whose edges are (edge, segment) pairs, segment-major: edge `s * n_base + e` is base edge e at the
    positions of segment s, named `NAME@SEG`. Sender/receiver indices, ranks and receiver layout are the base
    graph's, so node totals, circuits and masks read it like any graph; `mask` gives one sender x receiver
    matrix per segment."""

    def __init__(self, base: ComputationalGraph, segments: Sequence[str]) -> None:
        self.__dict__.update(base.__dict__)
        self.base, self.segments = base, tuple(segments)
        n_seg = len(self.segments)
        self.edge_sender = base.edge_sender.repeat(n_seg)
        self.edge_receiver = base.edge_receiver.repeat(n_seg)
        self.edge_names = [f"{name}@{seg}" for seg in self.segments for name in base.edge_names]
        self._edge_index = {name: i for i, name in enumerate(self.edge_names)}

    def edge_index(self, name: str) -> int:
        edge, sep, seg = name.rpartition("@")
        if not sep or seg not in self.segments:
            raise ValueError(f"position-aware edge {name!r} must be 'EDGE@SEGMENT' with a segment among {self.segments}")
        return self.segments.index(seg) * self.base.n_edges + self.base.edge_index(edge)

    def mask(self, edges: Tensor) -> Tensor:
        """Edge vectors [..., n_edges] to per-segment matrices [..., n_segments, n_senders, n_receivers]."""
        per_segment = edges.reshape(*edges.shape[:-1], len(self.segments), self.base.n_edges)
        return self.base.mask(per_segment)

    def edges_vector(self, names: Sequence[str], value: float = 1.0) -> Tensor:
        vec = torch.zeros(self.n_edges)
        for name in names:
            vec[self.edge_index(name)] = value
        return vec

    def pooled(self, values: Tensor) -> Tensor:
        """Per-edge values [..., n_edges] summed over segments to the base graph's edges [..., n_base]."""
        return values.reshape(*values.shape[:-1], len(self.segments), self.base.n_edges).sum(-2)
