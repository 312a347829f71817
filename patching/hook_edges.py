"""Edge methods on the exact hook backend: the computational graph computed by the bridge's own forward pass.

Edge patching, EAP, EAP-IG, ACDC, faithfulness and node masks need every receiver to read its own input: each
head's query, key and value (`<q>`, `<k>`, `<v>`), each MLP, the logits. The bridge computes one input per
layer, so `HookEdgeRunner` runs it on copies stacked along the batch: copy c of layer l's residual stream
(`hook_resid_pre`) is receiver c's input (c < 3H: the q, k and v inputs of every query head; copy 3H: the MLP
input in parallel blocks). At `hook_q`/`hook_k`/`hook_v` each head's projection is taken from its own copy and
written into every copy (a key/value head shared by a group of query heads gets, in copy j, the key of the
group's j-th query head), so `hook_z` of head h in copy h mod group is that head's output from its own q/k/v.
Head shares are z_h W_O[h] (post-attention norms split at the run's scale, as in `patching.edges`); the MLP
input replaces `hook_resid_mid` (sequential blocks) and the logits input `ln_final.hook_in`. The residual
stream between receivers is rebuilt from sender outputs here, so the bridge's own stream is never read.

Norms, rotary embeddings, attention, MLPs and the unembedding are the bridge's own modules; cost is ~(3H+1)
forwards per graph forward. Before first use the decomposition is checked: the rebuilt final stream of a probe
run must equal the bridge's, else edge methods refuse this model with the measured difference.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.components import hook_name
from circuitlab.patching.edge_runner import EdgeRunner, GraphActivations
from circuitlab.patching.forward_parts import UnsupportedModelError, block_norms, rms_post_share
from circuitlab.patching.hook_backend import ModelRunner, _Stop
from circuitlab.patching.runner import RunState
from circuitlab.patching.topology import ComputationalGraph

_FINAL = "ln_final.hook_in"


class HookEdgeRunner:
    """`patching.edge_runner.EdgeRunner`'s interface (from_run, plain, masked) over the bridge's hooks."""

    backend = "hook"
    available = True

    def __init__(self, model: TransformerBridge, runner: ModelRunner) -> None:
        self.model, self.runner, self.arch = model, runner, runner.arch
        self.graph = g = ComputationalGraph.from_architecture(self.arch)
        self.n_copies = 3 * g.n_heads + (0 if g.attn_only else 1)
        self.W_O = model.W_O.detach()
        try:
            b_O = model.b_O
        except (AttributeError, RuntimeError, ValueError):
            b_O = None
        self.b_O = torch.zeros(g.n_layers, self.W_O.shape[-1], dtype=self.W_O.dtype, device=self.W_O.device) \
            if b_O is None else b_O.detach()
        norms = block_norms(model, self.arch)
        self.post1, self.post2 = norms["post1"], norms["post2"]
        self._mlp_post: bool | None = None  # whether hook_mlp_out is before the post-MLP norm (set by the check)
        self._checked = False

    # ------------------------------------------------------------------ pieces shared with the fast EdgeRunner
    def shares(self, layer: int, head_out: Tensor) -> Tensor:
        """Each head's contribution [.., H, d_model] (its share of a post-attention RMS norm's output)."""
        if not self.arch.post_attn_norm:
            return head_out
        if self.arch.norm != "RMS" or bool(self.b_O[layer].abs().max() > 0):
            raise ValueError(f"{self.arch.name}: a post-attention {self.arch.norm} norm with attention biases does "
                             "not split into per-head edges; use activation or path patching on this model")
        return rms_post_share(self.post1[layer], head_out.sum(-2), head_out)

    def attn_total(self, layer: int, shares: Tensor) -> Tensor:
        return shares.sum(-2) + (0.0 if self.arch.post_attn_norm else self.b_O[layer])

    def _mlp_contribution(self, layer: int, out: Tensor) -> Tensor:
        return self.post2[layer](out) if self._mlp_post else out

    def require(self) -> None:
        """Check once that the bridge's stream is the sum of the graph's senders (see the module docstring)."""
        if self._checked:
            return
        options = [False, True] if self.arch.post_mlp_norm else [False]
        tokens = (torch.arange(2, 10, device=self.W_O.device) % self.model.W_E.shape[0]).view(2, 4)
        with torch.no_grad():
            got: dict[str, Tensor] = {}
            self.runner._forward(tokens, [(_FINAL, _keep(got))])
            scale = max(1.0, float(got["x"].abs().max()))
            diffs = []
            for option in options:
                self._mlp_post = option
                final = self._plain_forward(tokens, None, None)[1]
                diffs.append(float((final - got["x"]).abs().max()))
                if diffs[-1] <= 1e-4 * scale:
                    self._checked = True
                    return
        raise UnsupportedModelError(
            f"{self.arch.name}: its residual stream is not the sum of per-head (z W_O) and MLP outputs (max "
            f"difference {min(diffs):.3g}), so edges are undefined for it; activation and path patching still work")

    # ------------------------------------------------------------------ the graph forward
    def _graph_forward(self, items: int, seq: int, attn_in: Callable[[int], Tensor], mlp_in: Callable[[int], Tensor],
                       final_in: Callable[[], Tensor], on_heads: Callable[[int, Tensor], None],
                       on_mlp: Callable[[int, Tensor], None]) -> Tensor:
        """One bridge forward on n_copies x items rows; the callbacks give receiver inputs and take sender outputs
        (shares [items, p, H, d] per layer, MLP contributions [items, p, d]). Returns the logits' input."""
        g, n = self.graph, self.n_copies
        heads = torch.arange(g.n_heads, device=self.W_O.device)
        group = g.group
        out: dict[str, Tensor] = {}

        def copies(x: Tensor) -> Tensor:  # [n, items, p, ...] -> [n * items, p, ...]
            return x.reshape(n * items, *x.shape[2:])

        def resid_pre(layer: int) -> Callable:
            def hook(act: Tensor, hook: Any) -> Tensor:
                x = attn_in(layer).permute(2, 0, 1, 3)  # [3H, items, p, d]
                if not g.attn_only:
                    extra = mlp_in(layer) if g.parallel else x[0]
                    x = torch.cat([x, extra.unsqueeze(0)], dim=0)
                return copies(x)
            return hook

        def qkv(layer: int, offset: int) -> Callable:
            def hook(act: Tensor, hook: Any) -> Tensor:
                shape = act.shape
                a = act.reshape(n, items, seq, -1, self.arch.d_head)
                if a.shape[3] == g.n_heads:  # per query head: head h from copy offset + h, in every copy
                    own = a[offset + heads, :, :, heads].permute(1, 2, 0, 3)
                    return own.unsqueeze(0).expand(n, *own.shape).reshape(shape)
                own = a[offset + heads, :, :, heads // group]  # [H, items, p, d]: query head h's key/value
                own = own.view(g.n_kv, group, items, seq, -1).permute(1, 2, 3, 0, 4)  # [group, items, p, K, d]
                return own[torch.arange(n, device=act.device) % group].reshape(shape)
            return hook

        def z_hook(layer: int) -> Callable:
            def hook(act: Tensor, hook: Any) -> Tensor:
                a = act.reshape(n, items, seq, g.n_heads, -1)
                z = a[heads % group, :, :, heads].permute(1, 2, 0, 3)  # [items, p, H, d_head]
                on_heads(layer, self.shares(layer, torch.einsum("iphd,hdm->iphm", z, self.W_O[layer])))
                return act
            return hook

        def mid_hook(layer: int) -> Callable:
            def hook(act: Tensor, hook: Any) -> Tensor:
                x = mlp_in(layer)
                return copies(x.unsqueeze(0).expand(n, *x.shape))
            return hook

        def mlp_hook(layer: int) -> Callable:
            def hook(act: Tensor, hook: Any) -> Tensor:
                on_mlp(layer, self._mlp_contribution(layer, act.reshape(n, items, *act.shape[1:])[n - 1]))
                return act
            return hook

        def final_hook(act: Tensor, hook: Any) -> Tensor:
            out["final"] = final_in()
            raise _Stop

        hooks: list[tuple[str, Callable]] = []
        for layer in range(g.n_layers):
            hooks.append((hook_name("resid_pre", layer), resid_pre(layer)))
            hooks += [(self.runner.read_site(kind, layer), qkv(layer, i * g.n_heads)) for i, kind in enumerate("qkv")]
            hooks.append((hook_name("z", layer), z_hook(layer)))
            if not g.attn_only:
                if not g.parallel:
                    hooks.append((hook_name("resid_mid", layer), mid_hook(layer)))
                hooks.append((hook_name("mlp_out", layer), mlp_hook(layer)))
        hooks.append((_FINAL, final_hook))
        placeholder = torch.zeros(n * items, seq, dtype=torch.long, device=self.W_O.device)
        self.runner._forward(placeholder, self.runner.edits(hooks))  # stopped by final_hook; every hook probed
        return out["final"]

    def _plain_forward(self, tokens: Tensor | None, embed: Tensor | None, leaves: dict[str, list[Tensor]] | None
                       ) -> tuple[list[Tensor], Tensor, list[Tensor], list[Tensor]]:
        """(senders, the logits' input (plus its leaf), resid_pre per layer, MLP inputs per layer)."""
        g = self.graph
        resid = self.runner.embed(tokens) if embed is None else embed
        items, seq, dm = resid.shape
        senders: list[Tensor | None] = [resid] + [None] * (g.n_senders - 1)
        streams = {"pre": [resid], "mid": [], "attn": {}, "mlp": {}}

        def current(layer: int) -> Tensor:  # the stream entering `layer` (built lazily from sender outputs)
            while len(streams["pre"]) <= layer:
                done = len(streams["pre"]) - 1
                nxt = streams["pre"][done] + streams["attn"][done]
                if not g.attn_only:
                    nxt = nxt + streams["mlp"][done]
                streams["pre"].append(nxt)
            return streams["pre"][layer]

        def attn_in(layer: int) -> Tensor:
            x = current(layer).unsqueeze(2).expand(items, seq, 3 * g.n_heads, dm)
            if leaves is not None:
                leaf = torch.zeros_like(x, requires_grad=True)
                leaves["attn"].append(leaf)
                x = x + leaf
            return x

        def mlp_in(layer: int) -> Tensor:
            x = current(layer) if g.parallel else current(layer) + streams["attn"][layer]
            streams["mid"].append(x)
            if leaves is not None:
                leaf = torch.zeros_like(x, requires_grad=True)
                leaves["mlp"].append(leaf)
                x = x + leaf
            return x

        def final_in() -> Tensor:
            x = current(g.n_layers)
            if leaves is not None:
                leaf = torch.zeros_like(x, requires_grad=True)
                leaves["logits"].append(leaf)
                x = x + leaf
            return x

        def on_heads(layer: int, shares: Tensor) -> None:
            first = g.head_sender(layer, 0)
            senders[first:first + g.n_heads] = list(shares.unbind(2))
            streams["attn"][layer] = self.attn_total(layer, shares)

        def on_mlp(layer: int, out: Tensor) -> None:
            senders[g.mlp_sender(layer)] = out
            streams["mlp"][layer] = out

        final = self._graph_forward(items, seq, attn_in, mlp_in, final_in, on_heads, on_mlp)
        pre = [current(layer) for layer in range(g.n_layers)]
        mid = streams["mid"] if not g.attn_only else pre[1:] + [current(g.n_layers)]
        return senders, final, pre, mid

    def receiver_value(self, layer: int, channel: str, head: int, stream: Tensor) -> Tensor:
        """What a receiver computes from its input stream (see `EdgeRunner.receiver_value`), by the bridge: q (before
        any query norm), k/v as query head `head` reads them, or the MLP's contribution."""
        r = self.runner
        if channel != "mlp":
            values = r.receiver_values(channel, layer, stream)
            return values[:, :, head if values.shape[2] == self.graph.n_heads else head // self.graph.group]
        got: dict[str, Tensor] = {}
        keep = {("mlp_out", layer): lambda act: got.setdefault("x", act)}
        r.run(stream, start_layer=layer, start_at_mlp=not self.graph.parallel, stop_layer=layer + 1, hooks=keep)
        return self._mlp_contribution(layer, got["x"])

    # ------------------------------------------------------------------ EdgeRunner's interface
    def from_run(self, state: RunState) -> GraphActivations:
        """Graph activations of a plain hook-backend run (`z` and `mlp_out` collected at every layer)."""
        self.require()
        g = self.graph
        senders = [state.resid_pre[0]]
        mid = []
        for layer in range(g.n_layers):
            z = state.acts[("z", layer)]
            z = z.reshape(*z.shape[:2], g.n_heads, -1)
            senders += list(self.shares(layer, torch.einsum("bphd,hdm->bphm", z, self.W_O[layer])).unbind(2))
            if g.attn_only:
                mid.append(state.resid_pre[layer + 1] if layer + 1 < g.n_layers else state.resid_final)
                continue
            senders.append(self._mlp_contribution(layer, state.acts[("mlp_out", layer)]))
            mid.append(state.resid_pre[layer] if g.parallel else state.resid_mid[layer])
        pre = [state.resid_pre[layer] for layer in range(g.n_layers)]
        return GraphActivations(torch.stack(senders, dim=2), pre, mid, state.resid_final)

    def plain(self, tokens: Tensor | None = None, *, embed: Tensor | None = None, leaves: bool = False
              ) -> tuple[GraphActivations, Tensor, dict[str, list[Tensor]] | None]:
        """A normal forward in graph form (see `EdgeRunner.plain`); `leaves` for receiver-input gradients."""
        self.require()
        grads: dict[str, list[Tensor]] | None = {"attn": [], "mlp": [], "logits": []} if leaves else None
        senders, final, pre, mid = self._plain_forward(tokens, embed, grads)
        resid = final - grads["logits"][0] if grads is not None else final
        return GraphActivations(torch.stack(senders, dim=2), pre, mid, resid), final, grads

    def masked(self, tokens: Tensor, corrupt: GraphActivations, masks: Tensor, *, budget_mb: float = 256.0) -> Tensor:
        """Final residual streams [C * batch, pos, d_model] for C circuits (masks [C, n_senders, n_receivers]);
        differentiable in `masks` (no in-place writes)."""
        self.require()
        batch, seq, _, dm = corrupt.senders.shape
        per_circuit = 4.0 * self.n_copies * batch * seq * (dm * 12 + 4 * seq)
        step = max(1, int(budget_mb * 2**20 // per_circuit))
        return torch.cat([self._masked(tokens, corrupt, masks[i:i + step]) for i in range(0, masks.shape[0], step)])

    def _masked(self, tokens: Tensor, corrupt: Any, masks: Tensor) -> Tensor:
        g = self.graph
        n_circ = masks.shape[0]
        batch, seq, _, dm = corrupt.senders.shape
        items = n_circ * batch
        masks_t = masks.to(corrupt.senders.device, corrupt.senders.dtype).transpose(1, 2)  # [C, n_receivers, n_senders]
        corrupt_senders = corrupt.senders.permute(2, 0, 1, 3)  # [n_senders, b, p, d]
        embed = self.runner.embed(tokens)
        deltas: list[Tensor | None] = [(embed - corrupt_senders[0]).unsqueeze(0).expand(n_circ, -1, -1, -1)]
        deltas += [None] * (g.n_senders - 1)

        def inputs(base: Tensor, receivers: slice) -> Tensor:
            n_prev = g.senders_before(receivers.start)
            stacked = torch.stack(deltas[:n_prev], dim=1)  # [C, n_prev, b, p, d]
            mixed = torch.einsum("crs,csbpd->cbprd", masks_t[:, receivers, :n_prev], stacked)
            return (base.unsqueeze(0).unsqueeze(3) + mixed).reshape(items, seq, -1, dm)

        def attn_in(layer: int) -> Tensor:
            return inputs(corrupt.resid_pre[layer], g.attn_receivers(layer))

        def mlp_in(layer: int) -> Tensor:
            receiver = g.mlp_receiver(layer)
            return inputs(corrupt.resid_mid[layer], slice(receiver, receiver + 1))[:, :, 0]

        def final_in() -> Tensor:
            last = g.logits_receiver
            return inputs(corrupt.resid_final, slice(last, last + 1))[:, :, 0]

        def on_heads(layer: int, shares: Tensor) -> None:
            first = g.head_sender(layer, 0)
            shares = shares.view(n_circ, batch, seq, g.n_heads, dm)
            for h in range(g.n_heads):
                deltas[first + h] = shares[:, :, :, h] - corrupt_senders[first + h]

        def on_mlp(layer: int, out: Tensor) -> None:
            idx = g.mlp_sender(layer)
            deltas[idx] = out.view(n_circ, batch, seq, dm) - corrupt_senders[idx]

        return self._graph_forward(items, seq, attn_in, mlp_in, final_in, on_heads, on_mlp)


def _keep(store: dict) -> Callable:
    def hook(act: Tensor, hook: Any) -> Tensor:
        store["x"] = act
        return act
    return hook


GraphRunner = Union[EdgeRunner, HookEdgeRunner]  # `patching.engine.make_edge_runner`: fast or hook graph runner

__all__ = ["GraphRunner", "HookEdgeRunner"]
