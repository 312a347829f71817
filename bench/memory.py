"""Peak memory of a whole `circuitlab run --task ioi --method eap-ig` on SmolLM2 as the number of prompts grows.

Every stage iterates over prompt batches sized from `--memory-budget`, so the peak resident memory should stay
flat in n while the time grows about linearly. Each run is a fresh `circuitlab run` subprocess; its peak
resident set size is read from the kernel when it exits (`os.wait4` -> `ru_maxrss`), with its CPU time (user +
system, the measure that other processes on a shared machine disturb least) and its wall time. The runs use
the same budget and options; only `--n` changes. The last line is machine-readable:
`peak_mb_16=.. peak_mb_256=.. ratio=..` (ratio = peak at the largest n / peak at the smallest).

Run: `.venv/bin/python bench/memory.py [--ns 16,64,256] [--memory-budget 1024] [--steps 2]`.
The defaults keep what is not EAP-IG over batches small so that n=256 finishes on 2 shared CPU cores: 2 IG
steps, no exact head/MLP patching (`--positions none`; it is batched the same way but costs one patched
forward per head per batch), no residual heatmap, no role detection, no oracle, a two-point faithfulness curve.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def command(n: int, args: argparse.Namespace, out: Path) -> list[str]:
    """The `circuitlab run` command line for `--n n` (every other option the same for every n)."""
    return [sys.executable, "-m", "circuitlab.reports.cli", "run", "--task", "ioi", "--model", args.model,
           "--method", "eap-ig", "--n", str(n), "--memory-budget", str(args.memory_budget), "--steps", str(args.steps),
           "--positions", args.positions, "--resid-positions", "none", "--no-roles", "--oracle-edges", str(args.oracle_edges),
           "--n-boot", "100", "--percents", args.percents, "--threads", str(args.threads), "--quiet", "--out", str(out)]


def run_all(ns: list[int], args: argparse.Namespace, tmp: Path) -> dict[int, tuple[float, float, float]]:
    """{n: (peak resident MB, wall s, CPU s)}: one fresh `circuitlab run` process per n, one after another (or all
    at once with --parallel: peaks are per process either way; wall times then share the CPU, CPU times do not)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    results: dict[int, tuple[float, float, float]] = {}
    pending: dict[int, tuple[int, subprocess.Popen, float, Any]] = {}

    def start(n: int) -> None:
        errors = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen(command(n, args, tmp / f"n{n}"), env=env, stdout=subprocess.DEVNULL, stderr=errors)
        pending[proc.pid] = (n, proc, time.perf_counter(), errors)

    def finish() -> None:
        pid, status, usage = os.wait4(-1, 0)  # ru_maxrss of that child alone, in KiB on Linux
        n, proc, began, errors = pending.pop(pid)
        wall, code = time.perf_counter() - began, os.waitstatus_to_exitcode(status)
        if code != 0:
            errors.seek(0)
            print(errors.read().decode(errors="replace")[-2000:], file=sys.stderr)
            sys.exit(f"circuitlab run --n {n} failed with exit code {code}")
        errors.close()
        peak, cpu = usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime
        results[n] = (peak, wall, cpu)
        record = json.loads((tmp / f"n{n}" / "run.json").read_text())
        stages = " ".join(f"{k}={v:.0f}" for k, v in record.get("timings", {}).items())
        print(f"n={n:4d}  peak_rss_mb={peak:8.0f}  wall_s={wall:7.1f}  cpu_s={cpu:7.1f}  cpu_s_per_pair={cpu / n:6.2f}  "
              f"stage_wall_s: {stages}", flush=True)

    for n in ns:
        start(n)
        if not args.parallel:
            finish()
    while pending:
        finish()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="16,64,256", help="comma-separated numbers of prompt pairs")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--memory-budget", type=float, default=1024.0, help="MB, the same for every run")
    parser.add_argument("--steps", type=int, default=2, help="EAP-IG integration steps")
    parser.add_argument("--oracle-edges", type=int, default=0, help="0 skips the oracle stage")
    parser.add_argument("--percents", default="10,100", help="faithfulness curve points (%% of edges)")
    parser.add_argument("--positions", default="none", help="exact head/MLP patching positions (none skips it)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", action="store_true", help="start every n at once (CPU times stay comparable)")
    args = parser.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    print(f"circuitlab run --task ioi --model {args.model} --method eap-ig --memory-budget {args.memory_budget:.0f} "
          f"--steps {args.steps} --positions {args.positions} --resid-positions none --no-roles --oracle-edges "
          f"{args.oracle_edges} --n-boot 100 --percents {args.percents} --threads {args.threads} --n N", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(ns, args, Path(tmp))
    lo, hi = min(ns), max(ns)
    print(f"budget {args.memory_budget:.0f} MB{', runs in parallel' if args.parallel else ''}; n ratio {hi / lo:.0f}: wall time ratio {results[hi][1] / results[lo][1]:.2f}, "
          f"CPU time ratio {results[hi][2] / results[lo][2]:.2f} (both include ~the same fixed start-up: model load, "
          f"report)")
    print(f"peak_mb_{lo}={results[lo][0]:.0f} peak_mb_{hi}={results[hi][0]:.0f} "
          f"ratio={results[hi][0] / results[lo][0]:.2f}")


if __name__ == "__main__":
    main()
