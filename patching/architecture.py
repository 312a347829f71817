"""What a model's forward pass is made of, derived once from the bridge: read by the fast runner and the graph.

`describe(model)` inspects the bridge's modules, its config and the wrapped Hugging Face config, and probes one
short forward for what only the numbers tell (embedding scale, learned-position offset). The fast runner builds
its forward pass from this description, and `patching.topology.ComputationalGraph` its topology (parallel blocks,
attention-only), so graph topology is never re-derived elsewhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge


def _original(module: Any) -> Any:
    return getattr(module, "_original_component", module)


def _child(module: Any, name: str) -> Any:
    try:
        return module._modules.get(name) if hasattr(module, "_modules") else None
    except Exception:
        return None


@dataclass(frozen=True)
class Architecture:
    """A model's forward pass in words circuitlab acts on (see the module docstring)."""

    name: str
    n_layers: int
    n_heads: int
    n_kv: int
    d_head: int
    d_model: int
    attn_only: bool
    parallel: bool  # attention and MLP both read resid_pre (GPT-J, GPT-NeoX)
    causal: bool
    norm: str  # LN | RMS | none
    pre_attn_norm: bool
    post_attn_norm: bool  # a norm on the attention output before it joins the stream (Gemma-2/3, OLMo-2)
    pre_mlp_norm: bool
    post_mlp_norm: bool
    mlp_shares_attn_norm: bool  # GPT-J: the MLP reads the attention's input norm
    qk_norm: str  # none | head (per head, Qwen3/Gemma-3) | full (over all heads, OLMo-2)
    embed_scale: float
    positional: str  # learned | rotary | partial_rotary | alibi | none
    pos_offset: int  # learned positions: row of position 0 (OPT: 2)
    rotary_dim: int | None
    attn_softcap: float | None
    logit_softcap: float | None
    sliding_window: tuple[int | None, ...]  # per layer; None = full attention
    attn_bias: bool
    mlp_bias: bool
    moe: bool
    hf_model_type: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _hf_config(model: Any) -> Any:
    original = getattr(model, "original_model", None)
    return getattr(original, "config", None)


def _positional(cfg: Any, hf: Any, d_head: int) -> tuple[str, int | None]:
    kind = (getattr(cfg, "positional_embedding_type", None) or "standard").lower()
    if kind == "standard":
        return "learned", None
    if kind == "alibi":
        return "alibi", None
    if kind != "rotary":
        return kind, None
    rotary_dim = getattr(cfg, "rotary_dim", None)
    pct = getattr(hf, "rotary_pct", None) or getattr(hf, "partial_rotary_factor", None)
    if rotary_dim is None and pct is not None and float(pct) < 1.0:
        rotary_dim = int(d_head * float(pct))
    if rotary_dim is not None and int(rotary_dim) < d_head:
        return "partial_rotary", int(rotary_dim)
    return "rotary", d_head


def _sliding(hf: Any, n_layers: int) -> tuple[int | None, ...]:
    window = getattr(hf, "sliding_window", None) if hf is not None else None
    types = getattr(hf, "layer_types", None) if hf is not None else None
    if not window:
        return (None,) * n_layers
    if types is not None and len(types) == n_layers:
        return tuple(int(window) if "sliding" in str(t) else None for t in types)
    if getattr(hf, "use_sliding_window", True) is False:
        return (None,) * n_layers
    return (int(window),) * n_layers


def _probe_embedding(model: Any) -> tuple[float, int]:
    """(embedding scale, learned-position offset) from one short forward: resid_pre of block 0 vs W_E (+W_pos)."""
    vocab = int(model.W_E.shape[0])
    tokens = (torch.arange(3, 9, device=model.W_E.device) % vocab).unsqueeze(0)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == "blocks.0.hook_resid_pre")
    resid = cache["blocks.0.hook_resid_pre"][0].float()
    emb = model.W_E.detach()[tokens[0]].float()
    pos_rows = None
    try:
        pos_rows = model.W_pos.detach().float()
    except (AttributeError, RuntimeError, ValueError):
        pass
    best = (float("inf"), 1.0, 0)
    for offset in ((0, 1, 2) if pos_rows is not None else (None,)):
        pos = 0.0 if offset is None else pos_rows[offset:offset + tokens.shape[1]]
        if offset is not None and pos.shape[0] < tokens.shape[1]:
            continue
        target = resid - pos
        scale = float((target * emb).sum() / (emb * emb).sum().clamp_min(1e-30))
        err = float((target - scale * emb).abs().max())
        if err < best[0]:
            best = (err, scale, offset or 0)
    scale = best[1]
    return (1.0 if abs(scale - 1.0) < 1e-4 else scale), best[2]


def describe(model: TransformerBridge) -> Architecture:
    """The architecture of a bridge (see the module docstring)."""
    cfg, hf = model.cfg, _hf_config(model)
    n_heads, d_head = int(cfg.n_heads), int(cfg.d_head)
    block = model.blocks[0]
    attn = block.attn
    attn_only = bool(getattr(cfg, "attn_only", False))
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
    has = {name: _child(block, name) is not None for name in ("ln1", "ln2", "ln1_post", "ln2_post")}
    q_norm = _child(attn, "q_norm")
    qk = "none"
    if q_norm is not None:
        weight = getattr(_original(q_norm), "weight", None)
        qk = "full" if weight is not None and weight.numel() == n_heads * d_head else "head"
    positional, rotary_dim = _positional(cfg, hf, d_head)
    scale, offset = _probe_embedding(model)
    mlp = _original(block.mlp) if not attn_only else None
    moe = mlp is not None and any(hasattr(mlp, a) for a in ("experts", "router", "num_experts"))
    soft_attn = float(getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0)
    soft_logit = float(getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0)
    return Architecture(
        name=str(getattr(cfg, "architecture", "")), n_layers=int(cfg.n_layers), n_heads=n_heads,
        n_kv=int(getattr(cfg, "n_key_value_heads", None) or n_heads), d_head=d_head, d_model=int(cfg.d_model),
        attn_only=attn_only, parallel=parallel,
        causal=(getattr(cfg, "attention_dir", "causal") or "causal") == "causal",
        norm=str(getattr(cfg, "normalization_type", None) or "none"),
        pre_attn_norm=has["ln1"], post_attn_norm=has["ln1_post"], pre_mlp_norm=has["ln2"],
        post_mlp_norm=has["ln2_post"], mlp_shares_attn_norm=parallel and has["ln1"] and not has["ln2"],
        qk_norm=qk, embed_scale=scale, positional=positional, pos_offset=offset, rotary_dim=rotary_dim,
        attn_softcap=soft_attn if soft_attn > 0 else None, logit_softcap=soft_logit if soft_logit > 0 else None,
        sliding_window=_sliding(hf, int(cfg.n_layers)),
        attn_bias=bool(getattr(hf, "attention_bias", getattr(hf, "bias", False))) if hf is not None else True,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)) if hf is not None else True,
        moe=bool(moe), hf_model_type=str(getattr(hf, "model_type", "") or "native"))


__all__ = ["Architecture", "describe"]
