"""The run's circuit as a measured claim: chosen by exact faithfulness, checked on held-out prompts.

The run's prompts come from `reports.prompts` (discovery and held-out pairs from disjoint templates, and with
--validation-n validation pairs from templates neither uses). `circuit_stage` finds the circuit with the run's
circuit method (`graphs.faithful`: the smallest circuit whose exact faithfulness on the discovery pairs reaches
`--faithfulness-target`, or with validation pairs the smallest within [target, 2 - target] on both,
`graphs.selection.select_validated`), measures it on the held-out pairs, measures the baseline "top-k heads by single exact
effect" the same way, and optionally reruns discovery on bootstrap resamples (`--stability-resamples`) for
inclusion frequencies. `faithful_graph` turns the result into the run's circuit graph and
`faithful_paragraphs` states it in the report. `build_circuit` is the run's circuit graph: the faithful circuit, or
the size forced by --top-k/--top-fraction/--threshold (`selection`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import networkx as nx
import pandas as pd
import torch
from torch import Tensor
from circuitlab.graphs.circuit import Selection
from circuitlab.graphs.discovery import choose_circuit
from circuitlab.graphs.faithful import Contexts, FaithfulConfig, FaithfulResult, find_faithful_circuit, prefix_curve
from circuitlab.graphs.roles import assign_roles
from circuitlab.graphs.scores import Circuit
from circuitlab.graphs.selection import (
    CircuitEvaluator, batched_evaluator, candidate_order, node_evaluator, select_by_faithfulness, within,
)
from circuitlab.graphs.stability import inclusion_frequency
from circuitlab.graphs.variables import head_variables, variable_names
from circuitlab.patching.batched import Batches
from circuitlab.patching.edges import EdgeContext, prepare_edges
from circuitlab.patching.mask_learning import MaskConfig
from circuitlab.patching.methods import get_method, get_search
from circuitlab.patching.topology import ComputationalGraph, PositionalGraph
from circuitlab.reports.config import RunConfig
from circuitlab.reports.pipeline import Pipeline
from circuitlab.reports.prompts import SPLITS, heldout_label
from circuitlab.reports.result import strongest_per_node
from circuitlab.reports.summaries import BaselineSummary, CircuitSummary


def circuit_method(cfg: RunConfig) -> str:
    """The `graphs.faithful` method that finds the run's circuit: `--circuit-method`, or with `auto` the smallest
    faithful prefix of the method's own ranking (its registry entry's `circuit`, `patching.methods`). `greedy`
    (refining that prefix by exact gains) finds smaller circuits but costs one exact evaluation per candidate: on
    SmolLM2 IOI (16 pairs, 2 cores, bench/results/circuits_2026-11-28.txt) EAP-IG's prefix kept 39 heads
    (held-out 0.866) in 72 s, greedy 26 heads (held-out 0.992) in 181 s."""
    return cfg.circuit_method if cfg.circuit_method != "auto" else get_method(cfg.method).circuit


VALIDATION_COLUMNS = ("validation", "validation_low", "validation_high")  # select_validated's curve (NaN: not measured)


def _curve(frame: pd.DataFrame, held: pd.DataFrame, label: str) -> pd.DataFrame:
    out = frame.merge(held, on="size", how="left", suffixes=("", "_heldout"))
    return out.assign(ranking=label)[["ranking", "size", "faithfulness", "ci_low", "ci_high", "faithfulness_heldout",
                                      "ci_low_heldout", "ci_high_heldout"]
                                     + [c for c in VALIDATION_COLUMNS if c in out.columns]]


def _baseline(p: Pipeline, evaluator: CircuitEvaluator, held_eval: CircuitEvaluator,
              config: FaithfulConfig) -> tuple[BaselineSummary, pd.DataFrame]:
    """Top-k heads by single exact effect (the run's exact activation-patching stage), chosen and measured like
    the circuit: the smallest prefix reaching the target on the discovery pairs, then on held-out pairs."""
    exact = strongest_per_node(p.result.exact[p.result.exact["component"] == "z"]).set_index("node")["effect"]
    heads = [i for i in evaluator.items if i.startswith("a")]
    scores = torch.tensor([abs(float(exact.get(i, 0.0))) if i in heads else 0.0 for i in evaluator.items])
    chosen = select_by_faithfulness(evaluator, scores, config.target, n_boot=config.n_boot, seed=config.seed)
    ranked = [evaluator.items[i] for i in candidate_order(scores)]
    sizes = [int(s) for s in chosen.curve["size"]]
    held = prefix_curve(held_eval, ranked, sizes, n_boot=config.n_boot, seed=config.seed)
    row = held[held["size"] == chosen.size].iloc[0]
    summary = BaselineSummary(ranking="single exact effect", heads=chosen.size, reached=chosen.reached,
                              discovery=chosen.faithfulness, discovery_ci=tuple(chosen.ci),
                              heldout=float(row["faithfulness"]),
                              heldout_ci=(float(row["ci_low"]), float(row["ci_high"])), candidates=chosen.candidates)
    return summary, _curve(chosen.curve, held, "top-k heads by single exact effect (baseline)")


def faithful_config(cfg: RunConfig, n_discovery: int) -> FaithfulConfig:
    """The `graphs.faithful.FaithfulConfig` of a run's circuit stage (`cfg`: a `RunConfig`)."""
    batch = min(8, n_discovery)
    return FaithfulConfig(target=cfg.faithfulness_target, eap_ig_steps=cfg.steps, n_boot=cfg.n_boot, seed=cfg.seed,
                          memory_budget_mb=cfg.memory_budget,
                          masks=MaskConfig(steps=cfg.mask_steps, seed=cfg.seed, batch_size=batch),
                          edge_masks=MaskConfig(level="edge", steps=cfg.mask_steps, seed=cfg.seed, batch_size=batch))


def run_circuit(cfg: RunConfig, discovery: EdgeContext, heldout: EdgeContext | None, *,
                edge_scores: Tensor | None = None, log: Callable[[str], None] | None = None,
                batches: Contexts | None = None, heldout_batches: Contexts | None = None,
                n_discovery: int | None = None, validation: EdgeContext | None = None) -> FaithfulResult:
    """The run's circuit (`graphs.faithful.FaithfulResult`): `circuit_method(cfg)` with the run's options on the
    discovery context (an `EdgeContext`), its size chosen there or, given `validation` (--validation-n), within
    the target band there and on the validation context; checked on the held-out one. `edge_scores`: the run's
    attribution scores on `discovery`, reused instead of recomputed (eap/eap-ig rankings); `batches`/
    `heldout_batches`: the prompts batch by batch (see `graphs.faithful.find_faithful_circuit`)."""
    config = faithful_config(cfg, n_discovery or len(discovery.clean_values))
    return find_faithful_circuit(discovery, circuit_method(cfg), config, heldout=heldout, edge_scores=edge_scores,
                                 log=log, batches=batches, heldout_batches=heldout_batches, validation=validation)


def _heldout_split(p: Pipeline) -> str | None:
    """How the run split its held-out pairs (`reports.prompts.SPLITS`); None before the pairs stage or in runs
    saved before splits were recorded."""
    return p.result.model.heldout_split if p.result.model is not None else None


def _contexts(parts: Batches) -> tuple[Contexts, int]:
    """(callable yielding one edge context per prompt batch of `parts` (`patching.batched.Batches`: kept, not
    rebuilt, when every prompt fits in one batch), batch size)."""
    return parts.edge_contexts, parts.batch_size or parts.n


def circuit_stage(p: Pipeline) -> dict[str, object]:
    """Find, check and compare the run's faithful circuit (see the module docstring); RunResult fields."""
    cfg, say = p.cfg, p.say
    method = circuit_method(cfg)
    discovery, heldout = p.pairs(), p.result.heldout_pairs.to(cfg.device)
    search = get_search(method)
    edge_scores, reused = None, ""
    positional = cfg.edge_positions != "none" and search.level == "edge"  # edge circuits over position-aware edges
    if p.result.edges is not None and search.can_reuse(cfg.method):
        edges = p.scores()[0]
        edge_scores, reused = edges.ranking().float(), f"the run's {cfg.method} scores"
        if isinstance(edges.graph, PositionalGraph) and not positional:  # heads ranked by scores summed over segments
            edge_scores, reused = edges.graph.pooled(edge_scores), reused + " summed over position segments"
    batches = p.edge_batches if positional else p.batches
    (disc_parts, disc_size), (held_parts, held_size) = _contexts(batches()), _contexts(batches("heldout"))
    batched = disc_size < len(discovery) or held_size < len(heldout)
    full = {}  # contexts over every prompt, built only where needed

    def whole(name: str) -> EdgeContext:
        if name not in full:
            parts = batches(name)
            full[name] = next(parts.edge_contexts()) if parts.keeps_contexts() else prepare_edges(
                p.model(), p.task, parts.pairs, runner=p.runner(), positions=cfg.edge_positions if positional else None)
        return full[name]

    validation = p.result.validation_pairs
    val_ctx = whole("validation") if validation is not None else None  # --validation-n: the size is chosen here too

    config = faithful_config(cfg, len(discovery))
    nodes = lambda c: node_evaluator(c, memory_budget_mb=cfg.memory_budget)  # noqa: E731  (the baseline's)
    checked = heldout_label(p.task, discovery, heldout, _heldout_split(p))
    target = cfg.faithfulness_target
    chosen = (f"within [{target}, {2 - target:g}] on {len(discovery)} discovery and {len(validation)} validation pairs"
              if validation is not None else f">= {target} on {len(discovery)} discovery pairs")
    say(f"  {method}: smallest circuit with exact faithfulness {chosen}, checked on {len(heldout)} "
        + ("held-out pairs" if checked == "held-out" else f"other pairs ({checked})"))
    memory = ""
    if batched and edge_scores is not None:  # --memory-budget: evaluations batch by batch
        memory = f"evaluated in prompt batches of <= {disc_size} (discovery) and <= {held_size} (held-out)"
        ectx = next(iter(disc_parts()))  # only its graph is used: the ranking is the run's, over every prompt
        found = run_circuit(cfg, ectx, None, edge_scores=edge_scores, log=say, batches=disc_parts,
                            heldout_batches=held_parts, n_discovery=len(discovery), validation=val_ctx)
        evaluators = (batched_evaluator(nodes, disc_parts), batched_evaluator(nodes, held_parts))
    else:
        if batched:
            memory = f"{method} ranks on every prompt at once, so this stage holds them all despite --memory-budget"
            say(f"  note: {memory}")
        found = run_circuit(cfg, whole("discovery"), whole("heldout"), edge_scores=edge_scores, log=say,
                            validation=val_ctx)
        evaluators = (nodes(whole("discovery")), nodes(whole("heldout")))
    ranking_name = search.ranking_label(cfg.method if reused else None)
    curves = [_curve(found.circuit.curve, found.heldout_curve, f"{ranking_name} prefix")]
    baseline = None
    if p.result.exact is not None and (p.result.exact["component"] == "z").any():
        say("  baseline: top-k heads by single exact effect")
        baseline, base_curve = _baseline(p, *evaluators, config)
        curves.append(base_curve)
    held_f, held_ci = found.heldout
    label = heldout_label(p.task, discovery, heldout, _heldout_split(p))
    val_f, val_ci = found.circuit.validation if found.circuit.validation is not None else (None, None)
    summary = CircuitSummary(
        method=method, ranking=ranking_name, level=found.level, target=cfg.faithfulness_target,
        items=tuple(found.circuit.items), reached=found.circuit.reached, discovery=found.circuit.faithfulness,
        discovery_ci=tuple(found.circuit.ci), heldout=held_f, heldout_ci=tuple(held_ci),
        heldout_reached=bool(held_f >= cfg.faithfulness_target), sizes=found.sizes,
        candidates=found.circuit.candidates, added=tuple(found.circuit.added), n_discovery=len(discovery),
        n_heldout=len(heldout), split=_heldout_split(p) or "templates", heads_only=config.heads_only,
        notes="; ".join(x for x in (found.notes, reused and f"ranked by {reused}", memory) if x),
        seconds=round(found.seconds, 3), baseline=baseline, validation=val_f,
        validation_ci=tuple(val_ci) if val_ci is not None else None,
        n_validation=len(validation) if validation is not None else None)
    stability = None
    if cfg.stability_resamples > 0:
        say(f"  stability: rediscovering on {cfg.stability_resamples} bootstrap resamples")
        quick = FaithfulConfig(**{**config.__dict__, "n_boot": 0})
        if batched:
            say("  note: stability resamples hold every discovery prompt at once despite --memory-budget")
        stability = inclusion_frequency(
            whole("discovery"), lambda sub: find_faithful_circuit(sub, method, quick).circuit.items,
            n_resamples=cfg.stability_resamples, seed=cfg.seed, reference=found.circuit.items)
    say(f"  circuit: {found.sizes.heads} heads, {found.sizes.mlps} MLPs, {found.sizes.edges} edges; "
        f"faithfulness {found.circuit.faithfulness:.3f} (discovery), "
        + (f"{val_f:.3f} [{val_ci[0]:.3f}, {val_ci[1]:.3f}] (validation), " if val_f is not None else "")
        + f"{held_f:.3f} [{held_ci[0]:.3f}, {held_ci[1]:.3f}] "
        f"({label})" + (f"; baseline top-{baseline.heads} heads: {baseline.heldout:.3f} ({label})"
                        if baseline else ""))
    return {"faithful": summary, "faithful_curve": pd.concat(curves, ignore_index=True),
            "faithful_ranking": found.ranking, "stability": stability,
            "circuit_prompts": _per_prompt(evaluators[0], found)}


def _per_prompt(evaluator: CircuitEvaluator, found: FaithfulResult) -> pd.DataFrame | None:
    """The chosen node circuit's metric on each discovery prompt (the report's per-prompt view: where it fails);
    None for an edge-level circuit or one with items the head evaluator does not know."""
    if found.level != "node" or not set(found.circuit.items) <= set(evaluator.items):
        return None
    values = evaluator.values(evaluator.mask(found.circuit.items))[0]
    return pd.DataFrame({"prompt": range(len(values)), "circuit": values})


def faithful_graph(summary: CircuitSummary, ranking: pd.DataFrame, graph: ComputationalGraph,
                   name: str) -> nx.MultiDiGraph:
    """The circuit graph of a faithful selection (node circuits: the kept heads/MLPs with implied edges)."""
    scores = ranking.set_index("item")["score"]
    items = summary.items
    values = {i: (float(scores[i]) or 1e-12) for i in items}  # chosen items are clear of zero; keep them drawable
    if summary.level == "edge":
        circuit = Circuit(graph, graph.edges_vector(items).bool(), summary.method, None, values)
    else:
        circuit = Circuit.from_nodes(graph, items, summary.method, values)
    out = circuit.to_networkx(name)
    out.graph.update(faithfulness_heldout=float(summary.heldout), faithfulness_discovery=float(summary.discovery),
                     faithfulness_target=float(summary.target),
                     mlps_recomputed=bool(summary.heads_only and summary.level == "node"))
    return out


def faithful_paragraphs(summary: CircuitSummary) -> list[str]:
    """The report's statement of the circuit's faithfulness (headline: held-out) beside the baseline."""
    sizes = summary.sizes
    held, (lo, hi) = summary.heldout, summary.heldout_ci
    verdict = "reaches" if summary.heldout_reached else "does NOT reach"
    how = SPLITS.get(summary.split, summary.split)
    kept = ("every other head's output is replaced by its corrupted-run value at all positions; MLPs and "
            "embeddings are recomputed" if summary.heads_only and summary.level == "node" else
            "every other edge carries its corrupted-run value")
    found = "reaches" if summary.reached else "does not reach (the whole ranking is kept)"
    chosen = (f"on the {summary.n_discovery} discovery pairs {found} {summary.target}: {_f(summary.discovery)} (95% CI "
              f"{_f(summary.discovery_ci[0])} to {_f(summary.discovery_ci[1])})")
    if summary.n_validation is not None:  # --validation-n: the size was chosen on validation pairs too
        band = f"[{summary.target}, {2 - summary.target:g}]"
        val_lo, val_hi = summary.validation_ci or (None, None)
        chosen = (f"lies within {band} on the {summary.n_discovery} discovery pairs and on {summary.n_validation} "
                  "validation pairs (templates neither the discovery nor the held-out pairs use) — "
                  + ("none does, so the prefix closest to 1 on the validation pairs is kept" if not summary.reached else
                     "it does" if summary.validation is not None and within(summary.validation, summary.target) else
                     "the prefix chosen so was then changed on the discovery pairs alone (see the notes), and the "
                     "circuit kept is OUTSIDE the band on the validation pairs") + f": discovery {_f(summary.discovery)} (95% CI {_f(summary.discovery_ci[0])} to "
                  f"{_f(summary.discovery_ci[1])}), validation {_f(summary.validation)} (95% CI {_f(val_lo)} to "
                  f"{_f(val_hi)})")
    out = [
        f"Held-out faithfulness {_f(held)} (95% CI {_f(lo)} to {_f(hi)}) on {summary.n_heldout} pairs {how}: the "
        f"circuit {verdict} the target {summary.target}.",
        f"Circuit: {sizes.heads} heads, {sizes.mlps} MLPs, {sizes.edges} edges, found by "
        f"`{summary.method}` ({summary.ranking}) as the smallest circuit whose exact faithfulness "
        f"{chosen}; {summary.candidates} components "
        f"had scores clear of zero" + (
            f"; the whole ranking fell short, so {', '.join(summary.added)} entered by exact faithfulness gain "
            "(each raised it by more than 1e-4 of the gap; no inert component can)" if summary.added else
            " (no other may enter)") + f". In the circuit's evaluation {kept}."
        + (f" ({summary.notes}.)" if summary.notes else ""),
    ]
    base = summary.baseline
    if base:
        reach = "reaches" if base.reached else "does not reach"
        out.append(f"Baseline, top-k heads by single exact effect: the smallest such circuit that {reach} the target "
                   f"on the discovery pairs keeps {base.heads} heads (discovery {_f(base.discovery)}, held-out "
                   f"{_f(base.heldout)}, 95% CI {_f(base.heldout_ci[0])} to {_f(base.heldout_ci[1])}).")
    return out


def selection(cfg: RunConfig) -> Selection | None:
    """The configured circuit selection, or None for the method's default (see `graphs.discovery`)."""
    for key in ("top_fraction", "threshold", "top_k"):
        if getattr(cfg, key) is not None:
            return Selection(**{key: getattr(cfg, key)})
    return None


def build_circuit(p: Pipeline) -> nx.MultiDiGraph:
    """The circuit graph — the faithful circuit, or the forced selection (--top-k/--top-fraction/--threshold) from
    the method's scores — with exact effects, measured roles and (--variables) each head's IIA on its nodes."""
    cfg = p.cfg
    if selection(cfg) is None and p.result.faithful is not None:  # the faithful circuit (`reports.faithful`)
        summary = p.result.faithful
        graph = faithful_graph(summary, p.result.faithful_ranking, p.graph(),
                               f"{cfg.task} on {Path(cfg.model).name} ({summary.method})")
    else:
        if p.result.acdc_summary is not None and not p.result.acdc_summary.kept_edges:
            raise RuntimeError(f"ACDC at threshold {cfg.acdc_threshold} removed every edge; lower --acdc-threshold")
        edges, nodes = p.scores()
        circuit = choose_circuit(edges if edges is not None else nodes, selection(cfg), get_method(cfg.method).level)
        graph = circuit.to_networkx(f"{cfg.task} on {Path(cfg.model).name} ({cfg.method})")
    if p.result.exact is not None:
        exact = strongest_per_node(p.result.exact).set_index("node")["effect"]
        for node, data in graph.nodes(data=True):
            if node in exact.index:
                data["exact_effect"] = float(exact[node])
    if p.result.roles is not None and not p.result.roles.empty:
        graph = assign_roles(graph, p.result.roles)
    if cfg.variables:  # circuits that carry variables: each head's IIA per variable (`graphs.variables`)
        p.say(f"[variables] IIA of {cfg.variables} at the output of circuit heads: {cfg.variables_heads} (held-out "
              "counterfactual pairs)")
        graph = head_variables(graph, p.model(), cfg.task, variable_names(cfg.variables, cfg.task), n=2 * cfg.n, seed=cfg.seed,
                               runner=p.runner(), heads=cfg.variables_heads)
    return graph


def _f(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{float(value):.3f}"


__all__ = ["build_circuit", "circuit_method", "circuit_stage", "faithful_config",
           "faithful_graph", "faithful_paragraphs", "run_circuit", "selection"]
