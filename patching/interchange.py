"""Interchange interventions at any site, run on the engine's runners (fast or hook backend).

A `Site` is (component, layer, position[, head]): component `resid_pre`, `resid_mid`, `resid_post`,
`attn_out`, `mlp_out` or `z` (one head's output, with `head`); position a role name, `last` (each prompt's
END) or an index (negative counts from each prompt's own end), resolved per prompt on the base and on the
source side separately. The intervened forward starts at the site's layer from the base run's cached residual
stream, computes only positions from the earliest intervened one (cached keys/values before it) and unembeds
only each base prompt's END, as `patching.activation` does; gradients flow through it for DAS training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from circuitlab.patching.activation import _site_activation, _start
from circuitlab.patching.engine import _gather_logits
from circuitlab.patching.featurizers import Featurizer
from circuitlab.patching.hook_backend import ModelRunner
from circuitlab.patching.prefix import windowed
from circuitlab.patching.runner import KVCache, RunState
from circuitlab.tasks.base import PAD_ID
from circuitlab.tasks.counterfactual import Counterfactuals

SITE_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z")


@dataclass(frozen=True)
class Site:
    """Where an interchange intervention acts: component, layer, position (role, `last` or index), head for z."""

    component: str
    layer: int
    position: str | int
    head: int | None = None

    def __post_init__(self) -> None:
        if self.component not in SITE_KINDS:
            raise ValueError(f"unknown site component {self.component!r}: use one of {', '.join(SITE_KINDS)}")
        if (self.component == "z") != (self.head is not None):
            raise ValueError(f"site {self.component} {'needs' if self.component == 'z' else 'takes no'} a head")

    @property
    def label(self) -> str:
        head = "" if self.head is None else f".h{self.head}"
        return f"{self.component}.L{self.layer}{head}@{self.position}"


def check_site(runner: ModelRunner, site: Site, cf: Counterfactuals) -> None:
    """A ValueError naming the bad part of a site for this model and data."""
    if not 0 <= site.layer < runner.n_layers:
        raise ValueError(f"site {site.label}: layer {site.layer} is out of range (the model has {runner.n_layers})")
    if site.component in ("resid_mid", "mlp_out") and runner.attn_only:
        raise ValueError(f"site {site.label}: {site.component} does not exist in an attention-only model")
    if site.component == "resid_mid" and runner.parallel:
        raise ValueError(f"site {site.label}: resid_mid does not exist in a parallel-block model")
    if site.head is not None and not 0 <= site.head < runner.n_heads:
        raise ValueError(f"site {site.label}: head {site.head} is out of range (the model has {runner.n_heads})")
    if isinstance(site.position, str) and site.position != "last" and site.position not in cf.base_positions:
        raise ValueError(f"site {site.label}: unknown position {site.position!r}; the data has roles "
                         f"{cf.roles} (or use 'last' or an index)")


def positions_of(cf: Counterfactuals, position: str | int, side: str) -> Tensor:
    """Per-prompt positions `[B]` of a role / `last` / index on the `base` or `source` side."""
    tokens, mask, roles = ((cf.base_tokens, cf.base_mask, cf.base_positions) if side == "base"
                           else (cf.source_tokens, cf.source_mask, cf.source_positions))
    lengths = mask.sum(1) if mask is not None else torch.full((tokens.shape[0],), tokens.shape[1])
    if position == "last":
        return roles["END"].long()
    if isinstance(position, str):
        return roles[position].long()
    pos = torch.full_like(lengths, int(position)) if int(position) >= 0 else lengths + int(position)
    if bool((pos < 0).any()) or bool((pos >= lengths).any()):
        raise ValueError(f"position {position} is outside some {side} prompts (lengths {sorted(set(lengths.tolist()))})")
    return pos


@dataclass
class PreparedBatch:
    """One batch of counterfactual pairs with its base and source runs (residual streams, K/V, site activations)."""

    cf: Counterfactuals
    base: RunState
    source: RunState
    base_logits: Tensor  # [B, V] at each base prompt's END, no intervention


def prepare_batch(runner: ModelRunner, cf: Counterfactuals, kinds: Sequence[str] = ()) -> PreparedBatch:
    """Run base and source once (no gradients), recording every layer's activation of `kinds`."""
    if not runner.causal and (cf.base_mask is not None or cf.source_mask is not None):
        raise ValueError("interchange on a bidirectional model needs prompts of one length (no padding)")
    collect = tuple((k, layer) for k in sorted(set(kinds) - {"resid_pre", "resid_mid"}) for layer in range(runner.n_layers))
    device = runner.W_E.device
    with torch.no_grad():
        base = runner.full_run(cf.base_tokens.to(device), collect=collect)
        source = runner.full_run(cf.source_tokens.to(device), collect=collect)
        end = cf.base_positions["END"].to(device)[:, None]
        logits = _gather_logits(runner, base.resid_final, end, 0)[:, 0]
    return PreparedBatch(cf, base, source, logits)


def site_vectors(prep: PreparedBatch, site: Site, side: str) -> Tensor:
    """The site's vectors `[B, d]` on the base or source run (d_head for a head)."""
    state = prep.base if side == "base" else prep.source
    act = _site_activation(state, site.component, site.layer)
    pos = positions_of(prep.cf, site.position, side).to(act.device)
    rows = torch.arange(act.shape[0], device=act.device)
    picked = act[rows, pos]
    return picked[:, site.head] if site.head is not None else picked


def _rows(state: RunState, index: Tensor) -> RunState:
    """The runs of some prompts only (for minibatches)."""
    kv = KVCache({k: v[index] for k, v in state.kv.keys.items()}, {k: v[index] for k, v in state.kv.values.items()})
    return RunState({k: v[index] for k, v in state.resid_pre.items()}, {k: v[index] for k, v in state.resid_mid.items()},
                    kv, {k: v[index] for k, v in state.acts.items()},
                    None if state.resid_final is None else state.resid_final[index])


def select(prep: PreparedBatch, index: Sequence[int]) -> PreparedBatch:
    """The prepared batch restricted to some of its pairs (no new forward)."""
    idx = torch.as_tensor(list(index), dtype=torch.long)
    cf = prep.cf.subset(idx.tolist())
    base, source = _rows(prep.base, idx.to(prep.base_logits.device)), _rows(prep.source, idx.to(prep.base_logits.device))
    return PreparedBatch(cf, base, source, prep.base_logits[idx.to(prep.base_logits.device)])


def intervened_logits(runner: ModelRunner, prep: PreparedBatch, site: Site, featurizer: Featurizer,
                      source: Tensor | None = None) -> Tensor:
    """Logits `[B, V]` at each base prompt's END after swapping the featurized source vector into the base run.

    Differentiable in the featurizer's parameters (run it under `torch.no_grad()` to evaluate)."""
    kind, layer = site.component, site.layer
    src = site_vectors(prep, site, "source") if source is None else source
    pos = positions_of(prep.cf, site.position, "base").to(src.device)
    pos0 = int(pos.min()) if windowed(runner) else 0
    rows = torch.arange(len(pos), device=src.device)
    idx = pos - pos0

    def hook(act: Tensor) -> Tensor:
        out = act.clone()
        if site.head is not None:
            out[rows, idx, site.head] = featurizer(act[rows, idx, site.head], src).to(act.dtype)
        else:
            out[rows, idx] = featurizer(act[rows, idx], src).to(act.dtype)
        return out

    start_layer, at_mlp = _start(runner, kind, layer)
    key = (kind, layer)
    if kind == "resid_post":
        start_layer, key = layer + 1, ("resid_pre", layer + 1)
    base = prep.base
    if kind == "resid_post" and layer == runner.n_layers - 1:
        resid = hook(base.resid_final[:, pos0:])
    else:
        resid0 = (base.resid_mid if at_mlp else base.resid_pre)[start_layer][:, pos0:]
        resid = runner.run(resid0, start_layer=start_layer, start_at_mlp=at_mlp, pos0=pos0, past=base.kv,
                           hooks={key: hook})
    end = prep.cf.base_positions["END"].to(resid.device)[:, None]
    return _gather_logits(runner, resid, end, pos0)[:, 0]


def answer_scores(logits: Tensor, cf: Counterfactuals) -> tuple[Tensor, Tensor]:
    """Per pair: (hit: the top token is an expected token, logit diff: mean expected − mean base-answer logit;
    NaN where the base answer is unknown)."""
    logits = logits.float()
    expected = cf.expected_ids.to(logits.device)
    top = logits.argmax(-1, keepdim=True)
    hit = ((expected == top) & (expected != PAD_ID)).any(-1)

    def mean_logit(ids: Tensor) -> Tensor:
        ids = ids.to(logits.device)
        valid = (ids != PAD_ID).to(logits.dtype)
        picked = logits.gather(-1, ids.clamp(min=0)) * valid
        return picked.sum(-1) / valid.sum(-1).clamp(min=1) + torch.where(valid.sum(-1) > 0, 0.0, float("nan"))

    return hit, mean_logit(expected) - mean_logit(cf.base_answer_ids)


def expected_loss(logits: Tensor, cf: Counterfactuals) -> Tensor:
    """Cross-entropy toward the counterfactual label: −log of the probability mass on the expected token(s)."""
    logp = logits.float().log_softmax(-1)
    expected = cf.expected_ids.to(logits.device)
    picked = logp.gather(-1, expected.clamp(min=0)).masked_fill(expected == PAD_ID, float("-inf"))
    return -torch.logsumexp(picked, -1).mean()


def train_featurizer(runner: ModelRunner, batches: Sequence[PreparedBatch], site: Site, featurizer: Featurizer, *,
                     steps: int, lr: float = 1e-2, penalty: float = 1e-2, seed: int = 0) -> list[float]:
    """Fit a featurizer's parameters by cross-entropy toward the expected token on the given (training) batches.

    One Adam step per batch in turn (`steps` in all, seeded); only the featurizer's parameters change. Returns
    the loss of every step."""
    params = [p for p in featurizer.parameters() if p.requires_grad]
    if not params or steps < 1:
        return []
    torch.manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    featurizer.train()
    sources = [site_vectors(b, site, "source") for b in batches]
    losses = []
    for step in range(steps):
        i = step % len(batches)
        logits = intervened_logits(runner, batches[i], site, featurizer, source=sources[i])
        loss = expected_loss(logits, batches[i].cf)
        total = loss + penalty * featurizer.penalty().to(loss.device)
        grads = torch.autograd.grad(total, params)
        opt.zero_grad()
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        losses.append(float(loss.detach()))
    featurizer.eval()
    return losses
