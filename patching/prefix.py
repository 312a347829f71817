"""Where a patched forward may start: causal attention means a run that equals the base run at positions before p
equals it there in every layer, so it can start at p from the base run's keys/values (`Runner.run(pos0=...)`).

Used by activation patching (`first_change`: the first position where a patch writes a value different from the
base run's, bit for bit; a patch that changes nothing runs no forward), exact edge scores (`unchanged_prefix`) and
edge/node circuits (`EngineContext.shared_prefix`: the positions where the clean and corrupted runs agree). Where a
source differs from the base run from position 0 (zero or mean ablation), the window is the whole prompt. Patches
starting at nearby positions run together from the earliest (`merge_starts`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from circuitlab.patching.hook_backend import ModelRunner


def windowed(runner: ModelRunner) -> bool:
    """Whether `runner` can run a window of positions from cached keys/values of the earlier ones (the fast runner
    on a causal model; the hook backend runs every position)."""
    return bool(runner.causal) and getattr(runner, "windowed", True)


def first_false(flags: Tensor) -> int:
    """Index of the first False in a 1-D bool tensor (its length when every entry is True)."""
    off = (~flags).nonzero()
    return int(off[0, 0]) if len(off) else int(flags.numel())


def site_differs(src: Tensor, base: Tensor, kind: str) -> Tensor:
    """Where a patch source differs from the base run's activation, bit for bit: [batch, pos, heads] (one head
    column for kinds without heads; patterns by destination position)."""
    neq = src != base
    if kind == "pattern":  # [b, head, dest, src]
        return neq.any(3).transpose(1, 2)
    if neq.dim() == 4:  # [b, pos, head, d]
        return neq.any(3)
    return neq.any(2, keepdim=True)


def first_change(differs: Tensor, head: int | None, positions: Tensor | None) -> int | None:
    """The first position where a patch of `head` (None: no heads) at `positions` ([batch] per prompt, None: all)
    changes the base run, given `site_differs` (None: nowhere). Causal attention: the patched run equals the base
    run before it, so the patched forward may start there (from the base run's keys/values)."""
    column = differs[..., 0 if head is None or differs.shape[2] == 1 else head]  # [batch, pos]
    if positions is None:
        changed = column.any(0)
        return first_false(~changed) if bool(changed.any()) else None
    positions = positions.to(column.device)
    changed = column[torch.arange(column.shape[0], device=column.device), positions]  # [batch]
    return int(positions[changed].min()) if bool(changed.any()) else None


def unchanged_prefix(delta: Tensor, read: Tensor) -> int:
    """Leading positions where every difference in `delta` [n, batch, pos, d] is zero (runs altered by them equal
    the base run there), at most the first read position of `read` [batch, R]."""
    zero = (delta == 0).all(3).all(1).all(0)  # [pos]
    return first_false(zero[:int(read.min())])


def merge_starts(groups: dict[tuple[str, int, int], list[int]], seq: int, chunk: int
                 ) -> dict[tuple[str, int, int], list[int]]:
    """Patches of one kind and layer starting at nearby positions, run together from the earliest: a patched
    forward over a few positions of a few prompts is mostly overhead, and starting a patch before its first
    change is exact (it recomputes base-run positions). Groups merge while they fit one chunk and the later ones
    start at most a quarter of the window after the first."""
    out: dict[tuple[str, int, int], list[int]] = {}
    for kind, layer, pos0 in sorted(groups):
        members = groups[(kind, layer, pos0)]
        last = next((key for key in reversed(out) if key[:2] == (kind, layer)), None)
        if last is not None and len(out[last]) + len(members) <= chunk and pos0 - last[2] <= max(1, (seq - last[2]) // 4):
            out[last] = out[last] + members
        else:
            out[(kind, layer, pos0)] = list(members)
    return out


__all__ = ["first_change", "first_false", "merge_starts", "site_differs", "unchanged_prefix", "windowed"]
