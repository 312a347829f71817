"""`circuitlab patch` and `circuitlab path`: one activation-patching sweep or one path-patching sweep.

Each writes OUT/pairs.jsonl, OUT/scores.csv (the engine's tidy columns), OUT/run.json and a figure.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch

from circuitlab.patching.activation import PatchingConfig, activation_patching, prepare
from circuitlab.patching.components import canonical_kind, parse_node
from circuitlab.patching.engine import make_runner
from circuitlab.patching.models import load_model, weight_hash
from circuitlab.patching.path import CHANNELS, path_patching
from circuitlab.patching.reproducible import resolve_threads
from circuitlab.patching.shard import sharded_activation_patching
from circuitlab.reports import rundir, store, figures
from circuitlab.reports.config import (ConfigError, check_backend, check_device, check_memory_budget, check_seed,
                                      parse_positions)
from circuitlab.reports.executors import make_executor
from circuitlab.tasks import get_task
from circuitlab.tasks.custom import RecordsTask


@dataclass
class SweepConfig:
    """Options shared by `patch` and `path` (the sweep-specific ones are in `spec`)."""

    task: str
    model: str
    out: str
    n: int | None = None  # None: 16 prompts, or every row of a dataset file
    seed: int = 0
    corruption: str | None = None
    direction: str = "denoise"
    memory_budget: float = 2048.0
    device: str = "cpu"
    threads: int | None = None
    backend: str = "auto"  # patching.engine.make_runner: auto, fast or hook
    spec: dict[str, object] = field(default_factory=dict)


def _context(cfg: SweepConfig, model: Any, task: Any, pairs: Any) -> Any:
    """The engine context on the backend `cfg.backend` asks for (`patching.engine.make_runner`)."""
    try:
        runner = make_runner(model, cfg.backend)[0]
    except ValueError as exc:  # --backend fast on a model it does not reproduce
        raise ConfigError(str(exc)) from None
    return prepare(model, task, pairs, runner=runner)


def _prepare(cfg: SweepConfig, say: Callable[[str], None], kind: str) -> tuple[Any, Any, Any, Path]:
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {cfg.threads}")

    try:
        task = get_task(cfg.task)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.direction not in ("denoise", "noise"):
        raise ConfigError(f"--direction must be denoise or noise, got {cfg.direction!r}")
    if cfg.n is not None and cfg.n < 1:
        raise ConfigError(f"--n must be a positive number of prompt pairs, got {cfg.n}")

    check_backend(cfg.backend)
    check_memory_budget(cfg.memory_budget)
    check_seed(cfg.seed)
    check_device(cfg.device)
    n = cfg.n if cfg.n is not None else (None if isinstance(task, RecordsTask) else 16)  # a dataset: every row
    out = rundir.resolve_out(cfg.out, kind)
    say(f"loading model {cfg.model}")
    model = load_model(cfg.model, device=cfg.device)
    shards, layers = int(cfg.spec.get("shards") or 1), int(model.cfg.n_layers)
    if shards > layers:  # shards split the sweep by layer
        raise ConfigError(f"--shards {shards} is more than the {layers} layers of {cfg.model} (a shard holds whole "
                          f"layers); use --shards {layers} or fewer")
    options = {"corruption": cfg.corruption} if cfg.corruption else {}
    try:  # bad data fails here, before --out is touched
        if n is not None:
            sample = task.generate(model, 1, seed=cfg.seed, **options)
            per_pair = 2 * 4 * sample.seq_len * (2 * int(model.cfg.n_layers) + 2) * int(model.cfg.d_model)
            rundir.check_n(n, per_pair, 0.0, cfg.memory_budget, f"the clean and corrupt residual streams at "
                           f"{sample.seq_len} positions")
        say(f"generating {n if n is not None else 'all'} prompt pairs ...")
        pairs = task.generate(model, n, seed=cfg.seed, **options)
        rundir.check_context(pairs.seq_len, model, cfg.model)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    staging = rundir.fresh_staging(out)
    pairs.save_jsonl(staging / ".pairs.jsonl.tmp")
    (staging / ".pairs.jsonl.tmp").replace(staging / "pairs.jsonl")
    return model, task, pairs.to(cfg.device), staging


@contextlib.contextmanager
def _threads(threads: int | None, out: str, kind: str) -> Iterator[None]:
    """Inside the block: `threads` torch threads (see `resolve_threads`) and the lock of output folder `out`;
    a failure discards the staging folder (a sweep has nothing to resume), leaving `out` as it was."""
    previous = torch.get_num_threads()
    torch.set_num_threads(resolve_threads(threads))
    folder = rundir.resolve_out(out, kind)
    try:
        with rundir.locked(folder):
            try:
                yield
            except BaseException:
                shutil.rmtree(rundir.staging_path(folder), ignore_errors=True)
                raise
    finally:
        torch.set_num_threads(previous)


def _finish(cfg: SweepConfig, out: Path, frame: pd.DataFrame, kind: str, started: float, command: str,
            model: Any, figure_kind: str | None = None) -> None:
    """Write scores, figure and run record (listing every output with size and SHA-256) into the staging
    folder `out`, then replace the output folder with it in one step."""
    store.write_csv(out / "scores.csv", frame)
    if figure_kind is not None:
        _figure(frame, figure_kind, out)
    store.write_json(out / "run.json", {
        "command": command, "kind": kind, "config": asdict(cfg), "seed": cfg.seed,
        "model": {"name": cfg.model, "weight_hash": weight_hash(model)},
        "metrics": {"clean": frame.attrs.get("clean_metric"), "corrupt": frame.attrs.get("corrupt_metric")},
        "engine": {"requested": cfg.backend, **frame.attrs.get("engine", {"backend": f"{cfg.backend} (in each shard)"})},
        "wall_seconds": round(time.time() - started, 3), "outputs": rundir.manifest(out)})
    rundir.publish(rundir.real_out(cfg.out))


def run_patch(cfg: SweepConfig, *, quiet: bool = False, command: str = "") -> pd.DataFrame:
    """One activation-patching sweep of a component kind over layers (× heads × positions)."""
    started = time.time()
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    try:
        kind = canonical_kind(cfg.spec.get("component", "z"))
        roles = get_task(cfg.task).roles
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    positions = parse_positions(cfg.spec.get("positions", "all"), roles)
    with _threads(cfg.threads, cfg.out, "patch"):
        model, task, pairs, out = _prepare(cfg, say, "patch")
        config = PatchingConfig(direction=cfg.direction, memory_budget_mb=cfg.memory_budget, progress=not quiet)
        shards = int(cfg.spec.get("shards") or 1)
        if shards > 1:
            frame = _sharded(cfg, model, task, pairs, kind, positions, config, shards, say)
        else:
            ctx = _context(cfg, model, task, pairs)
            frame = activation_patching(model, task, pairs, kind, positions=positions, config=config, context=ctx)
            frame.attrs["engine"] = ctx.describe()
        say(f"clean {task.metric_name} {frame.attrs['clean_metric']:+.3f}, corrupt {frame.attrs['corrupt_metric']:+.3f}")
        _finish(cfg, out, frame, "patch", started, command, model, figure_kind=kind)
    _say_top(frame, ["component", "layer", "head", "position", "role", "effect"], cfg.direction, say)
    say(f"wrote {Path(cfg.out) / 'scores.csv'}")
    return frame


def _say_top(frame: pd.DataFrame, columns: list[str], direction: str, say: Callable[[str], None]) -> None:
    """The 10 rows farthest from "no effect", which is normalized effect 0 when denoising (the corrupted run)
    and 1 when noising (the clean run): sorting by |effect| would list the unimportant ones first when noising."""
    neutral = 1.0 if direction == "noise" else 0.0
    top = frame.assign(_far=(frame["effect"] - neutral).abs()).sort_values("_far", ascending=False).head(10)
    say(f"top {len(top)} by distance from no effect (effect {neutral:g} when patching in the {direction} direction):")
    say(top[columns].to_string(index=False))


def _sharded(cfg: SweepConfig, model: Any, task: Any, pairs: Any, kind: str, positions: Any, config: Any,
             shards: int, say: Callable[[str], None]) -> pd.DataFrame:
    """The same sweep split by layer over `shards` workers (`patching.shard`), each loading its own model."""
    executor = make_executor(cfg.spec.get("executor") or "sequential", address=cfg.spec.get("address"))
    say(f"  {shards} shards on {executor.name}")
    with executor:
        return sharded_activation_patching(cfg.model, task, pairs.to("cpu"), kind, positions=positions,
                                           n_layers=int(model.cfg.n_layers), config=replace(config, progress=False),
                                           n_shards=shards, map_fn=executor.map, device=cfg.device,
                                           threads=resolve_threads(cfg.threads), backend=cfg.backend)


def _figure(frame: pd.DataFrame, kind: str, out: Path) -> None:
    if kind in ("z", "q", "k", "v", "pattern"):
        grid = frame.pivot_table(index="layer", columns="head", values="effect", aggfunc="mean")
        fig = figures.head_heatmaps([(f"{kind} patching", grid)])
    else:
        column = "position" if (frame["position"] >= 0).any() else "role"
        grid = frame.pivot_table(index="layer", columns=column, values="effect", aggfunc="mean")
        fig = figures.resid_heatmap(grid, [str(c) for c in grid.columns])
    store.write_bytes(out / "heatmap.png", figures.png_bytes(fig))


def parse_senders(text: str) -> str | list[list[str]]:
    """`heads` / `all` / `a1.h2,a3.h4+a3.h5` (comma separates sender sets, `+` joins nodes of one set)."""
    text = text.strip()
    if text in ("heads", "all"):
        return text
    sets = [s.strip() for s in text.split(",") if s.strip()]
    if not sets:
        raise ConfigError("--senders is empty: use heads, all, or node names like a1.h2,a3.h4+a3.h5")
    return [[n.strip() for n in s.split("+") if n.strip()] for s in sets]


def _position(value: str | None, roles: tuple[str, ...]) -> Any:
    """One path-patching position (`parse_positions`, restricted to all, one role or one integer)."""
    parsed = "all" if value is None else parse_positions(value, roles)
    if parsed == "all":
        return None
    if parsed == "each" or len(parsed) != 1:
        raise ConfigError(f"bad position {value!r}: use all, an integer, or a role of this task ({', '.join(roles)})")
    return parsed[0]


def run_path(cfg: SweepConfig, *, quiet: bool = False, command: str = "") -> pd.DataFrame:
    """One path-patching sweep: senders -> receivers through a channel (q/k/v of receiver heads, or logits)."""
    started = time.time()
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    spec = cfg.spec
    channel = spec.get("channel", "q")
    if channel not in CHANNELS:
        raise ConfigError(f"--channel must be one of {', '.join(CHANNELS)}, got {channel!r}")
    senders = parse_senders(spec.get("senders", "heads"))
    receivers = [r.strip() for r in (spec.get("receivers") or "").split(",") if r.strip()]
    try:
        for name in receivers + ([n for s in senders for n in s] if isinstance(senders, list) else []):
            parse_node(name)
        roles = get_task(cfg.task).roles
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if channel != "logits" and not receivers:
        raise ConfigError(f"--channel {channel} needs --receivers (heads such as a9.h9,a9.h6)")
    sender_pos = _position(spec.get("sender_positions"), roles)
    receiver_pos = _position(spec.get("receiver_positions"), roles)
    with _threads(cfg.threads, cfg.out, "path"):
        model, task, pairs, out = _prepare(cfg, say, "path")
        config = PatchingConfig(direction=cfg.direction, memory_budget_mb=cfg.memory_budget, progress=not quiet)
        ctx = _context(cfg, model, task, pairs)
        frame = path_patching(model, task, pairs, senders=senders, receivers=receivers or None, channel=channel,
                              sender_positions=sender_pos, receiver_positions=receiver_pos, config=config,
                              context=ctx)
        frame.attrs["engine"] = ctx.describe()
        say(f"clean {task.metric_name} {frame.attrs['clean_metric']:+.3f}, corrupt {frame.attrs['corrupt_metric']:+.3f}")
        _finish(cfg, out, frame, "path", started, command, model)
    _say_top(frame, ["sender", "receiver", "channel", "effect"], cfg.direction, say)
    say(f"wrote {Path(cfg.out) / 'scores.csv'}")
    return frame
