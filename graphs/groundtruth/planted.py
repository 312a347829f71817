"""A trained model with a planted circuit: strict interchange-intervention training (SIIT, as in InterpBench).

Task (`marker`): BOS, random content tokens, a marker token M at a random position i, and a fixed query token
Q at the end; the answer at the last position is the token right after M. High-level causal model:

- P (aligned to head `a0.h{PREV_HEAD}`): for every position p, "the token before p was M";
- R (aligned to head `a1.h{READ_HEAD}`): at the last position, the token at the position flagged by P.

Training loss = task cross-entropy
  + IIT on R: patch R's output from a source run into the base run -> the source's answer;
  + IIT on P: patch P's output (all positions) from a source run -> the base token after the source's marker;
  + SIIT: patch a random non-circuit head (and, separately, all of them) from the source -> the base answer.
So the answer must flow through P and R and the other heads are causally irrelevant to it under resampling,
while all heads are trained and look it. Attention output biases are kept at zero (b_O belongs to no node).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from circuitlab.graphs.groundtruth.builders import Built, _load_full_state
from circuitlab.graphs.groundtruth.taskspec import TaskSpec
from circuitlab.patching.components import head_node
from circuitlab.patching.models import boot_native_model

PLANTED_CFG = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=16, n_ctx=12, attn_only=True,
                   normalization_type=None, positional_embedding_type="standard", seed=0)
PREV_HEAD, READ_HEAD = 2, 1  # the planted circuit: a0.h2 -> a1.h1
BOS, MARKER, QUERY, SEQ_LEN = 0, 1, 2, 10


def planted_task() -> TaskSpec:
    return TaskSpec("marker", "logit_diff", seq_len=SEQ_LEN,
                    params=dict(d_vocab=PLANTED_CFG["d_vocab"], bos=BOS, marker=MARKER, query=QUERY))


def _forward(p: dict[str, Tensor], tokens: Tensor, patch: dict[tuple[int, int], Tensor] | None = None
             ) -> tuple[Tensor, dict[tuple[int, int], Tensor]]:
    """The native model's math (attention-only, no LN, causal) with optional per-head z replacement."""
    cfg = PLANTED_CFG
    H, dh = cfg["n_heads"], cfg["d_head"]
    B, T = tokens.shape
    x = p["embed.weight"][tokens] + p["pos_embed.weight"][:T]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    zs: dict[tuple[int, int], Tensor] = {}
    for layer in range(cfg["n_layers"]):
        pre = f"blocks.{layer}.attn."
        q = (x @ p[pre + "q.weight"].T + p[pre + "q.bias"]).view(B, T, H, dh).transpose(1, 2)
        k = (x @ p[pre + "k.weight"].T + p[pre + "k.bias"]).view(B, T, H, dh).transpose(1, 2)
        v = (x @ p[pre + "v.weight"].T + p[pre + "v.bias"]).view(B, T, H, dh).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(mask, float("-inf"))
        z = (scores.softmax(-1) @ v).transpose(1, 2)  # [B, T, H, dh]
        if patch:
            heads = [patch.get((layer, h)) for h in range(H)]
            if any(t is not None for t in heads):
                z = torch.stack([z[:, :, h] if t is None else t for h, t in enumerate(heads)], 2)
        for h in range(H):
            zs[(layer, h)] = z[:, :, h]
        x = x + z.reshape(B, T, H * dh) @ p[pre + "o.weight"].T + p[pre + "o.bias"]
    return x @ p["unembed.weight"].T + p["unembed.bias"], zs


def _pool(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """n marker sequences (tokens, answer, marker position), from the task generator."""
    batch = planted_task().make_pairs(n // 2, seed=seed)
    tokens = torch.cat([batch.clean, batch.corrupt])
    answers = torch.cat([batch.answer[:, 0], batch.wrong[:, 0]])
    marker_pos = (tokens == MARKER).float().argmax(1)
    return tokens, answers, marker_pos


@torch.enable_grad()  # trains by backpropagation even when called under torch.no_grad()
def train_planted(seed: int = 0, steps: int = 1200, batch: int = 64, lr: float = 3e-3,
                  log: bool = False) -> tuple[dict[str, Tensor], dict[str, object]]:
    """Train the planted-circuit model; returns its state dict and a training summary."""
    torch.manual_seed(seed)
    model = boot_native_model(PLANTED_CFG)
    params = {k: v.detach().clone().float() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    frozen = {k for k in params if k.endswith("o.bias")}
    for k in frozen:
        params[k].zero_()
    trainable = [params[k].requires_grad_() for k in sorted(params) if k not in frozen]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=1e-3)
    tokens, answers, mpos = _pool(24000, seed=10_000 + seed)
    gen = torch.Generator().manual_seed(seed)
    others = [(l, h) for l in range(PLANTED_CFG["n_layers"]) for h in range(PLANTED_CFG["n_heads"])
              if (l, h) not in ((0, PREV_HEAD), (1, READ_HEAD))]
    rows = torch.arange(batch)
    start = time.time()
    for step in range(steps):
        bi = torch.randint(0, len(tokens), (batch,), generator=gen)
        si = torch.randint(0, len(tokens), (batch,), generator=gen)
        base, src = tokens[bi], tokens[si]
        logits, _ = _forward(params, base)
        with torch.no_grad():
            _, src_z = _forward(params, src)
        loss = F.cross_entropy(logits[:, -1], answers[bi])
        # IIT on R: the source's answer.
        out, _ = _forward(params, base, {(1, READ_HEAD): src_z[(1, READ_HEAD)]})
        loss = loss + F.cross_entropy(out[:, -1], answers[si])
        # IIT on P: the base token after the source's marker.
        out, _ = _forward(params, base, {(0, PREV_HEAD): src_z[(0, PREV_HEAD)]})
        loss = loss + F.cross_entropy(out[:, -1], base[rows, mpos[si] + 1])
        # SIIT: one random non-circuit head, then all of them: output must stay the base answer.
        pick = others[int(torch.randint(0, len(others), (1,), generator=gen))]
        out, _ = _forward(params, base, {pick: src_z[pick]})
        loss = loss + F.cross_entropy(out[:, -1], answers[bi])
        out, _ = _forward(params, base, {o: src_z[o] for o in others})
        loss = loss + F.cross_entropy(out[:, -1], answers[bi])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and step % 100 == 0:
            print(f"step {step} loss {float(loss.detach()):.4f} ({time.time() - start:.0f}s)", flush=True)
    state = {k: v.detach().clone() for k, v in params.items()}
    return state, dict(seed=seed, steps=steps, batch=batch, lr=lr, final_loss=float(loss.detach()),
                       train_seconds=round(time.time() - start, 1))


def build_planted(seed: int = 0, steps: int = 1200, log: bool = False) -> Built:
    """Train (CPU, about a minute) and wrap the planted-circuit model."""
    state, summary = train_planted(seed=seed, steps=steps, log=log)
    model = boot_native_model(PLANTED_CFG)
    _load_full_state(model, state)
    construction = (
        f"2-layer attention-only native model (d_model 32, 4 heads of d_head 8, no LN, vocab 16, seed "
        f"{seed}) trained for {steps} AdamW steps (batch 64, lr 3e-3) on the `marker` task with a strict "
        "interchange-intervention objective (SIIT, InterpBench): task cross-entropy + IIT on the reader "
        f"a1.h{READ_HEAD} (patched from a source run -> source answer) + IIT on the flag head a0.h{PREV_HEAD} "
        "(patched from a source -> base token after the source's marker) + SIIT on the other six heads "
        "(patched from a source, singly and jointly -> base answer). Attention output biases fixed at 0. "
        f"Final loss {summary['final_loss']:.4f}, {summary['train_seconds']} s on one CPU thread.")
    return Built("planted_marker", model, planted_task(),
                 description="Marker retrieval: at the last position (query token 2), predict the token right "
                             "after the unique marker token 1.",
                 construction=construction,
                 distractors=[head_node(l, h) for l in range(2) for h in range(4)
                              if (l, h) not in ((0, PREV_HEAD), (1, READ_HEAD))],
                 true_nodes={"input", f"a0.h{PREV_HEAD}", f"a1.h{READ_HEAD}", "logits"},
                 extra=dict(training=summary))
