"""The one vocabulary of circuitlab: component kinds, their TransformerLens hook names, graph node/edge names.

Every other module names things through this one. Component kinds (what can be patched):

| kind        | hook (per layer)                 | activation shape           | indexed by            |
|-------------|----------------------------------|----------------------------|-----------------------|
| resid_pre   | blocks.{l}.hook_resid_pre        | [batch, pos, d_model]      | layer, position       |
| resid_mid   | blocks.{l}.hook_resid_mid        | [batch, pos, d_model]      | layer, position       |
| resid_post  | blocks.{l}.hook_resid_post       | [batch, pos, d_model]      | layer, position       |
| attn_out    | blocks.{l}.hook_attn_out         | [batch, pos, d_model]      | layer, position       |
| mlp_out     | blocks.{l}.hook_mlp_out          | [batch, pos, d_model]      | layer, position       |
| z (= head)  | blocks.{l}.attn.hook_z           | [batch, pos, head, d_head] | layer, head, position |
| q           | blocks.{l}.attn.hook_q           | [batch, pos, head, d_head] | layer, head, position |
| k, v        | blocks.{l}.attn.hook_k / hook_v  | [batch, pos, kv_head, d]   | layer, kv head, pos.  |
| pattern     | blocks.{l}.attn.hook_pattern     | [batch, head, dest, src]   | layer, head, dest pos |

q/k/v are taken before rotary embeddings, as TransformerLens caches them. With grouped-query attention
(SmolLM2: 9 query, 3 key/value heads) k and v are indexed by key/value head.

Graph names follow ACDC / EAP-IG / MIB: nodes `input`, `a{l}.h{h}`, `m{l}`, `logits`; edges
`a0.h1->a5.h5<q>` (attention readers split into `<q>`, `<k>`, `<v>`), `a0.h1->m3`, `m3->logits`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from transformer_lens.model_bridge import TransformerBridge
from typing import Any

RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")
BLOCK_OUT_KINDS = ("attn_out", "mlp_out")
HEAD_KINDS = ("z", "q", "k", "v", "pattern")
KV_KINDS = ("k", "v")
COMPONENT_KINDS = RESID_KINDS + BLOCK_OUT_KINDS + HEAD_KINDS
ALIASES = {"head": "z", "attn_head": "z", "attn": "attn_out", "mlp": "mlp_out", "resid": "resid_pre"}

_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "z": "blocks.{layer}.attn.hook_z",
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
    "pattern": "blocks.{layer}.attn.hook_pattern",
}
EMBED_HOOK = "hook_embed"


def canonical_kind(kind: str) -> str:
    """Resolve a user-facing component name (`head`, `attn`, `mlp`, …) to its kind; error on unknown names."""
    key = kind.strip().lower()
    key = ALIASES.get(key, key)
    if key not in _HOOKS:
        known = ", ".join(list(COMPONENT_KINDS) + list(ALIASES))
        raise ValueError(f"unknown component {kind!r}: use one of {known}")
    return key


def hook_name(kind: str, layer: int) -> str:
    """The TransformerLens hook name of a component kind at a layer (`hook_name('z', 3)`)."""
    return _HOOKS[canonical_kind(kind)].format(layer=layer)


def required_hooks(n_layers: int) -> list[str]:
    """Hooks every model must expose for the engine and its reference checks."""
    return [EMBED_HOOK] + [hook_name(k, layer) for layer in (0, n_layers - 1) for k in COMPONENT_KINDS]


def check_required_hooks(model: TransformerBridge, name: str) -> None:
    """Raise a clear error if a loaded bridge lacks a hook the engine relies on."""
    available = set(model.hook_dict.keys()) | set(getattr(model, "hook_aliases", {}).keys())
    attn_only = bool(getattr(model.cfg, "attn_only", False))
    parallel = bool(getattr(model.cfg, "parallel_attn_mlp", False))
    missing = []
    for hook in required_hooks(model.cfg.n_layers):
        if attn_only and ("mlp" in hook or "resid_mid" in hook):
            continue
        if parallel and "resid_mid" in hook:  # parallel blocks (GPT-J, GPT-NeoX) have no stream between halves
            continue
        if hook not in available and not _alias_resolves(model, hook):
            missing.append(hook)
    if missing:
        raise ValueError(f"model {name!r} lacks hooks circuitlab needs: {', '.join(missing)}. "
                         "It may be an architecture the TransformerLens bridge does not map fully.")


def _alias_resolves(model: Any, hook: str) -> bool:
    try:
        return model.get_hook_point(hook) is not None
    except Exception:
        return False


# ---------------------------------------------------------------- graph names

@dataclass(frozen=True)
class Node:
    """A node of the computational graph: `input`, a head `a{l}.h{h}`, an MLP `m{l}`, or `logits`."""

    kind: str  # "input" | "head" | "mlp" | "logits"
    layer: int | None = None
    head: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "head":
            return f"a{self.layer}.h{self.head}"
        if self.kind == "mlp":
            return f"m{self.layer}"
        return self.kind


_NODE_RE = re.compile(r"^(?:a(\d+)\.h(\d+)|m(\d+)|input|logits)$")
_EDGE_RE = re.compile(r"^(?P<src>[^-<>]+)->(?P<dst>[^-<>]+?)(?:<(?P<ch>[qkv])>)?$")


def head_node(layer: int, head: int) -> str:
    return f"a{layer}.h{head}"


def mlp_node(layer: int) -> str:
    return f"m{layer}"


def parse_node(name: str) -> Node:
    """Parse `input`, `a3.h5`, `m7`, `logits`; raise ValueError naming the bad string otherwise."""
    match = _NODE_RE.match(name.strip())
    if not match:
        raise ValueError(f"unknown node name {name!r}: expected 'input', 'a{{layer}}.h{{head}}', 'm{{layer}}' or 'logits'")
    if match.group(1) is not None:
        return Node("head", int(match.group(1)), int(match.group(2)))
    if match.group(3) is not None:
        return Node("mlp", int(match.group(3)))
    return Node(name.strip())


def node_kind(name: str) -> str:
    """`input`, `head`, `mlp` or `logits`: the kind of a node name (`parse_node`)."""
    return parse_node(name).kind


def edge_name(src: str, dst: str, channel: str | None = None) -> str:
    """`a0.h1->a5.h5<q>` for attention readers (channel q/k/v), `a0.h1->m3` otherwise."""
    return f"{src}->{dst}<{channel}>" if channel in ("q", "k", "v") else f"{src}->{dst}"


def parse_edge(name: str) -> tuple[str, str, str]:
    """Split an edge name into (src, dst, channel) with channel in q/k/v/resid."""
    match = _EDGE_RE.match(name.strip())
    if not match:
        raise ValueError(f"unknown edge name {name!r}: expected 'SRC->DST' or 'SRC->DST<q|k|v>'")
    src, dst = parse_node(match.group("src")).name, parse_node(match.group("dst")).name
    return src, dst, match.group("ch") or "resid"
