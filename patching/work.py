"""Counting the work a computation does: model forwards and backward passes (the cost columns of benchmarks).

`WorkCounter` is a context manager. Inside it, every forward is counted where every forward passes: the fast
runner's `Runner.attend` (each call adds batch x query positions for one layer; partial runs that start late or
at few positions count the fraction they run, and C stacked circuits count C) and, for models given to `watch`,
the bridge's own `forward` (batch x positions x all layers). Backwards are calls of `torch.autograd.backward` /
`torch.autograd.grad` (any batch size). `forwards(unit)` turns token-layers into forwards, one forward being
`unit` token-layers (e.g. every layer once over every discovery prompt). `stage` names where counts go.
On exit the patched functions are restored.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.runner import Runner


class WorkCounter:
    """Token-layers and backward passes per `stage`, counted while the context is open."""

    def __init__(self) -> None:
        self.stage = "all"
        self.token_layers: dict[str, float] = defaultdict(float)
        self.backwards: dict[str, int] = defaultdict(int)
        self.active = True
        self._restore: list[tuple[Any, str, Any]] = []

    def add(self, rows: int) -> None:
        if self.active:
            self.token_layers[self.stage] += rows

    def add_backward(self) -> None:
        if self.active:
            self.backwards[self.stage] += 1

    def forwards(self, unit: float, stage: str | None = None) -> float:
        """Forwards counted (in one stage, or all), one forward being `unit` token-layers."""
        if unit <= 0:
            raise ValueError(f"a forward's unit must be > 0 token-layers, got {unit}")
        total = self.token_layers.get(stage, 0.0) if stage else sum(self.token_layers.values())
        return total / unit

    def backward_count(self, stage: str | None = None) -> int:
        return self.backwards.get(stage, 0) if stage else sum(self.backwards.values())

    def _patch(self, owner: Any, name: str, new: Any) -> None:
        self._restore.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    def watch(self, model: TransformerBridge) -> None:
        """Also count `model`'s own forward calls on token batches (the hook backend, direct calls)."""
        forward = model.forward
        n_layers = int(model.cfg.n_layers)

        def counted_forward(tokens: Any, *args: Any, **kwargs: Any) -> Any:
            if torch.is_tensor(tokens) and tokens.dim() == 2:
                self.add(int(tokens.shape[0]) * int(tokens.shape[1]) * n_layers)
            return forward(tokens, *args, **kwargs)

        self._restore.append((model, "forward", None))  # an instance attribute: deleted on exit
        model.forward = counted_forward

    def __enter__(self) -> WorkCounter:
        attend, backward, grad = Runner.attend, torch.autograd.backward, torch.autograd.grad

        def counted_attend(runner: Runner, layer: int, q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self.add(int(q.shape[0]) * int(q.shape[1]))
            return attend(runner, layer, q, *args, **kwargs)

        def counted_backward(*args: Any, **kwargs: Any) -> Any:
            self.add_backward()
            return backward(*args, **kwargs)

        def counted_grad(*args: Any, **kwargs: Any) -> Any:
            self.add_backward()
            return grad(*args, **kwargs)

        self._patch(Runner, "attend", counted_attend)
        self._patch(torch.autograd, "backward", counted_backward)
        self._patch(torch.autograd, "grad", counted_grad)
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False
        for owner, name, old in reversed(self._restore):
            if old is None:
                owner.__dict__.pop(name, None)
            else:
                setattr(owner, name, old)
        self._restore.clear()


__all__ = ["WorkCounter"]
