"""The exact hook backend: the runner interface over the bridge's own forward pass and hook points.

Used where the fast `Runner`'s self-check fails (an architecture it does not reproduce). Every partial run is a
whole bridge forward: the residual stream given to `run` replaces `blocks.{l}.hook_resid_pre` (or
`hook_resid_mid`, or `ln_final.hook_in`) of a forward on placeholder tokens, so everything after it is the
model's own computation, and intervention hooks `(kind, layer)` become hooks on `components.hook_name(kind, layer)`.
It computes every position (no windows) and unembeds through the bridge, so it is exact and slower.

Activation patching (every kind), path patching (q; k/v without grouped-query attention) and everything built
on them work. Edge methods need per-receiver inputs, which the bridge's hooks do not expose; they say so.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from circuitlab.patching.architecture import describe
from circuitlab.patching.components import hook_name
from circuitlab.patching.runner import RunState

Hook = Callable[[Tensor], Tensor]
_FINAL = "ln_final.hook_in"


class HookRunner:
    """The runner interface of `patching.runner.Runner`, computed by the bridge itself (see module docstring)."""

    backend = "hook"
    windowed = False  # every run computes all positions

    def __init__(self, model: Any) -> None:
        self.model, self.cfg = model, model.cfg
        self.arch = arch = describe(model)
        self.n_layers, self.n_heads, self.n_kv = arch.n_layers, arch.n_heads, arch.n_kv
        self.d_head, self.d_model = arch.d_head, arch.d_model
        self.group = self.n_heads // self.n_kv
        self.attn_only, self.parallel, self.causal = arch.attn_only, arch.parallel, arch.causal
        self.W_U = model.W_U.detach()
        self.W_E = model.W_E.detach()

    # ------------------------------------------------------------------ the runner interface
    def _forward(self, tokens: Tensor, hooks: list[tuple[str, Callable]]) -> Tensor:
        with self.model.hooks(fwd_hooks=hooks):
            return self.model(tokens)

    def _placeholder(self, resid: Tensor) -> Tensor:
        return torch.zeros(resid.shape[:2], dtype=torch.long, device=resid.device)

    def embed(self, tokens: Tensor) -> Tensor:
        """The residual stream entering block 0, as the bridge computes it."""
        got: dict[str, Tensor] = {}
        with torch.no_grad():
            self._forward(tokens, [(hook_name("resid_pre", 0), _capture(got, "x"))])
        return got["x"]

    def unembed(self, resid: Tensor) -> Tensor:
        """Logits from final residual vectors [..., d_model] through the bridge's final norm and unembedding."""
        flat = resid.reshape(-1, resid.shape[-2] if resid.dim() > 2 else 1, resid.shape[-1])
        logits = self._forward(self._placeholder(flat), [(_FINAL, lambda act, hook: flat)])
        return logits.reshape(*resid.shape[:-1], logits.shape[-1])

    def run(self, resid: Tensor, *, start_layer: int = 0, start_at_mlp: bool = False, pos0: int = 0,
            past: Any = None, hooks: dict[tuple[str, int], Hook] | None = None, state: RunState | None = None,
            stop_layer: int | None = None) -> Tensor:
        """Blocks `start_layer`.. on `resid` by a bridge forward; returns the stream after the last block run."""
        if pos0 != 0:
            raise ValueError("the hook backend runs every position: start windows at position 0")
        stop = self.n_layers if stop_layer is None else stop_layer
        if start_at_mlp:
            entry = hook_name("resid_mid", start_layer)
        else:
            entry = hook_name("resid_pre", start_layer) if start_layer < self.n_layers else _FINAL
        fwd: list[tuple[str, Callable]] = [(entry, lambda act, hook: resid)]
        fwd += self._hooks(hooks or {}, start_layer, start_at_mlp, state)
        got: dict[str, Tensor] = {}
        exit_name = _FINAL if stop >= self.n_layers else hook_name("resid_pre", stop)
        fwd.append((exit_name, _capture(got, "out")))
        self._forward(self._placeholder(resid), fwd)
        if state is not None and stop >= self.n_layers:
            state.resid_final = got["out"]
        return got["out"]

    def _hooks(self, hooks: dict[tuple[str, int], Hook], start: int, at_mlp: bool,
               state: RunState | None) -> list[tuple[str, Callable]]:
        out: list[tuple[str, Callable]] = []
        attention_kinds = ("resid_pre", "q", "k", "v", "pattern", "z", "attn_out")
        for (kind, layer), fn in hooks.items():
            if layer < start or (at_mlp and layer == start and kind in attention_kinds):
                continue
            if kind == "q_n":
                if self.arch.qk_norm != "none":
                    raise ValueError("per-head edits of normed queries need the fast runner, which does not "
                                     f"reproduce this model: {self.arch.name}")
                kind = "q"
            if kind in ("k_q", "v_q"):
                if self.group != 1:
                    raise ValueError("per-query-head key/value edits on grouped-query attention need the fast "
                                     f"runner, which does not reproduce this model: {self.arch.name}")
                kind = kind[0]
            out.append((hook_name(kind, layer), lambda act, hook, fn=fn: fn(act)))
        if state is not None:
            for layer in range(start, self.n_layers):
                out.append((hook_name("resid_pre", layer), _record(state.resid_pre, layer)))
                if not (self.parallel or self.attn_only):
                    out.append((hook_name("resid_mid", layer), _record(state.resid_mid, layer)))
            for key in list(state.acts):
                if key[1] >= start:
                    out.append((hook_name(*key), _record(state.acts, key)))
        return out

    def full_run(self, tokens: Tensor, *, collect: tuple[tuple[str, int], ...] = (),
                 hooks: dict[tuple[str, int], Hook] | None = None) -> RunState:
        """A whole forward pass recording residual streams and the `collect` sites."""
        state = RunState()
        for key in collect:
            state.acts[key] = torch.empty(0)
        got: dict[str, Tensor] = {}
        fwd = self._hooks(hooks or {}, 0, False, state) + [(_FINAL, _capture(got, "out"))]
        self._forward(tokens, fwd)
        state.resid_final = got["out"]
        return state

    def receiver_values(self, channel: str, layer: int, resid: Tensor) -> Tensor:
        """q/k/v [batch, pos, heads, d_head] of `layer` computed by the bridge from residual stream `resid`."""
        got: dict[str, Tensor] = {}
        fwd = [(hook_name("resid_pre", layer), lambda act, hook: resid), (hook_name(channel, layer), _capture(got, "x"))]
        self._forward(self._placeholder(resid), fwd)
        return got["x"]

    def logits(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)


def _capture(store: dict, key: str) -> Callable:
    def hook(act: Tensor, hook: Any) -> Tensor:
        store[key] = act
        return act
    return hook


def _record(store: dict, key: Any) -> Callable:
    def hook(act: Tensor, hook: Any) -> Tensor:
        store[key] = act
        return act
    return hook


__all__ = ["HookRunner"]
