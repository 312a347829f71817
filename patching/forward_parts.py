"""Pieces of the fast runner's forward pass that depend on the architecture (see `patching.architecture`):
per-layer norms, query/key norms, rotary embeddings, post-norm head shares. The bridge's own modules are called
wherever possible, so the numbers are the model's."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.architecture import Architecture


class UnsupportedModelError(ValueError):
    """The fast engine cannot reproduce this architecture's forward pass exactly."""


def original(module: nn.Module) -> nn.Module:
    return getattr(module, "_original_component", module)


def identity(x: Tensor) -> Tensor:
    return x


def block_norms(model: TransformerBridge, arch: Architecture) -> dict[str, list[Callable[[Tensor], Tensor]]]:
    """Per layer: `ln1` (before attention), `ln2` (before the MLP), `post1`/`post2` (on their outputs)."""
    out: dict[str, list[Callable[[Tensor], Tensor]]] = {"ln1": [], "ln2": [], "post1": [], "post2": []}
    for block in model.blocks:
        children = block._modules
        ln1 = original(children["ln1"]) if "ln1" in children else identity
        out["ln1"].append(ln1)
        if "ln2" in children:
            out["ln2"].append(original(children["ln2"]))
        else:
            out["ln2"].append(ln1 if arch.mlp_shares_attn_norm else identity)
        out["post1"].append(original(children["ln1_post"]) if "ln1_post" in children else identity)
        out["post2"].append(original(children["ln2_post"]) if "ln2_post" in children else identity)
    return out


def qk_norms(model: TransformerBridge, arch: Architecture) -> tuple[list[nn.Module | None], list[nn.Module | None]]:
    """Query and key norm modules per layer (None where the model has none)."""
    if arch.qk_norm == "none":
        return [None] * arch.n_layers, [None] * arch.n_layers
    qs = [original(block.attn._modules["q_norm"]) for block in model.blocks]
    ks = [original(block.attn._modules["k_norm"]) for block in model.blocks]
    return qs, ks


def rms_post_share(norm: nn.Module, total: Tensor, parts: Tensor) -> Tensor:
    """Each part's share [.., n, d] of `norm(total)` for an RMS norm without centring: parts · w / rms(total).

    An RMS norm is linear in its input once its scale is fixed, so the shares of one run add up to the normed
    total exactly (with the scale of that same run)."""
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    ones = torch.ones(total.shape[-1], dtype=torch.float32, device=total.device)
    weight = norm(ones.to(total.dtype)).float() * (1.0 + eps) ** 0.5  # effective weight (Gemma: 1 + w)
    inv = torch.rsqrt(total.float().pow(2).mean(-1, keepdim=True) + eps)
    return (parts.float() * (inv * weight).unsqueeze(-2)).to(parts.dtype)


def make_rope(model: TransformerBridge, arch: Architecture,
              attn_modules: list[nn.Module]) -> Callable[..., tuple[Tensor, Tensor]] | None:
    """A function (q, k, positions, layer) -> rotated (q, k), q/k as [batch, head, pos, d_head]; None without."""
    if arch.positional in ("learned", "none"):
        return None
    if arch.positional == "alibi":
        raise UnsupportedModelError(f"{arch.name}: ALiBi attention biases are not in the fast engine")
    attn = attn_modules[0]
    native_rotary = getattr(attn, "rotary", None)
    if native_rotary is not None and hasattr(native_rotary, "apply_rope"):
        return lambda q, k, pos, layer: native_rotary.apply_rope(q, k, position_ids=pos)
    module = importlib.import_module(type(attn).__module__)
    rotary = None
    for name, candidate in model.original_model.named_modules():
        if name.endswith("rotary_emb"):
            rotary = original(candidate)
            break
    apply = getattr(module, "apply_rotary_pos_emb", None)
    if rotary is None or apply is None:
        raise UnsupportedModelError(f"{arch.name}: cannot find its rotary embedding")
    if hasattr(module, "rotate_every_two"):  # GPT-J: interleaved pairs, partial, [batch, pos, head, d] layout
        return _gptj_rope(rotary, apply, attn, arch)
    per_layer = "layer_type" in inspect.signature(rotary.forward).parameters
    layer_types = getattr(model.original_model.config, "layer_types", None)

    def rope(q: Tensor, k: Tensor, pos: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        if per_layer:
            cos, sin = rotary(q, pos, layer_types[layer])
        else:
            cos, sin = rotary(q, pos)
        return apply(q, k, cos, sin)

    return rope


def _gptj_rope(rotary: Any, apply: Any, attn: Any, arch: Architecture) -> Callable[..., tuple[Tensor, Tensor]]:
    rot = int(getattr(attn, "rotary_dim", None) or arch.d_head)

    def rope(q: Tensor, k: Tensor, pos: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        sin, cos = rotary(q, position_ids=pos)

        def one(x: Tensor) -> Tensor:
            x = x.transpose(1, 2)  # [b, p, h, d]
            x = torch.cat([apply(x[..., :rot], sin, cos), x[..., rot:]], dim=-1)
            return x.transpose(1, 2)

        return one(q), one(k)

    return rope


def mlp_module(block: nn.Module) -> nn.Module:
    """The callable MLP of a block: HF's module, or the bridge's own where HF has none (OPT's fc1/fc2 live in
    the decoder layer, which is what the bridge wraps)."""
    inner = original(block.mlp)
    if not (hasattr(inner, "self_attn") or hasattr(inner, "attn")):
        return inner
    fc1, fc2 = original(block.mlp._modules["in"]), original(block.mlp._modules["out"])
    act = getattr(inner, "activation_fn", None) or getattr(inner, "act", None)
    if act is None:
        raise UnsupportedModelError(f"{type(inner).__name__}: cannot find the MLP's activation function")
    return lambda x: fc2(act(fc1(x)))
