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
"""

from __future__ import annotations

import bisect
import math
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

    @classmethod
    def from_meta(cls, meta: dict[str, object]) -> ComputationalGraph:
        """The graph from a run record's model entry (`n_layers`, `n_heads`, `n_key_value_heads`, `attn_only`,
        `parallel_attn_mlp`), so saved scores are read with the topology they were computed on."""
        return cls(int(meta["n_layers"]), int(meta["n_heads"]), int(meta.get("n_key_value_heads") or meta["n_heads"]),
                   bool(meta.get("attn_only", False)), bool(meta.get("parallel_attn_mlp", False)))

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
