"""Builders of the ground-truth models, each from scratch and deterministic.

- `build_induction_handwired()`: analytic weights (previous-token head + induction head + active distractors).
- `build_tracr(name)`: converts a Tracr export (`tracr_export.npz/json`, made by `tracr_export.py` in a
  separate JAX venv) into a TL-native model, adding one active distractor head per layer.
- `build_planted(...)` lives in `planted.py` (training with an interchange-intervention objective).

Each builder returns a `Built`: the model plus the task spec and what the card needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.graphs.groundtruth.taskspec import TaskSpec
from circuitlab.patching.components import head_node
from circuitlab.patching.models import boot_native_model

MODELS_DIR = Path(__file__).resolve().parent / "models"


@dataclass
class Built:
    """A freshly built ground-truth model and its metadata (written out by `build.py`)."""

    name: str
    model: TransformerBridge  # TransformerBridge
    task: TaskSpec
    description: str
    construction: str
    distractors: list[str] = field(default_factory=list)
    true_nodes: set[str] | None = None  # None: derive structurally from the weights
    true_edges: set[str] | None = None
    extra: dict[str, object] = field(default_factory=dict)


def _load_full_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load a state dict that must set every parameter of the bridge."""
    current = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(current[k].shape):
            raise ValueError(f"{k}: shape {tuple(v.shape)} != model's {tuple(current[k].shape)}")
    model.load_state_dict({k: v.to(current[k].dtype) for k, v in state.items()}, strict=False)


def _zeros_like_model(model: Any) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in model.state_dict().items() if torch.is_tensor(v)}


# ------------------------------------------------------------------ hand-wired induction

INDUCTION_CFG = dict(n_layers=2, d_model=80, n_heads=3, d_head=16, d_vocab=16, n_ctx=16, attn_only=True,
                     normalization_type=None, positional_embedding_type="standard", seed=0)
_TOK, _POS, _PREV, _OUT, _SCR = 0, 16, 32, 48, 64  # residual subspaces, 16 dims each
_SHARP = 120.0  # query gain: a matching key scores 120 / sqrt(16) = 30, others 0 (leak < 1e-12)
_LOGIT = 10.0  # the induction head writes 10 * onehot(answer) into the OUT subspace


def build_induction_handwired() -> Built:
    """2-layer attention-only model with analytic weights; see the card for the construction."""
    model = boot_native_model(INDUCTION_CFG)
    sd = _zeros_like_model(model)
    V, n_ctx, dh = INDUCTION_CFG["d_vocab"], INDUCTION_CFG["n_ctx"], INDUCTION_CFG["d_head"]
    eye = torch.eye(16)
    sd["embed.weight"][:, _TOK:_TOK + V] = torch.eye(V)
    sd["pos_embed.weight"][:, _POS:_POS + n_ctx] = torch.eye(n_ctx)
    sd["unembed.weight"][:, _OUT:_OUT + V] = torch.eye(V)  # logits read only the OUT subspace

    def head(layer: int, h: int, q: torch.Tensor | None = None, k: torch.Tensor | None = None,
             v: torch.Tensor | None = None, o: torch.Tensor | None = None) -> None:
        """Set a head's maps as [d_head, d_model] (q/k/v) and [d_model, d_head] (o) blocks."""
        rows = slice(h * dh, (h + 1) * dh)
        for name, mat in (("q", q), ("k", k), ("v", v)):
            if mat is not None:
                sd[f"blocks.{layer}.attn.{name}.weight"][rows] = mat
        if o is not None:
            sd[f"blocks.{layer}.attn.o.weight"][:, rows] = o

    def read(offset: int, gain: float = 1.0, shift: int = 0) -> torch.Tensor:
        """[d_head, d_model]: head dim i+shift reads residual dim offset+i."""
        m = torch.zeros(dh, INDUCTION_CFG["d_model"])
        for i in range(16):
            if 0 <= i + shift < dh:
                m[i + shift, offset + i] = gain
        return m

    def write(offset: int, gain: float = 1.0) -> torch.Tensor:
        m = torch.zeros(INDUCTION_CFG["d_model"], dh)
        m[offset:offset + 16, :16] = gain * eye
        return m

    # a0.h0 previous-token head: query pos p matches key pos p-1; copies that token into PREV.
    head(0, 0, q=read(_POS, _SHARP), k=read(_POS, 1.0, shift=1), v=read(_TOK), o=write(_PREV))
    # a0.h1 distractor: duplicate-token head (attends to equal tokens), copies positions into SCR.
    head(0, 1, q=read(_TOK, _SHARP), k=read(_TOK), v=read(_POS), o=write(_SCR))
    # a0.h2 distractor: uniform attention over the prefix, averages tokens into SCR.
    head(0, 2, v=read(_TOK), o=write(_SCR, 0.5))
    # a1.h0 induction head: query = current token, key = PREV (K-composition), value = token -> OUT.
    head(1, 0, q=read(_TOK, _SHARP), k=read(_PREV), v=read(_TOK), o=write(_OUT, _LOGIT))
    # a1.h1 distractor: query from SCR (distractor outputs), key from PREV, value SCR -> SCR.
    head(1, 1, q=read(_SCR, 4.0), k=read(_PREV), v=read(_SCR), o=write(_SCR))
    # a1.h2 distractor: a shadow induction head (same pattern as a1.h0) that writes into SCR.
    head(1, 2, q=read(_TOK, _SHARP), k=read(_PREV), v=read(_TOK), o=write(_SCR))
    _load_full_state(model, sd)
    task = TaskSpec("induction", "logit_diff", seq_len=12, params=dict(d_vocab=V, bos=0))
    construction = (
        "Residual stream of 80 dims = five 16-dim subspaces: TOK (one-hot token, from W_E), POS (one-hot "
        "position, from W_pos), PREV (written by the previous-token head), OUT (read by W_U, written only by "
        "the induction head) and SCR (scratch, written and read only by distractors; W_U ignores it). All "
        "biases are zero. Attention is sharpened with a query gain of 120 (score 30 on a match, 0 otherwise).\n"
        "- a0.h0 previous-token head: Q reads POS(p), K reads POS(j) shifted by one, so position p attends to "
        "p-1; V reads TOK; O writes PREV. Position 0 (BOS) attends to itself.\n"
        "- a1.h0 induction head: Q reads TOK of the current token A, K reads PREV (K-composition with a0.h0), "
        "so it attends to the position after the earlier A; V reads TOK (the token B there); O writes "
        "10*onehot(B) into OUT; W_U reads OUT, so logit[B] = 10.\n"
        "- Distractors (active: sharp or uniform attention, non-zero outputs), all writing only into SCR: "
        "a0.h1 duplicate-token head (V = positions), a0.h2 uniform head (V = tokens), a1.h1 (reads SCR and "
        "PREV), a1.h2 a shadow induction head with exactly the induction pattern. Nothing on a path to the "
        "logits reads SCR, so they provably cannot change the output.")
    return Built("induction_handwired", model, task,
                 description="Induction: at the last position (token A, seen once before as `A B`), predict B.",
                 construction=construction, distractors=["a0.h1", "a0.h2", "a1.h1", "a1.h2"])


# ------------------------------------------------------------------ Tracr conversion

TRACR_SCRATCH = 4  # residual dims appended for the distractor heads


def build_tracr(name: str, models_dir: Path = MODELS_DIR) -> Built:
    """Convert the committed Tracr export of `name` into a TL-native model plus one distractor head per layer.

    Tracr layer i (attention then MLP) becomes block i; Tracr's single head per layer is head 0 and the
    added distractor is head 1: its Q/K read the token one-hots, its V reads the position one-hots (and,
    from layer 1 on, the scratch dims), its O writes only into `TRACR_SCRATCH` new residual dims that no
    Tracr component and not W_U reads.
    """
    folder = models_dir / name
    meta_path, npz_path = folder / "tracr_export.json", folder / "tracr_export.npz"
    if not meta_path.is_file() or not npz_path.is_file():
        raise FileNotFoundError(f"{folder} has no Tracr export: run graphs/groundtruth/tracr_export.py {name} "
                                "in a venv with tracr-pypi (see the module docstring)")
    meta = json.loads(meta_path.read_text())
    arr = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in np.load(npz_path).items()}
    labels: list[str] = meta["residual_labels"]
    D, L, H, ks, mlp = len(labels), meta["num_layers"], meta["num_heads"], meta["key_size"], meta["mlp_hidden_size"]
    d_model = D + TRACR_SCRATCH
    scr = list(range(D, d_model))
    out_name = meta["output_name"]
    if meta["categorical"]:
        out_enc: dict[str, int] = meta["output_encoding"]
        d_vocab_out = len(out_enc)
    else:
        d_vocab_out = 1
    cfg = dict(n_layers=L, d_model=d_model, n_heads=H + 1, d_head=ks, d_mlp=mlp,
               d_vocab=len(meta["input_encoding"]), d_vocab_out=d_vocab_out, n_ctx=meta["max_seq_len"] + 1,
               act_fn="relu", attn_only=False, normalization_type=None, positional_embedding_type="standard",
               attention_dir="causal" if meta["causal"] else "bidirectional", seed=0)
    model = boot_native_model(cfg)
    sd = {k: v.to(torch.float64) for k, v in _zeros_like_model(model).items()}
    sd["embed.weight"][:, :D] = arr["token_embed/embeddings"]
    sd["pos_embed.weight"][:, :D] = arr["pos_embed/embeddings"]
    if meta["categorical"]:
        for value, idx in out_enc.items():
            sd["unembed.weight"][idx, labels.index(f"{out_name}:{value}")] = 1.0
    else:
        sd["unembed.weight"][0, labels.index(out_name)] = 1.0
    tok_dims = [i for i, lab in enumerate(labels) if lab.startswith("tokens:")]
    pos_dims = [i for i, lab in enumerate(labels) if lab.startswith("indices:")]
    for layer in range(L):
        pre = f"transformer/layer_{layer}"
        hk = H * ks
        for tl, tr in (("q", "query"), ("k", "key"), ("v", "value")):
            sd[f"blocks.{layer}.attn.{tl}.weight"][:hk, :D] = arr[f"{pre}/attn/{tr}/w"].T
            sd[f"blocks.{layer}.attn.{tl}.bias"][:hk] = arr[f"{pre}/attn/{tr}/b"]
        sd[f"blocks.{layer}.attn.o.weight"][:D, :hk] = arr[f"{pre}/attn/linear/w"].T
        sd[f"blocks.{layer}.attn.o.bias"][:D] = arr[f"{pre}/attn/linear/b"]
        sd[f"blocks.{layer}.mlp.in.weight"][:, :D] = arr[f"{pre}/mlp/linear_1/w"].T
        sd[f"blocks.{layer}.mlp.in.bias"][:] = arr[f"{pre}/mlp/linear_1/b"]
        sd[f"blocks.{layer}.mlp.out.weight"][:D, :] = arr[f"{pre}/mlp/linear_2/w"].T
        sd[f"blocks.{layer}.mlp.out.bias"][:D] = arr[f"{pre}/mlp/linear_2/b"]
        # Distractor head H: duplicate-token attention over positions, writing only into scratch.
        base = H * ks
        for i, dim in enumerate(tok_dims):
            sd[f"blocks.{layer}.attn.q.weight"][base + i % ks, dim] = 10.0
            sd[f"blocks.{layer}.attn.k.weight"][base + i % ks, dim] = 1.0
        for i, dim in enumerate(pos_dims):
            sd[f"blocks.{layer}.attn.v.weight"][base + i % ks, dim] = 1.0 + 0.5 * i
        if layer > 0:
            for i, dim in enumerate(scr):
                sd[f"blocks.{layer}.attn.v.weight"][base + i % ks, dim] += 1.0
        for i in range(ks):
            sd[f"blocks.{layer}.attn.o.weight"][scr[i % TRACR_SCRATCH], base + i] = 1.0
    if any(float(sd[f"blocks.{layer}.attn.o.bias"].abs().max()) > 0 for layer in range(L)):
        raise ValueError(f"{name}: Tracr attention output bias is non-zero; b_O belongs to no node")
    _load_full_state(model, {k: v.float() for k, v in sd.items()})
    if meta["categorical"]:
        vocab = meta["vocab"]
        # Inputs one token shorter than max_seq_len: at full length the length sub-circuit is not needed
        # (its zero-ablated output decodes to the maximal length), so it would not be a true component.
        task = TaskSpec("reverse", "logit_diff", seq_len=meta["max_seq_len"],
                        params=dict(bos=meta["input_encoding"][meta["bos"]],
                                    token_ids=[meta["input_encoding"][t] for t in vocab],
                                    output_ids=[out_enc[t] for t in vocab], vocab=vocab))
    else:
        task = TaskSpec("frac_prevs", "regression", seq_len=meta["max_seq_len"] + 1,
                        params=dict(bos=meta["input_encoding"][meta["bos"]],
                                    token_ids=[meta["input_encoding"][t] for t in meta["vocab"]],
                                    target_id=meta["input_encoding"]["x"], vocab=meta["vocab"]), tol=0.02)
    construction = (
        f"Compiled with Tracr ({meta['tracr_version']}, JAX) from the RASP program `{meta['description']}` "
        f"(vocab {meta['vocab']}, max_seq_len {meta['max_seq_len']}, causal={meta['causal']}), exported by "
        "`graphs/groundtruth/tracr_export.py` in a separate venv and converted by `builders.build_tracr`: "
        f"Tracr layer i (attention, then MLP) -> block i; Tracr's head -> head 0; residual dims 0..{D - 1} are "
        f"Tracr's labelled basis (see tracr_export.json), dims {D}..{d_model - 1} are scratch. Layer norm off, "
        "relu MLPs, attention scale 1/sqrt(d_head) as in Tracr, "
        f"{'causal' if meta['causal'] else 'bidirectional'} attention, W_U = projection onto the output SOp's "
        "dims. Added per layer: distractor head h1 (Q/K read the token one-hots with gain 10 -> "
        "duplicate-token attention; V reads positions and scratch; O writes only the scratch dims, which "
        "neither Tracr's components nor W_U read). Empty Tracr heads/MLPs (all-zero weights) are left as they are.")
    return Built(name, model, task, description=meta["description"], construction=construction,
                 distractors=[head_node(layer, H) for layer in range(L)],
                 extra=dict(ref_tokens=arr["ref_tokens"].long(), ref_final_resid=arr["ref_final_resid"],
                            tracr_dims=D))
