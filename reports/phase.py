"""`circuitlab phase`: train 1- and 2-layer attention-only models on real text and measure the phase change.

Outputs in OUT/:
- `checkpoints/<L>L/step_XXXXXX/` (`save_model` folders) with `train_log.csv` and `train_state.pt` (resume);
- `checkpoints.csv`, one row per (model, checkpoint), columns `CHECKPOINT_COLUMNS`;
- `heads.csv`, one row per (model, checkpoint, head), columns `HEAD_TABLE_COLUMNS`;
- `composition.csv` (final checkpoints), `ablation.csv` and `patching.csv` (causal checkpoints), `summary.json`;
- `report.html` and `report.md` (figures under `figures/`).
Column meanings are in `COLUMN_DOCS` (also written to `columns.md`). Rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from circuitlab.graphs.ablation import InductionAblation
from circuitlab.graphs.induction import ProbeOptions, composition_scores
from circuitlab.graphs.phase import (attach_causal, causal_tables, detect_phase_change, joint_induction_ablation,
                                     label_heads, measure_checkpoint)
from circuitlab.patching.models import load_model
from circuitlab.patching.reproducible import DEFAULT_THREADS, check_threads, pinned_threads
from circuitlab.patching.training import TrainConfig, train_attn_only
from circuitlab.reports import rundir, store
from circuitlab.reports.config import ConfigError
from circuitlab.reports.phase_report import acceptance, render_phase_report
from circuitlab.tasks.corpus import Corpus, eval_tokens, load_corpus, periodic_mix, model_corpus

CHECKPOINT_COLUMNS = ["model", "n_layers", "step", "tokens", "icl_score", "icl_se", "late", "early", "icl_width", "late_loss",
                      "early_loss",
                      "mean_loss", "train_loss", "top_induction", "top_induction_head", "top_previous_token",
                      "top_ov_copying"]
HEAD_TABLE_COLUMNS = ["model", "n_layers", "step", "layer", "head", "node", "previous_token", "previous_token_top",
                      "duplicate_token",
                      "induction", "ov_copying", "qk_direct", "qk_matching", "qk_via", "k_comp_from_prev",
                      "delta_icl_zero", "delta_icl_mean", "patch_effect", "label"]
COLUMN_DOCS = {
    "model": "which run: `1L`, `2L`, `3L` (trained here) or `name@revision` (published checkpoints)",
    "step": "optimizer step of the checkpoint (0 = initialisation); `tokens` = tokens seen",
    "icl_score": "loss at token `late` minus loss at token `early` on held-out text (negative = uses context)",
    "icl_se": "standard error of icl_score over the evaluation sequences (std of each sequence's own score / √n)",
    "late, early": "token indices of the ICL score: 500 and 50 when the context allows, else n_ctx−1 and a tenth",
    "icl_width": "indices averaged on each side (late−w+1…late minus early…early+w−1; n_ctx/32) against the noise "
                 "of few evaluation sequences",
    "late_loss, early_loss, mean_loss": "held-out loss at those indices and over all indices (nats/token)",
    "train_loss": "training loss at that step, smoothed over ~2% of training (NaN at step 0)",
    "top_induction": "largest prefix-matching (induction) attention score of any head on repeated random tokens",
    "previous_token, duplicate_token, induction": "mean attention to i−1 / to the earlier copy / to the token after "
                                                  "the earlier copy, on repeated random tokens (graphs.induction)",
    "previous_token_top": "share of query positions (repeated random tokens) whose most-attended key is i−1",
    "ov_copying": "Σλ/Σ|λ| of W_E W_OV W_U (+1 copies, −1 suppresses)",
    "qk_direct, qk_matching, qk_via": "Σλ/Σ|λ| of the QK circuit on raw tokens, and through the earlier head "
                                      "`qk_via` with the highest previous-token score (K-composition path)",
    "k_comp_from_prev": "K-composition score from that previous-token head (NaN in layer 0)",
    "delta_icl_zero, delta_icl_mean": "ICL score with the head zero-/mean-ablated minus the base ICL score "
                                      "(causal checkpoints only, else NaN)",
    "patch_effect": "exact patching effect of the head's output on the repeated-tokens task (engine; 1 = restores "
                    "the clean metric alone; causal checkpoints only)",
    "label": "`induction` (induction ≥ 0.3 and ov_copying > 0), `previous_token` (previous_token ≥ 0.4, or "
             "previous_token_top > 0.5: i−1 is the most-attended key at most positions) or ``",
}


@dataclass
class PhaseConfig:
    """Options of a phase-change study (defaults: the 1+2-layer study; README gives its measured wall time).

    Training batches come from `tasks.corpus.periodic_mix`: real text with one repeated span per row
    (`repeat_prob`), of which a `periodic_prob` share of rows is periodic real text (a segment of
    `min_period`…`max_period` tokens tiled). Without the periodic rows no induction head forms in a CPU budget.
    The ICL score is measured on `eval_sequences` held-out real-text windows (not the training mix); its
    checkpoint-to-checkpoint noise falls as 1/√eval_sequences (16 gave ±0.3 nats, swamping the effect).
    Everything runs at `threads` torch threads (fixed default, never the machine's core count): with the same
    `seed` and `threads` a rerun gives the same numbers bit for bit, at any load (`patching.reproducible`).
    """

    out: str = "runs/phase"
    layers: tuple[int, ...] = (1, 2)
    steps: int = 3000
    batch_size: int = 16
    n_ctx: int = 128
    d_model: int = 64
    n_heads: int = 4
    lr: float = 1e-2
    repeat_prob: float = 1.0
    periodic_prob: float = 0.5
    min_period: int = 4
    max_period: int = 32
    positions: str = "rotary"
    seed: int = 0
    n_checkpoints: int = 10
    n_linear_checkpoints: int = 20
    max_bytes: int | None = 8_000_000
    eval_sequences: int = 1024
    probe_sequences: int = 16
    probe_half: int = 40
    low: float = 0.2
    high: float = 0.5
    threads: int = DEFAULT_THREADS
    model: str | None = None
    revisions: tuple[str, ...] = ()
    progress: bool = True


def probe_tokens(corpus: Corpus, k: int = 96) -> tuple[int, ...]:
    """The `k` most frequent tokens of the training text: repeated-token probes drawn from them are in-distribution."""
    counts = torch.bincount(corpus.train, minlength=corpus.vocab)
    return tuple(int(i) for i in torch.argsort(counts, descending=True)[:k].tolist())


def _measure_run(name: str, n_layers: int, steps_paths: dict[int, Path], train_log: pd.DataFrame | None,
                 tokens: torch.Tensor, probe: ProbeOptions, cache_dir: Path, tokens_per_step: int,
                 progress: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, head_frames = [], []
    smoothed = None
    if train_log is not None and len(train_log):
        window = max(1, len(train_log) // 50)
        smoothed = train_log.set_index("step")["loss"].rolling(window, min_periods=1, center=True).mean()
    for step, path in tqdm(steps_paths.items(), desc=f"measure {name}", unit="ckpt",
                            disable=None if progress else True):  # a bar on a terminal only
        done = cache_dir / f"step_{step:06d}.json"
        if done.is_file():
            row = json.loads(done.read_text())
            heads = store.read_csv(cache_dir / f"step_{step:06d}.csv")
        else:
            model = load_model(str(path))
            row, heads = measure_checkpoint(model, tokens, probe)
            store.write_csv(cache_dir / f"step_{step:06d}.csv", heads)
            store.write_json(done, row)
        train_loss = float(smoothed.get(step, float("nan"))) if smoothed is not None else float("nan")
        rows.append({"model": name, "n_layers": n_layers, "step": step, "tokens": step * tokens_per_step,
                     "train_loss": train_loss, **row})
        head_frames.append(heads.assign(model=name, n_layers=n_layers, step=step))
    return pd.DataFrame(rows)[CHECKPOINT_COLUMNS], pd.concat(head_frames, ignore_index=True)


def _measure_cache(out: Path, name: str, cfg: PhaseConfig) -> Path:
    """Cache folder of one model's checkpoint measurements, keyed by the settings they depend on (a rerun with
    other evaluation or probe settings measures afresh instead of reusing stale rows)."""
    key = json.dumps(["v3", cfg.eval_sequences, cfg.n_ctx, cfg.probe_sequences, cfg.probe_half, cfg.seed, cfg.max_bytes,
                      cfg.threads])
    return out / store.PARTIAL / "measure" / name / hashlib.sha256(key.encode()).hexdigest()[:12]


def run_phase_study(cfg: PhaseConfig) -> pd.DataFrame:
    """Train (or load published checkpoints), measure every checkpoint, detect the window, write the report.

    Returns the tidy per-checkpoint DataFrame (`CHECKPOINT_COLUMNS`); every table is also written to `cfg.out`.
    """
    check_threads(cfg.threads)
    with pinned_threads(cfg.threads):
        return _run_pinned(cfg)


def _run_pinned(cfg: PhaseConfig) -> pd.DataFrame:
    began = time.perf_counter()
    load_at_start = os.getloadavg()
    out = store.check_writable(rundir.check_kind(cfg.out, "phase"))  # never mixes tables into another result
    if cfg.model:
        return run_published(cfg)
    corpus = load_corpus(max_bytes=cfg.max_bytes)
    tokens = eval_tokens(corpus, cfg.eval_sequences, cfg.n_ctx, seed=cfg.seed + 100)
    allowed = probe_tokens(corpus)
    probe = ProbeOptions(n=cfg.probe_sequences, half=cfg.probe_half, seed=cfg.seed, tokens=allowed)
    tables, head_tables, windows, timings = [], [], {}, {}
    causal_frames: list[pd.DataFrame] = []
    patch_frames: list[pd.DataFrame] = []
    comps: list[pd.DataFrame] = []
    joints: dict[str, InductionAblation] = {}
    for n_layers in cfg.layers:
        name = f"{n_layers}L"
        tcfg = TrainConfig(n_layers=n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads,
                           d_head=cfg.d_model // cfg.n_heads, n_ctx=cfg.n_ctx, d_vocab=corpus.vocab,
                           positional_embedding_type=cfg.positions,
                           batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr, seed=cfg.seed,
                           n_checkpoints=cfg.n_checkpoints, n_linear_checkpoints=cfg.n_linear_checkpoints,
                           threads=cfg.threads)

        def sample(n: int, width: int, gen: torch.Generator) -> torch.Tensor:
            return periodic_mix(corpus, n, width, gen, periodic_prob=cfg.periodic_prob, min_period=cfg.min_period,
                                max_period=cfg.max_period, repeat_prob=cfg.repeat_prob)

        t0 = time.perf_counter()
        result = train_attn_only(tcfg, sample, out / "checkpoints" / name, progress=cfg.progress)
        timings[f"train_{name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        table, heads = _measure_run(name, n_layers, result.checkpoints, result.log, tokens, probe,
                                    _measure_cache(out, name, cfg), cfg.batch_size * cfg.n_ctx, cfg.progress)
        window = detect_phase_change(table, result.log, low=cfg.low, high=cfg.high, grid=_grid(cfg))
        windows[name] = window.to_dict()
        final = int(table["step"].max())
        causal_steps = sorted({final} | ({window.start, window.end} if window.found else set()))
        heads["label"] = label_heads(heads)
        for step in causal_steps:
            abl, patch = causal_tables(name, step, result.checkpoints[step], tokens, heads,
                                       (min(allowed), max(allowed) + 1))
            causal_frames.append(abl)
            patch_frames.append(patch)
        final_heads = heads[heads["step"] == final]
        joints[name] = joint_induction_ablation(result.checkpoints[final], tokens, final_heads, cfg.seed)
        comps.append(composition_scores(load_model(str(result.checkpoints[final]))).assign(model=name, step=final)
                     if n_layers > 1 else pd.DataFrame())
        timings[f"measure_{name}"] = time.perf_counter() - t0
        tables.append(table)
        head_tables.append(heads)
    checkpoints = pd.concat(tables, ignore_index=True)
    heads = attach_causal(pd.concat(head_tables, ignore_index=True), causal_frames, patch_frames)
    store.write_csv(out / "checkpoints.csv", checkpoints)
    store.write_csv(out / "heads.csv", heads[HEAD_TABLE_COLUMNS])
    store.write_csv(out / "ablation.csv", pd.concat(causal_frames, ignore_index=True))
    store.write_csv(out / "patching.csv", pd.concat(patch_frames, ignore_index=True))
    store.write_csv(out / "composition.csv", pd.concat([c for c in comps if len(c)] or [pd.DataFrame()], ignore_index=True))
    timings["total"] = time.perf_counter() - began
    summary = {"config": _plain_config(cfg), "corpus": {"source": corpus.source, "files": corpus.n_files,
               "tokenizer": corpus.tokenizer, "train_tokens": len(corpus.train), "heldout_tokens": len(corpus.heldout)},
               "windows": windows, "joint_ablation": {k: j.to_dict() for k, j in joints.items()},
               "timings_s": timings, "cpu_s": _cpu_seconds(),
               "load_average_at_start": load_at_start, "load_average": os.getloadavg(), "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(),
               "reproducibility": {"seed": cfg.seed, "threads": cfg.threads,
                                   "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}}

    composition = pd.concat([c for c in comps if len(c)] or [pd.DataFrame()], ignore_index=True)
    summary["acceptance"] = acceptance(checkpoints, heads, windows, joints, composition)
    store.write_json(out / "summary.json", summary)
    store.write_text(out / "columns.md", "\n".join(f"- `{k}`: {v}" for k, v in COLUMN_DOCS.items()) + "\n")
    render_phase_report(out)
    return checkpoints


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (wall time alone misleads on a shared machine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _grid(cfg: PhaseConfig) -> list[int] | None:
    """The evenly spaced checkpoint steps (`checkpoint_steps`' linear part) over which ICL drops are compared."""
    n = cfg.n_linear_checkpoints
    return sorted({int(round(cfg.steps * i / n)) for i in range(1, n + 1)}) if n > 0 else None


def _plain_config(cfg: PhaseConfig) -> dict[str, Any]:
    data = asdict(cfg)
    data["layers"], data["revisions"] = list(cfg.layers), list(cfg.revisions)
    return data


def run_published(cfg: PhaseConfig) -> pd.DataFrame:
    """The same per-checkpoint measurements on a published model's revisions (e.g. Pythia's `step1000`).

    Needs the network (or the hub cache) once per revision; offline, `load_model` raises its usual clear error.
    """
    if not cfg.revisions:
        raise ValueError("published checkpoints need --revisions, e.g. step1000,step2000")
    out = Path(cfg.out)
    rows, head_frames, corpus, tokens, probe = [], [], None, None, None
    for rev in cfg.revisions:
        model = load_model(cfg.model, revision=rev)
        if corpus is None:
            corpus = model_corpus(model, max_bytes=cfg.max_bytes)
            n_ctx = min(cfg.n_ctx, model.cfg.n_ctx)
            tokens = eval_tokens(corpus, cfg.eval_sequences, n_ctx, seed=cfg.seed + 100)
            probe = ProbeOptions(n=cfg.probe_sequences, half=cfg.probe_half, seed=cfg.seed,
                                 tokens=probe_tokens(corpus, 500))
        row, heads = measure_checkpoint(model, tokens, probe)
        step = int("".join(ch for ch in rev if ch.isdigit()) or 0)
        name = f"{cfg.model}@{rev}"
        rows.append({"model": cfg.model, "n_layers": model.cfg.n_layers, "step": step, "tokens": float("nan"),
                     "train_loss": float("nan"), **row})
        head_frames.append(heads.assign(model=name, n_layers=model.cfg.n_layers, step=step))
    checkpoints = pd.DataFrame(rows)[CHECKPOINT_COLUMNS]
    heads = attach_causal(pd.concat(head_frames, ignore_index=True), [], [])
    heads["label"] = label_heads(heads)
    store.write_csv(out / "checkpoints.csv", checkpoints)
    store.write_csv(out / "heads.csv", heads[HEAD_TABLE_COLUMNS])
    window = detect_phase_change(checkpoints, None, low=cfg.low, high=cfg.high)
    store.write_json(out / "summary.json", {"config": _plain_config(cfg), "windows": {cfg.model: window.to_dict()},
                                            "load_average": os.getloadavg()})
    render_phase_report(out)
    return checkpoints


def phase_study(**options: object) -> pd.DataFrame:
    """Python entry point: `phase_study(out="runs/phase", steps=600, ...)` → the per-checkpoint DataFrame."""
    return run_phase_study(PhaseConfig(**options))


def add_phase_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `circuitlab phase` on the CLI's subparsers."""
    p = sub.add_parser("phase", help="train 1/2-layer attention-only models on real text; measure the induction "
                                     "phase change (or measure published checkpoints with --model/--revisions)")
    d = PhaseConfig()
    p.add_argument("--out", default=d.out, help="output directory (rerun the same command to resume)")
    p.add_argument("--layers", default=",".join(map(str, d.layers)), help="layer counts to train, e.g. 1,2,3")
    for flag, typ in (("steps", int), ("batch_size", int), ("n_ctx", int), ("d_model", int), ("n_heads", int),
                      ("lr", float), ("repeat_prob", float), ("periodic_prob", float),
                      ("min_period", int), ("max_period", int), ("seed", int), ("n_checkpoints", int),
                      ("n_linear_checkpoints", int), ("max_bytes", int), ("eval_sequences", int),
                      ("probe_sequences", int), ("probe_half", int), ("low", float), ("high", float),
                      ("threads", int)):
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=typ, default=getattr(d, flag))
    p.add_argument("--positions", default=d.positions, choices=["rotary", "standard"],
                   help="positional embeddings of the trained models")
    p.add_argument("--model", default=None, help="published model name (e.g. EleutherAI/pythia-70m); needs the hub")
    p.add_argument("--revisions", default="", help="its revisions, comma-separated (e.g. step1000,step2000)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_phase)


def _cmd_phase(args: Any) -> int:
    try:
        layers = tuple(int(x) for x in str(args.layers).split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--layers {args.layers!r}: write layer counts like 1,2") from None
    if not layers or min(layers) < 1:
        raise ConfigError(f"--layers {args.layers!r}: give at least one layer count ≥ 1")
    options = {k: getattr(args, k) for k in ("out", "steps", "batch_size", "n_ctx", "d_model", "n_heads", "lr",
                                             "repeat_prob", "periodic_prob", "min_period", "max_period", "seed",
                                             "n_checkpoints", "n_linear_checkpoints",
                                             "max_bytes", "eval_sequences", "probe_sequences", "probe_half", "low",
                                             "high", "threads", "model", "positions")}
    for flag, value in (("--n-heads", args.n_heads), ("--eval-sequences", args.eval_sequences),
                        ("--probe-sequences", args.probe_sequences), ("--probe-half", args.probe_half),
                        ("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    need = max(12, 2 * args.probe_half + 1)  # the ICL score's positions; the induction probe's [BOS] r r
    if args.n_ctx < need:
        raise ConfigError(f"--n-ctx {args.n_ctx} is too short: the induction probe needs 2 x --probe-half + 1 = "
                          f"{2 * args.probe_half + 1} tokens and the ICL score 12; use --n-ctx {need} or more "
                          "(or a smaller --probe-half)")
    if args.d_model % args.n_heads:
        raise ConfigError(f"--d-model {args.d_model} must be a multiple of --n-heads {args.n_heads}")
    revisions = tuple(r.strip() for r in args.revisions.split(",") if r.strip())
    table = run_phase_study(PhaseConfig(layers=layers, revisions=revisions, progress=not args.quiet, **options))
    print(f"report: {args.out}/report.html (and report.md); {len(table)} checkpoints in {args.out}/checkpoints.csv")
    return 0
