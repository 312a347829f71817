"""Checks of single run options shared by `circuitlab run` and the sweep commands: `ConfigError`, seeds, devices,
backends, memory budgets, positions and percents (each raises a `ConfigError` naming the option and what to do).
"""

from __future__ import annotations

import math

import torch

from circuitlab.patching.engine import BACKENDS


class ConfigError(ValueError):
    """A bad run configuration: the message names the bad input and what to do."""


def check_memory_budget(mb: float) -> None:
    """`--memory-budget`: a finite, positive number of MB."""
    if not math.isfinite(mb) or mb <= 0:
        raise ConfigError(f"--memory-budget must be a finite, positive number of MB (e.g. 2048), got {mb}")



def check_backend(backend: str) -> None:
    """`--backend`: auto (the fast runner where it reproduces the model, else hooks), fast or hook."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r} is unknown: use {', '.join(BACKENDS)} (auto: the fast runner where "
                          "it reproduces the model, else the exact hook backend)")


def check_seed(seed: int) -> None:
    """Seeds feed numpy and torch generators: they must be in [0, 2**32)."""
    if not 0 <= seed < 2**32:
        raise ConfigError(f"--seed must be an integer in [0, 2**32), got {seed}")


def check_device(device: str) -> None:
    """Refuse a device torch cannot parse or this machine does not have (before any model is loaded)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:1 or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA GPU is available on this machine "
                              "(torch.cuda.is_available() is False); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                              "use cuda:0 or --device cpu")
    elif parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif parsed.type != "cpu":
        raise ConfigError(f"--device {device!r}: circuitlab runs on cpu, cuda or mps")


def parse_positions(spec: str, roles: tuple[str, ...] | list[str]) -> str | list[str | int]:
    """`all` / `each` / comma-separated roles or integers -> what `activation_patching(positions=)` takes."""
    text = str(spec).strip()
    if text in ("all", "each"):
        return text
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ConfigError("--positions is empty: use all, each, a role or integer positions")
    out: list[str | int] = []
    for item in items:
        if item.lstrip("-").isdigit():
            out.append(int(item))
        elif item in roles:
            out.append(item)
        else:
            raise ConfigError(f"bad position {item!r}: use all, each, an integer, or a role of this task "
                              f"({', '.join(roles)})")
    return out


def parse_percents(spec: str) -> tuple[float, ...]:
    """`0.1,1,10,100` -> (0.1, 1.0, 10.0, 100.0): increasing percentages in (0, 100]."""
    try:
        values = tuple(float(x) for x in str(spec).split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--percents must be comma-separated numbers, got {spec!r}") from None
    if len(values) < 2 or any(not 0 < v <= 100 for v in values) or list(values) != sorted(set(values)):
        raise ConfigError(f"--percents needs at least two increasing values in (0, 100], got {spec!r}")
    return values


__all__ = ["ConfigError", "check_backend", "check_device", "check_memory_budget", "check_seed",
           "parse_percents", "parse_positions"]
