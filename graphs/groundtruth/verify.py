"""Reference checks for ground-truth circuits: weights as plain tensors, a forward pass at the level of graph
edges, and the structural circuit read off the weights.

Why our own forward: proving a ground truth needs edge-level ablation that does not depend on the patching
engine under test. For the LN-free TL-native models used here the residual stream is a plain sum of sender
outputs, so a receiver's input can be rebuilt from its senders with any subset of edges removed.

Edge semantics (shared with `graphs.groundtruth`): senders are `input` (token + positional embedding),
heads `a{l}.h{h}` (their own z @ W_O, without the bias b_O) and MLPs `m{l}` (including their output bias).
Receivers are heads through `<q>`, `<k>`, `<v>`, MLPs and `logits`. The attention output bias b_O belongs to
no node: it is a constant present in every run and is never ablated (it is zero in all our models).
The query/key/value biases belong to their head, the unembedding bias to `logits`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.components import edge_name, head_node, mlp_node, parse_edge, parse_node
from circuitlab.patching.topology import can_read, sender_nodes


@dataclass(frozen=True)
class LayerWeights:
    """One block's weights in TransformerLens orientation ([in, out])."""

    W_Q: Tensor  # [H, d_model, d_head]
    b_Q: Tensor  # [H, d_head]
    W_K: Tensor
    b_K: Tensor
    W_V: Tensor
    b_V: Tensor
    W_O: Tensor  # [H, d_head, d_model]
    b_O: Tensor  # [d_model]
    W_in: Tensor | None  # [d_model, d_mlp]
    b_in: Tensor | None
    W_out: Tensor | None  # [d_mlp, d_model]
    b_out: Tensor | None


@dataclass(frozen=True)
class Weights:
    """A whole LN-free native model as tensors: what `graph_forward` and `structural_circuit` read."""

    W_E: Tensor  # [d_vocab, d_model]
    W_pos: Tensor  # [n_ctx, d_model]
    layers: tuple[LayerWeights, ...]
    W_U: Tensor  # [d_model, d_vocab_out]
    b_U: Tensor
    causal: bool
    scale: float

    @property
    def n_heads(self) -> int:
        return int(self.layers[0].W_Q.shape[0])

    @property
    def has_mlp(self) -> bool:
        return self.layers[0].W_in is not None


def weights_of(model: TransformerBridge) -> Weights:
    """Read an LN-free, relu-or-attention-only, standard-position native bridge into `Weights`."""
    cfg = model.cfg
    if cfg.normalization_type is not None:
        raise ValueError(f"weights_of needs an LN-free model; this one has normalization_type={cfg.normalization_type!r}")
    if (cfg.n_key_value_heads or cfg.n_heads) != cfg.n_heads:
        raise ValueError("weights_of needs n_key_value_heads == n_heads")
    if not cfg.attn_only and (cfg.act_fn or "relu") != "relu":
        raise ValueError(f"weights_of supports relu MLPs only, not act_fn={cfg.act_fn!r}")
    sd = {k: v.detach().to(torch.float64) for k, v in model.state_dict().items() if torch.is_tensor(v)}
    H, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model

    def qkv(layer: int, name: str) -> tuple[Tensor, Tensor]:
        w = sd[f"blocks.{layer}.attn.{name}.weight"].T.reshape(d, H, dh).permute(1, 0, 2)
        b = sd[f"blocks.{layer}.attn.{name}.bias"].reshape(H, dh)
        return w.contiguous(), b

    layers = []
    for layer in range(cfg.n_layers):
        W_Q, b_Q = qkv(layer, "q")
        W_K, b_K = qkv(layer, "k")
        W_V, b_V = qkv(layer, "v")
        W_O = sd[f"blocks.{layer}.attn.o.weight"].T.reshape(H, dh, d).contiguous()
        b_O = sd[f"blocks.{layer}.attn.o.bias"]
        mlp: list[Tensor | None] = [None] * 4
        if not cfg.attn_only:
            mlp = [sd[f"blocks.{layer}.mlp.in.weight"].T, sd[f"blocks.{layer}.mlp.in.bias"],
                   sd[f"blocks.{layer}.mlp.out.weight"].T, sd[f"blocks.{layer}.mlp.out.bias"]]
        layers.append(LayerWeights(W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O, *mlp))
    scale = cfg.attn_scale if (cfg.use_attn_scale and cfg.attn_scale > 0) else math.sqrt(dh)
    b_U = sd.get("unembed.bias", torch.zeros(sd["unembed.weight"].shape[0], dtype=torch.float64))
    return Weights(sd["embed.weight"], sd["pos_embed.weight"], tuple(layers), sd["unembed.weight"].T, b_U,
                   cfg.attention_dir == "causal", float(scale))


def node_order(w: Weights) -> list[str]:
    """Sender nodes in computation order: input, then per layer its heads and its MLP."""
    return sender_nodes(len(w.layers), w.n_heads, attn_only=not w.has_mlp)


def _senders_of(w: Weights, receiver: str) -> list[str]:
    return [s for s in node_order(w) if can_read(s, receiver)]


def all_edges(w: Weights) -> list[str]:
    """Every edge of the model's graph in our naming, receivers in computation order."""
    edges = []
    for receiver in node_order(w)[1:] + ["logits"]:
        channels = ("q", "k", "v") if parse_node(receiver).kind == "head" else (None,)
        for ch in channels:
            edges += [edge_name(s, receiver, ch) for s in _senders_of(w, receiver)]
    return edges


def graph_forward(w: Weights, tokens: Tensor, ablate: frozenset[str] | set[str] = frozenset(),
                  source: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits [batch, pos, vocab_out] with the named edges ablated, and every sender's output [batch, pos, d].

    An ablated edge feeds its receiver `source[sender]` (e.g. the sender's output on a corrupted input,
    from an earlier call) instead of the sender's output, or zeros when `source` is None.
    """
    ablate = frozenset(ablate)
    unknown = ablate - set(all_edges(w))
    if unknown:
        raise ValueError(f"unknown edges for this model: {sorted(unknown)[:5]}")
    tokens = tokens.long()
    batch, seq = tokens.shape
    outs: dict[str, Tensor] = {"input": w.W_E[tokens] + w.W_pos[:seq][None]}
    const = torch.zeros_like(outs["input"])  # b_O of earlier layers: no node's, never ablated

    def read(receiver: str, ch: str | None) -> Tensor:
        total = const.clone()
        for s in _senders_of(w, receiver):
            if edge_name(s, receiver, ch) in ablate:
                if source is not None:
                    total = total + source[s]
            else:
                total = total + outs[s]
        return total

    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1) if w.causal else None
    for layer, lw in enumerate(w.layers):
        new: dict[str, Tensor] = {}
        for h in range(w.n_heads):
            name = head_node(layer, h)
            q = read(name, "q") @ lw.W_Q[h] + lw.b_Q[h]
            k = read(name, "k") @ lw.W_K[h] + lw.b_K[h]
            v = read(name, "v") @ lw.W_V[h] + lw.b_V[h]
            scores = q @ k.transpose(-1, -2) / w.scale
            if mask is not None:
                scores = scores.masked_fill(mask, float("-inf"))
            new[name] = torch.softmax(scores, dim=-1) @ v @ lw.W_O[h]
        outs.update(new)
        const = const + lw.b_O
        if lw.W_in is not None:
            name = mlp_node(layer)
            pre = read(name, None) @ lw.W_in + lw.b_in
            outs[name] = torch.relu(pre) @ lw.W_out + lw.b_out
    logits = read("logits", None) @ w.W_U + w.b_U
    return logits, outs


def _writer(w: Weights, name: str) -> Tensor:
    node = parse_node(name)
    if node.kind == "input":
        return torch.cat([w.W_E, w.W_pos])
    if node.kind == "mlp":
        return w.layers[node.layer].W_out
    return w.layers[node.layer].W_O[node.head]


def _reader(w: Weights, name: str, ch: str) -> Tensor:
    node = parse_node(name)
    if node.kind == "logits":
        return w.W_U
    if node.kind == "mlp":
        return w.layers[node.layer].W_in
    return getattr(w.layers[node.layer], f"W_{ch.upper()}")[node.head]


def structural_edges(w: Weights, tol: float = 1e-9) -> set[str]:
    """Edges whose virtual weight (sender's write matrix @ receiver's read matrix) is non-zero."""
    out = set()
    for edge in all_edges(w):
        src, dst, ch = parse_edge(edge)
        if (_writer(w, src) @ _reader(w, dst, ch)).abs().max() > tol:
            out.add(edge)
    return out


def structural_circuit(w: Weights, tol: float = 1e-9) -> tuple[set[str], set[str]]:
    """(nodes, edges): the non-zero-weight edges that lie on a path from `input` to `logits`.

    For analytically set weights (hand-wired, compiled) whose components write into disjoint subspaces
    this is exactly the set of edges that can carry information to the output.
    """
    edges = structural_edges(w, tol)
    parsed = [(e, *parse_edge(e)[:2]) for e in edges]
    reaches_out, from_in = {"logits"}, {"input"}
    changed = True
    while changed:
        changed = False
        for _, s, d in parsed:
            if d in reaches_out and s not in reaches_out:
                reaches_out.add(s)
                changed = True
            if s in from_in and d not in from_in:
                from_in.add(d)
                changed = True
    kept = {e for e, s, d in parsed if s in from_in and d in reaches_out}
    nodes = {s for e, s, d in parsed if e in kept} | {d for e, s, d in parsed if e in kept}
    return nodes, kept


def prune_inert_edges(w: Weights, tokens: Tensor, read_pos: Tensor, edges: set[str],
                      tol: float = 1e-4) -> tuple[set[str], set[str]]:
    """(kept, dropped): greedily drop circuit edges whose zero-ablation, on top of ablating every non-circuit
    edge and the edges already dropped, changes the read logits by less than `tol` on `tokens`.

    Non-zero virtual weights can still carry nothing the task needs (e.g. Tracr's query/key of an all-true
    selector: every score is equal with or without them), so the structural circuit is pruned this way.
    """
    full, _ = graph_forward(w, tokens)
    ref = full[:, read_pos]
    others = set(all_edges(w)) - edges
    dropped: set[str] = set()
    for edge in sorted(edges):
        lg, _ = graph_forward(w, tokens, ablate=others | dropped | {edge})
        if float((lg[:, read_pos] - ref).abs().max()) < tol:
            dropped.add(edge)
    return edges - dropped, dropped
