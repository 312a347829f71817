"""The run's circuit as a measured claim: chosen by exact faithfulness, checked on held-out prompts.

`split_prompts` draws the run's discovery pairs and held-out pairs from disjoint templates (tasks that record
templates), or from another seed (tasks without templates; the report says so, and says when the two sets
overlap because the task has too few distinct prompts). `faithful_stage` ranks
components with `--circuit-method`, keeps the smallest prefix whose exact faithfulness on the discovery pairs
reaches `--faithfulness-target`, measures it on the held-out pairs, and optionally reruns discovery on
bootstrap resamples (`--stability-resamples`) for inclusion frequencies. `faithful_graph` turns the result into
the run's circuit graph; `faithful_section` writes the report section from the saved files.
"""

from __future__ import annotations

from typing import Any, Callable

import pandas as pd
import torch

HELDOUT_SEED_OFFSET = 1_000_003
RUN_METHOD_TO_RANKING = {"eap-ig": "eap-ig", "eap": "eap", "attribution": "eap", "activation": "single-effect",
                         "acdc": "eap-ig"}


def split_prompts(task: Any, model: Any, n: int, n_heldout: int, seed: int, options: dict[str, Any]
                  ) -> tuple[Any, Any, str]:
    """(discovery pairs, held-out pairs, how they were split)."""
    from circuitlab.tasks.split import heldout_split

    try:
        disc, held = heldout_split(task, model, n, n_heldout, seed=seed, **options)
        return disc, held, "templates"
    except ValueError:
        pass  # no template column, or too few pairs for a pool: held-out pairs from another seed
    disc = task.generate(model, n, seed=seed, **options)
    held = task.generate(model, n_heldout, seed=seed + HELDOUT_SEED_OFFSET, **options)
    shared = set(disc.clean_texts) & set(held.clean_texts)
    return disc, held, "overlapping" if shared else "seed"


def faithful_stage(model: Any, task: Any, discovery: Any, heldout: Any, cfg: Any, *, ectx: Any = None,
                   edge_scores: torch.Tensor | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Find the run's faithful circuit; returns JSON-able results plus DataFrames under `frames`."""
    from circuitlab.graphs.faithful import FaithfulConfig, find_faithful_circuit
    from circuitlab.patching.edges import prepare_edges
    from circuitlab.patching.mask_learning import MaskConfig

    method = cfg.circuit_method if cfg.circuit_method != "auto" else RUN_METHOD_TO_RANKING.get(cfg.method, "eap-ig")
    if method not in ("eap", "eap-ig", "greedy", "eap-edges", "eap-ig-edges"):
        edge_scores = None
    ectx = ectx if ectx is not None else prepare_edges(model, task, discovery)
    hctx = prepare_edges(model, task, heldout)
    masks = MaskConfig(steps=cfg.mask_steps, seed=cfg.seed, batch_size=min(8, len(discovery)))
    config = FaithfulConfig(target=cfg.faithfulness_target, eap_ig_steps=cfg.steps, n_boot=cfg.n_boot, seed=cfg.seed,
                            masks=masks, edge_masks=MaskConfig(level="edge", steps=cfg.mask_steps, seed=cfg.seed,
                                                               batch_size=min(8, len(discovery))))
    say(f"  {method}: smallest circuit with exact faithfulness >= {cfg.faithfulness_target} on {len(discovery)} "
        f"discovery pairs, checked on {len(heldout)} held-out pairs")
    result = find_faithful_circuit(ectx, method, config, heldout=hctx, edge_scores=edge_scores, log=say)
    frames = {"faithful_curve": result.circuit.curve.merge(result.heldout_curve, on="size", how="left",
                                                           suffixes=("", "_heldout")),
              "faithful_ranking": result.ranking}
    stability = None
    if cfg.stability_resamples > 0:
        from circuitlab.graphs.stability import inclusion_frequency

        say(f"  stability: rediscovering on {cfg.stability_resamples} bootstrap resamples")
        stability = inclusion_frequency(
            ectx, lambda sub: find_faithful_circuit(sub, method, config, edge_scores=None).circuit.items,
            n_resamples=cfg.stability_resamples, seed=cfg.seed, reference=result.circuit.items)
        frames["stability"] = stability
    held_f, held_ci = result.heldout if result.heldout else (float("nan"), (float("nan"), float("nan")))
    say(f"  circuit: {result.sizes['heads']} heads, {result.sizes['mlps']} MLPs, {result.sizes['edges']} edges; "
        f"faithfulness {result.circuit.faithfulness:.3f} (discovery), {held_f:.3f} "
        f"[{held_ci[0]:.3f}, {held_ci[1]:.3f}] (held-out)")
    return {"method": method, "level": result.level, "target": cfg.faithfulness_target, "items": result.circuit.items,
            "reached": result.circuit.reached, "discovery": result.circuit.faithfulness,
            "discovery_ci": list(result.circuit.ci), "heldout": held_f, "heldout_ci": list(held_ci),
            "heldout_reached": bool(held_f >= cfg.faithfulness_target), "sizes": result.sizes,
            "candidates": result.circuit.candidates, "n_discovery": len(discovery), "n_heldout": len(heldout),
            "heads_only": config.heads_only, "notes": result.notes, "seconds": result.seconds, "frames": frames}


def faithful_graph(result: dict[str, Any], n_layers: int, name: str) -> Any:
    """The circuit graph of a faithful selection (node circuits: selected heads/MLPs with implied edges)."""
    from circuitlab.graphs.circuit import Selection, circuit_from_edge_scores, circuit_from_node_scores
    from circuitlab.patching.components import parse_node

    ranking = result["frames"]["faithful_ranking"].set_index("item")["score"]
    items = result["items"]
    if result["level"] == "edge":
        frame = pd.DataFrame({"edge": items, "score": [float(ranking[i]) for i in items]})
        graph = circuit_from_edge_scores(frame, Selection(top_fraction=1.0), method=result["method"],
                                         n_layers=n_layers, name=name)
    else:
        nodes = [parse_node(i) for i in items]
        frame = pd.DataFrame({"component": ["z" if n.kind == "head" else "mlp_out" for n in nodes],
                              "layer": [n.layer for n in nodes],
                              "head": [n.head if n.kind == "head" else float("nan") for n in nodes],
                              "effect": [float(ranking[i]) or 1e-12 for i in items]})
        graph = circuit_from_node_scores(frame, Selection(top_fraction=1.0), method=result["method"],
                                         n_layers=n_layers, name=name)
    graph.graph.update(faithfulness_heldout=float(result["heldout"]), faithfulness_discovery=float(result["discovery"]),
                       faithfulness_target=float(result["target"]),
                       mlps_recomputed=bool(result["heads_only"] and result["level"] == "node"))
    return graph


def faithful_paragraphs(summary: dict[str, Any], split: str) -> list[str]:
    """The report's statement of the circuit's faithfulness (headline: held-out)."""
    sizes = summary["sizes"]
    held, lo, hi = summary["heldout"], *summary["heldout_ci"]
    verdict = "reaches" if summary["heldout_reached"] else "does NOT reach"
    how = {"templates": "drawn from templates the discovery pairs do not use",
           "seed": "drawn with another seed (this task records no templates, so they share its templates)",
           "overlapping": "drawn with another seed but OVERLAPPING the discovery pairs (too few distinct prompts): "
                          "this is not a held-out test"}.get(split, split)
    kept = ("every other head's output is replaced by its corrupted-run value at all positions; MLPs and "
            "embeddings are recomputed" if summary["heads_only"] and summary["level"] == "node" else
            "every other component (edge) carries its corrupted-run value")
    return [
        f"Held-out faithfulness {held:.3f} (95% CI {lo:.3f} to {hi:.3f}) on {summary['n_heldout']} pairs {how}: the "
        f"circuit {verdict} the target {summary['target']}.",
        f"Circuit: {sizes['heads']} heads, {sizes['mlps']} MLPs, {sizes['edges']} edges, chosen by `{summary['method']}` "
        f"as the smallest prefix of its ranking whose exact faithfulness on the {summary['n_discovery']} discovery "
        f"pairs reaches {summary['target']} ({summary['discovery']:.3f}, 95% CI {summary['discovery_ci'][0]:.3f} to "
        f"{summary['discovery_ci'][1]:.3f}); {summary['candidates']} components had scores clear of zero. In the "
        f"circuit's evaluation {kept}.",
    ]


__all__ = ["faithful_graph", "faithful_paragraphs", "faithful_stage", "split_prompts", "RUN_METHOD_TO_RANKING"]
