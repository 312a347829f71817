"""Forward passes in graph form (`EdgeRunner`) and what a plain run records for them (`GraphActivations`):
sender outputs and the residual streams, from which edge patching, EAP, EAP-IG, ACDC and faithfulness build each
receiver's input. The engine context keeps one of each for its clean and corrupted runs; `patching.edges` uses
them to evaluate circuits given as edge masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.forward_parts import rms_post_share
from circuitlab.patching.runner import KVCache, Runner, RunState
from circuitlab.patching.topology import ComputationalGraph, PositionSplit


@dataclass
class GraphActivations:
    """Sender outputs and residual streams of one plain run, for edge patching and attribution."""

    senders: Tensor  # [batch, pos, n_senders, d_model]
    resid_pre: list[Tensor]
    resid_mid: list[Tensor]
    resid_final: Tensor


class EdgeRunner:
    """Forward passes in graph form: plain (recording senders), masked (edge patching), or with gradients."""

    def __init__(self, model: TransformerBridge, runner: Runner | None = None) -> None:
        self.runner = runner or Runner(model)
        self.arch = self.runner.arch
        self.graph = ComputationalGraph.from_architecture(self.arch)
        self.available = getattr(self.runner, "backend", "fast") == "fast"
        if not self.available:
            return
        group = self.graph.group  # per-query-head copies of the key/value weights (grouped-query attention)
        r = self.runner
        self._weights = {"q": (r.W_Q, r.b_Q), "k": (r.W_K.repeat_interleave(group, dim=1), r.b_K.repeat_interleave(group, dim=1)),
                         "v": (r.W_V.repeat_interleave(group, dim=1), r.b_V.repeat_interleave(group, dim=1))}
        self._full = {"q": (r.W_Q, r.b_Q), "k": (r.W_K, r.b_K)}
        self._head_index = {"q": torch.arange(r.n_heads), "k": torch.arange(r.n_heads) // group}

    def require(self) -> None:
        """This class computes receiver inputs with the fast runner's weights; the hook backend has its own."""
        if not self.available:
            raise ValueError(f"{self.arch.name} runs on the exact hook backend: build its graph-form runner with "
                             "patching.engine.make_edge_runner (a patching.hook_edges.HookEdgeRunner), as "
                             "engine_context does")

    def receiver_value(self, layer: int, channel: str, head: int, stream: Tensor) -> Tensor:
        """What a receiver computes from its input stream: query head `head`'s q/k/v [b, p, d_head], or the MLP's
        contribution (channel `mlp`) [b, p, d_model]."""
        r = self.runner
        if channel == "mlp":
            return r.mlp_block(layer, stream)
        copies = r.ln1[layer](stream).unsqueeze(2).expand(-1, -1, self.graph.n_heads, -1)
        return self.project(layer, channel, copies)[:, :, head]

    def project(self, layer: int, kind: str, x: Tensor) -> Tensor:
        """Normalized per-query-head inputs [b, p, H, d_model] to that head's q, k or v [b, p, H, d_head]
        (query/key norms included; a norm over all heads, as OLMo-2's, sees each copy's full projection)."""
        r = self.runner
        if kind == "v" or self.arch.qk_norm != "full":
            weight, bias = self._weights[kind]
            out = torch.einsum("bphm,hmd->bphd", x, weight[layer]) + bias[layer]
            return out if kind == "v" else r.norm_qk(layer, kind, out)
        weight, bias = self._full[kind]
        full = r.norm_qk(layer, kind, torch.einsum("bphm,nmd->bphnd", x, weight[layer]) + bias[layer])
        heads = torch.arange(r.n_heads, device=x.device)
        return full[:, :, heads, self._head_index[kind].to(x.device)]

    def shares(self, layer: int, head_out: Tensor) -> Tensor:
        """Each head's contribution to the stream [b, p, H, d_model]: z_h W_O, or with a post-attention norm
        (Gemma-2/3, OLMo-2) its exact share of the normed output at this run's norm scale."""
        r = self.runner
        if not self.arch.post_attn_norm:
            return head_out
        if self.arch.norm != "RMS" or bool(r.b_O[layer].abs().max() > 0):
            raise ValueError(f"{self.arch.name}: a post-attention {self.arch.norm} norm with attention biases does "
                             "not split into per-head edges; use activation or path patching on this model")
        return rms_post_share(r.post1[layer], head_out.sum(2), head_out)

    def attn_total(self, layer: int, shares: Tensor) -> Tensor:
        """The attention layer's contribution to the stream from its head shares."""
        return shares.sum(2) + (0.0 if self.arch.post_attn_norm else self.runner.b_O[layer])

    def _attn_from_inputs(self, layer: int, x: Tensor, pos0: int = 0, past: KVCache | None = None) -> Tensor:
        """Per-receiver inputs [b, p, 3H, d_model] (q, k, v per query head) to head shares [b, p, H, d_model];
        `x` holds positions pos0.. and `past` the keys/values of the earlier ones."""
        r, g = self.runner, self.graph
        xn = r.ln1[layer](x)
        xq, xk, xv = xn.split([g.n_heads, g.n_heads, g.n_heads], dim=2)
        z = r.attend(layer, self.project(layer, "q", xq), self.project(layer, "k", xk), self.project(layer, "v", xv),
                     pos0, past)
        return self.shares(layer, r.head_outputs(layer, z))

    def from_run(self, state: RunState) -> GraphActivations:
        """Graph activations of a plain run recorded by the runner (`z` and `mlp_out` collected at every layer)."""
        self.require()
        r = self.runner
        senders = [state.resid_pre[0]]
        mid = []
        for layer in range(r.n_layers):
            senders += list(self.shares(layer, r.head_outputs(layer, state.acts[("z", layer)])).unbind(2))
            if r.attn_only:
                mid.append(state.resid_pre[layer + 1] if layer + 1 < r.n_layers else state.resid_final)
                continue
            senders.append(state.acts[("mlp_out", layer)])
            mid.append(state.resid_pre[layer] if r.parallel else state.resid_mid[layer])
        pre = [state.resid_pre[layer] for layer in range(r.n_layers)]
        return GraphActivations(torch.stack(senders, dim=2), pre, mid, state.resid_final)

    def plain(self, tokens: Tensor | None = None, *, embed: Tensor | None = None, leaves: bool = False
              ) -> tuple[GraphActivations, Tensor, dict[str, list[Tensor]] | None]:
        """A normal forward in graph form. With `leaves`, every receiver input gets a zero leaf whose
        gradient is d(metric)/d(receiver input). Returns (activations, final resid, leaves)."""
        self.require()
        r, g = self.runner, self.graph
        resid = r.embed(tokens) if embed is None else embed
        batch, seq, dm = resid.shape
        senders = [resid]
        pre, mid = [], []
        grads: dict[str, list[Tensor]] | None = {"attn": [], "mlp": [], "logits": []} if leaves else None
        for layer in range(r.n_layers):
            pre.append(resid)
            x = resid.unsqueeze(2).expand(batch, seq, 3 * g.n_heads, dm)
            if grads is not None:
                leaf = torch.zeros_like(x, requires_grad=True)
                grads["attn"].append(leaf)
                x = x + leaf
            head_out = self._attn_from_inputs(layer, x)
            senders += list(head_out.unbind(2))
            attn_total = self.attn_total(layer, head_out)
            if r.attn_only:
                resid = resid + attn_total
                mid.append(resid)
                continue
            mlp_in = resid if r.parallel else resid + attn_total
            mid.append(mlp_in)
            if grads is not None:
                leaf = torch.zeros_like(mlp_in, requires_grad=True)
                grads["mlp"].append(leaf)
                mlp_in = mlp_in + leaf
            mlp_out = r.mlp_block(layer, mlp_in)
            senders.append(mlp_out)
            resid = resid + attn_total + mlp_out
        final = resid
        if grads is not None:
            leaf = torch.zeros_like(final, requires_grad=True)
            grads["logits"].append(leaf)
            final = final + leaf
        acts = GraphActivations(torch.stack(senders, dim=2), pre, mid, resid)
        return acts, final, grads

    def masked(self, tokens: Tensor, corrupt: GraphActivations, masks: Tensor, *, pos0: int = 0,
               past: KVCache | None = None, sparse: bool = False, segments: PositionSplit | None = None) -> Tensor:
        """Final residual streams [C * batch, pos, d_model] for C circuits (masks [C, n_senders, n_receivers], or
        position-aware [C, n_segments, n_senders, n_receivers] with `segments` saying which segment each
        position belongs to: a receiver at a position reads the senders of that position with that segment's mask).

        Sender differences a_u - a_u^corrupt are kept as [C, n_senders, batch * pos * d_model]; each layer's
        receiver inputs are one batched matrix product of the masks with them (position-aware: one per segment, on
        that segment's positions, `_by_segment`). With `sparse` (faithfulness curves, circuit evaluation), each
        circuit's product runs over the senders it keeps towards these receivers, or (when fewer) the sum of every
        earlier difference minus those it drops (`_mixed`; position-aware: the senders some circuit keeps in that
        segment): a top-k circuit keeps few edges or almost all, and the product reads every difference it touches
        from memory. The dense product is the default because its rounding does not depend on the mask: an edge
        whose difference is exactly zero changes nothing, bit for bit, which ACDC at threshold 0 relies on. `pos0`
        > 0: positions before it are the same in the clean and corrupted runs (`EngineContext.shared_prefix`), so
        every circuit equals the corrupted run there: only positions pos0.. are computed, from the corrupted run's
        keys/values `past`, and the corrupted final stream fills the prefix.
        """
        r, g = self.runner, self.graph
        if (masks.dim() == 4) != (segments is not None):
            raise ValueError("position-aware masks [C, S, senders, receivers] need their position split, and only they")
        n_circ = masks.shape[0]
        resid0 = r.embed(tokens)[:, pos0:]
        batch, seq, dm = resid0.shape
        flat = batch * seq * dm
        deltas = torch.zeros(n_circ, g.n_senders, flat, dtype=resid0.dtype, device=resid0.device)
        corrupt_flat = corrupt.senders[:, pos0:].permute(2, 0, 1, 3).reshape(g.n_senders, flat)
        deltas[:, 0] = (resid0.reshape(flat) - corrupt_flat[0])
        masks_t = masks.to(resid0.device, resid0.dtype).transpose(-1, -2)  # [C, (S,) n_receivers, n_senders]
        cols = [] if segments is None else [  # flat (batch * pos) indices of each segment's positions from pos0
            (segments.index[:, pos0:].flatten() == s).nonzero().flatten().to(resid0.device)
            for s in range(len(segments.names))]
        total = deltas[:, 0].clone() if sparse and segments is None else None  # sum of the differences 0..done-1
        done = 1

        def inputs(base: Tensor, n_prev: int, receivers: slice) -> Tensor:
            if segments is not None:
                mixed = _by_segment(masks_t[:, :, receivers, :n_prev], deltas, cols, dm, sparse)
            elif sparse:
                mixed = _mixed(masks_t[:, receivers, :n_prev], deltas, total if n_prev == done else None)
            else:
                mixed = torch.bmm(masks_t[:, receivers, :n_prev].contiguous(), deltas[:, :n_prev])  # [C, R, flat]
            mixed = mixed.view(n_circ, -1, batch, seq, dm).permute(0, 2, 3, 1, 4)
            return base.unsqueeze(0).unsqueeze(3) + mixed  # [C, batch, seq, R, dm]

        for layer in range(r.n_layers):
            n_prev = g.senders_before(g.attn_receivers(layer).start)
            x = inputs(corrupt.resid_pre[layer][:, pos0:], n_prev, g.attn_receivers(layer))
            head_out = self._attn_from_inputs(layer, x.reshape(n_circ * batch, seq, -1, dm), pos0, past)
            first = g.head_sender(layer, 0)
            head_out = head_out.view(n_circ, batch, seq, g.n_heads, dm).permute(0, 3, 1, 2, 4).reshape(
                n_circ, g.n_heads, flat)
            deltas[:, first:first + g.n_heads] = head_out - corrupt_flat[first:first + g.n_heads]
            if total is not None:
                total += deltas[:, first:first + g.n_heads].sum(1)
            done = first + g.n_heads
            if r.attn_only:
                continue
            receiver = g.mlp_receiver(layer)
            n_mlp = g.senders_before(receiver)
            x_mlp = inputs(corrupt.resid_mid[layer][:, pos0:], n_mlp, slice(receiver, receiver + 1)).squeeze(3)
            mlp_out = r.mlp_block(layer, x_mlp)
            idx = g.mlp_sender(layer)
            deltas[:, idx] = mlp_out.reshape(n_circ, flat) - corrupt_flat[idx]
            if total is not None:
                total += deltas[:, idx]
            done = idx + 1
        last = g.logits_receiver
        final = inputs(corrupt.resid_final[:, pos0:], g.n_senders, slice(last, last + 1)).squeeze(3)
        final = final.reshape(n_circ * batch, seq, dm)
        if pos0:
            final = torch.cat([corrupt.resid_final[:, :pos0].repeat(n_circ, 1, 1), final], dim=1)
        return final


def _by_segment(masks: Tensor, deltas: Tensor, cols: list[Tensor], dm: int, sparse: bool) -> Tensor:
    """Σ_u masks[c, s, r, u] · deltas[c, u] at the positions `cols[s]` of each segment s ([C, R, flat]; masks
    [C, S, R, n_prev]); with `sparse`, over the senders some circuit keeps towards these receivers in that segment."""
    n_circ, _, n_recv, n_prev = masks.shape
    by_pos = deltas.view(n_circ, deltas.shape[1], -1, dm)
    mixed = torch.zeros(n_circ, n_recv, by_pos.shape[2], dm, dtype=deltas.dtype, device=deltas.device)
    for s, at in enumerate(cols):
        m = masks[:, s]
        active = m.ne(0).any(0).any(0).nonzero().flatten() if sparse else torch.arange(n_prev, device=m.device)
        if len(at) and len(active):
            part = by_pos[:, active[:, None], at[None, :]].reshape(n_circ, len(active), -1)
            mixed[:, :, at] = torch.bmm(m[:, :, active].contiguous(), part).view(n_circ, n_recv, len(at), dm)
    return mixed.view(n_circ, n_recv, -1)

def _mixed(masks: Tensor, deltas: Tensor, total: Tensor | None) -> Tensor:
    """Σ_u masks[c, r, u] · deltas[c, u] for every circuit c and receiver r ([C, R, flat]; masks [C, R, n_prev]),
    reading only the senders circuit c keeps towards these receivers or, where fewer and `total` (the sum of
    deltas[:, :n_prev]) is given, total minus the senders it drops."""
    n_circ, n_recv, n_prev = masks.shape
    out = torch.empty(n_circ, n_recv, deltas.shape[2], dtype=deltas.dtype, device=deltas.device)
    for c in range(n_circ):
        m = masks[c]
        kept = m.ne(0).any(0).nonzero().flatten()
        dropped = m.ne(1).any(0).nonzero().flatten() if total is not None else None
        if dropped is not None and len(dropped) < len(kept):
            out[c] = total[c]
            if len(dropped):
                out[c] -= (1.0 - m[:, dropped]) @ deltas[c, dropped]
        elif len(kept):
            torch.mm(m[:, kept], deltas[c, kept], out=out[c])
        else:
            out[c].zero_()
    return out
