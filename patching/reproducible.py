"""Torch threads: pinned threads and deterministic kernels for training and mask learning, and the thread count a
run chooses from the cores free when it starts (recorded in its run.json).

Why: a CPU reduction (matmul, attention backward) sums in an order that depends on how many threads split it,
so the same seeded training gives different weights at 1 and 2 threads, and after thousands of steps a
different phase-change window (issue 26: 1650–1950 at torch's default 2 threads vs 1500–1800 at 1). A
study that takes its thread count from the machine ("every core", `OMP_NUM_THREADS`) is therefore not
reproducible; one that pins it is, bit for bit, whatever the machine's load.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

DEFAULT_THREADS = 1  # fixed, never "what is free": the numbers depend on it (on 2 cores also the fastest)


def check_threads(threads: int) -> int:
    """`threads` as an int ≥ 1, or a ValueError naming the value."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer ≥ 1 (the torch thread count the numbers are reproducible at), "
                         f"got {threads!r}")
    return threads


@contextmanager
def pinned_threads(threads: int, *, deterministic: bool = True) -> Iterator[int]:
    """Run the block with `threads` torch threads and (by default) deterministic algorithms; restore both after.

    Pass `deterministic=False` for work on a GPU: there deterministic mode makes cuBLAS refuse to run unless
    `CUBLAS_WORKSPACE_CONFIG` is set before the process starts, which a library cannot do for its caller.
    """
    check_threads(threads)
    previous = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic or was_deterministic, warn_only=was_warn_only and not deterministic)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)


def free_cores() -> tuple[int, str]:
    """(cores free for torch now, how that was decided): the cores this process may run on
    (`os.sched_getaffinity`) minus the 1-minute load average of the others, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    free = max(1, min(cores, int(cores - load + 0.5)))
    return free, f"{free} of {cores} cores free at load {load:.2f}"


def resolve_threads(threads: int | None) -> int:
    """The torch thread count to use: the given one, else the cores free now (`free_cores`): on a shared 2-core
    machine a second thread competing with other processes made patching up to 10x slower, while on a quiet one
    the second core sat idle."""
    if threads is not None:
        return int(threads)
    return free_cores()[0]


__all__ = ["DEFAULT_THREADS", "check_threads", "free_cores", "pinned_threads", "resolve_threads"]
