"""The `circuitlab` command line: run, patch, path, report, tasks, models (`bench` from reports.bench, `sweep`
from reports.grid, `phase` from reports.phase).

Every failure ends with one line `circuitlab: error: <reason>` on stderr and a non-zero exit status
(2 for bad arguments or configuration, 1 for failures while running, 130 when interrupted).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn

from circuitlab.patching.methods import run_method_names, search_names
from circuitlab.patching.models import list_models
from circuitlab.reports import rundir
from circuitlab.reports.bench import add_bench_parser
from circuitlab.reports.config import ConfigError, build_configs, load_config_file
from circuitlab.reports.executors import EXECUTORS
from circuitlab.reports.grid import add_sweep_parser
from circuitlab.reports.localize import add_localize_parser
from circuitlab.reports.phase import add_phase_parser
from circuitlab.reports.render import render_report
from circuitlab.reports.run import execute
from circuitlab.reports.rundir import annotate
from circuitlab.reports.sweep import SweepConfig, run_patch, run_path
from circuitlab.tasks import get_task, list_tasks


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _add_common(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--task", default=d("ioi"), help="task name (see `circuitlab tasks`)")
    p.add_argument("--model", default=d("smollm2-135m"), help="model name or directory (see `circuitlab models`)")
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("--n", type=int, default=None, help="number of prompt pairs (default 16; a dataset file: every row)")
    p.add_argument("--seed", type=int, default=d(0))
    p.add_argument("--corruption", default=None, help="IOI corruption: abc (default) or s2_io_flip")
    p.add_argument("--memory-budget", type=float, default=d(2048.0),
                   help="MB for one batch of prompts (sets the batch size) and per batched forward")
    p.add_argument("--device", default=d("cpu"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores free at the start)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--backend", default=d("auto"), choices=None,
                   help="auto (the fast runner where it reproduces the model, else the exact hook backend), fast or "
                        "hook: run both to check one against the other")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="circuitlab", description="Activation patching and circuit discovery.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="a whole discovery: pairs, scores, exact checks, circuit, roles, report")
    run.add_argument("--config", help="YAML/JSON experiment file (CLI flags override it; `runs:` makes a sweep)")
    _add_common(run, defaults=False)
    run.add_argument("--batch-size", type=int, default=None,
                     help="prompt pairs per batch (default: as many as --memory-budget allows)")
    run.add_argument("--method", default=None, help=f"one of {', '.join(run_method_names())} (default eap-ig)")
    run.add_argument("--faithfulness-target", type=float, default=None,
                     help="the circuit is the smallest one whose exact faithfulness reaches this (default 0.8)")
    run.add_argument("--circuit-method", default=None,
                     help="how the circuit is found: auto (the method's ranking) or one of "
                          f"{', '.join(search_names())}")
    run.add_argument("--heldout-n", type=int, default=None, help="held-out pairs (other templates; default --n)")
    run.add_argument("--validation-n", type=int, default=None,
                     help="choose the circuit's size on this many validation pairs too (templates neither the "
                          "discovery nor the held-out pairs use; the task needs >= 3 templates); default: off")
    run.add_argument("--mask-steps", type=int, default=None, help="mask-learning steps (default 60)")
    run.add_argument("--stability-resamples", type=int, default=None,
                     help="rediscover the circuit on this many bootstrap resamples (default 0)")
    run.add_argument("--variables", default=None,
                     help="task variables (e.g. io,s) whose IIA is measured at each circuit head's output")
    run.add_argument("--variables-heads", default=None,
                     help="which circuit heads --variables measures: all (default), or comma-separated roles "
                          "(name_mover, ...) and head names (a9.h6)")
    run.add_argument("--top-fraction", type=float, default=None, help="keep this fraction of scored edges/nodes")
    run.add_argument("--threshold", type=float, default=None, help="keep edges/nodes with |score| >= this")
    run.add_argument("--top-k", type=int, default=None, help="keep the k best edges/nodes")
    run.add_argument("--positions", default=None, help="exact patching positions: all, each, ROLE[,ROLE], ints or none")
    run.add_argument("--resid-positions", default=None, help="residual heatmap: each, roles or none")
    run.add_argument("--edge-positions", default=None,
                     help="roles: position-aware edges, each edge split by the role segment it is read at; none (default)")
    run.add_argument("--resid-layers", type=int, default=None, help="at most this many layers in the heatmap")
    run.add_argument("--steps", type=int, default=None, help="EAP-IG integration steps (default 5)")
    run.add_argument("--oracle-edges", type=int, default=None, help="edges re-scored exactly (default 200)")
    run.add_argument("--acdc-threshold", type=float, default=None, help="ACDC pruning threshold (default 0.05)")
    run.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples (default 1000)")
    run.add_argument("--percents", default=None, help="faithfulness curve points, %% of edges (comma-separated)")
    run.add_argument("--roles", dest="roles", action="store_true", default=None, help="detect head roles (default)")
    run.add_argument("--no-roles", dest="roles", action="store_false", help="skip role detection")
    run.add_argument("--force", action="store_true", default=None,
                     help="allow ACDC on large graphs, and replace files in --out that circuitlab did not write")
    run.add_argument("--task-option", action="append", default=[], metavar="KEY=JSON",
                     help="extra task.generate option, e.g. seq_len=8 (repeatable)")
    run.set_defaults(func=_cmd_run)

    for name, help_text, options, func in SWEEP_COMMANDS:
        sweep_parser = sub.add_parser(name, help=help_text)
        _add_common(sweep_parser, defaults=True)
        for flag, default, kind, flag_help in options:
            sweep_parser.add_argument(flag, type=kind, default=default, help=flag_help)
        sweep_parser.set_defaults(func=func)

    report = sub.add_parser("report", help="re-render a run's report from its saved results")
    report.add_argument("run_dir")
    report.set_defaults(func=_cmd_report)

    sub.add_parser("tasks", help="list tasks").set_defaults(func=_cmd_tasks)
    sub.add_parser("models", help="list loadable models").set_defaults(func=_cmd_models)

    add_bench_parser(sub)

    add_sweep_parser(sub)

    add_phase_parser(sub)
    add_localize_parser(sub)
    return parser


# ---------------------------------------------------------------------- commands

def _task_options(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--task-option {item!r}: write KEY=VALUE, e.g. seq_len=8")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    file_values = load_config_file(args.config) if args.config else {}
    cli = {k: getattr(args, k) for k in ("task", "model", "method", "out", "n", "seed", "corruption",
                                         "top_fraction", "threshold", "top_k", "positions", "resid_positions",
                                         "resid_layers", "memory_budget", "batch_size", "device", "steps", "oracle_edges",
                                         "acdc_threshold", "n_boot", "percents", "roles", "force", "threads",
                                         "faithfulness_target", "circuit_method", "heldout_n", "mask_steps",
                                         "stability_resamples", "backend", "variables", "variables_heads",
                                         "edge_positions", "validation_n")}
    if args.task_option:
        cli["task_options"] = {**file_values.get("task_options", {}), **_task_options(args.task_option)}
    configs = build_configs(file_values, cli)
    for i, cfg in enumerate(configs):
        try:
            record = execute(cfg, quiet=args.quiet)
        except Exception as exc:
            if len(configs) > 1:
                annotate(exc, prefix=f"run {i + 1} of {len(configs)} (out {cfg.out}): ")
            raise
        print(f"report: {cfg.out}/report.html (and report.md); run record {cfg.out}/run.json"
              + (f"; resumed {', '.join(record['resumed_stages'])}" if record["resumed_stages"] else ""))
    return 0


def _sweep_config(args: argparse.Namespace, spec: dict[str, Any], default_out: str) -> Any:
    return SweepConfig(task=args.task, model=args.model, out=args.out or default_out, n=args.n, seed=args.seed,
                       corruption=args.corruption, direction=args.direction, memory_budget=args.memory_budget,
                       device=args.device, threads=args.threads, backend=args.backend, spec=spec)


def _cmd_patch(args: argparse.Namespace) -> int:
    if args.shards < 1:
        raise ConfigError(f"--shards must be >= 1, got {args.shards}")
    if args.executor not in EXECUTORS:
        raise ConfigError(f"--executor {args.executor!r} is unknown: use {' or '.join(EXECUTORS)}")
    spec = {"component": args.component, "positions": args.positions, "shards": args.shards,
            "executor": args.executor, "address": args.address}
    cfg = _sweep_config(args, spec, "runs/patch")
    run_patch(cfg, quiet=args.quiet, command=_command_line())
    return 0


def _cmd_path(args: argparse.Namespace) -> int:
    spec = {"senders": args.senders, "receivers": args.receivers, "channel": args.channel,
            "sender_positions": args.sender_positions, "receiver_positions": args.receiver_positions}
    run_path(_sweep_config(args, spec, "runs/path"), quiet=args.quiet, command=_command_line())
    return 0


# (command, help, [(flag, default, type, help)], handler): the one-sweep commands' own options
SWEEP_COMMANDS = (
    ("patch", "one activation-patching sweep", [
        ("--component", "head", str, "head|resid|attn|mlp|q|k|v|pattern (or a kind)"),
        ("--positions", "all", str, "all, each, ROLE[,ROLE] or integer positions"),
        ("--direction", "denoise", str, "denoise (clean into corrupt) or noise"),
        ("--shards", 1, int, "split the sweep by layer over this many workers"),
        ("--executor", "sequential", str, "where shards run: sequential or ray"),
        ("--address", None, str, "Ray cluster address for the shards (implies ray)")], _cmd_patch),
    ("path", "one path-patching sweep", [
        ("--senders", "heads", str, "heads, all, or a1.h2,a3.h4+a3.h5 (+ joins a set)"),
        ("--receivers", "", str, "receiver heads, e.g. a9.h9,a9.h6 (not for logits)"),
        ("--channel", "q", str, "q, k, v or logits"),
        ("--sender-positions", None, str, "all, ROLE or an integer"),
        ("--receiver-positions", None, str, "all, ROLE or an integer"),
        ("--direction", "noise", str, "noise (paper default) or denoise")], _cmd_path),
)


def _cmd_report(args: argparse.Namespace) -> int:
    folder = Path(args.run_dir).expanduser().absolute()
    if folder.is_file():
        raise ConfigError(f"{args.run_dir!r} is a file; `circuitlab report` takes the folder a `circuitlab run` wrote")
    if not folder.is_dir():
        raise FileNotFoundError(f"run directory {args.run_dir!r} does not exist")
    kind = rundir.result_kind(folder)
    if kind in ("sweep", "phase", "localize"):
        raise ConfigError(f"{args.run_dir!r} holds a circuitlab {kind} result, whose report is written with it "
                          f"({'summary.html' if kind == 'sweep' else 'report.html'}); `circuitlab report` re-renders "
                          "a `circuitlab run` folder")
    with rundir.locked(folder):
        html_path, md_path = render_report(folder)
    print(f"report: {html_path} (and {md_path.name})")
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    for name in list_tasks():
        task = get_task(name)
        print(f"{name:16s} metric {task.metric_name:13s} roles {','.join(task.roles):38s} {task.description}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    for info in list_models():
        print(f"{info.name:24s} {'offline' if info.offline else 'online ':8s} {info.description}")
    return 0


def _command_line() -> str:
    return " ".join(["circuitlab"] + [shlex.quote(a) for a in sys.argv[1:]])


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing key {text}"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `circuitlab` console script (set CIRCUITLAB_DEBUG=1 for tracebacks)."""
    if os.environ.get("CIRCUITLAB_DEBUG"):
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"circuitlab: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("circuitlab: error: interrupted; rerun the same command to resume from saved results", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError, KeyError, OSError) as exc:
        print(f"circuitlab: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # the one-line contract holds for unexpected failures too
        print(f"circuitlab: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
