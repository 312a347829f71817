"""Exact activation patching at every granularity, fast.

`activation_patching(model, task, pairs, component, positions=...)` swaps one component's activation between
the clean and corrupted runs and reports the metric, for every layer (and head, and position) at once.
It gives the numbers `transformer_lens.patching` gives, but each patched forward starts at the patched layer
from the cached residual stream, recomputes only positions at or after the patched one (reusing cached
keys/values), and unembeds only the positions the metric reads (see `patching.runner`).

Result columns (one row per patched component):
- `component`: the kind (`z`, `q`, `k`, `v`, `pattern`, `resid_pre`, `resid_mid`, `resid_post`, `attn_out`, `mlp_out`)
- `layer`, `head` (query head; key/value head for `k`/`v`; -1 where the kind has no heads)
- `position`: the position patched (nullable Int64): an absolute position (>= 0), or a negative integer as asked
  for (that many tokens back from each prompt's own end); empty (NA) for all positions at once and for a role's
  per-prompt positions (see `role`), never -1, which as an input means each prompt's last token
- `role`: the token role patched (`""` when positions are absolute or all)
- `metric`: mean task metric over prompts after the patch
- `effect`: normalized, (metric - corrupt) / (clean - corrupt): 0 = corrupted run, 1 = clean run
- `direction` (`denoise` = clean into corrupt, `noise` = corrupt into clean) and `source` (where values came from)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.components import BLOCK_OUT_KINDS, KV_KINDS, RESID_KINDS, canonical_kind
from circuitlab.patching.engine import EngineContext, _gather_logits, _metric_values, engine_context, read_logits
from circuitlab.patching.prefix import first_change, merge_starts, site_differs, windowed
from circuitlab.patching.runner import Hook, RunState, Runner
from circuitlab.tasks.base import PromptPairs, Task

RESULT_COLUMNS = ["component", "layer", "head", "position", "role", "metric", "effect", "direction", "source"]


@dataclass
class PatchingConfig:
    """How a sweep runs. `direction` picks the base run; `source` where patched values come from.

    - direction `denoise`: base = corrupted run, default source = clean (TransformerLens's default).
    - direction `noise`: base = clean run, default source = corrupted.
    - source `zero` / `mean`: ablations (mean = average over the corrupted prompts, position by position:
      `mean_ablation`).
    `chunk_size` patched copies run per forward, fewer if `memory_budget_mb` would be exceeded.
    """

    direction: str = "denoise"
    source: str | None = None
    chunk_size: int = 8
    memory_budget_mb: float = 2048.0
    progress: bool = False

    def resolved_source(self) -> str:
        if self.direction not in ("denoise", "noise"):
            raise ValueError(f"direction {self.direction!r} is unknown: use 'denoise' or 'noise'")
        source = self.source or ("clean" if self.direction == "denoise" else "corrupt")
        if source not in ("clean", "corrupt", "zero", "mean"):
            raise ValueError(f"source {source!r} is unknown: use clean, corrupt, zero or mean")
        return source


@dataclass(frozen=True)
class Patch:
    """One patched component: kind, layer, head (or None), positions per prompt (None = all positions)."""

    kind: str
    layer: int
    head: int | None
    positions: Tensor | None  # LongTensor [batch] of absolute positions, or None for every position
    position_label: int | None = None  # None: all positions, or a role's per-prompt positions
    role: str = ""


PatchingContext = EngineContext  # the one engine context serves activation and path patching too
# positions to patch: "all", "each", a task role (`END`), an integer (negative: from each prompt's end), or a list
Positions = Union[str, int, Sequence[Union[str, int]], None]


def prepare(model: TransformerBridge, task: Task, pairs: PromptPairs, *, runner: Runner | None = None,
            collect: Iterable[tuple[str, int]] = (), check_gap: bool = True) -> PatchingContext:
    """The engine context: clean and corrupted prompts run once, baselines computed once (`patching.engine`)."""
    return engine_context(model, task, pairs, runner=runner, collect=collect, check_gap=check_gap)


def ensure_collected(ctx: PatchingContext, keys: Iterable[tuple[str, int]]) -> None:
    """Make sure clean and corrupt activations at these sites are cached (re-running once if needed)."""
    ctx.ensure_collected(keys)


def _site_activation(state: RunState, kind: str, layer: int) -> Tensor:
    if kind == "resid_pre":
        return state.resid_pre[layer]
    if kind == "resid_mid":
        return state.resid_mid[layer]
    return state.acts[(kind, layer)]


def _start(runner: Runner, kind: str, layer: int) -> tuple[int, bool]:
    """Where a patched forward must start: (layer, start_at_mlp)."""
    if kind in ("resid_mid", "mlp_out"):
        if runner.attn_only:
            raise ValueError(f"{kind} does not exist in an attention-only model")
        if runner.parallel or not getattr(runner, "windowed", True):  # the hook backend enters at resid_pre
            return layer, False
        return layer, True
    return layer, False


def _position_dim(kind: str) -> int:
    """Index of the position axis in an activation (after batch)."""
    return 2 if kind == "pattern" else 1


def _build_patches(runner: Runner, pairs: Any, kind: str, positions: Any, layers: Sequence[int] | None,
                   heads: Sequence[int] | None) -> list[Patch]:
    n_layers, seq = runner.n_layers, pairs.clean_tokens.shape[1]
    batch = pairs.clean_tokens.shape[0]
    layers = list(range(n_layers)) if layers is None else list(layers)
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    if kind in ("resid_mid", "mlp_out") and runner.attn_only:
        raise ValueError(f"{kind} does not exist in an attention-only model")
    if kind == "resid_mid" and runner.parallel:
        raise ValueError("resid_mid does not exist in a parallel-block model (attention and MLP both read "
                         "resid_pre): patch resid_pre, attn_out or mlp_out")
    if kind in RESID_KINDS or kind in BLOCK_OUT_KINDS:
        head_list: list[int | None] = [None]
        if heads is not None:
            raise ValueError(f"component {kind!r} has no heads; drop the heads argument")
    else:
        n = runner.n_kv if kind in KV_KINDS else runner.n_heads
        head_list = list(range(n)) if heads is None else list(heads)
        for head in head_list:
            if not 0 <= int(head) < n:
                what = "key/value heads" if kind in KV_KINDS else "heads"
                raise ValueError(f"head {head} is out of range for {kind!r}: the model has {n} {what}")
    position_specs: list[tuple[Tensor | None, int | None, str]] = []
    if isinstance(positions, str) and positions == "all":
        position_specs.append((None, None, ""))
    elif isinstance(positions, str) and positions == "each":
        for pos in range(seq):
            position_specs.append((torch.full((batch,), pos, dtype=torch.long), pos, _role_at(pairs, pos)))
    else:
        items = [positions] if isinstance(positions, (str, int)) else list(positions)
        for item in items:
            index, label, role = resolve_position(pairs, item)
            position_specs.append((index.cpu(), label, role))
    return [Patch(kind, layer, head, pos, label, role)
            for layer in layers for pos, label, role in position_specs for head in head_list]


def resolve_position(pairs: PromptPairs, item: str | int, what: str = "") -> tuple[Tensor, int | None, str]:
    """The one reading of a position in prompt pairs (counterfactual pairs read theirs by the same rule,
    `interchange.positions_of`, which also takes `last`): a task role (its per-prompt positions) or an integer.
    A non-negative integer is an absolute position; a negative one counts from the end of *each prompt* (length +
    pos, its own length on a right-padded batch, never the padded width). Returns (positions [batch], the label:
    the integer as given, None for a role; the role's name or the role found at those positions); a ValueError
    naming the bad item otherwise. `what` (e.g. `sender`) names it in errors."""
    batch, seq = pairs.clean_tokens.shape
    name = f"{what} position" if what else "position"
    if isinstance(item, str):
        roles = getattr(pairs, "positions", {}) or {}
        if item not in roles:
            raise ValueError(f"unknown {name} role {item!r}: this task has roles {sorted(roles)} "
                             "(or use 'all' or integer positions)")
        return roles[item].long(), None, item
    pos = int(item)
    mask = getattr(pairs, "attention_mask", None)
    lengths = torch.full((batch,), seq, dtype=torch.long) if mask is None else mask.long().sum(1).cpu()
    if pos >= seq:
        raise ValueError(f"{name} {pos} is out of range for prompts of {seq} tokens")
    shortest = int(lengths.min()) if batch else seq
    if pos < -shortest:
        raise ValueError(f"{name} {pos} is out of range: it counts back from the end of each prompt, and the "
                         f"shortest prompt has {shortest} tokens (use -{shortest}..-1 or 0..{seq - 1})")
    if pos < 0:
        index = (lengths + pos).to(pairs.clean_tokens.device)
        label = pos  # per prompt: the same tokens in any batch, so the same label
    else:
        index, label = torch.full((batch,), pos, dtype=torch.long, device=pairs.clean_tokens.device), pos
    return index, label, _role_at(pairs, index)


def _role_at(pairs: Any, pos: int | Tensor) -> str:
    for role, where in (getattr(pairs, "positions", {}) or {}).items():
        if bool((where == pos).all()):
            return role
    return ""


def _bytes_per_patch(runner: Runner, batch: int, window: int, seq: int, reads: int) -> float:
    per_pos = 6 * runner.d_model + 3 * (runner.cfg.d_mlp or 0) + 2 * runner.n_heads * seq
    return 4.0 * batch * (window * per_pos + reads * runner.W_U.shape[1])


def _make_hook(kind: str, chunk: Sequence[Patch], src: Tensor, batch: int, pos0: int) -> Hook:
    """A hook replacing each patched copy's activation with `src` where its patch mask is set."""
    pdim = _position_dim(kind)
    window = src.shape[pdim]
    has_heads = src.dim() == 4
    n = len(chunk)
    mask_shape = [n, batch] + list(src.shape[1:-1]) if kind != "pattern" else [n, batch, src.shape[1], window]
    mask = torch.zeros(mask_shape, dtype=torch.bool, device=src.device)
    arange_b = torch.arange(batch, device=src.device)
    for i, patch in enumerate(chunk):
        if patch.positions is not None:  # before pos0 the source equals the base run (`prefix.first_change`): no write
            where = patch.positions.to(src.device) - pos0
            rows, where = arange_b[where >= 0], where[where >= 0]
        if kind == "pattern":  # [n, B, head, dest]
            head_sel = slice(None) if patch.head is None else patch.head
            if patch.positions is None:
                mask[i, :, head_sel, :] = True
            else:
                mask[i, rows, head_sel, where] = True
        elif has_heads:  # [n, B, pos, head]
            if patch.positions is None:
                mask[i, :, :, patch.head] = True
            else:
                mask[i, rows, where, patch.head] = True
        else:  # [n, B, pos]
            if patch.positions is None:
                mask[i] = True
            else:
                mask[i, rows, where] = True
    mask = mask.unsqueeze(-1)

    def hook(act: Tensor) -> Tensor:
        shaped = act.reshape(n, batch, *act.shape[1:])
        return torch.where(mask, src.unsqueeze(0), shaped).reshape(act.shape)

    return hook


def _source_activation(ctx: PatchingContext, kind: str, layer: int, source: str) -> Tensor:
    if source == "clean":
        return _site_activation(ctx.clean_run, kind, layer)
    corrupt = _site_activation(ctx.corrupt_run, kind, layer)
    if source == "corrupt":
        return corrupt
    if source == "zero":
        return torch.zeros_like(corrupt)
    means = getattr(ctx, "means", None)
    if means is not None and (kind, layer) in means:  # a dataset's means over prompt batches (patching.batched)
        mean = means[(kind, layer)]
        for dim in ((2, 3) if kind == "pattern" else (_position_dim(kind),)):
            mean = mean.narrow(dim, 0, corrupt.shape[dim])
        return mean.to(corrupt.device, corrupt.dtype).expand_as(corrupt)
    return mean_ablation(corrupt, getattr(ctx.pairs, "attention_mask", None), _position_dim(kind))


def mean_ablation(corrupt: Tensor, mask: Tensor | None, pos_dim: int = 1) -> Tensor:
    """The one mean ablation of prompt pairs: every activation replaced by its mean over the *corrupted* prompts, position by
    position (over the prompts that are real there), as Wang et al. 2022 mean-ablate over their ABC dataset.
    Used by activation/path patching (`source="mean"`), edge methods (`edges.ablated_context`) and node-circuit
    evaluation (`graphs.evaluate.Ablator`), so a circuit's "mean" means the same everywhere for prompt pairs.
    (Unpaired text has no corrupted prompts: the in-context-learning ablations of `graphs.ablation` take each
    head's mean over the evaluation sequences instead, `graphs.ablation.head_means`.)"""
    return prompt_mean(corrupt, mask, pos_dim).expand_as(corrupt)


def prompt_mean(act: Tensor, mask: Tensor | None, pos_dim: int = 1) -> Tensor:
    """Mean over prompts [1, ...], position by position over the prompts that are real there (not padding)."""
    if mask is None:
        return act.mean(0, keepdim=True)
    shape = [1] * act.dim()
    shape[0], shape[pos_dim] = mask.shape[0], mask.shape[1]
    w = mask.to(act.device, act.dtype).reshape(shape)
    return (act * w).sum(0, keepdim=True) / w.sum(0, keepdim=True).clamp(min=1.0)


def run_patches(ctx: PatchingContext, patches: Sequence[Patch], config: PatchingConfig) -> Tensor:
    """Mean metric after each patch, [len(patches)], grouping patches that share a start layer and position."""
    source = config.resolved_source()
    runner, batch, seq = ctx.runner, ctx.batch, ctx.seq_len
    # Cache a kind at every layer at once: sweeps that go layer by layer then cost no extra full runs.
    kinds = {p.kind for p in patches if p.kind not in ("resid_pre", "resid_mid")}
    ensure_collected(ctx, {(kind, layer) for kind in kinds for layer in range(runner.n_layers)})
    base = ctx.corrupt_run if config.direction == "denoise" else ctx.clean_run
    base_at = ctx.corrupt_logits_at if config.direction == "denoise" else ctx.clean_logits_at
    base_values = ctx.corrupt_values if config.direction == "denoise" else ctx.clean_values
    groups: dict[tuple[str, int, int], list[int]] = {}
    results = torch.empty(len(patches))
    differs: dict[tuple[str, int], Tensor] = {}
    for index, patch in enumerate(patches):
        if not windowed(runner):  # the hook backend runs every position
            groups.setdefault((patch.kind, patch.layer, 0), []).append(index)
            continue
        key = (patch.kind, patch.layer)
        if key not in differs:
            differs[key] = site_differs(_source_activation(ctx, *key, source), _site_activation(base, *key), patch.kind)
        pos0 = first_change(differs[key], patch.head, patch.positions)
        if pos0 is None:  # the source equals the base run wherever this patch writes: the base run itself
            results[index] = float(base_values.mean())
            continue
        groups.setdefault((patch.kind, patch.layer, pos0), []).append(index)
    reads = ctx.read_positions.shape[1]
    work = []
    for (kind, layer, pos0), members in merge_starts(groups, seq, config.chunk_size).items():
        per_patch = _bytes_per_patch(runner, batch, seq - pos0, seq, reads)
        size = max(1, min(config.chunk_size, int(config.memory_budget_mb * 2**20 // max(per_patch, 1.0))))
        n_chunks = -(-len(members) // size)
        size = -(-len(members) // n_chunks)  # balanced chunks: 9 patches run as 5 + 4, not 8 + 1
        for start in range(0, len(members), size):
            work.append((kind, layer, pos0, members[start:start + size]))
    iterator: Iterable[Any] = work
    if config.progress:
        iterator = tqdm(work, desc=f"patching {patches[0].kind if patches else ''}", unit="fwd",
                        disable=None)  # a bar on a terminal only
    with torch.no_grad():
        for kind, layer, pos0, members in iterator:
            chunk = [patches[i] for i in members]
            n = len(chunk)
            src_full = _source_activation(ctx, kind, layer, source)
            pdim = _position_dim(kind)
            src = src_full.narrow(pdim, pos0, src_full.shape[pdim] - pos0)
            start_layer, at_mlp = _start(runner, kind, layer)
            if kind == "resid_post":
                start_layer += 1
            hook_key = ("resid_pre", layer + 1) if kind == "resid_post" else (kind, layer)
            hooks = {hook_key: _make_hook(kind, chunk, src, batch, pos0)}
            if kind == "resid_post" and layer == runner.n_layers - 1:
                resid = hooks[hook_key](base.resid_final[:, pos0:].repeat(n, 1, 1))
                logits_at = _gather_logits(runner, resid, ctx.read_positions, pos0, ctx.metric_vocab)
            else:
                resid0 = (base.resid_mid if at_mlp else base.resid_pre)[start_layer][:, pos0:]
                resid = runner.run(resid0.repeat(n, 1, 1), start_layer=start_layer, start_at_mlp=at_mlp, pos0=pos0,
                                   past=base.kv, hooks=hooks, read=ctx.read_positions)
                logits_at = read_logits(runner, resid, ctx.metric_vocab)
            keep = (ctx.read_positions >= pos0).repeat(n, 1)[..., None]
            logits_at = torch.where(keep, logits_at, base_at.repeat(n, 1, 1))
            values = _metric_values(ctx.task, ctx.pairs, logits_at.view(n, batch, reads, -1))
            results[torch.tensor(members)] = values.mean(1).cpu()
    return results


def activation_patching(model: TransformerBridge, task: Task, pairs: PromptPairs, component: str = "z", *,
                        positions: Positions = "all",
                        layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                        config: PatchingConfig | None = None, context: PatchingContext | None = None) -> pd.DataFrame:
    """Patch one component kind at every layer (× head × position) and return a tidy DataFrame.

    `positions`: "all" (every position at once), "each" (every absolute position separately), a role name or
    list of role names of the task (`["S2", "END"]`: each prompt's own position), or integer positions.
    """
    config = config or PatchingConfig()
    source = config.resolved_source()
    kind = canonical_kind(component)
    ctx = context or prepare(model, task, pairs)
    patches = _build_patches(ctx.runner, pairs, kind, positions, layers, heads)
    values = run_patches(ctx, patches, config)
    rows = []
    for patch, value in zip(patches, values.tolist()):
        rows.append({"component": kind, "layer": patch.layer, "head": -1 if patch.head is None else patch.head,
                     "position": patch.position_label, "role": patch.role, "metric": value,
                     "effect": float(ctx.normalize(value)), "direction": config.direction, "source": source})
    frame = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    frame["position"] = frame["position"].astype("Int64")  # NA (written empty) = all positions / a role's
    frame.attrs.update(clean_metric=ctx.clean_metric, corrupt_metric=ctx.corrupt_metric)
    return frame


def effects_grid(frame: pd.DataFrame, index: str = "layer", columns: str = "head", value: str = "effect") -> pd.DataFrame:
    """Pivot a result frame into a grid (e.g. layer × head) for heatmaps."""
    return frame.pivot_table(index=index, columns=columns, values=value, aggfunc="mean")


def save_results(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write results as CSV or Parquet (by suffix), atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".parquet":
        frame.to_parquet(tmp, index=False)
    elif path.suffix == ".csv":
        frame.to_csv(tmp, index=False)
    else:
        raise ValueError(f"{path}: use a .csv or .parquet file name")
    tmp.replace(path)
    return path


def load_results(path: str | Path) -> pd.DataFrame:
    """Read results written by `save_results`."""
    path = Path(path)
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)
    if "role" in frame:
        frame["role"] = frame["role"].astype(str)
    if "position" in frame:  # empty = all positions / a role's (NA)
        frame["position"] = pd.to_numeric(frame["position"].replace("", pd.NA)).astype("Int64")
    return frame
