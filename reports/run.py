"""`circuitlab run`: a short sequence of stages filling one `RunResult`, then saved and rendered.

Stages: pairs -> baseline (clean vs corrupt metric) -> scores (`graphs.discovery.discover` with the chosen
method) -> exact (activation patching of every head and MLP) -> resid (residual-stream heatmap) -> oracle
(exact re-scoring of sampled edges) -> faithfulness (top-k circuits, CPR/CMD) -> circuit (the smallest circuit
reaching --faithfulness-target, checked on held-out pairs: `reports.faithful`) -> roles. Each stage's output
is kept under `.partial/<resume key>/` when done and reused by a rerun whose key matches (`reports.resume`:
same options, model weights, prompt pairs and code; files verified). Then the circuit graph is built,
`reports.save` writes the run directory and `reports.render` the reports — all into a staging folder that
replaces OUT in one step, under OUT's lock (`reports.rundir`); a failed run leaves OUT as it was.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from circuitlab.graphs.circuit import node_name_from_row
from circuitlab.graphs.discovery import discover
from circuitlab.graphs.role_scores import head_patterns
from circuitlab.graphs.roles import detect_roles
from circuitlab.patching.activation import PatchingConfig, activation_patching
from circuitlab.patching.batched import position_independent
from circuitlab.patching.components import parse_node
from circuitlab.patching.methods import get_method
from circuitlab.patching.models import load_model
from circuitlab.patching.normalize import normalize_difference
from circuitlab.patching.reproducible import free_cores
from circuitlab.patching.topology import ComputationalGraph
from circuitlab.reports import resume, rundir
from circuitlab.reports.config import ConfigError, RunConfig, check_heldout_n, parse_percents, parse_positions
from circuitlab.reports.faithful import build_circuit, circuit_stage, selection
from circuitlab.reports.pipeline import Pipeline
from circuitlab.reports.prompts import RunPrompts, heldout_label
from circuitlab.reports.render import render_result
from circuitlab.reports.result import RunResult, platform_info, versions
from circuitlab.reports.save import save_result
from circuitlab.tasks import get_task
from circuitlab.tasks.custom import RecordsTask
from circuitlab.reports.summaries import AcdcSummary, FaithfulnessSummary, ModelRecord, OracleSummary

ATTENTION_PROMPTS = 4  # discovery prompts whose attention patterns the report shows for the circuit's heads
STAGES = ("pairs", "baseline", "scores", "exact", "resid", "oracle", "faithfulness", "circuit", "roles")


# ---------------------------------------------------------------------- stages

def _pairs(p: Pipeline, prompts: RunPrompts) -> dict[str, object]:
    cfg, model, pairs = p.cfg, p.model(), prompts.discovery
    meta = ModelRecord(name=cfg.model, weight_hash=p.key_parts["model"], n_layers=int(model.cfg.n_layers),
                       n_heads=int(model.cfg.n_heads),
                       n_key_value_heads=int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads),
                       d_model=int(model.cfg.d_model), d_vocab=int(model.cfg.d_vocab),
                       attn_only=bool(getattr(model.cfg, "attn_only", False)),
                       parallel_attn_mlp=bool(getattr(model.cfg, "parallel_attn_mlp", False)),
                       architecture=str(getattr(model.cfg, "architecture", "")),
                       has_tokenizer=model.tokenizer is not None,
                       position_labels=tuple(_position_labels(model, pairs)), engine=p.engine(),
                       heldout_split=prompts.split)
    out = {"pairs": pairs, "heldout_pairs": prompts.heldout, "model": meta}
    if prompts.validation is not None:  # --validation-n only: a default run's stage files stay as they were
        out.update(validation_pairs=prompts.validation, prompt_split=prompts.summary())
    return out


def _position_labels(model: Any, pairs: Any) -> list[str]:
    """A label per absolute position: the token there when every prompt that reaches it has the same one, else
    `*`; then the role found there in every such prompt. Prompts of different templates or lengths share few
    tokens by position, so their labels say so rather than show one prompt's token."""
    labels, tok = [], getattr(model, "tokenizer", None)
    tokens, lengths = pairs.clean_tokens, pairs.lengths
    for pos in range(pairs.seq_len):
        real = lengths > pos  # prompts that have a token here (not padding)
        column = tokens[real, pos]
        roles = [r for r, where in pairs.positions.items() if bool((where[real] == pos).all()) and r != "END"]
        if not roles and bool((pairs.positions.get("END", torch.full_like(lengths, -1))[real] == pos).all()):
            roles = ["END"]
        if bool((column == column[0]).all()):
            first = int(column[0])
            text = repr(tok.decode([first])) if tok is not None else f"<{first}>"
        else:
            text = "*"
        labels.append(text + (f" [{'/'.join(roles)}]" if roles else ""))
    return labels


def _baseline(p: Pipeline) -> dict[str, Any]:
    clean, corrupt = p.batches().baseline()
    return {"baseline": pd.DataFrame({"prompt": np.arange(len(p.result.pairs)), "clean": clean.double().numpy(),
                                      "corrupt": corrupt.double().numpy()})}


def _scores(p: Pipeline) -> dict[str, Any]:
    cfg = p.cfg
    p.say(f"  {cfg.method} over {p.graph().n_edges} edges")
    found = discover(p.model(), p.task, p.pairs(), cfg.method, context=p.batches(), steps=cfg.steps,
                     acdc_threshold=cfg.acdc_threshold, seed=cfg.seed, memory_budget_mb=cfg.memory_budget,
                     progress=p.progress, edge_positions=None if cfg.edge_positions == "none" else cfg.edge_positions)
    out: dict[str, Any] = {"nodes": found.node_scores.to_frame(), "edges": None, "acdc_summary": None}
    if found.edge_scores is not None:
        out["edges"] = found.edge_scores.to_frame()
        if found.edge_scores.kept is not None:
            out["acdc_summary"] = AcdcSummary(threshold=cfg.acdc_threshold,
                                              kept_edges=int(found.edge_scores.kept.sum()))
    return out


def _with_nodes(frame: pd.DataFrame, corrupt: float) -> pd.DataFrame:
    """Exact patching rows with their graph node name and score = m(patched) − m(corrupt)."""
    nodes = [node_name_from_row(c, l, h) if c in ("z", "mlp_out") else "" for c, l, h in
             zip(frame["component"], frame["layer"], frame["head"])]
    return frame.assign(node=nodes, score=frame["metric"] - corrupt)


def _exact(p: Pipeline) -> dict[str, Any]:
    cfg, model = p.cfg, p.model()
    positions = parse_positions(cfg.positions, p.task.roles)
    config = PatchingConfig(memory_budget_mb=cfg.memory_budget, progress=p.progress)

    def sweep(part: Any, ctx: Any) -> pd.DataFrame:
        return pd.concat([activation_patching(model, p.task, part, kind, positions=positions, config=config,
                                              context=ctx) for kind in p.head_and_mlp_kinds()], ignore_index=True)

    collect = [(kind, layer) for kind in p.head_and_mlp_kinds() for layer in range(model.cfg.n_layers)]
    frame = p.batches().sweep(sweep, collect, trim=position_independent(positions))  # absolute positions: full width
    return {"exact": _with_nodes(frame, float(p.result.baseline["corrupt"].mean()))}


def _resid(p: Pipeline) -> dict[str, Any]:
    cfg, n_layers = p.cfg, int(p.model().cfg.n_layers)
    positions: Any = "each"
    if cfg.resid_positions == "roles":
        positions = [r for r in dict.fromkeys(p.task.roles) if r in p.result.pairs.positions]
    layers = sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, min(cfg.resid_layers, n_layers))})
    config = PatchingConfig(memory_budget_mb=cfg.memory_budget, progress=p.progress)
    frame = p.batches().activation_patching("resid_pre", positions=positions, layers=layers, config=config)
    return {"resid": _with_nodes(frame, float(p.result.baseline["corrupt"].mean()))}


def _oracle(p: Pipeline) -> dict[str, Any]:
    edges, _ = p.scores()
    p.say(f"  exact edge patching of {p.cfg.oracle_edges} sampled edges")
    rho, frame = p.edge_batches().oracle_check(edges.scores.float(), n_edges=p.cfg.oracle_edges, seed=p.cfg.seed,
                                          progress=p.progress)
    frame = frame.assign(approx_effect=normalize_difference(frame["approx"], edges.gap),
                         exact_effect=normalize_difference(frame["exact"], edges.gap))
    return {"oracle": frame, "oracle_summary": OracleSummary(spearman=rho, n_edges=int(len(frame)))}


def _faithfulness(p: Pipeline) -> dict[str, Any]:
    cfg = p.cfg
    edges, nodes = p.scores()
    ranking = edges.ranking() if edges is not None else nodes.edge_ranking(absolute=True)
    result = p.edge_batches().faithfulness_curve(ranking.float(), percents=parse_percents(cfg.percents), n_boot=cfg.n_boot,
                                            seed=cfg.seed, memory_budget_mb=cfg.memory_budget, progress=p.progress)
    return {"faithfulness": result.curve,
            "faithfulness_summary": FaithfulnessSummary(cpr=result.cpr, cpr_ci=tuple(result.cpr_ci), cmd=result.cmd,
                                                        cmd_ci=tuple(result.cmd_ci))}


def _roles(p: Pipeline) -> dict[str, Any]:
    return {"roles": detect_roles(p.model(), p.task, p.pairs(), context=p.batches(),
                                  memory_budget_mb=p.cfg.memory_budget, seed=p.cfg.seed, say=p.say)}


def _attention(p: Pipeline, circuit: Any) -> pd.DataFrame | None:
    """The circuit heads' attention patterns on the first discovery prompts (clean, each run alone, padding
    dropped) for the report's evidence panel; None for a circuit without heads."""
    heads = sorted((n.layer, n.head) for n in map(parse_node, circuit.nodes) if n.kind == "head")
    if not heads:
        return None
    p.say(f"[attention] patterns of {len(heads)} circuit heads on {min(ATTENTION_PROMPTS, len(p.result.pairs))} prompts")
    pairs = p.result.pairs
    prompts = [pairs.clean_tokens[i, :int(pairs.lengths[i])] for i in range(min(ATTENTION_PROMPTS, len(pairs)))]
    return head_patterns(p.model(), [t.to(p.cfg.device) for t in prompts], heads)


# ---------------------------------------------------------------------- the run

def _check_dataset(cfg: RunConfig, task: Any) -> Any:
    """For a dataset-file task: load the model and tokenize every row now, so bad data is one clear error
    before anything is written. Returns the loaded model (None for built-in tasks)."""
    if not isinstance(task, RecordsTask):
        return None

    model = load_model(cfg.model, device=cfg.device)
    try:
        task.generate(model, cfg.n, seed=cfg.seed, **dict(cfg.task_options))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return model


def _check_top_k(cfg: RunConfig, model: Any) -> Any:
    """Refuse a --top-k larger than the graph it selects from (edges, or heads and MLPs for a node-level method)
    before any work; returns the model, loaded here when needed (None when --top-k is not given)."""
    if cfg.top_k is None:
        return model
    model = model if model is not None else load_model(cfg.model, device=cfg.device)
    graph, level = ComputationalGraph.from_model(model), get_method(cfg.method).level
    available = graph.n_edges if level == "edge" else len(graph.senders_of("head", "mlp"))
    if cfg.top_k > available:
        what = "edges" if level == "edge" else "heads and MLPs"
        raise ConfigError(f"--top-k {cfg.top_k} is more than the {available} {what} of {cfg.model}'s graph "
                          f"(method {cfg.method}): use --top-k {available} or less, or --top-fraction 1 to keep all")
    return model


def execute(cfg: RunConfig, *, quiet: bool = False, command: str | None = None) -> dict[str, object]:
    """Run (or resume) a whole discovery into `cfg.out`; returns the run record written to run.json."""
    previous = torch.get_num_threads()
    threads, why = (cfg.threads, "--threads") if cfg.threads is not None else free_cores()
    torch.set_num_threads(threads)
    try:
        return _execute(cfg, quiet=quiet, command=command, threads_chosen=why)
    finally:
        torch.set_num_threads(previous)


def _execute(cfg: RunConfig, *, quiet: bool, command: str | None, threads_chosen: str) -> dict[str, Any]:
    started = time.time()
    task = get_task(cfg.task)
    model = _check_dataset(cfg, task)  # bad rows of a dataset file fail here, before --out is touched
    model = _check_top_k(cfg, model)
    check_heldout_n(cfg)
    out = rundir.resolve_out(cfg.out, "run", force=cfg.force)
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    with rundir.locked(out):
        try:
            record = _run(cfg, out, task, model, say, quiet=quiet, command=command, started=started,
                          threads_chosen=threads_chosen)
        except BaseException as exc:
            if not rundir.discard_if_empty(out):
                untouched = f"the previous result in {out} is untouched; " if out.exists() else ""
                rundir.annotate(exc, suffix=f" ({untouched}finished stages are kept in {rundir.staging_path(out)}: "
                                            "rerun the same command to resume)")
            raise
        rundir.publish(out)
    return record


def _run(cfg: RunConfig, out: Path, task: Any, model: Any, say: Callable[[str], None], *, quiet: bool,
         command: str | None, started: float, threads_chosen: str) -> dict[str, Any]:
    result = RunResult(cfg, task={"name": task.name, "description": getattr(task, "description", ""),
                                  "metric": getattr(task, "metric_name", ""), "roles": list(getattr(task, "roles", ()))})
    p = Pipeline(cfg, result, None, say, progress=not quiet, task=task, _model=model)  # type: ignore[arg-type]
    say(f"circuitlab run: task {cfg.task}, model {cfg.model}, method {cfg.method}, n={cfg.n}, seed={cfg.seed} -> {out}")
    prompts = resume.generate_pairs(p)
    p.key_parts = resume.key_parts(cfg, p.model(), prompts.discovery, prompts.heldout, prompts.validation)
    p.cache, fresh = resume.open_cache(out, p.key_parts, say)
    staging = p.cache.root.parent.parent
    p.stage("pairs", lambda p: _pairs(p, prompts))
    if getattr(task, "metric_name", "") == "kl" and hasattr(task, "attach_reference"):
        task.attach_reference(p.model(), result.pairs)  # the clean distributions are not saved
    say(f"  {len(result.pairs)} pairs of {result.pairs.seq_len} tokens, e.g. {result.pairs.clean_texts[0]!r} -> "
        f"{result.pairs.corrupt_texts[0]!r}")
    limit, n_edges = get_method(cfg.method).max_edges, p.graph().n_edges
    if limit is not None and n_edges > limit and not cfg.force:
        raise ConfigError(f"{cfg.method.upper()} on {n_edges} edges would take hours (limit {limit}); use --method "
                          "eap-ig, a smaller model, or --force")
    p.stage("baseline", _baseline)
    metrics = result.metrics()
    lo, hi = metrics["difference_ci"]
    say(f"  does the model do the task? clean {metrics['metric']} {metrics['clean']:+.3f}, corrupt "
        f"{metrics['corrupt']:+.3f}, difference {metrics['difference']:+.3f} (95% CI {lo:+.3f} .. {hi:+.3f}); "
        f"clean > corrupt on {metrics['fraction_clean_above_corrupt']:.0%} of pairs")
    if not metrics["clean"] > metrics["corrupt"]:
        say("  warning: the clean metric is not above the corrupt one; the model may not do this task")
    if abs(metrics["difference"]) < 1e-9:
        raise RuntimeError("clean and corrupt runs give the same metric: effects cannot be normalized; "
                           "change the task, corruption or model")
    spec = get_method(cfg.method)
    p.stage("scores", _scores)
    if cfg.positions != "none":
        p.stage("exact", _exact)
    if cfg.resid_positions != "none":
        p.stage("resid", _resid)
    if spec.level == "edge" and not spec.exact and cfg.oracle_edges > 0:
        p.stage("oracle", _oracle)
    p.stage("faithfulness", _faithfulness)
    p.stage("circuit", circuit_stage)
    if cfg.roles:
        p.stage("roles", _roles)
    result.circuit = build_circuit(p)
    start = time.time()
    result.attention = _attention(p, result.circuit)
    result.timings["attention"] = round(time.time() - start, 3)
    result.info = {"command": command or cfg.command(), "versions": versions(), "threads": torch.get_num_threads(),
                   "threads_chosen": threads_chosen,
                   "wall_seconds": round(time.time() - started, 3), "platform": platform_info(),
                   "resume_key": {"key": p.cache.root.name, **p.key_parts}, "fresh_because": fresh}
    record = save_result(result, staging)
    render_result(result, staging)
    sizes = result.circuit_size()  # the size the circuit stage printed, or the forced selection's
    size = f"{sizes['heads']} heads, {sizes['mlps']} MLPs, {sizes['edges']} edges"
    split = result.model.heldout_split if result.model is not None else None
    label = heldout_label(task, result.pairs, result.heldout_pairs, split)
    say(f"clean {metrics['clean']:+.3f} vs corrupt {metrics['corrupt']:+.3f}; circuit {size}; "
        + (f"faithfulness {result.faithful.heldout:.3f} ({label}; target {cfg.faithfulness_target}); "
           if result.faithful else "")
        + (f"CPR {record['faithfulness']['cpr']:.3f}, CMD {record['faithfulness']['cmd']:.3f}; "
           if record.get("faithfulness") else "") + f"{record['wall_seconds']:.0f}s")
    return record


__all__ = ["STAGES", "Pipeline", "build_circuit", "execute", "selection"]
