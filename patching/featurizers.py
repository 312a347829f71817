"""Featurizers: which part of a site's vector an interchange intervention swaps.

Every featurizer maps (base vector, source vector) `[N, d]` to the intervened vector `[N, d]`:
- `full`: the whole source vector (the ceiling of any featurizer at that site);
- `neurons`: the source's values on a fixed set of coordinates; `mask` (MIB's DBM): a learned mask over
  coordinates (sigmoid while training, thresholded at 0.5 for evaluation);
- `subspace`: a fixed k-dimensional subspace with orthonormal rows R `[k, d]`: h' = h_b + Rᵀ R (h_s − h_b), which is
  Rᵀ[(R h_s)_{:k}; (R h_b)_{k:}] for any orthogonal completion of R. PCA (top-k components of training
  activations) and the random-rotation control are subspaces;
- `das`: a learned orthogonal rotation (`torch.nn.utils.parametrizations.orthogonal`), its first k rows swapped;
- `boundless`: Boundless DAS, a learned rotation and a learned boundary: coordinate i is swapped with weight
  sigmoid((b − i)/τ) while training, and iff i < round(b) for evaluation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

FEATURIZERS = ("full", "neurons", "mask", "pca", "das", "boundless", "random")
TRAINED = ("mask", "das", "boundless")


class Featurizer(nn.Module, ABC):
    """Base class: `forward(base, source)` gives the intervened vectors; `dims` how many dimensions it swaps;
    `penalty` the sparsity term a trained featurizer adds to its loss (zero for the others)."""

    name = ""

    @abstractmethod
    def dims(self) -> int:
        """How many dimensions the intervention swaps."""

    def penalty(self) -> Tensor:
        return torch.zeros(())

    def rotation(self) -> Tensor | None:
        """The rows spanning the swapped subspace `[k, d]` (None where the featurizer is not a subspace)."""
        return None


class FullVector(Featurizer):
    name = "full"

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        return source

    def dims(self) -> int:
        return self.d


class Neurons(Featurizer):
    """Swap the coordinates in `index` (a fixed neuron subset)."""

    name = "neurons"

    def __init__(self, d: int, index: Tensor) -> None:
        super().__init__()
        mask = torch.zeros(d, dtype=torch.bool)
        mask[index.long()] = True
        self.register_buffer("mask", mask)

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        return torch.where(self.mask.to(base.device), source, base)

    def dims(self) -> int:
        return int(self.mask.sum())


class NeuronMask(Featurizer):
    """A learned mask over coordinates (DBM): soft while training, hard (> 0.5) in eval mode."""

    name = "mask"

    def __init__(self, d: int, temperature: float = 0.1) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(d))
        self.temperature = temperature

    def weights(self) -> Tensor:
        if self.training:
            return torch.sigmoid(self.logits / self.temperature)
        return (self.logits > 0).to(self.logits.dtype)

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        w = self.weights().to(base.device, base.dtype)
        return base + w * (source - base)

    def penalty(self) -> Tensor:
        return torch.sigmoid(self.logits / self.temperature).mean()

    def dims(self) -> int:
        return int((self.logits > 0).sum())


class Subspace(Featurizer):
    """A fixed subspace with orthonormal rows `[k, d]` (PCA, random rotation, a given rotation)."""

    def __init__(self, rows: Tensor, name: str = "subspace") -> None:
        super().__init__()
        self.register_buffer("rows", rows.detach().clone())
        self.name = name

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        r = self.rows.to(base.device, base.dtype)
        return base + ((source - base) @ r.T) @ r

    def dims(self) -> int:
        return int(self.rows.shape[0])

    def rotation(self) -> Tensor:
        return self.rows


class DAS(Featurizer):
    """A learned orthogonal rotation `[d, d]`; its first k rows span the swapped subspace."""

    name = "das"

    def __init__(self, d: int, k: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 1 <= k <= d:
            raise ValueError(f"DAS needs 1 <= k <= d = {d}, got k = {k}")
        self.k = k
        lin = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            lin.weight.copy_(random_rotation(d, d, generator=generator))
        self.rotate = orthogonal(lin)

    def matrix(self) -> Tensor:
        return self.rotate.weight

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        r = self.matrix()[:self.k].to(base.dtype)
        return base + ((source - base) @ r.T) @ r

    def dims(self) -> int:
        return self.k

    def rotation(self) -> Tensor:
        return self.matrix()[:self.k].detach()


class BoundlessDAS(DAS):
    """DAS with a learned boundary b: coordinate i of the rotated space swaps with weight sigmoid((b − i)/τ)."""

    name = "boundless"

    def __init__(self, d: int, *, init: float | None = None, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(d, d, generator=generator)
        self.boundary = nn.Parameter(torch.tensor(float(init if init is not None else d / 2)))
        self.temperature = temperature
        self.register_buffer("index", torch.arange(d, dtype=torch.float32))

    def weights(self) -> Tensor:
        if self.training:
            return torch.sigmoid((self.boundary - self.index) / self.temperature)
        return (self.index < torch.round(self.boundary)).to(self.index.dtype)

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        r = self.matrix().to(base.dtype)
        w = self.weights().to(base.device, base.dtype)
        return base + (((source - base) @ r.T) * w) @ r

    def penalty(self) -> Tensor:
        return self.boundary / self.index.numel()

    def dims(self) -> int:
        return int((self.index < torch.round(self.boundary.detach())).sum())

    def rotation(self) -> Tensor:
        return self.matrix()[:self.dims()].detach()


def random_rotation(k: int, d: int, *, generator: torch.Generator | None = None) -> Tensor:
    """k orthonormal rows `[k, d]` drawn uniformly (QR of a Gaussian matrix, sign-fixed), seeded by `generator`."""
    g = torch.randn(d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.T[:k].to(torch.float32).contiguous()


def pca_rows(vectors: Tensor, k: int) -> Tensor:
    """The top-k principal directions `[k, d]` of vectors `[N, d]` (centred), as orthonormal rows."""
    x = vectors.detach().double()
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=True)
    if k > vh.shape[0]:
        raise ValueError(f"PCA with k = {k} needs k <= d = {vh.shape[0]}")
    return vh[:k].to(torch.float32).contiguous()
