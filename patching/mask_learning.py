"""Learning circuits by optimising faithfulness directly: hard-concrete masks over nodes or edges.

Edge Pruning (Bhaskar et al. 2024, arXiv 2406.16778) learns a mask per edge through the exact masked forward
pass; the same works over nodes (heads, MLPs). Each item i has a parameter log_alpha_i; a hard-concrete
sample (Louizos et al. 2018) z_i = clamp(sigmoid((log u - log(1-u) + log_alpha_i) / beta) * (zeta - gamma)
+ gamma, 0, 1) is 0 or 1 with positive probability and differentiable in between. The loss is

    mean over prompts of ((m_z(x) - m_clean(x)) / (m_clean - m_corrupt))^2  +  lambda * E[#kept]

where m_z is the task metric of the circuit z computed exactly (`node_masks.node_masked_metric` or
`edge_masks.edge_masked_metric`: every item outside the circuit takes its corrupted-run value) and
E[#kept] = sum_i P(z_i != 0) is the expected L0 norm: each kept item costs lambda, whatever the graph's size (an
item stays when dropping it would cost more than that in squared normalized error). lambda ramps up linearly over the first half of training
(`warmup`), so masks first learn what matters, then shed what does not.

The result is a ranking (log_alpha) and a deterministic mask (log_alpha > 0); `graphs.selection` turns the
ranking into the smallest circuit whose exact faithfulness reaches a target.

Against overfitting the discovery prompts (SmolLM2 IOI edge pruning: 0.80 on discovery, 0.38 held-out), training
can start from an attribution ranking (`init`: initial log_alpha per item, e.g. +init for EAP-IG's top edges and
-init for the rest) and stop early: every `check_every` steps a `monitor` (built by the caller on validation
prompts, `graphs.faithful`) scores the current deterministic mask, lower is better; the best-scoring log_alpha is
returned, and training stops after `patience` checks without improvement.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from circuitlab.patching.context_subset import subset_context
from circuitlab.patching.edge_masks import edge_masked_metric
from circuitlab.patching.edges import EdgeContext
from circuitlab.patching.node_masks import node_masked_metric
from circuitlab.patching.normalize import checked_gap, normalize_difference
from circuitlab.patching.reproducible import pinned_threads

LEVELS = ("node", "edge")


@dataclass(frozen=True)
class MaskConfig:
    """How masks are learned. `level` node (heads, plus MLPs unless `heads_only`) or edge (every edge).

    `sparsity` is lambda, the loss cost of one kept item; `steps` optimisation steps of Adam at `lr`; `init` the initial log_alpha (positive:
    start from the full model); `beta`, `gamma`, `zeta` the hard-concrete temperature and stretch;
    `batch_size` prompts drawn (seeded) for each step (None: all prompts every step).
    """

    level: str = "node"
    heads_only: bool = True
    steps: int = 200
    lr: float = 0.1
    sparsity: float = 0.02
    warmup: float = 0.5
    init: float = 3.0
    beta: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1
    seed: int = 0
    batch_size: int | None = None
    check_every: int = 10  # steps between monitor checks (early stopping; only with a monitor)
    patience: int = 3  # checks without improvement before stopping

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"mask level {self.level!r} is unknown: use one of {LEVELS}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.sparsity < 0:
            raise ValueError(f"sparsity must be >= 0, got {self.sparsity}")
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"warmup must be in [0, 1], got {self.warmup}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size}")
        if self.check_every < 1 or self.patience < 1:
            raise ValueError(f"check_every and patience must be >= 1, got {self.check_every}, {self.patience}")
        if not (self.gamma < 0.0 and self.zeta > 1.0 and self.beta > 0.0):
            raise ValueError("hard-concrete needs gamma < 0 < 1 < zeta and beta > 0")


@dataclass
class MaskResult:
    """Learned masks: item names, log_alpha, P(kept), the deterministic circuit, the training history."""

    level: str
    items: list[str]
    log_alpha: Tensor
    keep_probability: Tensor
    kept: Tensor  # bool [n_items]: log_alpha > 0
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    best_step: int | None = None  # with a monitor: the step whose masks were kept

    @property
    def circuit(self) -> list[str]:
        return [name for name, k in zip(self.items, self.kept.tolist()) if k]


def sample_hard_concrete(log_alpha: Tensor, cfg: MaskConfig, generator: torch.Generator) -> Tensor:
    """One stretched, clamped hard-concrete sample per entry (0 and 1 have positive probability)."""
    u = torch.rand(log_alpha.shape, generator=generator).clamp(1e-6, 1.0 - 1e-6).to(log_alpha)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / cfg.beta)
    return (s * (cfg.zeta - cfg.gamma) + cfg.gamma).clamp(0.0, 1.0)


def keep_probability(log_alpha: Tensor, cfg: MaskConfig) -> Tensor:
    """P(z != 0) of each hard-concrete gate: the expected L0 norm's terms."""
    return torch.sigmoid(log_alpha - cfg.beta * math.log(-cfg.gamma / cfg.zeta))


def _node_setup(ctx: EdgeContext, cfg: MaskConfig) -> tuple[list[int], Callable[[EdgeContext, Tensor], Tensor]]:
    g = ctx.graph
    learn = g.senders_of(*(("head",) if cfg.heads_only else ("head", "mlp")))
    base = torch.ones(g.n_senders)
    idx = torch.tensor(learn, dtype=torch.long)

    def metric(sub: EdgeContext, z: Tensor) -> Tensor:
        full = base.clone().unsqueeze(0).repeat(z.shape[0], 1)
        full = full.index_put((torch.arange(z.shape[0])[:, None], idx[None, :]), z)
        return node_masked_metric(sub, full)

    return learn, metric


def _edge_setup() -> Callable[[EdgeContext, Tensor], Tensor]:
    return edge_masked_metric


def learn_masks(ctx: EdgeContext, config: MaskConfig | None = None, *, progress: bool = False,
                log: Callable[[str], None] | None = None, init: Tensor | None = None,
                monitor: Callable[[Tensor], float] | None = None) -> MaskResult:
    """Optimise hard-concrete masks over nodes or edges of `ctx` (see the module docstring). `init`: initial
    log_alpha per item (default `config.init` everywhere); `monitor(log_alpha) -> loss` for early stopping."""
    cfg = config or MaskConfig()
    g = ctx.graph
    if cfg.level == "node":
        learn, metric = _node_setup(ctx, cfg)
        items = [g.sender_names[i] for i in learn]
    else:
        metric = _edge_setup()
        items = list(g.edge_names)
    n = len(items)
    if n == 0:
        raise ValueError("nothing to mask: the model has no heads/MLPs (or edges) to learn")
    n_prompts = int(ctx.clean_values.shape[0])
    gap = float(checked_gap(ctx.clean_metric, ctx.corrupt_metric))
    generator = torch.Generator().manual_seed(cfg.seed)
    if init is not None and tuple(init.shape) != (n,):
        raise ValueError(f"init has shape {tuple(init.shape)}; the masks have {n} items")
    start = torch.full((n,), float(cfg.init)) if init is None else init.detach().float().clone()
    log_alpha = start.requires_grad_(True)
    best: tuple[float, int, Tensor] | None = None
    stale = 0
    optimiser = torch.optim.Adam([log_alpha], lr=cfg.lr)
    history: list[dict[str, float]] = []
    started = time.time()
    iterator: Any = range(cfg.steps)
    if progress:
        iterator = tqdm(iterator, desc=f"{cfg.level} masks", unit="step", disable=None)  # a bar on a terminal only
    ramp = max(1, int(cfg.warmup * cfg.steps))
    # the caller's thread count (a run pins and records it), with deterministic kernels on CPU: same seed, same masks
    on_cpu = ctx.clean_values.device.type == "cpu"
    with torch.enable_grad(), pinned_threads(torch.get_num_threads(), deterministic=on_cpu):
        for step in iterator:
            z = sample_hard_concrete(log_alpha, cfg, generator).unsqueeze(0)
            sub = ctx
            if cfg.batch_size is not None and cfg.batch_size < n_prompts:
                rows = torch.randperm(n_prompts, generator=generator)[: cfg.batch_size]
                sub = subset_context(ctx, rows)
            values = metric(sub, z)[0]
            faith_loss = (normalize_difference(values - sub.clean_values, gap) ** 2).mean()
            expected = keep_probability(log_alpha, cfg).sum()
            lam = cfg.sparsity * min(1.0, (step + 1) / ramp)
            loss = faith_loss + lam * expected
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                log_alpha.clamp_(-10.0, 10.0)
            f = float(normalize_difference(values.detach().mean() - sub.corrupt_values.mean(), gap))
            history.append({"step": step, "loss": float(loss.detach()), "faithfulness_sample": f,
                            "expected_size": float(expected.detach()), "lambda": lam})
            if log is not None and (step % 25 == 0 or step == cfg.steps - 1):
                log(f"  step {step}: loss {float(loss.detach()):.4f}, sampled faithfulness {f:.3f}, "
                    f"expected size {float(expected.detach()):.1f}/{n}")
            if monitor is not None and ((step + 1) % cfg.check_every == 0 or step == cfg.steps - 1):
                score = float(monitor(log_alpha.detach().clone()))
                history[-1]["monitor"] = score
                if log is not None:
                    log(f"  step {step}: validation check {score:.4f}, {int((log_alpha > 0).sum())} gates open")
                if best is None or score < best[0]:
                    best, stale = (score, step, log_alpha.detach().clone()), 0
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        break
    final = log_alpha.detach().clone() if best is None else best[2]
    return MaskResult(cfg.level, items, final, keep_probability(final, cfg), final > 0, history,
                      time.time() - started, None if best is None else best[1])


__all__ = ["LEVELS", "MaskConfig", "MaskResult", "learn_masks", "sample_hard_concrete", "keep_probability"]
