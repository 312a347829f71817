"""Peak memory of a whole `circuitlab run --task ioi --method eap-ig` on SmolLM2 as the number of prompts grows.

Every stage iterates over prompt batches sized from `--memory-budget`, so the peak resident memory should stay
flat in n while the wall time grows about linearly. Each run is a fresh `circuitlab run` subprocess; its peak
resident set size is read from the kernel when it exits (`os.wait4` → `ru_maxrss`), its wall time around it.
The runs use the same budget and options; only `--n` changes. The last line is machine-readable:
`peak_mb_16=.. peak_mb_256=.. ratio=..` (ratio = peak at the largest n / peak at the smallest).

Run: `.venv/bin/python bench/memory.py [--ns 16,64,256] [--memory-budget 1024] [--steps 5]`.
The defaults keep the stages that are not EAP-IG small (exact patching at END only, no residual heatmap,
no role detection, 20 oracle edges) so that n=256 finishes on 2 CPU cores.
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


def run_once(n: int, args: argparse.Namespace, out: Path) -> tuple[float, float, int]:
    """(peak resident MB, wall seconds, exit code) of one `circuitlab run` with `--n n`, in a fresh process."""
    cmd = [sys.executable, "-m", "circuitlab.reports.cli", "run", "--task", "ioi", "--model", args.model,
           "--method", "eap-ig", "--n", str(n), "--memory-budget", str(args.memory_budget), "--steps", str(args.steps),
           "--positions", "END", "--resid-positions", "none", "--no-roles", "--oracle-edges", str(args.oracle_edges),
           "--n-boot", "100", "--percents", args.percents, "--threads", str(args.threads), "--quiet", "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(proc.stderr.read().decode(errors="replace")[-2000:], file=sys.stderr)
    proc.stderr.close()
    return usage.ru_maxrss / 1024.0, wall, code  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="16,64,256", help="comma-separated numbers of prompt pairs")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--memory-budget", type=float, default=1024.0, help="MB, the same for every run")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG integration steps")
    parser.add_argument("--oracle-edges", type=int, default=20, help="0 skips the oracle stage")
    parser.add_argument("--percents", default="1,10,100", help="faithfulness curve points (% of edges)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in ns:
            peak, wall, code = run_once(n, args, Path(tmp) / f"n{n}")
            if code != 0:
                sys.exit(f"circuitlab run --n {n} failed with exit code {code}")
            results[n] = (peak, wall)
            record = json.loads((Path(tmp) / f"n{n}" / "run.json").read_text())
            stages = " ".join(f"{k}={v:.0f}" for k, v in record.get("timings", {}).items())
            print(f"n={n:4d}  peak_rss_mb={peak:8.0f}  wall_s={wall:7.1f}  s_per_pair={wall / n:6.2f}  "
                  f"stage_s: {stages}", flush=True)
    lo, hi = min(ns), max(ns)
    print(f"budget {args.memory_budget:.0f} MB; time ratio n={hi}/n={lo}: {results[hi][1] / results[lo][1]:.2f} "
          f"(n ratio {hi / lo:.0f})")
    print(f"peak_mb_{lo}={results[lo][0]:.0f} peak_mb_{hi}={results[hi][0]:.0f} "
          f"ratio={results[hi][0] / results[lo][0]:.2f}")


if __name__ == "__main__":
    main()
