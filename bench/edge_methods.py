"""Edge-level discovery on SmolLM2-135M IOI: EAP-IG over the whole graph, checked exactly.

Prints, from one run: the graph's edge count and EAP-IG's wall time; the faithfulness of the top-5% circuit;
MIB CPR and CMD with bootstrap 95% intervals over prompts; and the oracle check (Spearman rank correlation
between EAP-IG scores and exact edge-patching scores on sampled edges). The last line is machine-readable.

Run: `.venv/bin/python bench/edge_methods.py [--n 16] [--steps 5] [--oracle-edges 200] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from circuitlab.patching.attribution import eap_ig_scores, oracle_check
from circuitlab.patching.edges import prepare_edges
from circuitlab.patching.faithfulness import faithfulness_curve
from circuitlab.patching.models import load_model
from circuitlab.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="IOI prompt pairs (ABC corruption)")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG integration steps")
    parser.add_argument("--oracle-edges", type=int, default=200, help="edges re-scored exactly")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model("smollm2-135m")
    task = get_task("ioi")
    pairs = task.generate(model, args.n, seed=0, corruption="abc")
    start = time.perf_counter()
    ctx = prepare_edges(model, task, pairs)
    t_prepare = time.perf_counter() - start
    print(f"SmolLM2-135M IOI (ABC), {len(pairs)} prompts: m(clean) {ctx.clean_metric:.3f}, "
          f"m(corrupt) {ctx.corrupt_metric:.3f}; graph of {ctx.graph.n_edges} edges (prepared in {t_prepare:.1f}s)")
    start = time.perf_counter()
    scores = eap_ig_scores(ctx, steps=args.steps, progress=True)
    t_eap_ig = time.perf_counter() - start
    print(f"EAP-IG ({args.steps} steps) over all {ctx.graph.n_edges} edges: {t_eap_ig:.1f}s")
    start = time.perf_counter()
    result = faithfulness_curve(ctx, scores, n_boot=args.n_boot, progress=True)
    t_curve = time.perf_counter() - start
    curve = result.curve[result.curve.selection == "signed"].set_index("percent")
    top5 = curve.loc[5.0]
    print(f"top-5% circuit ({int(top5.n_edges)} edges): faithfulness {top5.faithfulness:.3f} "
          f"[{top5.ci_low:.3f}, {top5.ci_high:.3f}]")
    print("faithfulness curve (signed scores):")
    for pct, row in curve.iterrows():
        print(f"  {pct:6.1f}% {int(row.n_edges):6d} edges  f = {row.faithfulness:7.3f} "
              f"[{row.ci_low:7.3f}, {row.ci_high:7.3f}]")
    print(f"CPR {result.cpr:.3f} [{result.cpr_ci[0]:.3f}, {result.cpr_ci[1]:.3f}]  "
          f"CMD {result.cmd:.3f} [{result.cmd_ci[0]:.3f}, {result.cmd_ci[1]:.3f}]  ({t_curve:.1f}s)")
    start = time.perf_counter()
    rho, sample = oracle_check(ctx, scores, n_edges=args.oracle_edges, progress=True)
    t_oracle = time.perf_counter() - start
    print(f"oracle check: Spearman {rho:.3f} between EAP-IG and exact edge patching on {len(sample)} edges "
          f"({t_oracle:.1f}s)")
    print(f"edges={ctx.graph.n_edges} eap_ig_seconds={t_eap_ig:.1f} top5_faithfulness={top5.faithfulness:.3f} "
          f"cpr={result.cpr:.3f} cmd={result.cmd:.3f} oracle_spearman={rho:.3f}")


if __name__ == "__main__":
    main()
