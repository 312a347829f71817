"""Small and faithful circuits on SmolLM2-135M IOI: the size each method needs to reach a faithfulness target.

For every method (see `graphs.faithful`) the circuit is chosen on discovery prompts as the smallest prefix of
the method's ranking whose exact faithfulness reaches the target (heads kept, every other head's output
replaced by its corrupted-run value at all positions, everything else recomputed), then measured on held-out
prompts drawn from IOI templates the discovery prompts do not use. The baseline is `single-effect`: heads
ranked by their exact single-head effect. Also printed: the held-out faithfulness of the ranking's prefixes
(the size at which the ranking reaches the target on held-out prompts). The last line is machine-readable:
`best_method=.. heads_at_0.8=.. edges_at_0.8=.. heldout_faithfulness=..` (best_method: the node-level method with
the fewest heads whose held-out faithfulness reaches the target without overshooting, i.e. lies in
[target, 2 - target] (`graphs.selection.within`; a circuit at 1.49 does not reproduce the behaviour either), else
the one closest to 1; edges_at: the size of the smallest *edge* circuit, from an edge-level method, meeting the
same criterion on held-out prompts — `none` if none does; the line before it names that method, or the best edge
circuit reached and its size).

Edge circuits are chosen on validation prompts (`--validation-n`, templates neither discovery nor held-out uses;
`graphs.selection.select_validated`: the smallest prefix of the signed or absolute ranking within [target,
2 - target] on the discovery and the validation prompts); edge pruning starts from EAP-IG's top edges and stops
early on the validation prompts. `--edge-positions roles` adds position-aware EAP-IG edges (`eap-ig-edges@roles`:
every edge split by the IOI role segment it is read at, `patching.topology.PositionalGraph`). The last line adds
`edge_method=.. edge_percent=..`: which edge circuit edges_at counts and its share of its graph's edges
(position-aware circuits count (edge, segment) pairs of the position-aware graph).

Run: `.venv/bin/python bench/circuits.py [--n 16] [--validation-n 8] [--steps 5] [--mask-steps 60] [--edge-steps 60]
[--edge-sparsity 1e-4] [--mask-batch 4] [--methods ...] [--edge-positions roles] [--threads 1]`;
bench/results/circuits.txt holds the last run and its command (circuits_2026-11-28.txt: the last run of every method).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch

from circuitlab.graphs.faithful import FaithfulConfig, find_faithful_circuit
from circuitlab.graphs.selection import distance, within
from circuitlab.patching.attribution import eap_ig_scores
from circuitlab.patching.edges import prepare_edges, with_positions
from circuitlab.patching.mask_learning import MaskConfig
from circuitlab.patching.methods import get_search, search_names
from circuitlab.patching.models import load_model
from circuitlab.tasks import get_task
from circuitlab.tasks.split import heldout_split, shared_templates, validation_split


def held_size(curve: pd.DataFrame | None, target: float) -> str:
    if curve is None:
        return "-"
    hits = curve[[within(f, target) for f in curve["faithfulness"]]]
    return str(int(hits["size"].min())) + " (grid)" if len(hits) else f">{int(curve['size'].max())}"


def best_rows(table: pd.DataFrame, target: float) -> tuple[pd.Series, pd.Series | None, bool]:
    """(node-level method with the fewest heads whose held-out faithfulness is `within` the target band, else the
    one closest to 1; edge-level method with the fewest edges within it, else the one closest to 1 (None if no
    edge method ran); whether that edge circuit is within the band). edges_at is the size of an actual edge
    circuit, not the edges a head circuit implies."""
    ok = table["heldout_faithfulness"].map(lambda f: within(float(f), target))
    gap = table["heldout_faithfulness"].map(lambda f: distance(float(f)))
    nodes = table["level"] == "node" if (table["level"] == "node").any() else table["level"].notna()
    best = (table[nodes & ok].sort_values(["heads", "edges"]).iloc[0] if (nodes & ok).any()
            else table[nodes].loc[gap[nodes].idxmin()])
    edge = table["level"] == "edge"
    if not edge.any():
        return best, None, False
    if (edge & ok).any():  # the smallest share of its own graph (position-aware graphs have more edges)
        return best, table[edge & ok].sort_values("edge_percent").iloc[0], True
    return best, table.loc[gap[edge].idxmin()], False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=16, help="IOI pairs for discovery (and as many held-out)")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG integration steps")
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--mask-steps", type=int, default=60, help="node mask-learning steps")
    parser.add_argument("--mask-batch", type=int, default=4, help="prompts per mask-learning step")
    parser.add_argument("--sparsity", type=float, default=0.02, help="mask-learning L0 weight (per kept item)")
    parser.add_argument("--mask-lr", type=float, default=0.25, help="mask-learning Adam learning rate")
    parser.add_argument("--edge-steps", type=int, default=60, help="edge mask-learning steps")
    parser.add_argument("--edge-sparsity", type=float, default=1e-4,
                        help="edge mask-learning L0 weight per kept edge (SmolLM2 has ~123k edges, 270 heads)")
    parser.add_argument("--validation-n", type=int, default=8,
                        help="IOI pairs from other templates for choosing edge circuits' size (0: choose on discovery)")
    parser.add_argument("--edge-positions", default="none", choices=("none", "roles"),
                        help="roles: also position-aware EAP-IG edge circuits (eap-ig-edges@roles)")
    parser.add_argument("--init-fraction", type=float, default=0.02,
                        help="edge pruning starts with EAP-IG's top fraction of edges open (0: all open, as before)")
    parser.add_argument("--check-every", type=int, default=10, help="edge pruning: steps between validation checks")
    parser.add_argument("--patience", type=int, default=3, help="edge pruning: checks without improvement before stopping")
    parser.add_argument("--methods", nargs="+", default=list(search_names(benchmark=True)),
                        choices=search_names())
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    print("command: python bench/circuits.py " + " ".join(sys.argv[1:]), flush=True)
    model = load_model(args.model)
    task = get_task("ioi")
    if args.validation_n:
        disc, val, held = validation_split(task, model, args.n, args.validation_n, args.n, seed=args.seed,
                                           corruption="abc")
    else:
        (disc, held), val = heldout_split(task, model, args.n, args.n, seed=args.seed, corruption="abc"), None
    print(f"model {args.model}; IOI (ABC) {len(disc)} discovery pairs from templates "
          f"{sorted(set(disc.meta['template_id']))}, {len(held)} held-out pairs from templates "
          f"{sorted(set(held.meta['template_id']))} (shared: {sorted(shared_templates(disc, held)) or 'none'})"
          + (f", {len(val)} validation pairs from templates {sorted(set(val.meta['template_id']))}" if val else ""))
    ctx, hctx = prepare_edges(model, task, disc), prepare_edges(model, task, held)
    vctx = prepare_edges(model, task, val) if val is not None else None
    print(f"logit diff clean {ctx.clean_metric:+.3f} corrupt {ctx.corrupt_metric:+.3f} (discovery); "
          f"clean {hctx.clean_metric:+.3f} corrupt {hctx.corrupt_metric:+.3f} (held-out)")
    config = FaithfulConfig(target=args.target, eap_ig_steps=args.steps, n_boot=args.n_boot, seed=args.seed,
                            masks=MaskConfig(steps=args.mask_steps, sparsity=args.sparsity, seed=args.seed, lr=args.mask_lr,
                                             batch_size=args.mask_batch),
                            edge_masks=MaskConfig(level="edge", steps=args.edge_steps, sparsity=args.edge_sparsity,
                                                  lr=args.mask_lr, seed=args.seed, batch_size=args.mask_batch,
                                                  check_every=args.check_every, patience=args.patience),
                            init_from_scores=args.init_fraction > 0, init_fraction=args.init_fraction)
    rows = []
    edge_scores = None
    # they rank EAP-IG's edge scores, or (mask searches, with --init-fraction) start from them
    shares = [m for m in args.methods if get_search(m).scores == "eap-ig"
              or (get_search(m).ranks == "masks" and args.init_fraction > 0)]
    if shares:
        start = time.time()
        edge_scores = eap_ig_scores(ctx, steps=args.steps)
        print(f"EAP-IG ({args.steps} steps) over {ctx.graph.n_edges} edges: {time.time() - start:.0f} s (shared by "
              f"{', '.join(shares)})", flush=True)
    runs = [(method, method, ctx, hctx, vctx) for method in args.methods]
    if args.edge_positions != "none":  # right after the plain EAP-IG edge circuit, if it runs
        at = next((i + 1 for i, r in enumerate(runs) if r[0] == "eap-ig-edges"), len(runs))
        runs.insert(at, (f"eap-ig-edges@{args.edge_positions}", "eap-ig-edges", with_positions(ctx, args.edge_positions),
                     with_positions(hctx, args.edge_positions),
                     with_positions(vctx, args.edge_positions) if vctx is not None else None))
    for label, method, dctx, held_ctx, val_ctx in runs:
        print(f"[{label}] ...", flush=True)
        shared = edge_scores if method in shares else None
        if dctx is not ctx:
            start = time.time()
            shared = eap_ig_scores(dctx, steps=args.steps)
            print(f"  position-aware EAP-IG over {dctx.graph.n_edges} edges ({len(dctx.split.names)} segments: "
                  f"{', '.join(dctx.split.names)}): {time.time() - start:.0f} s", flush=True)
        edge_level = get_search(method).level == "edge"
        result = find_faithful_circuit(dctx, method, config, heldout=held_ctx, log=lambda m: print(m, flush=True),
                                       edge_scores=shared, validation=val_ctx if edge_level else None)
        row = result.row()
        row["method"] = label
        row["edge_percent"] = 100.0 * row["edges"] / dctx.graph.n_edges if edge_level else float("nan")
        row["heldout_size_at_target"] = held_size(result.heldout_curve, args.target)
        rows.append(row)
        curve = result.circuit.curve.merge(result.heldout_curve, on="size", how="left", suffixes=("", "_heldout"))
        has_val = "validation" in curve.columns
        print(f"  faithfulness vs size ({result.level}s; discovery [95% CI] | "
              f"{'validation [95% CI] | ' if has_val else ''}held-out [95% CI])"
              + (f", {'absolute' if bool(curve['absolute'].iloc[0]) else 'signed'} scores:" if has_val else ":"))
        for r in curve.itertuples():
            middle = f"{r.validation:+.3f} [{r.validation_low:+.3f}, {r.validation_high:+.3f}] | " if has_val else ""
            print(f"    {int(r.size):7d}: {r.faithfulness:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] | {middle}"
                  f"{r.faithfulness_heldout:+.3f} [{r.ci_low_heldout:+.3f}, {r.ci_high_heldout:+.3f}]")
        print(f"  chosen: {row['heads']} heads, {row['mlps']} MLPs, {row['edges']} edges; discovery "
              f"{row['discovery_faithfulness']:.3f} [{row['discovery_low']:.3f}, {row['discovery_high']:.3f}], "
              + (f"validation {row['validation_faithfulness']:.3f} [{row['validation_low']:.3f}, "
                 f"{row['validation_high']:.3f}], " if row['validation_faithfulness'] == row['validation_faithfulness'] else "")
              + "held-out "
              f"{row['heldout_faithfulness']:.3f} [{row['heldout_low']:.3f}, {row['heldout_high']:.3f}]; "
              f"{row['seconds']:.0f} s {result.notes}")
        print(f"  circuit: {' '.join(result.circuit.items[:60])}{' ...' if result.circuit.size > 60 else ''}", flush=True)
    table = pd.DataFrame(rows)
    cols = ["method", "level", "heads", "mlps", "edges", "edge_percent", "discovery_faithfulness",
            "validation_faithfulness", "heldout_faithfulness", "heldout_low", "heldout_high", "heldout_size_at_target",
            "seconds"]
    print()
    print(f"target {args.target}: circuit chosen on discovery prompts, faithfulness measured on held-out prompts")
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"total {time.time() - started:.0f} s")
    best, edge_row, edge_ok = best_rows(table, args.target)
    if edge_row is None:
        print("edge circuits: no edge-level method ran")
    else:
        print(f"edge circuits: {'smallest within' if edge_ok else 'none within'} [{args.target:g}, {2 - args.target:g}] "
              f"held-out: {edge_row['method']} {int(edge_row['edges'])} edges ({edge_row['edge_percent']:.2f}% of its graph, "
              f"{int(edge_row['heads'])} heads), "
              f"held-out {edge_row['heldout_faithfulness']:.3f}" + ("" if edge_ok else " (the closest to 1 reached)"))
    edges_at = str(int(edge_row["edges"])) if edge_ok else "none"
    edge_tail = (f" edge_method={edge_row['method']} edge_percent={edge_row['edge_percent']:.3f}"
                 f" edge_heldout={edge_row['heldout_faithfulness']:.3f}" if edge_ok else "")
    print(f"best_method={best['method']} heads_at_{args.target:g}={int(best['heads'])} "
          f"edges_at_{args.target:g}={edges_at} heldout_faithfulness={best['heldout_faithfulness']:.3f}{edge_tail}")


if __name__ == "__main__":
    main()
