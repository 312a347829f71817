"""The exact hook backend: the runner interface over the bridge's own forward pass and hook points.

Used where the fast `Runner`'s self-check fails (an architecture it does not reproduce). Every partial run is a
whole bridge forward: the residual stream given to `run` replaces `blocks.{l}.hook_resid_pre` (or
`hook_resid_mid`, or `ln_final.hook_in`) of a forward on placeholder tokens, so everything after it is the
model's own computation, and intervention hooks `(kind, layer)` become hooks on `components.hook_name(kind, layer)`.
It computes every position (no windows) and unembeds through the bridge, so it is exact and slower.

Activation patching (every kind; an edit of `resid_mid` reaches the MLP and the skip connection even where the
bridge aliases `hook_resid_mid` to the MLP norm's input, as TL-native bridges do) and path patching (q, and k/v
per query head under grouped-query attention, by running a key/value group's query heads as batch copies) work.
Edge methods (edge patching, EAP, EAP-IG, ACDC, faithfulness, node masks) run on `patching.hook_edges`.

Every hook this backend edits is first probed on the loaded model (`require_editable`: add fixed noise there, see
the logits move), because some bridges fire a hook after the wrapped module has used the values (TransformerLens
4.3: `attn.hook_pattern` of GPT-J and OPT): an edit there would be discarded and every patched metric would
silently equal the unpatched one. Such an edit is refused with a `DiscardedEditError`.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Union

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.architecture import describe
from circuitlab.patching.components import hook_name
from circuitlab.patching.runner import KVCache, RunState, Runner, at_positions

Hook = Callable[[Tensor], Tensor]
_FINAL = "ln_final.hook_in"


class DiscardedEditError(ValueError):
    """An edit the loaded bridge would discard (the hook fires after its value was used): refused, not run."""


class _Stop(Exception):
    """Raised by a hook once a forward has given what it was run for: the rest (the unembedding) is skipped."""


class HookRunner:
    """The runner interface of `patching.runner.Runner`, computed by the bridge itself (see module docstring)."""

    backend = "hook"
    windowed = False  # every run computes all positions

    def __init__(self, model: TransformerBridge) -> None:
        self.model, self.cfg = model, model.cfg
        self.arch = arch = describe(model)
        self.n_layers, self.n_heads, self.n_kv = arch.n_layers, arch.n_heads, arch.n_kv
        self.d_head, self.d_model = arch.d_head, arch.d_model
        self.group = self.n_heads // self.n_kv
        self.attn_only, self.parallel, self.causal = arch.attn_only, arch.parallel, arch.causal
        self.W_U = model.W_U.detach()
        self.W_E = model.W_E.detach()
        self._editable: dict[str, bool] = {}

    def require_editable(self, name: str) -> None:
        """Refuse an edit at hook `name` that would not reach the logits (probed once per hook, see module doc)."""
        if name not in self._editable:
            self._editable[name] = self._edit_moves_logits(name)
        if not self._editable[name]:
            raise DiscardedEditError(
                f"the hook backend cannot edit {name} on this {self.arch.name or 'model'}: the bridge fires that hook "
                "after the model has used the values, so an edit there changes nothing and every patched metric would "
                "equal the unpatched one. Use the fast backend (`--backend fast`, or `backend='fast'`), which computes "
                "this component itself.")

    def edits(self, hooks: list[tuple[str, Callable]]) -> list[tuple[str, Callable]]:
        """`hooks` (all of which edit), after `require_editable` on each name."""
        for name, _ in hooks:
            self.require_editable(name)
        return hooks

    def _edit_moves_logits(self, name: str) -> bool:
        """Whether adding fixed unit noise at hook `name` changes the logits of a short prompt."""
        tokens = (torch.arange(1, 6, device=self.W_E.device) % self.W_E.shape[0]).unsqueeze(0)
        gen = torch.Generator().manual_seed(0)

        def noise(act: Tensor, hook: Any) -> Tensor:
            return act + torch.randn(act.shape, generator=gen).to(act.device, act.dtype)

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TransformerLens warns about the discarded edit we are probing for
            base = self.model(tokens)
            edited = self._forward(tokens, [(name, noise)])
        return not torch.allclose(base, edited, rtol=1e-4, atol=1e-5)

    # ------------------------------------------------------------------ the runner interface
    def _forward(self, tokens: Tensor, hooks: list[tuple[str, Callable]]) -> Tensor | None:
        """The bridge's forward with hooks; None where a hook stopped it (`_Stop`)."""
        try:
            with self.model.hooks(fwd_hooks=hooks):
                return self.model(tokens)
        except _Stop:
            return None

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
            past: KVCache | None = None, hooks: dict[tuple[str, int], Hook] | None = None,
            state: RunState | None = None, stop_layer: int | None = None, read: Tensor | None = None) -> Tensor:
        """Blocks `start_layer`.. on `resid` by a bridge forward; returns the stream after the last block run (at
        the `read` positions only when given, as `Runner.run` does)."""
        if pos0 != 0:
            raise ValueError("the hook backend runs every position: start windows at position 0")
        stop = self.n_layers if stop_layer is None else stop_layer
        hooks = dict(hooks or {})
        per_query = {key: hooks.pop(key) for key in list(hooks) if key[0] in ("k_q", "v_q") and key[1] >= start_layer}
        if self.group == 1 and self.arch.qk_norm != "full":
            hooks.update({(kind[0], layer): fn for (kind, layer), fn in per_query.items()})
            per_query = {}
        if start_at_mlp:
            fwd = self._mid_hooks(start_layer, lambda act: resid)
        else:
            entry = hook_name("resid_pre", start_layer) if start_layer < self.n_layers else _FINAL
            fwd = self.edits([(entry, lambda act, hook: resid)])
        fwd += self._hooks(hooks, start_layer, start_at_mlp, state)
        got: dict[str, Tensor] = {}
        exit_name = _FINAL if stop >= self.n_layers else hook_name("resid_pre", stop)
        fwd.append((exit_name, _capture(got, "out", stop=True)))
        placeholder = self._placeholder(resid)
        if per_query:
            fwd = self._per_query_head(fwd, per_query, resid.shape[0])
            placeholder = placeholder.repeat(self.group, 1)
        self._forward(placeholder, fwd)
        if state is not None and stop >= self.n_layers:
            state.resid_final = got["out"]
        return got["out"] if read is None else at_positions(got["out"], read)

    def read_site(self, kind: str, layer: int) -> str:
        """The hook where each head's q/k/v is its own: `hook_q`/`hook_k`/`hook_v`, except under a query/key norm
        over all heads (OLMo-2), where it is after the norm (`attn.hook_q_normed`, [batch, pos, heads * d_head]).
        A per-head norm (Qwen3, Gemma-3) acts on each head alone, so before or after it is the same."""
        if kind in ("q", "k") and self.arch.qk_norm == "full":
            name = f"blocks.{layer}.attn.hook_{kind}_normed"
            if name in self.model.hook_dict:
                return name
        return hook_name(kind, layer)

    def _per_query_head(self, fwd: list[tuple[str, Callable]], per_query: dict[tuple[str, int], Hook],
                        batch: int) -> list[tuple[str, Callable]]:
        """Per-query-head key/value edits under grouped-query attention: the forward runs on `group` copies; copy j
        holds, in each key/value head, the (edited) key/value as the group's j-th query head reads it, and at
        `hook_z` each query head's output is taken from its own copy and written into all. Keys/values are seen at
        `read_site` (after any key norm), the values `receiver_values` gives, as the fast runner's `k_q`/`v_q`."""
        group, heads = self.group, torch.arange(self.n_heads, device=self.W_E.device)

        def chunked(fn: Callable) -> Callable:
            return lambda act, hook: torch.cat([fn(part, hook) for part in act.chunk(group)], dim=0)

        def edit(fn: Hook) -> Callable:
            def hook(act: Tensor, hook: Any) -> Tensor:
                a = act.view(group, batch, act.shape[1], self.n_kv, self.d_head)
                per_head = fn(a[0].repeat_interleave(group, dim=2))  # [batch, pos, n_heads, d_head]
                arranged = per_head.view(*per_head.shape[:2], self.n_kv, group, -1).permute(3, 0, 1, 2, 4)
                return arranged.reshape(act.shape)
            return hook

        def merge(act: Tensor, hook: Any) -> Tensor:
            a = act.view(group, batch, act.shape[1], self.n_heads, -1)
            own = a[heads % group, :, :, heads].permute(1, 2, 0, 3)  # [batch, pos, n_heads, d_head]
            return own.unsqueeze(0).expand(group, *own.shape).reshape(act.shape)

        layers = sorted({layer for _, layer in per_query})
        first = self.edits([(hook_name("z", layer), merge) for layer in layers])
        last = self.edits([(self.read_site(kind[0], layer), edit(fn)) for (kind, layer), fn in per_query.items()])
        return first + [(name, chunked(fn)) for name, fn in fwd] + last

    @property
    def mid_is_stream(self) -> bool:
        """Whether an edit at `hook_resid_mid` reaches the residual stream. TL-native bridges alias it to
        `ln2.hook_in`: the edit changes the MLP's input only, the skip connection keeps the old value."""
        if getattr(self, "_mid_is_stream", None) is None:
            got: dict[str, Tensor] = {}
            tokens = (torch.arange(1, 5, device=self.W_E.device) % self.W_E.shape[0]).unsqueeze(0)
            edit = [(hook_name("resid_mid", 0), lambda act, hook: got.setdefault("mid", act + 1.0)),
                    (hook_name("mlp_out", 0), _capture(got, "mlp")), (hook_name("resid_post", 0), _capture(got, "post"))]
            with torch.no_grad():
                self._forward(tokens, edit)
            diff = float((got["post"] - got["mid"] - got["mlp"]).abs().max())
            self._mid_is_stream = diff < 0.5
        return self._mid_is_stream

    def _mid_hooks(self, layer: int, fn: Hook) -> list[tuple[str, Callable]]:
        """Hooks editing resid_mid of `layer` by `fn`, on the MLP's input and on the skip connection alike."""
        self.require_editable(hook_name("resid_mid", layer))
        if self.mid_is_stream:
            return [(hook_name("resid_mid", layer), lambda act, hook: fn(act))]
        changes: list[Tensor] = []  # one per call (several when the batch runs in chunks)

        def mid(act: Tensor, hook: Any) -> Tensor:
            new = fn(act)
            changes.append(new - act)
            return new

        return [(hook_name("resid_mid", layer), mid),
                (hook_name("resid_post", layer), lambda act, hook: act + changes.pop(0))]

    def _hooks(self, hooks: dict[tuple[str, int], Hook], start: int, at_mlp: bool,
               state: RunState | None) -> list[tuple[str, Callable]]:
        out: list[tuple[str, Callable]] = []
        for (kind, layer), fn in hooks.items():  # first, so that later hooks on resid_post see the corrected stream
            if kind == "resid_mid" and layer >= start:
                out += self._mid_hooks(layer, fn)
        hooks = {key: fn for key, fn in hooks.items() if key[0] != "resid_mid"}
        attention_kinds = ("resid_pre", "q", "k", "v", "pattern", "z", "attn_out")
        for (kind, layer), fn in hooks.items():
            if layer < start or (at_mlp and layer == start and kind in attention_kinds):
                continue
            if kind == "q_n":
                if self.arch.qk_norm != "none":
                    raise ValueError("per-head edits of normed queries need the fast runner, which does not "
                                     f"reproduce this model: {self.arch.name}")
                kind = "q"
            if kind in ("k_q", "v_q"):  # full_run: run() takes these
                raise ValueError("per-query-head key/value edits are for partial runs (HookRunner.run)")
            self.require_editable(hook_name(kind, layer))
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
        fwd = self._hooks(hooks or {}, 0, False, state) + [(_FINAL, _capture(got, "out", stop=True))]
        self._forward(tokens, fwd)
        state.resid_final = got["out"]
        return state

    def receiver_values(self, channel: str, layer: int, resid: Tensor) -> Tensor:
        """q (before any query norm; path patching's `q` site), k/v (as read: after any key norm) [batch, pos, heads,
        d_head] of `layer`, computed by the bridge from residual stream `resid`."""
        got: dict[str, Tensor] = {}
        site = hook_name("q", layer) if channel == "q" else self.read_site(channel, layer)  # q: before its norm
        fwd = [(hook_name("resid_pre", layer), lambda act, hook: resid), (site, _capture(got, "x", stop=True))]
        self._forward(self._placeholder(resid), fwd)
        x = got["x"]
        return x.view(*x.shape[:2], -1, self.d_head)

    def logits(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)


def _capture(store: dict, key: str, stop: bool = False) -> Callable:
    def hook(act: Tensor, hook: Any) -> Tensor:
        store[key] = act
        if stop:
            raise _Stop
        return act
    return hook


def _record(store: dict, key: Any) -> Callable:
    def hook(act: Tensor, hook: Any) -> Tensor:
        store[key] = act
        return act
    return hook


ModelRunner = Union[Runner, HookRunner]  # `patching.engine.make_runner`: the fast runner or the hook backend

__all__ = ["DiscardedEditError", "HookRunner", "ModelRunner"]
