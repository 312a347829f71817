"""Benchmarking circuit-discovery methods against known circuits.

Pieces (used by `bench/methods.py` and `circuitlab bench methods`):

- `adapt_groundtruth(gt, n, seed)` turns a `graphs.groundtruth.GroundTruth` (or any `TaskSpec`) into the
  engine's (task, pairs) interface: `GroundTruthTask.read_positions(pairs) -> [B, R]` and
  `metric_at(logits_at[..., B, R, V], pairs) -> [..., B]` (the ground truth's own metric, per prompt).
  `counterfactual="task"` uses the spec's corrupted inputs; `"resample"` uses independently drawn clean
  inputs of the same task as the corrupted run (resample ablation, as InterpBench evaluates), with the
  resampled input's answer as the wrong answer. Which edges a patching method can see depends on this
  choice: an edge whose sender is identical in the clean and corrupted runs has zero effect under every
  method here (e.g. the previous-token head of `induction_handwired` under the task's corruption, which only
  changes the last token; `tracr_reverse`'s length sub-circuit under both, as every input has one length).
  `"zero"` is zero ablation (ACDC's alternative): every corrupted sender output is zero
  (`patching.edges.ablated_context`; `activation` patches `z`/`mlp_out` with zeros), which exposes edges
  that carry the same value in any two inputs, such as purely positional queries.
- `run_method(name, model, task, pairs)` -> (edge scores [n_edges] or None, node scores, seconds) for
  `activation`, `eap`, `eap-ig`, `acdc`, `random` (see `METHOD_NOTES` for each method's scores).
- `evaluate_method(...)`: edge and node ROC-AUC against a reference circuit, MIB CPR/CMD with bootstrap CIs.

Scoring conventions (all documented in the results table's notes):

- Edge ROC-AUC ranks edges by |edge score| against membership in the reference edges (InterpBench).
- Node ROC-AUC ranks heads and MLPs (not `input`/`logits`) against the reference nodes. For edge methods a
  node's score is the sum of its outgoing edge scores (its attribution-patching score, `graphs.scores`).
- `activation` is node-level exact patching (noising: corrupted head `z` / `mlp_out` into the clean run, all
  positions); node score = (m(clean) - m(noised)) / (m(clean) - m(corrupt)). Edge scores are derived as
  min(|s_u|, |s_v|) with `input` and `logits` scored as the largest node score, so that every threshold on
  edge scores gives exactly the edges induced by the node circuit {|s| >= threshold}.
- `acdc` edge score = the objective change measured when the edge was tried, with every kept edge ranked
  above every removed one (kept edges get an offset larger than any change); untested edges count 0.
- `random`: seeded standard-normal edge scores (a chance-level reference: AUROC ~ 0.5).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.graphs.bench_adapter import (COUNTERFACTUALS, GroundTruthPairs, GroundTruthTask, Reference,
                                             adapt_groundtruth, adapt_spec)
from circuitlab.graphs.discovery import DiscoveryOptions, score
from circuitlab.graphs.evaluate import roc_auc
from circuitlab.graphs.groundtruth import TaskSpec, load_groundtruth
from circuitlab.graphs.scores import EdgeScores, NodeScores
from circuitlab.patching.components import parse_node
from circuitlab.patching.edges import EdgeContext, evaluate_edge_masks, prepare_edges
from circuitlab.patching.engine import EngineContext
from circuitlab.patching.faithfulness import faithfulness_curve
from circuitlab.patching.methods import METHODS as REGISTRY, get_method
from circuitlab.patching.models import load_model
from circuitlab.patching.prompts import OneBatch, Prompts, as_prompts
from circuitlab.patching.topology import ComputationalGraph
from circuitlab.tasks import get_task
from circuitlab.tasks.base import PromptPairs, Task

METHODS: tuple[str, ...] = tuple(name for name, m in REGISTRY.items() if m.benchmark)  # what runs by default
METHOD_NOTES: dict[str, str] = {name: get_method(name).note for name in METHODS}
RESULT_COLUMNS = ["model", "counterfactual", "method", "n_pairs", "n_edges", "n_true_edges", "n_visible_true_edges",
                  "edge_auroc", "edge_auroc_visible", "node_auroc", "cpr", "cpr_low", "cpr_high", "cmd", "cmd_low", "cmd_high", "seconds",
                  "eval_seconds", "note"]


# ---------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class BenchConfig:
    """How each method runs and is evaluated.

    `acdc_threshold` is a fraction of |m(clean) - m(corrupt)| for the `metric` objective (scale-free across
    tasks); for the `kl` objective it is used as is. ACDC is skipped (with an estimated cost) on graphs with
    more than `acdc_max_edges` edges. `n_boot` bootstrap resamples give the CPR/CMD intervals.
    """

    eap_ig_steps: int = 5
    acdc_objective: str = "metric"
    acdc_threshold: float = 0.01
    acdc_max_edges: int = REGISTRY["acdc"].max_edges or 0
    n_boot: int = 1000
    memory_budget_mb: float = 1024.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.acdc_objective not in ("kl", "metric"):
            raise ValueError(f"acdc_objective {self.acdc_objective!r} is unknown: use 'kl' or 'metric'")
        if self.eap_ig_steps < 1:
            raise ValueError(f"eap_ig_steps must be >= 1, got {self.eap_ig_steps}")
        if self.acdc_threshold < 0:
            raise ValueError(f"acdc_threshold must be >= 0, got {self.acdc_threshold}")


# ---------------------------------------------------------------------- methods

def node_scores_from_edges(graph: ComputationalGraph, scores: Tensor) -> pd.DataFrame:
    """Node scores (`node`, `score`) of edge scores: `graphs.scores.EdgeScores.node_scores` (one definition)."""
    return EdgeScores(graph, scores.detach().double().cpu(), "edges", 1.0).node_scores().frame[["node", "score"]]


def edge_scores_from_nodes(graph: ComputationalGraph, nodes: pd.DataFrame) -> Tensor:
    """Edge scores min(|s_u|, |s_v|) from node scores (`graphs.scores.NodeScores.edge_ranking`)."""
    frame = nodes.assign(effect=nodes["score"])
    return NodeScores(graph, frame, "nodes").edge_ranking(absolute=True).float()


def acdc_cost_estimate(ctx: EdgeContext, n_probe: int = 2) -> tuple[int, float]:
    """(forwards, seconds): ACDC needs up to one masked forward per edge; time `n_probe` of them here."""
    masks = torch.ones(1, ctx.graph.n_edges)
    evaluate_edge_masks(ctx, masks)  # warm-up
    start = time.perf_counter()
    for _ in range(n_probe):
        evaluate_edge_masks(ctx, masks)
    per = (time.perf_counter() - start) / n_probe
    return ctx.graph.n_edges, per * ctx.graph.n_edges


def run_method(name: str, model: TransformerBridge, task: Task, pairs: PromptPairs, *,
               ctx: Prompts | EngineContext | None = None,
               config: BenchConfig | None = None, ablation: str | None = None
               ) -> tuple[Tensor | None, pd.DataFrame, float]:
    """Run one registered method (`graphs.discovery.score`): (edge ranking [n_edges] or None for node methods,
    node scores (`node`, `score`), seconds). Seconds exclude preparing the shared `ctx` (prompts already carrying
    the `ablation`, or an engine context to which it is applied here)."""
    config = config or BenchConfig()
    get_method(name)
    prompts = as_prompts(ctx if ctx is not None else prepare_edges(model, task, pairs))
    if not isinstance(ctx, Prompts) and ablation:
        prompts = prompts.with_ablation(ablation)
    if name == "acdc" and prompts.graph.n_edges > config.acdc_max_edges:
        raise ValueError(f"ACDC on {prompts.graph.n_edges} edges exceeds acdc_max_edges={config.acdc_max_edges}")
    options = DiscoveryOptions(steps=config.eap_ig_steps, acdc_threshold=config.acdc_threshold,
                               acdc_objective=config.acdc_objective, ablation=ablation, seed=config.seed,
                               memory_budget_mb=config.memory_budget_mb)
    start = time.perf_counter()
    edges, nodes = score(name, prompts, options)
    seconds = time.perf_counter() - start
    ranking = edges.ranking().float() if edges is not None else None
    return ranking, nodes.frame[["node", "score"]], seconds


# ---------------------------------------------------------------------- metrics

def edge_auroc(graph: ComputationalGraph, scores: Tensor, reference: Reference) -> float:
    """ROC-AUC of |edge score| for membership in the reference edges (every graph edge is a candidate)."""
    ref = reference.checked(graph)
    labels = [e in ref.edges for e in graph.edge_names]
    return roc_auc(scores.abs().double().numpy(), labels)


def visible_edge_auroc(ctx: EdgeContext, scores: Tensor, reference: Reference) -> float:
    """Edge ROC-AUC with the reference's invisible edges (`visible_edges`) left out of the candidates:
    what a method can reach under this counterfactual. NaN if no reference edge is visible."""
    graph = ctx.graph
    ref = reference.checked(graph)
    seen = visible_edges(ctx, sorted(ref.edges))
    keep = [i for i, e in enumerate(graph.edge_names) if e not in ref.edges or seen[e]]
    labels = [graph.edge_names[i] in ref.edges for i in keep]
    if not any(labels):
        return float("nan")
    return roc_auc(scores.abs().double().numpy()[keep], labels)


def node_auroc(nodes: pd.DataFrame, reference: Reference) -> float:
    """ROC-AUC of |node score| over heads and MLPs for membership in the reference nodes."""
    members = {parse_node(n).name for n in reference.nodes} - {"input", "logits"}
    labels = [n in members for n in nodes["node"]]
    if all(labels) or not any(labels):
        return float("nan")
    return roc_auc(nodes["score"].abs().to_numpy(), labels)


def visible_edges(ctx: EdgeContext, edges: Sequence[str], *, tol: float = 1e-5) -> dict[str, bool]:
    """Whether each edge can be seen at all under this counterfactual.

    Edge u->v is visible when corrupting it alone changes what receiver v computes from its input on some
    prompt and position: v's query/key/value projection (after its norm), its MLP output, or the logits.
    An invisible edge has zero effect under every patching method here, whatever the method (e.g. a query
    that reads only positions, when clean and corrupted inputs have the same length). `tol` is relative to
    the largest |value| of that receiver computation.
    """
    g, runner = ctx.graph, ctx.edge_runner.runner
    out: dict[str, bool] = {}
    with torch.no_grad():
        for name in edges:
            e = g.edge_index(name)
            s, r = int(g.edge_sender[e]), int(g.edge_receiver[e])
            delta = ctx.clean.senders[:, :, s] - ctx.corrupt.senders[:, :, s]
            if r == g.logits_receiver:
                x = ctx.clean.resid_final
                before, after = runner.unembed(x), runner.unembed(x - delta)
            else:
                layer, channel, head = g.receiver_info(r)
                x = ctx.clean.resid_mid[layer] if channel == "mlp" else ctx.clean.resid_pre[layer]
                read = ctx.edge_runner.receiver_value
                before, after = read(layer, channel, head, x), read(layer, channel, head, x - delta)
            scale = max(1.0, float(before.abs().max()))
            out[g.edge_names[e]] = bool((before - after).abs().max() > tol * scale)
    return out


def evaluate_method(ctx: EdgeContext, edge_scores: Tensor, nodes: pd.DataFrame, reference: Reference | None,
                    config: BenchConfig) -> dict[str, float]:
    """Edge/node ROC-AUC (NaN without a reference) and MIB CPR/CMD with bootstrap CIs, plus eval seconds."""
    start = time.perf_counter()
    out: dict[str, float] = {"edge_auroc": float("nan"), "edge_auroc_visible": float("nan"),
                             "node_auroc": float("nan")}
    if reference is not None:
        out["edge_auroc"] = edge_auroc(ctx.graph, edge_scores, reference)
        out["edge_auroc_visible"] = visible_edge_auroc(ctx, edge_scores, reference)
        out["node_auroc"] = node_auroc(nodes, reference)
    result = faithfulness_curve(ctx, edge_scores, n_boot=config.n_boot, seed=config.seed,
                                memory_budget_mb=config.memory_budget_mb)
    out.update(cpr=result.cpr, cpr_low=result.cpr_ci[0], cpr_high=result.cpr_ci[1], cmd=result.cmd,
               cmd_low=result.cmd_ci[0], cmd_high=result.cmd_ci[1])
    out["eval_seconds"] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------------- one model, all methods

@dataclass
class BenchCase:
    """One benchmark row group: a model, its task and pairs, and its reference circuit (or None)."""

    label: str
    model: TransformerBridge
    task: Task
    pairs: PromptPairs
    reference: Reference | None
    counterfactual: str = "task"
    skip: dict[str, str] = field(default_factory=dict)  # method -> reason (reported, not silently dropped)


def benchmark_case(case: BenchCase, methods: Sequence[str] = METHODS, config: BenchConfig | None = None,
                   say: Callable[[str], None] = lambda s: None) -> pd.DataFrame:
    """Run every method on one case and evaluate it; one row per method (`RESULT_COLUMNS`)."""
    config = config or BenchConfig()
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown methods {unknown}: use any of {tuple(REGISTRY)}")
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    ablation = "zero" if case.counterfactual == "zero" else None
    prompts = OneBatch(prepare_edges(case.model, case.task, case.pairs)).with_ablation(ablation)
    ctx = next(prompts.edge_contexts())  # what circuits are evaluated on (the ablated run, if any)
    prep = time.perf_counter() - start
    graph = ctx.graph
    reference = case.reference.checked(graph) if case.reference is not None else None
    base = {"model": case.label, "counterfactual": case.counterfactual, "n_pairs": int(case.pairs.clean_tokens.shape[0]),
            "n_edges": graph.n_edges, "n_true_edges": len(reference.edges) if reference else 0,
            "n_visible_true_edges": sum(visible_edges(ctx, sorted(reference.edges)).values()) if reference else 0}
    say(f"{case.label} [{case.counterfactual}]: {graph.n_edges} edges ({base['n_true_edges']} true, "
        f"{base['n_visible_true_edges']} visible), m(clean)={ctx.clean_metric:.3f}, "
        f"m(corrupt)={ctx.corrupt_metric:.3f} (prepared in {prep:.1f}s)")
    rows = []
    for method in methods:
        row: dict[str, Any] = {**base, "method": method, "note": ""}
        if method in case.skip:
            row.update(note=f"skipped: {case.skip[method]}")
            rows.append(row)
            say(f"  {method:10s} {row['note']}")
            continue
        if method == "acdc" and graph.n_edges > config.acdc_max_edges:
            forwards, seconds = acdc_cost_estimate(ctx)
            row.update(note=f"skipped: {graph.n_edges} edges > acdc_max_edges={config.acdc_max_edges}; "
                            f"estimated up to {forwards} masked forwards, ~{seconds / 3600:.0f} h here")
            rows.append(row)
            say(f"  {method:10s} {row['note']}")
            continue
        edges, nodes, seconds = run_method(method, case.model, case.task, case.pairs, ctx=prompts, config=config,
                                           ablation=ablation)
        if edges is None:
            edges = edge_scores_from_nodes(graph, nodes)
            row["note"] = "edge scores derived from node scores"
        row["seconds"] = seconds
        row.update(evaluate_method(ctx, edges, nodes, reference, config))
        rows.append(row)
        say(f"  {method:10s} edge AUROC {row['edge_auroc']:.3f} (visible {row['edge_auroc_visible']:.3f})  node AUROC {row['node_auroc']:.3f}  "
            f"CPR {row['cpr']:.3f}  CMD {row['cmd']:.3f}  {seconds:.1f}s (+{row['eval_seconds']:.1f}s eval)")
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def groundtruth_cases(names: Sequence[str], n: int, seed: int = 0,
                      counterfactuals: Sequence[str] = COUNTERFACTUALS) -> list[BenchCase]:
    """Benchmark cases for committed ground-truth models, one per counterfactual."""
    cases = []
    for name in names:
        gt = load_groundtruth(name)
        for cf in counterfactuals:
            task, pairs = adapt_groundtruth(gt, n, seed, counterfactual=cf)
            cases.append(BenchCase(name, gt.model, task, pairs, Reference.from_groundtruth(gt), cf))
    return cases


def own_case(model_dir: str | Path, circuit: str | Path, task: str | Path, n: int, seed: int = 0,
             counterfactual: str = "task", label: str | None = None) -> BenchCase:
    """A case for a user's own model: a model directory (`save_model` / `save_pretrained`), a reference circuit
    file (see `Reference.load`), and a task: a `task.json` TaskSpec path (token-id inputs) or a registry task
    name (`ioi`, ...; generated with the model's tokenizer, task corruption only)."""
    model_path = Path(model_dir)
    if not model_path.is_dir():
        raise FileNotFoundError(f"model directory {model_path} does not exist")
    model = load_model(str(model_path))
    reference = Reference.load(circuit)
    task_path = Path(task)
    if task_path.suffix == ".json" or task_path.is_file():
        if not task_path.is_file():
            raise FileNotFoundError(f"task spec {task_path} does not exist")
        engine_task, pairs = adapt_spec(TaskSpec.load(task_path), n, seed, counterfactual=counterfactual,
                                        name=label or model_path.name)
    else:
        if counterfactual != "task":
            raise ValueError(f"counterfactual {counterfactual!r} needs a task.json spec; registry tasks use 'task'")

        engine_task = get_task(str(task))
        pairs = engine_task.generate(model, n, seed=seed)
    return BenchCase(label or model_path.name, model, engine_task, pairs, reference, counterfactual)


# ---------------------------------------------------------------------- presentation

def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def results_markdown(frame: pd.DataFrame) -> str:
    """The results as a Markdown table (AUROC n/a where there is no reference or the method was skipped)."""
    head = ("| model | counterfactual | method | edge AUROC | edge AUROC (visible) | node AUROC | CPR [95% CI] | "
            "CMD [95% CI] | time (s) | eval (s) | note |")
    lines = [head, "|" + "---|" * 11]
    for r in frame.to_dict("records"):
        def ci(key: str) -> str:
            if pd.isna(r.get(key)):
                return "n/a"
            return f"{_fmt(r[key])} [{_fmt(r[key + '_low'])}, {_fmt(r[key + '_high'])}]"
        lines.append(f"| {r['model']} | {r['counterfactual']} | {r['method']} | {_fmt(r.get('edge_auroc'))} | "
                     f"{_fmt(r.get('edge_auroc_visible'))} | {_fmt(r.get('node_auroc'))} | {ci('cpr')} | {ci('cmd')} | {_fmt(r.get('seconds'), 1)} | "
                     f"{_fmt(r.get('eval_seconds'), 1)} | {r.get('note') or ''} |")
    return "\n".join(lines)


__all__ = ["METHODS", "COUNTERFACTUALS", "METHOD_NOTES", "RESULT_COLUMNS", "BenchConfig", "Reference",
           "GroundTruthPairs", "GroundTruthTask", "adapt_spec", "adapt_groundtruth", "run_method",
           "node_scores_from_edges", "edge_scores_from_nodes", "acdc_cost_estimate", "edge_auroc", "node_auroc",
           "evaluate_method", "BenchCase", "benchmark_case", "groundtruth_cases", "own_case", "results_markdown"]
