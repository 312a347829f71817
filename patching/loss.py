"""Next-token loss at each token index of a batch of sequences, the measurement behind the in-context-learning
score (`tasks.corpus.icl_score`): it runs the model, so it lives with the engine, not with the data.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.training import hooked_forward


def loss_by_position(model: TransformerBridge, tokens: Tensor, *, batch_size: int = 64,
                     fwd_hooks: Sequence[tuple[str, Callable]] = (), fast: bool = True,
                     per_sequence: bool = False) -> Tensor:
    """Mean next-token loss at each token index over the sequences, [seq_len]; entry 0 is NaN.
    (`per_sequence`: every sequence's losses instead, [n, seq_len], for standard errors.)

    Entry t is the loss of predicting token t from tokens 0..t-1 (so "the loss at token 500" is entry 500,
    as in Olsson et al.). Works on any bridge (`model(tokens)` returns logits); `fwd_hooks` run during the
    forward (ablations). With `fast`, attention-only TL-native models run on `patching.training.hooked_forward`
    (fused attention, checked against the bridge's logits first; `hook_z` hooks only); otherwise, and whenever
    that check fails, the bridge's own hooked forward runs.
    """
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, seq ≥ 2], got {tuple(tokens.shape)}")
    rows = []
    forward = hooked_forward(model, fwd_hooks, check=tokens[:2]) if fast else None
    hooks = [] if forward is not None else list(fwd_hooks)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        for start in range(0, tokens.shape[0], batch_size):
            chunk = tokens[start:start + batch_size]
            logits = forward(chunk) if forward is not None else model(chunk)
            logprobs = logits[:, :-1].float().log_softmax(-1)
            nll = -logprobs.gather(-1, chunk[:, 1:, None].to(logprobs.device))[..., 0]
            rows.append(nll.double().cpu())
    out = torch.full((tokens.shape[0], tokens.shape[1]), float("nan"), dtype=torch.float64)
    out[:, 1:] = torch.cat(rows)
    return out if per_sequence else out.mean(0)
