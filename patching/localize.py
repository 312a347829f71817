"""Where is a causal variable represented? Interchange-intervention accuracy (IIA) over sites and featurizers.

`localize(model, "ioi", "io")` draws counterfactual pairs from the task's causal model (or takes a
`Counterfactuals`), splits them into train and test pairs (seeded; `test_fraction`), and at every site measures,
per featurizer and dimension count, on both splits:
- `iia`: the fraction of pairs whose intervened top token is an expected token, with a 95 % bootstrap interval
  (`patching.stats`, resampling pairs);
- `graded`: mean(LD_int − LD_none) / (2 · mean|LD_none|), LD = mean expected logit − mean base-answer logit:
  0 = the intervention changed nothing, 1 = the base run's margin for its own answer is fully reversed.
Trained featurizers (DAS, Boundless DAS, DBM mask) and PCA are fitted on the train pairs only. Controls in every
result: `full` at every site (the ceiling), `random` (a random rotation with the same k, beside every subspace
featurizer) and `none` (no intervention: how often the base run already says the expected token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.engine import make_runner
from circuitlab.patching.featurizers import (DAS, TRAINED, BoundlessDAS, Featurizer, FullVector,
                                             NeuronMask, Neurons, Subspace, pca_rows, random_rotation)
from circuitlab.patching.hook_backend import ModelRunner
from circuitlab.patching.interchange import (PreparedBatch, Site, answer_scores, check_site, intervened_logits,
                                             prepare_batch, site_vectors, train_featurizer)
from circuitlab.patching.stats import bootstrap_ci
from circuitlab.tasks.causal import causal_model
from circuitlab.tasks.counterfactual import Counterfactuals

KNOWN = ("full", "neurons", "mask", "pca", "das", "boundless")
RESULT_COLUMNS = ["component", "layer", "head", "position", "featurizer", "dims", "split", "iia", "iia_low",
                  "iia_high", "graded", "n"]


@dataclass(frozen=True)
class LocalizeConfig:
    """How a localisation sweep runs (see the module docstring); `top_sites` limits trained featurizers to the
    sites with the best full-vector IIA on the train pairs (None: every site)."""

    featurizers: tuple[str, ...] = ("full", "das")
    dims: tuple[int, ...] = (16,)
    steps: int = 30
    lr: float = 0.05
    test_fraction: float = 0.5
    seed: int = 0
    memory_budget_mb: float = 2048.0
    top_sites: int | None = None
    n_boot: int = 1000
    progress: bool = False

    def __post_init__(self) -> None:
        bad = [f for f in self.featurizers if f not in KNOWN]
        if bad:
            raise ValueError(f"unknown featurizer(s) {bad}: use {', '.join(KNOWN)}")
        if not self.dims or any(int(k) < 1 for k in self.dims):
            raise ValueError(f"dims must be positive integers, got {self.dims}")
        if self.steps < 0 or not 0 < self.test_fraction < 1:
            raise ValueError("steps must be >= 0 and test_fraction in (0, 1)")


@dataclass(frozen=True)
class IIARow:
    """One measured (site, featurizer, dims, split)."""

    component: str
    layer: int
    head: int
    position: str
    featurizer: str
    dims: int
    split: str
    iia: float
    iia_low: float
    iia_high: float
    graded: float
    n: int


@dataclass
class LocalizeResult:
    """Every IIA row, the counterfactual pairs used (with their split), learned/fitted rotations and losses."""

    task: str
    variable: str
    rows: list[IIARow]
    counterfactuals: Counterfactuals
    rotations: dict[str, Tensor] = field(default_factory=dict)
    losses: dict[str, list[float]] = field(default_factory=dict)
    config: LocalizeConfig = field(default_factory=LocalizeConfig)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(r) for r in self.rows], columns=RESULT_COLUMNS)

    def best(self, featurizer: str = "das", split: str = "test") -> IIARow:
        """The row with the highest IIA for a featurizer and split (ties: higher graded)."""
        rows = [r for r in self.rows if r.featurizer == featurizer and r.split == split]
        if not rows:
            raise ValueError(f"no {featurizer!r} rows on the {split} split")
        return max(rows, key=lambda r: (r.iia, r.graded))


def default_sites(runner: ModelRunner, cf: Counterfactuals, components: Sequence[str] = ("resid_pre",),
                  layers: Sequence[int] | None = None, positions: Sequence[str | int] | None = None) -> list[Site]:
    """Every (component, layer, position[, head]) asked for: default residual stream at every layer and role."""
    layers = list(range(runner.n_layers)) if layers is None else list(layers)
    positions = cf.roles if positions is None else list(positions)
    sites = []
    for component in components:
        for layer in layers:
            for position in positions:
                heads = range(runner.n_heads) if component == "z" else [None]
                sites.extend(Site(component, layer, position, head) for head in heads)
    for site in sites:
        check_site(runner, site, cf)
    return sites


def _batches(runner: Any, cf: Counterfactuals, kinds: Sequence[str], budget_mb: float) -> list[PreparedBatch]:
    seq = max(int(cf.base_tokens.shape[1]), int(cf.source_tokens.shape[1]))
    per_layer = 4 * runner.d_model + 4 * runner.n_kv * runner.d_head + len(kinds) * runner.d_model
    per_pair = 4.0 * seq * runner.n_layers * per_layer * 2 * 3  # base + source, slack for training activations
    size = max(1, int(budget_mb * 2**20 // per_pair))
    return [prepare_batch(runner, cf.subset(range(i, min(i + size, len(cf)))), kinds) for i in range(0, len(cf), size)]


def _scores(runner: Any, batches: Sequence[PreparedBatch], site: Site | None, feat: Featurizer | None) -> tuple[np.ndarray, np.ndarray]:
    hits, lds = [], []
    with torch.no_grad():
        for b in batches:
            logits = b.base_logits if site is None else intervened_logits(runner, b, site, feat)
            hit, ld = answer_scores(logits, b.cf)
            hits.append(hit.cpu().numpy()), lds.append(ld.cpu().numpy())
    return np.concatenate(hits).astype(float), np.concatenate(lds).astype(float)


class _Sweep:
    """The state of one sweep: runner, train/test batches, no-intervention scores, rows so far."""

    def __init__(self, runner: Any, cf: Counterfactuals, kinds: Sequence[str], config: LocalizeConfig) -> None:
        self.runner, self.config = runner, config
        self.parts = {s: _batches(runner, cf.part(s), kinds, config.memory_budget_mb) for s in ("train", "test")}
        self.none = {s: _scores(runner, b, None, None) for s, b in self.parts.items()}
        self.rows: list[IIARow] = []
        self.rotations: dict[str, Tensor] = {}
        self.losses: dict[str, list[float]] = {}

    def measure(self, site: Site | None, feat: Featurizer | None, name: str, dims: int) -> float:
        """Add train and test rows for one featurizer at one site; returns the train IIA."""
        train_iia = 0.0
        for split, batches in self.parts.items():
            hit, ld = _scores(self.runner, batches, site, feat)
            ld0 = self.none[split][1]
            ok = np.isfinite(ld) & np.isfinite(ld0)
            denom = 2.0 * np.abs(ld0[ok]).mean() if ok.any() else float("nan")
            graded = float((ld[ok] - ld0[ok]).mean() / denom) if ok.any() and denom > 0 else float("nan")
            low, high = bootstrap_ci(hit, n_boot=self.config.n_boot, seed=self.config.seed)
            self.rows.append(IIARow("none" if site is None else site.component, -1 if site is None else site.layer,
                                    -1 if site is None or site.head is None else site.head,
                                    "" if site is None else str(site.position), name, dims, split, float(hit.mean()),
                                    low, high, graded, len(hit)))
            if split == "train":
                train_iia = float(hit.mean())
        return train_iia

    def train_vectors(self, site: Site) -> tuple[Tensor, Tensor]:
        base = torch.cat([site_vectors(b, site, "base") for b in self.parts["train"]])
        source = torch.cat([site_vectors(b, site, "source") for b in self.parts["train"]])
        return base.float().cpu(), source.float().cpu()

    def featurizer(self, site: Site, kind: str, k: int, d: int) -> Featurizer:
        """A featurizer fitted/trained on the train pairs (seeded by the sweep's seed)."""
        gen = torch.Generator().manual_seed(self.config.seed)
        torch.manual_seed(self.config.seed)
        if kind == "full":
            return FullVector(d)
        if kind == "pca":
            base, source = self.train_vectors(site)
            return Subspace(pca_rows(torch.cat([base, source]), k), name="pca")
        if kind == "neurons":  # the k coordinates where source and base differ most on the train pairs
            base, source = self.train_vectors(site)
            return Neurons(d, (source - base).pow(2).mean(0).topk(k).indices)
        feat: Featurizer = {"das": lambda: DAS(d, k, generator=gen), "boundless": lambda: BoundlessDAS(d, generator=gen),
                            "mask": lambda: NeuronMask(d)}[kind]()
        device = self.runner.W_E.device
        feat = feat.to(device)
        self.losses[f"{site.label}/{kind}{k}"] = train_featurizer(
            self.runner, self.parts["train"], site, feat, steps=self.config.steps, lr=self.config.lr, seed=self.config.seed)
        return feat


def localize(model: TransformerBridge, task: str | Counterfactuals, variable: str | None = None, *,
             sites: Sequence[Site] | None = None,
             featurizer: str | Sequence[str] | None = None, n: int = 64, config: LocalizeConfig | None = None,
             runner: ModelRunner | None = None) -> LocalizeResult:
    """IIA of `variable` at each site per featurizer (see the module docstring); returns a `LocalizeResult`.

    `task`: a built-in task name (its causal model makes `n` pairs) or a `Counterfactuals` (e.g. from
    `tasks.counterfactual.read_counterfactuals`). `sites`: default residual stream at every layer and role."""
    config = config or LocalizeConfig()
    if featurizer is not None:
        names = (featurizer,) if isinstance(featurizer, str) else tuple(featurizer)
        config = LocalizeConfig(**{**{f.name: getattr(config, f.name) for f in fields(config)}, "featurizers": names})
    if isinstance(task, Counterfactuals):
        cf = task
        if variable is not None and variable != cf.variable:
            raise ValueError(f"the counterfactual pairs are for variable {cf.variable!r}, not {variable!r}")
    else:
        if variable is None:
            raise ValueError(f"name the variable to localise: task {task!r} has {sorted(causal_model(task).variables)}")
        cf = causal_model(task).counterfactuals(model, variable, n, seed=config.seed)
    if not cf.split:
        cf = cf.with_split(config.test_fraction, seed=config.seed)
    if runner is None:
        runner, _, _ = make_runner(model)
    sites = list(sites) if sites is not None else default_sites(runner, cf)
    for site in sites:
        check_site(runner, site, cf)
    sweep = _Sweep(runner, cf, sorted({s.component for s in sites}), config)
    sweep.measure(None, None, "none", 0)
    say = print if config.progress else (lambda *a, **k: None)
    ceiling = {}
    for site in sites:  # the full vector everywhere: the ceiling, and the ranking for top_sites
        d = runner.d_head if site.head is not None else runner.d_model
        ceiling[site] = sweep.measure(site, FullVector(d), "full", d)
        say(f"full vector {site.label}: train IIA {ceiling[site]:.2f}", flush=True)
    ranked = sorted(sites, key=lambda s: -ceiling[s])
    trained_at = set(ranked[:config.top_sites] if config.top_sites is not None else ranked)
    controls: set[tuple[Site, int]] = set()  # one random-rotation control per site and k
    for i, site in enumerate(sites):
        d = runner.d_head if site.head is not None else runner.d_model
        for kind in config.featurizers:
            if kind == "full" or (kind in TRAINED and site not in trained_at):
                continue
            for k in ([0] if kind in ("boundless", "mask") else [k for k in config.dims if k <= d]):
                feat = sweep.featurizer(site, kind, k, d)
                dims = feat.dims()
                sweep.measure(site, feat, kind, dims)
                rows = feat.rotation()
                if rows is not None:
                    sweep.rotations[f"{site.label}/{kind}{k or ''}"] = rows.detach().cpu().contiguous()
                if kind in ("das", "pca", "boundless") and 0 < dims < d and (site, dims) not in controls:
                    controls.add((site, dims))
                    gen = torch.Generator().manual_seed(config.seed + 1)
                    sweep.measure(site, Subspace(random_rotation(dims, d, generator=gen), name="random"), "random", dims)
        if site in trained_at or any(k not in TRAINED + ("full",) for k in config.featurizers):
            say(f"[{i + 1}/{len(sites)}] {site.label}: featurizers measured", flush=True)
    return LocalizeResult(cf.task, cf.variable, sweep.rows, cf, sweep.rotations, sweep.losses, config)
