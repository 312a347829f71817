"""A functional forward pass over a bridge's own weights, built for patching.

TransformerLens runs every forward from the embeddings over every position. A patch at layer L and position
p cannot change layers below L nor positions before p (causal attention), and the metric reads the logits
at a few positions only. `Runner` exploits all three: it starts at any layer (or half-layer) from a cached
residual stream, computes only positions >= p while attending to cached keys/values of earlier positions,
and unembeds only the positions that are read.

It reads the weights from the bridge (`W_Q`, `W_K`, `W_V`, `W_O`, biases, `W_U`, `W_E`, `W_pos`) and calls the
bridge's own norm and MLP modules, so the numbers are the model's. At construction it checks that its logits
equal the bridge's on a probe input, and refuses (with the architecture's name) where they do not.

Intervention sites (`hooks` keys are `(kind, layer)`, kinds from `patching.components`): `resid_pre`,
`q`, `k`, `v` (before rotary, [batch, pos, head, d_head]), `pattern` ([batch, head, dest, src]), `z`,
`attn_out`, `resid_mid`, `mlp_out`, `resid_post`. A hook gets the activation restricted to the computed
window of positions and returns the (possibly edited) activation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.architecture import describe
from circuitlab.patching.forward_parts import (UnsupportedModelError, block_norms, make_rope, mlp_module, original,
                                               qk_norms)

Hook = Callable[[Tensor], Tensor]


def _get(model: Any, name: str, shape: tuple[int, ...]) -> Tensor:
    """A stacked weight view of the bridge, or zeros where the model has no such parameter (bias-free)."""
    try:
        value = getattr(model, name)
    except (AttributeError, RuntimeError, ValueError):
        value = None
    if value is None:
        return torch.zeros(shape, dtype=model.cfg.dtype, device=model.cfg.device)
    return value.detach()


_original = original


@dataclass
class KVCache:
    """Post-rotary keys and values per layer for a run: [batch, kv_head, pos, d_head] each."""

    keys: dict[int, Tensor] = field(default_factory=dict)
    values: dict[int, Tensor] = field(default_factory=dict)


@dataclass
class RunState:
    """What a full run leaves behind for later partial runs: residual streams, K/V, and collected sites."""

    resid_pre: dict[int, Tensor] = field(default_factory=dict)
    resid_mid: dict[int, Tensor] = field(default_factory=dict)
    kv: KVCache = field(default_factory=KVCache)
    acts: dict[tuple[str, int], Tensor] = field(default_factory=dict)
    resid_final: Tensor | None = None


class Runner:
    """Layer-, position- and readout-restricted forward passes over a TransformerBridge's weights."""

    backend = "fast"
    key_mask: Tensor | None = None  # [batch, pos] bool: keys a bidirectional model may attend to (not padding)

    def __init__(self, model: TransformerBridge, *, check: bool = True, atol: float | None = None) -> None:
        cfg = model.cfg
        self.model = model
        self.cfg = cfg
        self.arch = arch = describe(model)
        self.n_layers: int = cfg.n_layers
        self.n_heads: int = cfg.n_heads
        self.d_head: int = cfg.d_head
        self.d_model: int = cfg.d_model
        self.n_kv: int = cfg.n_key_value_heads or cfg.n_heads
        self.group: int = self.n_heads // self.n_kv
        self.attn_only: bool = bool(cfg.attn_only)
        self.parallel: bool = arch.parallel
        self.causal: bool = arch.causal
        if getattr(cfg, "post_embedding_ln", False):
            raise UnsupportedModelError(f"{cfg.architecture}: a norm after the embeddings is not in the fast engine")
        L, H, K, dm, dh = self.n_layers, self.n_heads, self.n_kv, self.d_model, self.d_head
        self.W_Q = _get(model, "W_Q", (L, H, dm, dh))
        self.W_K = _get(model, "W_K", (L, K, dm, dh))
        self.W_V = _get(model, "W_V", (L, K, dm, dh))
        self.W_O = _get(model, "W_O", (L, H, dh, dm))
        self.b_Q = _get(model, "b_Q", (L, H, dh))
        self.b_K = _get(model, "b_K", (L, K, dh))
        self.b_V = _get(model, "b_V", (L, K, dh))
        self.b_O = _get(model, "b_O", (L, dm))
        self.W_U = _get(model, "W_U", (dm, cfg.d_vocab_out if cfg.d_vocab_out > 0 else cfg.d_vocab))
        self.b_U = _get(model, "b_U", (self.W_U.shape[1],))
        self.W_E = model.W_E.detach()
        self.standard_pos = arch.positional == "learned"
        self.W_pos = model.W_pos.detach() if self.standard_pos else None
        # Flattened projections: one matmul per layer instead of one per head.
        self._wq = self.W_Q.permute(0, 2, 1, 3).reshape(L, dm, H * dh)
        self._wk = self.W_K.permute(0, 2, 1, 3).reshape(L, dm, K * dh)
        self._wv = self.W_V.permute(0, 2, 1, 3).reshape(L, dm, K * dh)
        self._wo = self.W_O.reshape(L, H * dh, dm)
        norms = block_norms(model, arch)
        self.ln1, self.ln2 = norms["ln1"], [None if self.attn_only else n for n in norms["ln2"]]
        self.post1, self.post2 = norms["post1"], norms["post2"]
        self.q_norm, self.k_norm = qk_norms(model, arch)
        self.mlp = [None if self.attn_only else mlp_module(block) for block in model.blocks]
        self.ln_final = _original(model.ln_final)
        self.attn_modules = [_original(block.attn) for block in model.blocks]
        self.scale = self._attention_scale()
        self._rope = make_rope(model, arch, self.attn_modules)
        if check:
            self.check(atol=atol)

    def with_key_mask(self, mask: Tensor) -> "Runner":
        """A view of this runner (weights shared) whose attention ignores the keys where `mask` [batch, pos] is 0:
        right padding of a bidirectional model, where real tokens would otherwise attend to later pads. Partial
        runs stack copies of the batch (`x.repeat(n, 1, 1)`); the mask repeats the same way."""
        view = copy.copy(self)
        view.key_mask = mask.bool()
        return view

    # ------------------------------------------------------------------ architecture pieces
    def _attention_scale(self) -> float:
        attn = self.attn_modules[0]
        if getattr(self.cfg, "scale_attn_by_inverse_layer_idx", False):
            raise UnsupportedModelError(f"{self.cfg.architecture}: scale_attn_by_inverse_layer_idx is not supported")
        if hasattr(attn, "scaling"):
            return float(attn.scaling)
        if hasattr(attn, "scale") and isinstance(attn.scale, (int, float)):
            return 1.0 / float(attn.scale)
        return 1.0 / math.sqrt(self.d_head)

    # ------------------------------------------------------------------ pieces of the forward pass
    def embed(self, tokens: Tensor) -> Tensor:
        """The residual stream entering block 0 (token plus learned positional embedding)."""
        resid = self.W_E[tokens]
        if self.arch.embed_scale != 1.0:  # Gemma: embeddings times sqrt(d_model), in the model's dtype
            resid = resid * torch.tensor(self.arch.embed_scale, dtype=resid.dtype, device=resid.device)
        if self.W_pos is not None:
            offset = self.arch.pos_offset  # OPT keeps two unused rows before position 0
            resid = resid + self.W_pos[offset: offset + tokens.shape[1]]
        return resid

    def unembed(self, resid: Tensor, columns: Tensor | None = None) -> Tensor:
        """Logits from final-layer residual vectors [..., d_model] (final norm, then W_U, then any soft-cap);
        with `columns` (vocabulary ids) only those logits [..., len(columns)]."""
        if columns is None:
            logits = self.ln_final(resid) @ self.W_U + self.b_U
        else:
            logits = self.ln_final(resid) @ self.W_U[:, columns] + self.b_U[columns]
        cap = self.arch.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def norm_qk(self, layer: int, kind: str, x: Tensor) -> Tensor:
        """Apply the layer's query or key norm to projections [..., heads, d_head] (identity without)."""
        norm = (self.q_norm if kind == "q" else self.k_norm)[layer]
        if norm is None:
            return x
        if self.arch.qk_norm == "head":
            return norm(x)
        return norm(x.reshape(*x.shape[:-2], -1)).view(x.shape)

    def mlp_block(self, layer: int, x: Tensor) -> Tensor:
        """The MLP's contribution to the residual stream from the stream it reads (norms included)."""
        return self.post2[layer](self.mlp[layer](self.ln2[layer](x)))

    def project_q(self, layer: int, x: Tensor, normed: bool = True) -> Tensor:
        """Pre-rotary queries [batch, pos, head, d_head] from a normalized residual [batch, pos, d_model]."""
        q = (x @ self._wq[layer]).view(*x.shape[:-1], self.n_heads, self.d_head) + self.b_Q[layer]
        return self.norm_qk(layer, "q", q) if normed else q

    def project_k(self, layer: int, x: Tensor, normed: bool = True) -> Tensor:
        """Keys [batch, pos, kv_head, d_head]; `normed=False` stops before any key norm (the `k` site)."""
        k = (x @ self._wk[layer]).view(*x.shape[:-1], self.n_kv, self.d_head) + self.b_K[layer]
        return self.norm_qk(layer, "k", k) if normed else k

    def project_v(self, layer: int, x: Tensor) -> Tensor:
        return (x @ self._wv[layer]).view(*x.shape[:-1], self.n_kv, self.d_head) + self.b_V[layer]

    def head_outputs(self, layer: int, z: Tensor) -> Tensor:
        """Per-head contributions to the residual stream [batch, pos, head, d_model] (no b_O)."""
        return torch.einsum("bphd,hdm->bphm", z, self.W_O[layer])

    def _positions(self, batch: int, start: int, length: int, device: torch.device) -> Tensor:
        return torch.arange(start, start + length, device=device).unsqueeze(0).expand(batch, -1)

    def attention(self, layer: int, x_q: Tensor, x_k: Tensor, x_v: Tensor, pos0: int, past: KVCache | None,
                  hooks: dict[tuple[str, int], Hook], state: RunState | None) -> Tensor:
        """One attention layer over the window [pos0, pos0 + len); returns attn_out [batch, len, d_model]."""
        batch, length, _ = x_q.shape
        q = self.project_q(layer, x_q, normed=False)  # the q/k sites are before any query/key norm
        k = self.project_k(layer, x_k, normed=False)
        v = self.project_v(layer, x_v)
        if ("q", layer) in hooks:
            q = hooks[("q", layer)](q)
        if ("k", layer) in hooks:
            k = hooks[("k", layer)](k)
        if ("v", layer) in hooks:
            v = hooks[("v", layer)](v)
        if state is not None:
            for kind, act in (("q", q), ("k", k), ("v", v)):
                if (kind, layer) in state.acts:
                    state.acts[(kind, layer)] = act
        q, k = self.norm_qk(layer, "q", q), self.norm_qk(layer, "k", k)
        if ("q_n", layer) in hooks:  # queries as each head reads them (after any query norm)
            q = hooks[("q_n", layer)](q)
        if ("k_q", layer) in hooks or ("v_q", layer) in hooks:
            # Keys/values as each query head reads them ([b, p, head, d]): a per-query-head edit of a shared
            # key/value head (grouped-query attention) leaves the group's other query heads untouched.
            k = k.repeat_interleave(self.group, dim=2)
            v = v.repeat_interleave(self.group, dim=2)
            if ("k_q", layer) in hooks:
                k = hooks[("k_q", layer)](k)
            if ("v_q", layer) in hooks:
                v = hooks[("v_q", layer)](v)
        z = self.attend(layer, q, k, v, pos0, past, hooks, state)
        if ("z", layer) in hooks:
            z = hooks[("z", layer)](z)
        if state is not None and ("z", layer) in state.acts:
            state.acts[("z", layer)] = z
        return z.reshape(batch, length, -1) @ self._wo[layer] + self.b_O[layer]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, pos0: int = 0, past: KVCache | None = None,
               hooks: dict[tuple[str, int], Hook] | None = None, state: RunState | None = None) -> Tensor:
        """Attention from pre-rotary q [b, p, head, d] and k/v [b, p, kv_head, d] to z [b, p, head, d].

        k/v may also carry one key/value per query head ([b, p, head, d]), the per-query-head form."""
        hooks = hooks or {}
        batch, length = q.shape[0], q.shape[1]
        q = q.transpose(1, 2)  # [b, h, p, d]
        k = k.transpose(1, 2)
        v = v.transpose(1, 2)
        if self._rope is not None:
            q, k = self._rope(q, k, self._positions(batch, pos0, length, q.device), layer)
        if past is not None and pos0 > 0:
            k_past, v_past = past.keys[layer], past.values[layer]
            if k_past.shape[1] != k.shape[1]:
                k_past = k_past.repeat_interleave(k.shape[1] // k_past.shape[1], dim=1)
                v_past = v_past.repeat_interleave(v.shape[1] // v_past.shape[1], dim=1)
            if k_past.shape[0] != batch:
                k_past = k_past.repeat(batch // k_past.shape[0], 1, 1, 1)
                v_past = v_past.repeat(batch // v_past.shape[0], 1, 1, 1)
            k = torch.cat([k_past[:, :, :pos0], k], dim=2)
            v = torch.cat([v_past[:, :, :pos0], v], dim=2)
        if state is not None:
            state.kv.keys[layer], state.kv.values[layer] = k, v
        total = k.shape[2]
        n_kv = k.shape[1]
        group = self.n_heads // n_kv
        qg = q.reshape(batch, n_kv, group, length, self.d_head)
        scores = torch.einsum("bkgqd,bksd->bkgqs", qg, k) * self.scale
        scores = scores.reshape(batch, self.n_heads, length, total)
        if self.arch.attn_softcap is not None:
            scores = self.arch.attn_softcap * torch.tanh(scores / self.arch.attn_softcap)
        query_pos = torch.arange(pos0, pos0 + length, device=q.device)[:, None]
        key_pos = torch.arange(total, device=q.device)[None, :]
        if self.causal:
            scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
            window = self.arch.sliding_window[layer]
            if window is not None:
                scores = scores.masked_fill(key_pos <= query_pos - window, float("-inf"))
        elif pos0 > 0:
            raise ValueError("bidirectional attention: later positions change earlier ones; run from position 0")
        if self.key_mask is not None:
            keys = self.key_mask.to(q.device)[:, :total]
            if batch % keys.shape[0]:
                raise ValueError(f"a key mask for {keys.shape[0]} prompts cannot mask a batch of {batch}")
            keys = keys.repeat(batch // keys.shape[0], 1)
            scores = scores.masked_fill(~keys[:, None, None, :], float("-inf"))
        pattern = torch.softmax(scores, dim=-1)
        if ("pattern", layer) in hooks:
            pattern = hooks[("pattern", layer)](pattern)
        if state is not None and ("pattern", layer) in state.acts:
            state.acts[("pattern", layer)] = pattern
        pg = pattern.reshape(batch, n_kv, group, length, total)
        return torch.einsum("bkgqs,bksd->bqkgd", pg, v).reshape(batch, length, self.n_heads, self.d_head)

    def run(self, resid: Tensor, *, start_layer: int = 0, start_at_mlp: bool = False, pos0: int = 0,
            past: KVCache | None = None, hooks: dict[tuple[str, int], Hook] | None = None,
            state: RunState | None = None, stop_layer: int | None = None, read: Tensor | None = None) -> Tensor:
        """Run blocks `start_layer`..`stop_layer-1` on `resid` (positions pos0.. of the prompt).

        `resid` is the residual stream entering `start_layer` (its resid_mid if `start_at_mlp`). `past` holds
        keys/values of positions < pos0 for every layer that runs. `state`, when given, records resid_pre,
        resid_mid, K/V and any `(kind, layer)` keys pre-registered in `state.acts`. Returns the residual
        stream after the last block run; with `read` (absolute positions [B, R] of the prompts, the rows of
        `resid` being copies of them) only the final stream at those positions [rows, R, d_model] (positions
        before pos0 read as pos0): the last block's MLP then runs at those positions only, since nothing later
        reads the others.
        """
        hooks = hooks or {}
        stop = self.n_layers if stop_layer is None else stop_layer
        last = self.n_layers - 1 if read is not None and stop == self.n_layers and state is None and not any(
            layer == self.n_layers - 1 and kind in ("resid_mid", "mlp_out", "resid_post") for kind, layer in hooks) \
            else None  # the layer whose MLP runs at the read positions only
        picked = False
        for layer in range(start_layer, stop):
            skip_attn = start_at_mlp and layer == start_layer
            if not skip_attn:
                if ("resid_pre", layer) in hooks:
                    resid = hooks[("resid_pre", layer)](resid)
                if state is not None:
                    state.resid_pre[layer] = resid
                x = self.ln1[layer](resid)
                attn_out = self.post1[layer](self.attention(layer, x, x, x, pos0, past, hooks, state))
                if ("attn_out", layer) in hooks:
                    attn_out = hooks[("attn_out", layer)](attn_out)
                if state is not None and ("attn_out", layer) in state.acts:
                    state.acts[("attn_out", layer)] = attn_out
                if self.parallel and not self.attn_only:
                    if layer == last:
                        resid, attn_out, picked = at_positions(resid, read, pos0), at_positions(attn_out, read, pos0), True
                    mlp_out = self._mlp(layer, self.ln2[layer](resid), hooks, state)
                    resid = resid + attn_out + mlp_out
                    resid = self._post(layer, resid, hooks, state)
                    continue
                resid = resid + attn_out
            if self.attn_only:
                resid = self._post(layer, resid, hooks, state)
                continue
            if ("resid_mid", layer) in hooks:
                resid = hooks[("resid_mid", layer)](resid)
            if state is not None:
                state.resid_mid[layer] = resid
            if layer == last:
                resid, picked = at_positions(resid, read, pos0), True
            resid = resid + self._mlp(layer, self.ln2[layer](resid), hooks, state)
            resid = self._post(layer, resid, hooks, state)
        if state is not None and stop == self.n_layers:
            state.resid_final = resid
        return at_positions(resid, read, pos0) if read is not None and not picked else resid

    def _mlp(self, layer: int, x: Tensor, hooks: dict[tuple[str, int], Hook], state: RunState | None) -> Tensor:
        out = self.post2[layer](self.mlp[layer](x))
        if ("mlp_out", layer) in hooks:
            out = hooks[("mlp_out", layer)](out)
        if state is not None and ("mlp_out", layer) in state.acts:
            state.acts[("mlp_out", layer)] = out
        return out

    def _post(self, layer: int, resid: Tensor, hooks: dict[tuple[str, int], Hook], state: RunState | None) -> Tensor:
        if ("resid_post", layer) in hooks:
            resid = hooks[("resid_post", layer)](resid)
        if state is not None and ("resid_post", layer) in state.acts:
            state.acts[("resid_post", layer)] = resid
        return resid

    def full_run(self, tokens: Tensor, *, collect: tuple[tuple[str, int], ...] = (),
                 hooks: dict[tuple[str, int], Hook] | None = None) -> RunState:
        """A whole forward pass that records what partial runs need (and the `collect` sites)."""
        state = RunState()
        for key in collect:
            state.acts[key] = torch.empty(0)
        self.run(self.embed(tokens), state=state, hooks=hooks)
        return state

    def logits(self, tokens: Tensor) -> Tensor:
        """Full logits [batch, pos, vocab], equal to the bridge's forward."""
        return self.unembed(self.full_run(tokens).resid_final)

    def check(self, atol: float | None = None) -> None:
        """Compare our logits with the bridge's on a probe input; raise UnsupportedModelError on mismatch.

        The tolerance (relative to the largest |logit|) depends on the dtype: 1e-3 for float32/64, 2e-2 for
        float16 and 6e-2 for bfloat16, whose 8-bit mantissa rounds differently in a differently ordered sum."""
        atol = tolerance(self.W_E.dtype) if atol is None else atol
        vocab = self.W_E.shape[0]
        length = max(1, min(8, int(self.cfg.n_ctx)))
        tokens = torch.arange(1, length + 1, device=self.W_E.device).remainder(vocab).unsqueeze(0)
        tokens = torch.cat([tokens, tokens.flip(1)], dim=0)
        with torch.no_grad():
            ours = self.logits(tokens)
            theirs = self.model(tokens)
        diff = (ours.float() - theirs.float()).abs().max().item()
        scale = max(1.0, theirs.float().abs().max().item())
        if not math.isfinite(diff) or diff > atol * scale:
            raise UnsupportedModelError(
                f"the fast runner does not reproduce {self.cfg.architecture} exactly (max |logit diff| {diff:.3g} > "
                f"{atol:g} x {scale:.3g})")


def at_positions(x: Tensor, read: Tensor, pos0: int = 0) -> Tensor:
    """Rows of a window of streams [copies * B, window, d] (starting at pos0) at absolute positions [B, R]
    (positions before pos0 read as pos0) -> [copies * B, R, d]."""
    idx = (read.to(x.device) - pos0).clamp(min=0).repeat(x.shape[0] // read.shape[0], 1)
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def tolerance(dtype: torch.dtype) -> float:
    """Self-check tolerance of the fast runner for a dtype (relative to the largest |logit|)."""
    return {torch.float16: 2e-2, torch.bfloat16: 6e-2}.get(dtype, 1e-3)
