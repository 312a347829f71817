"""`circuitlab localize`: where is a task's causal variable represented? (IIA over sites × featurizers)

Writes into `--out` through the run-folder module (`reports.rundir`: locked, staged, published in one step,
every output hashed in `run.json`): `iia.parquet` / `iia.csv` (one row per site × featurizer × dims × split),
`counterfactuals.jsonl` (every pair used, with its split; a valid `--task FILE`), `rotations.safetensors` (the
learned and fitted subspaces, `[k, d]` per site and featurizer) and the standard report (`reports.localize_report`:
report.html / report.md with figures/, an IIA heatmap over layers × sites per featurizer on the test pairs, the
controls beside it). `--backend auto|fast|hook` picks the engine runner as `run` and `patch` do (in run.json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from circuitlab.patching.engine import BACKENDS, make_runner
from circuitlab.patching.localize import KNOWN, LocalizeConfig, LocalizeResult, default_sites, localize
from circuitlab.patching.models import load_model, weight_hash
from circuitlab.patching.reproducible import resolve_threads
from circuitlab.reports import rundir, store
from circuitlab.reports.config import ConfigError, check_device, check_seed
from circuitlab.reports.localize_report import LocalizeRecord, write_report
from circuitlab.reports.summaries import EngineRecord
from circuitlab.tasks.causal import causal_model
from circuitlab.tasks.counterfactual import read_counterfactuals
from circuitlab.tasks.custom import looks_like_path


def add_localize_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("localize", help="localise a causal variable: interchange interventions and DAS over sites")
    p.add_argument("--task", default="ioi", help="a task with a causal model (ioi, capitals, greater_than, "
                   "repeated_tokens) or a counterfactual file (.jsonl/.csv)")
    p.add_argument("--variable", default=None, help="the variable (ioi: io, s, order; capitals: country; "
                   "greater_than: year; repeated_tokens: next); a file names its own")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="runs/localize")
    p.add_argument("--components", default="resid_pre", help="comma-separated: resid_pre, resid_mid, resid_post, "
                   "attn_out, mlp_out, z (every head)")
    p.add_argument("--layers", default=None, help="comma-separated layers (default every layer)")
    p.add_argument("--positions", default=None, help="comma-separated roles, 'last' or indices (default every role)")
    p.add_argument("--featurizers", default="full,das", help=f"comma-separated: {', '.join(KNOWN)}")
    p.add_argument("--dims", default="16", help="comma-separated k for das, pca, neurons")
    p.add_argument("--steps", type=int, default=30, help="training steps of das, boundless and mask")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate of das, boundless and mask")
    p.add_argument("--top-sites", type=int, default=2, help="train das/boundless/mask only at the N sites with the best "
                   "full-vector train IIA (0 = every site)")
    p.add_argument("--n", type=int, default=None, help="counterfactual pairs (default 48; half train, half test; "
                   "a file: every row, or its first N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-budget", type=float, default=2048.0, help="MB per batch of pairs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="auto (the fast runner where it reproduces "
                   "the model, else the exact hook backend), fast or hook")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_localize)


def _ints(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: write comma-separated integers") from None


def _cmd_localize(args: argparse.Namespace) -> int:
    check_seed(args.seed)
    check_device(args.device)
    featurizers = tuple(f.strip() for f in args.featurizers.split(",") if f.strip())
    try:
        config = LocalizeConfig(featurizers=featurizers, dims=tuple(_ints(args.dims, "--dims") or ()), steps=args.steps,
                                lr=args.lr, seed=args.seed, memory_budget_mb=args.memory_budget,
                                top_sites=args.top_sites or None, progress=not args.quiet)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out = rundir.resolve_out(args.out)
    started = time.time()
    torch.set_num_threads(resolve_threads(args.threads))
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    say(f"loading model {args.model}")
    model = load_model(args.model, device=args.device)
    try:
        runner, backend, reason = make_runner(model, args.backend)
    except ValueError as exc:  # --backend fast on a model it does not reproduce
        raise ConfigError(str(exc)) from None
    try:  # bad data and bad sites fail here, before --out is touched
        if looks_like_path(args.task):
            cf = read_counterfactuals(args.task, model)
            if args.n is not None:
                if args.n > len(cf):
                    raise ValueError(f"--n {args.n}: {args.task} has only {len(cf)} rows")
                cf = cf.subset(range(args.n))
        else:
            if args.variable is None:
                raise ValueError(f"--variable is required: task {args.task!r} has "
                                 f"{sorted(causal_model(args.task).variables)}")
            cf = causal_model(args.task).counterfactuals(model, args.variable, args.n or 48, seed=args.seed)
        positions = None if args.positions is None else [int(p) if p.lstrip("-").isdigit() else p
                                                         for p in args.positions.split(",") if p]
        sites = default_sites(runner, cf, [c.strip() for c in args.components.split(",") if c.strip()],
                              _ints(args.layers, "--layers"), positions)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    say(f"{len(cf)} counterfactual pairs for {cf.variable!r}; {len(sites)} sites; featurizers {','.join(featurizers)}")
    with rundir.locked(out):
        result = localize(model, cf, sites=sites, config=config, runner=runner)
        staging = rundir.fresh_staging(out)
        split = result.counterfactuals.split
        record = LocalizeRecord(task=args.task, variable=result.variable, config=config, seed=args.seed,
                                engine=EngineRecord(backend=backend, requested=args.backend, reason=reason),
                                model_name=args.model, weight_hash=weight_hash(model), n_train=split.count("train"),
                                n_test=split.count("test"))
        write_outputs(result, record, staging)
        store.write_json(staging / rundir.RECORD, {**record.to_dict(), "wall_seconds": round(time.time() - started, 3),
                                                   "outputs": rundir.manifest(staging)})
        rundir.publish(out)
    best = result.to_frame().query("split == 'test' and featurizer != 'none'").sort_values("iia").tail(1)
    for row in best.itertuples():
        say(f"best test IIA {row.iia:.2f} [{row.iia_low:.2f}, {row.iia_high:.2f}] at {row.component} layer "
            f"{row.layer} {row.position} ({row.featurizer}, k={row.dims})")
    print(f"report: {out / 'report.html'} (and report.md, iia.csv)")
    return 0


def write_outputs(result: LocalizeResult, record: LocalizeRecord, folder: Path) -> None:
    """iia.parquet/csv, counterfactuals.jsonl, rotations.safetensors and the report (`reports.localize_report`:
    report.html, report.md, figures/) into `folder`."""
    frame = result.to_frame()
    store.write_parquet(folder / "iia.parquet", frame)
    store.write_csv(folder / "iia.csv", frame)
    store.write_with(folder / "counterfactuals.jsonl", result.counterfactuals.save_jsonl)
    tensors = {k: v.float().contiguous() for k, v in result.rotations.items()}
    store.write_with(folder / "rotations.safetensors", lambda p: save_file(tensors, str(p)))
    write_report(result, record, folder)
