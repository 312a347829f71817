"""`circuitlab run`: one whole discovery, stage by stage, resumable.

Stages (each cached in `OUT/.partial/<config key>/` when done, skipped on a rerun with the same options):
pairs -> baseline (clean vs corrupt metric) -> scores (the method) -> exact (activation patching of every
head and MLP) -> resid (residual stream heatmap) -> oracle (exact re-scoring of sampled edges) ->
faithfulness (top-k circuits, CPR/CMD) -> roles. Then the circuit is built and every output written:
pairs.jsonl, scores.csv, circuit.graphml/json, run.json, the extra tables the report reads, and the report.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from circuitlab.reports import store
from circuitlab.reports.config import ACDC_EDGE_LIMIT, ConfigError, RunConfig, parse_percents, parse_positions

SCORE_COLUMNS = ["component", "node", "layer", "head", "position", "role", "edge", "sender", "receiver",
                 "channel", "method", "exact", "metric", "effect", "score"]
STAGES = ("pairs", "baseline", "scores", "exact", "resid", "oracle", "faithfulness", "roles")
DEFAULT_TOP_K_EDGES = 50
DEFAULT_TOP_K_NODES = 20


@dataclass
class Run:
    """State shared by the stages of one run."""

    cfg: RunConfig
    out: Path
    cache: store.StageCache
    say: Callable[[str], None]
    progress: bool
    model: Any = None
    task: Any = None
    pairs: Any = None
    _ectx: Any = None
    _pctx: Any = None
    _runner: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ lazily built heavy objects
    def get_model(self) -> Any:
        if self.model is None:
            from circuitlab.patching.models import load_model

            self.say(f"loading model {self.cfg.model} on {self.cfg.device}")
            t0 = time.time()
            self.model = load_model(self.cfg.model, device=self.cfg.device)
            self.timings["load_model"] = time.time() - t0
        return self.model

    def device_pairs(self) -> Any:
        return self.pairs.to(self.cfg.device)

    def edge_context(self) -> Any:
        return self.patch_context()  # one engine context serves every method

    def patch_context(self) -> Any:
        if self._pctx is None:
            from circuitlab.patching.engine import engine_context

            self._pctx = engine_context(self.get_model(), self.task, self.device_pairs(), check_gap=False,
                                        runner=getattr(self, "_runner", None))
            self._ectx = self._pctx
        return self._pctx

    def stage(self, name: str, compute: Callable[[], None]) -> None:
        """Run a stage unless its results are cached; `compute` saves into the cache itself."""
        if self.cache.has(name):
            self.resumed.append(name)
            self.timings[name] = self.cache.seconds(name)
            self.say(f"[{name}] resumed from saved results")
            return
        self.say(f"[{name}] ...")
        t0 = time.time()
        compute()
        seconds = time.time() - t0
        self.cache.mark(name, seconds)
        self.timings[name] = seconds
        if os.environ.get("CIRCUITLAB_PAUSE_AFTER_STAGE") == name:  # a hook for the resume test
            time.sleep(float(os.environ.get("CIRCUITLAB_PAUSE_SECONDS", "60")))


# ---------------------------------------------------------------------- stages

def _stage_pairs(run: Run) -> None:
    cfg = run.cfg
    options = dict(cfg.task_options)
    if cfg.corruption is not None:
        options["corruption"] = cfg.corruption
    pairs = run.task.generate(run.get_model(), cfg.n, seed=cfg.seed, **options)
    path = run.cache.path("pairs", ".jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".pairs.jsonl.tmp")
    pairs.save_jsonl(tmp)
    tmp.replace(path)
    model = run.get_model()
    from circuitlab.patching.models import weight_hash

    labels = _position_labels(model, pairs)
    from circuitlab.patching.engine import make_runner

    run._runner, backend, reason = make_runner(model)  # the fast runner where exact, else the hook backend
    run.cache.save_json("model", {"engine": {"backend": backend, "reason": reason,
                                             "architecture": run._runner.arch.as_dict()},"name": cfg.model, "weight_hash": weight_hash(model),
                                  "n_layers": int(model.cfg.n_layers), "n_heads": int(model.cfg.n_heads),
                                  "n_key_value_heads": int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads),
                                  "d_model": int(model.cfg.d_model), "d_vocab": int(model.cfg.d_vocab),
                                  "attn_only": bool(getattr(model.cfg, "attn_only", False)),
                                  "parallel_attn_mlp": bool(getattr(model.cfg, "parallel_attn_mlp", False)),
                                  "architecture": str(getattr(model.cfg, "architecture", "")),
                                  "has_tokenizer": model.tokenizer is not None,
                                  "position_labels": labels})


def _position_labels(model: Any, pairs: Any) -> list[str]:
    """A label per position: the role found there in every prompt, else the first prompt's token."""
    labels = []
    first = pairs.clean_tokens[0].tolist()
    for pos in range(pairs.seq_len):
        roles = [r for r, where in pairs.positions.items() if bool((where == pos).all()) and r != "END"]
        if not roles and bool((pairs.positions.get("END", torch.tensor([-1])) == pos).all()):
            roles = ["END"]
        tok = getattr(model, "tokenizer", None)
        text = tok.decode([first[pos]]) if tok is not None else f"<{first[pos]}>"
        labels.append(f"{text!r}" + (f" [{'/'.join(roles)}]" if roles else ""))
    return labels


def _stage_baseline(run: Run) -> None:
    ectx = run.edge_context()
    frame = pd.DataFrame({"prompt": range(len(run.pairs)), "clean": ectx.clean_values.cpu().double().numpy(),
                          "corrupt": ectx.corrupt_values.cpu().double().numpy()})
    run.cache.save_frame("baseline", frame)


def _stage_scores(run: Run) -> None:
    from circuitlab.patching.attribution import eap_ig_scores, eap_scores

    cfg = run.cfg
    ectx = run.edge_context()
    n_edges = ectx.graph.n_edges
    if cfg.method == "eap-ig":
        run.say(f"  EAP-IG, {cfg.steps} steps over {n_edges} edges")
        scores = eap_ig_scores(ectx, steps=cfg.steps, progress=run.progress)
        run.cache.save_tensors("scores", {"scores": scores.detach().cpu().double()})
    elif cfg.method in ("eap", "attribution"):
        run.say(f"  EAP (attribution patching) over {n_edges} edges")
        run.cache.save_tensors("scores", {"scores": eap_scores(ectx).detach().cpu().double()})
    else:  # acdc
        from circuitlab.patching.acdc import acdc

        run.say(f"  ACDC at threshold {cfg.acdc_threshold} over {n_edges} edges")
        result = acdc(ectx, cfg.acdc_threshold, progress=run.progress)
        run.cache.save_tensors("scores", {"scores": result.scores.double(), "kept": result.kept,
                                          "forwards": torch.tensor(result.forwards)})


def _stage_exact(run: Run) -> None:
    from circuitlab.patching.activation import PatchingConfig, activation_patching

    cfg = run.cfg
    model = run.get_model()
    ctx = run.patch_context()
    positions = parse_positions(cfg.positions, run.task.roles)
    config = PatchingConfig(memory_budget_mb=cfg.memory_budget, progress=run.progress)
    frames = [activation_patching(model, run.task, ctx.pairs, "z", positions=positions, config=config, context=ctx)]
    if not getattr(model.cfg, "attn_only", False):
        frames.append(activation_patching(model, run.task, ctx.pairs, "mlp_out", positions=positions,
                                          config=config, context=ctx))
    run.cache.save_frame("exact", pd.concat(frames, ignore_index=True))


def _resid_layers(n_layers: int, wanted: int) -> list[int]:
    if wanted >= n_layers:
        return list(range(n_layers))
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, wanted)})


def _stage_resid(run: Run) -> None:
    from circuitlab.patching.activation import PatchingConfig, activation_patching

    cfg = run.cfg
    model = run.get_model()
    ctx = run.patch_context()
    positions: Any = "each" if cfg.resid_positions == "each" else list(run.task.roles)
    if cfg.resid_positions == "roles":
        positions = [r for r in dict.fromkeys(positions) if r in ctx.pairs.positions]
    layers = _resid_layers(int(model.cfg.n_layers), cfg.resid_layers)
    config = PatchingConfig(memory_budget_mb=cfg.memory_budget, progress=run.progress)
    frame = activation_patching(model, run.task, ctx.pairs, "resid_pre", positions=positions, layers=layers,
                                config=config, context=ctx)
    run.cache.save_frame("resid", frame)


def _ranking_scores(run: Run) -> torch.Tensor:
    """Edge scores ranking circuits for the faithfulness curve: the method's own (node methods: weakest link)."""
    cfg = run.cfg
    if cfg.method in ("eap-ig", "eap"):
        return run.cache.load_tensors("scores")["scores"].float()
    if cfg.method == "acdc":
        saved = run.cache.load_tensors("scores")
        scores = torch.nan_to_num(saved["scores"].float(), nan=0.0)
        kept = saved["kept"].bool()
        return torch.where(kept, scores.abs() + scores.abs().max() + 1.0, scores.abs())
    nodes = node_rows(run)
    effect = dict(zip(nodes["node"], nodes["effect"].astype(float)))
    graph = run.edge_context().graph
    big = max([abs(v) for v in effect.values()] + [1.0]) * 10.0
    senders = [big if name == "input" else effect.get(name, 0.0) for name in graph.sender_names]
    receivers = [big if name == "logits" else effect.get(name, 0.0) for name in graph.receiver_names]
    s = torch.tensor(senders)[graph.edge_sender]
    r = torch.tensor(receivers)[graph.edge_receiver]
    return torch.minimum(s, r)


def _stage_oracle(run: Run) -> None:
    from circuitlab.patching.attribution import oracle_check

    cfg = run.cfg
    scores = run.cache.load_tensors("scores")["scores"].float()
    run.say(f"  exact edge patching of {cfg.oracle_edges} sampled edges")
    rho, frame = oracle_check(run.edge_context(), scores, n_edges=cfg.oracle_edges, seed=cfg.seed,
                              progress=run.progress)
    gap = run.edge_context().clean_metric - run.edge_context().corrupt_metric
    frame["approx_effect"] = frame["approx"] / gap
    frame["exact_effect"] = frame["exact"] / gap
    run.cache.save_frame("oracle", frame)
    run.cache.save_json("oracle", {"spearman": rho, "n_edges": int(len(frame))})


def _stage_faithfulness(run: Run) -> None:
    from circuitlab.patching.faithfulness import faithfulness_curve

    cfg = run.cfg
    percents = parse_percents(cfg.percents)
    result = faithfulness_curve(run.edge_context(), _ranking_scores(run), percents=percents, n_boot=cfg.n_boot,
                                seed=cfg.seed, memory_budget_mb=cfg.memory_budget, progress=run.progress)
    run.cache.save_frame("faithfulness", result.curve)
    run.cache.save_json("faithfulness", {"cpr": result.cpr, "cpr_ci": list(result.cpr_ci), "cmd": result.cmd,
                                         "cmd_ci": list(result.cmd_ci)})


def _stage_roles(run: Run) -> None:
    from circuitlab.reports.roles import detect_roles

    cfg = run.cfg
    frame = detect_roles(run.get_model(), run.task, run.device_pairs(), context=run.patch_context(),
                         memory_budget_mb=cfg.memory_budget, seed=cfg.seed, say=run.say)
    run.cache.save_frame("roles", frame)


# ---------------------------------------------------------------------- tables

def node_rows(run: Run) -> pd.DataFrame:
    """The method's own node scores (exact rows for `activation`, EAP node attribution otherwise)."""
    exact = _exact_frame(run)
    if run.cfg.method == "activation":
        return exact
    scores = run.cache.load_tensors("scores")["scores"].float()
    if run.cfg.method == "acdc":
        scores = torch.nan_to_num(scores, nan=0.0)
    from circuitlab.patching.attribution import node_scores

    frame = node_scores(_graph(run), scores, _gap(run), run.cfg.method)
    frame["exact"] = False
    return frame


def _graph(run: Run) -> Any:
    from circuitlab.patching.edges import ComputationalGraph

    meta = run.cache.load_json("model")
    return ComputationalGraph.from_meta(meta)


def _gap(run: Run) -> float:
    base = run.cache.load_frame("baseline")
    return float(base["clean"].mean() - base["corrupt"].mean())


def _exact_frame(run: Run) -> pd.DataFrame:
    from circuitlab.patching.components import head_node, mlp_node

    frame = run.cache.load_frame("exact").copy()
    frame["node"] = [head_node(int(l), int(h)) if c == "z" else mlp_node(int(l))
                     for c, l, h in zip(frame["component"], frame["layer"], frame["head"])]
    frame["method"] = "activation"
    frame["exact"] = True
    frame["score"] = frame["metric"] - run.cache.load_frame("baseline")["corrupt"].mean()
    return frame


def edge_rows(run: Run) -> pd.DataFrame:
    """One row per edge of the graph with the method's score (edge methods only)."""
    if run.cfg.method not in ("eap-ig", "eap", "acdc"):
        return pd.DataFrame(columns=SCORE_COLUMNS)
    saved = run.cache.load_tensors("scores")
    scores = saved["scores"].double()
    graph = _graph(run)
    gap = _gap(run)
    values = scores.numpy()
    frame = pd.DataFrame({
        "component": "edge", "node": "", "layer": -1, "head": -1, "position": -1, "role": "",
        "edge": graph.edge_names,
        "sender": [graph.sender_names[i] for i in graph.edge_sender.tolist()],
        "receiver": [graph.receiver_names[i] for i in graph.edge_receiver.tolist()],
        "channel": [graph.receiver_channels[i] for i in graph.edge_receiver.tolist()],
        "method": run.cfg.method, "exact": run.cfg.method == "acdc", "metric": float("nan"),
        "effect": values / gap, "score": values})
    if run.cfg.method == "acdc":
        frame["kept"] = saved["kept"].numpy().astype(bool)
    return frame


def scores_table(run: Run) -> pd.DataFrame:
    """scores.csv: exact head/MLP rows, the method's node rows, edge rows, residual-stream rows."""
    parts = [_exact_frame(run)]
    if run.cfg.method != "activation":
        parts.append(node_rows(run))
    edges = edge_rows(run)
    if not edges.empty:
        parts.append(edges)
    if run.cache.has("resid") and run.cfg.resid_positions != "none":
        resid = run.cache.load_frame("resid").copy()
        resid["node"], resid["method"], resid["exact"] = "", "activation", True
        resid["score"] = resid["metric"] - run.cache.load_frame("baseline")["corrupt"].mean()
        parts.append(resid)
    frame = pd.concat([p for p in parts if not p.empty], ignore_index=True)
    for col in SCORE_COLUMNS:
        if col not in frame.columns:
            frame[col] = ""
    for col in ("node", "role", "edge", "sender", "receiver", "channel"):
        frame[col] = frame[col].fillna("").astype(str)
    extra = [c for c in frame.columns if c not in SCORE_COLUMNS and c not in ("direction", "source")]
    return frame[SCORE_COLUMNS + extra]


# ---------------------------------------------------------------------- circuit

def _selection(cfg: RunConfig, default_k: int) -> tuple[Any, bool]:
    from circuitlab.graphs.circuit import Selection

    if cfg.top_fraction is not None:
        return Selection(top_fraction=cfg.top_fraction), False
    if cfg.threshold is not None:
        return Selection(threshold=cfg.threshold), False
    if cfg.top_k is not None:
        return Selection(top_k=cfg.top_k), False
    return Selection(top_k=default_k), True


def build_circuit(run: Run, scores: pd.DataFrame) -> Any:
    """The circuit graph from the method's scores, with roles and exact effects on its nodes."""
    from circuitlab.graphs.circuit import Selection, circuit_from_edge_scores, circuit_from_node_scores
    from circuitlab.graphs.roles import assign_roles

    cfg = run.cfg
    n_layers = run.cache.load_json("model")["n_layers"]
    name = f"{cfg.task} on {Path(cfg.model).name} ({cfg.method})"
    if cfg.method == "acdc":
        edges = scores[(scores["component"] == "edge") & scores["kept"].astype(bool)].copy()
        if edges.empty:
            raise RuntimeError(f"ACDC at threshold {cfg.acdc_threshold} removed every edge; lower --acdc-threshold")
        edges["score"] = edges["score"].astype(float).fillna(0.0)
        graph = circuit_from_edge_scores(edges, Selection(top_fraction=1.0), method="acdc", n_layers=n_layers, name=name)
    elif cfg.method in ("eap-ig", "eap"):
        edges = scores[(scores["component"] == "edge")]
        selection, widen = _selection(cfg, DEFAULT_TOP_K_EDGES)
        graph = _widening(lambda sel: circuit_from_edge_scores(edges, sel, method=cfg.method, n_layers=n_layers,
                                                               name=name), selection, widen, len(edges))
    else:
        nodes = scores[(scores["method"] == cfg.method) & scores["component"].isin(["z", "mlp_out"])]
        selection, widen = _selection(cfg, DEFAULT_TOP_K_NODES)
        graph = _widening(lambda sel: circuit_from_node_scores(nodes, sel, method=cfg.method, n_layers=n_layers,
                                                               name=name), selection, widen, len(nodes))
    exact = scores[scores["exact"].astype(str).isin(["True", "true", "1"]) & scores["component"].isin(["z", "mlp_out"])]
    best = exact.assign(_abs=exact["effect"].astype(float).abs()).sort_values("_abs", ascending=False)
    best = best.drop_duplicates("node").set_index("node")
    for node, data in graph.nodes(data=True):
        if node in best.index:
            data["exact_effect"] = float(best.loc[node, "effect"])
    if run.cache.has("roles"):
        roles = run.cache.load_frame("roles")
        if not roles.empty:
            graph = assign_roles(graph, roles)
    return graph


def _widening(build: Callable[[Any], Any], selection: Any, widen: bool, available: int) -> Any:
    from circuitlab.graphs.circuit import Selection

    while True:
        try:
            return build(selection)
        except ValueError as exc:
            if not widen or "empty" not in str(exc) or selection.top_k >= available:
                raise
            selection = Selection(top_k=min(available, selection.top_k * 2))


# ---------------------------------------------------------------------- outputs

def bootstrap_ci(values: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of a mean."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or n_boot < 1:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("circuitlab", "torch", "transformer-lens", "transformers", "numpy", "pandas", "networkx",
                "matplotlib"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def spearman(a: Any, b: Any) -> float:
    from circuitlab.patching.attribution import spearman as _spearman

    return _spearman(np.asarray(a, dtype=float), np.asarray(b, dtype=float))


def node_agreement(scores: pd.DataFrame, method: str) -> dict[str, Any]:
    """Spearman rank agreement of the method's node effects with exact activation patching."""
    exact = scores[(scores["method"] == "activation") & scores["component"].isin(["z", "mlp_out"])]
    exact = exact.assign(_abs=exact["effect"].astype(float).abs()).sort_values("_abs", ascending=False)
    exact = exact.drop_duplicates("node").set_index("node")["effect"].astype(float)
    if method == "activation":
        return {"compared_with": None, "spearman": None, "n_nodes": int(len(exact))}
    approx = scores[(scores["method"] == method) & scores["component"].isin(["z", "mlp_out"])]
    approx = approx.set_index("node")["effect"].astype(float)
    common = exact.index.intersection(approx.index)
    return {"compared_with": method, "spearman": spearman(exact[common], approx[common]), "n_nodes": int(len(common))}


def write_outputs(run: Run, started: float, command: str) -> dict[str, Any]:
    """Write every contract file of OUT from the cached stage results (atomically)."""
    from circuitlab.graphs.io import to_node_link, write_graphml

    cfg, out = run.cfg, run.out
    pairs_src = run.cache.path("pairs", ".jsonl")
    store.write_text(out / "pairs.jsonl", pairs_src.read_text(encoding="utf-8"))
    scores = scores_table(run)
    store.write_csv(out / "scores.csv", scores)
    graph = build_circuit(run, scores)
    store.write_json(out / "circuit.json", to_node_link(graph))
    tmp = out / ".circuit.graphml.tmp"
    write_graphml(graph, tmp)
    tmp.replace(out / "circuit.graphml")
    baseline = run.cache.load_frame("baseline")
    store.write_csv(out / "baseline.csv", baseline)
    extras: dict[str, Any] = {}
    for name in ("oracle", "faithfulness", "roles"):
        if run.cache.has(name):
            store.write_csv(out / f"{name}.csv", run.cache.load_frame(name))
            if run.cache.path(name, ".json").is_file():
                extras[name] = run.cache.load_json(name)
    model_meta = run.cache.load_json("model")
    clean, corrupt = baseline["clean"].to_numpy(), baseline["corrupt"].to_numpy()
    metrics = {"metric": getattr(run.task, "metric_name", ""),
               "clean": float(clean.mean()), "clean_ci": bootstrap_ci(clean, seed=cfg.seed),
               "corrupt": float(corrupt.mean()), "corrupt_ci": bootstrap_ci(corrupt, seed=cfg.seed),
               "difference": float((clean - corrupt).mean()),
               "difference_ci": bootstrap_ci(clean - corrupt, seed=cfg.seed),
               "fraction_clean_above_corrupt": float((clean > corrupt).mean())}
    record = {
        "command": command,
        "config": cfg.to_dict(),
        "config_key": cfg.result_key(),
        "seed": cfg.seed,
        "task": {"name": run.task.name, "description": getattr(run.task, "description", ""),
                 "metric": getattr(run.task, "metric_name", ""), "roles": list(getattr(run.task, "roles", ()))},
        "model": model_meta,
        "versions": _versions(),
        "metrics": metrics,
        "n_pairs": int(len(baseline)),
        "circuit": {"nodes": graph.number_of_nodes(), "edges": graph.number_of_edges()},
        "node_agreement": node_agreement(scores, cfg.method),
        "oracle": extras.get("oracle"),
        "faithfulness": extras.get("faithfulness"),
        "timings": {k: round(v, 3) for k, v in run.timings.items()},
        "threads": torch.get_num_threads(),
        "resumed_stages": run.resumed,
        "wall_seconds": round(time.time() - started, 3),
        "platform": {"python": sys.version.split()[0], "machine": platform.machine(), "system": platform.system()},
    }
    if cfg.method == "acdc":
        saved = run.cache.load_tensors("scores")
        record["acdc"] = {"threshold": cfg.acdc_threshold, "kept_edges": int(saved["kept"].sum()),
                          "forwards": int(saved["forwards"])}
    store.write_json(out / "run.json", record)
    return record


def _check_dataset(cfg: RunConfig, task: Any) -> Any:
    """For a dataset-file task: load the model and tokenize every row now, so bad data is one clear error
    before anything is written. Returns the loaded model (None for built-in tasks)."""
    from circuitlab.tasks.custom import RecordsTask

    if not isinstance(task, RecordsTask):
        return None
    from circuitlab.patching.models import load_model

    model = load_model(cfg.model, device=cfg.device)
    try:
        task.generate(model, cfg.n, seed=cfg.seed, **dict(cfg.task_options))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return model


def execute(cfg: RunConfig, *, quiet: bool = False, command: str | None = None) -> dict[str, Any]:
    """Run (or resume) a whole discovery into `cfg.out`; returns the run record written to run.json."""
    from circuitlab.reports.config import resolve_threads

    previous = torch.get_num_threads()
    torch.set_num_threads(resolve_threads(cfg.threads))
    try:
        return _execute(cfg, quiet=quiet, command=command)
    finally:
        torch.set_num_threads(previous)


def _execute(cfg: RunConfig, *, quiet: bool, command: str | None) -> dict[str, Any]:
    from circuitlab.tasks import get_task

    started = time.time()
    task = get_task(cfg.task)
    model = _check_dataset(cfg, task)  # bad rows of a dataset file fail here, before --out is touched
    out = store.check_writable(cfg.out)
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    run = Run(cfg, out, store.StageCache(out, cfg.result_key()), say, progress=not quiet, model=model)
    run.task = task
    say(f"circuitlab run: task {cfg.task}, model {cfg.model}, method {cfg.method}, n={cfg.n}, seed={cfg.seed} -> {out}")

    run.stage("pairs", lambda: _stage_pairs(run))
    from circuitlab.tasks import PromptPairs

    run.pairs = PromptPairs.load_jsonl(run.cache.path("pairs", ".jsonl"))
    if getattr(run.task, "metric_name", "") == "kl" and hasattr(run.task, "attach_reference"):
        run.task.attach_reference(run.get_model(), run.pairs)  # the clean distributions are not saved
    say(f"  {len(run.pairs)} pairs of {run.pairs.seq_len} tokens, e.g. {run.pairs.clean_texts[0]!r} -> "
        f"{run.pairs.corrupt_texts[0]!r}")
    meta = run.cache.load_json("model")
    if cfg.method == "acdc" and not cfg.force:
        from circuitlab.patching.edges import ComputationalGraph

        n_edges = ComputationalGraph.from_meta(meta).n_edges
        if n_edges > ACDC_EDGE_LIMIT:
            raise ConfigError(f"ACDC on {n_edges} edges would take hours (limit {ACDC_EDGE_LIMIT}); use --method "
                              "eap-ig, a smaller model, or --force")

    run.stage("baseline", lambda: _stage_baseline(run))
    base = run.cache.load_frame("baseline")
    clean, corrupt = base["clean"].to_numpy(), base["corrupt"].to_numpy()
    lo, hi = bootstrap_ci(clean - corrupt, seed=cfg.seed)
    say(f"  does the model do the task? clean {run.task.metric_name} {clean.mean():+.3f}, corrupt "
        f"{corrupt.mean():+.3f}, difference {(clean - corrupt).mean():+.3f} (95% CI {lo:+.3f} .. {hi:+.3f}); "
        f"clean > corrupt on {(clean > corrupt).mean():.0%} of pairs")
    if not clean.mean() > corrupt.mean():
        say("  warning: the clean metric is not above the corrupt one; the model may not do this task")
    if abs(clean.mean() - corrupt.mean()) < 1e-9:
        raise RuntimeError("clean and corrupt runs give the same metric: effects cannot be normalized; "
                           "change the task, corruption or model")

    if cfg.method != "activation":
        run.stage("scores", lambda: _stage_scores(run))
    run.stage("exact", lambda: _stage_exact(run))
    if cfg.resid_positions != "none":
        run.stage("resid", lambda: _stage_resid(run))
    if cfg.method in ("eap-ig", "eap", "attribution") and cfg.oracle_edges > 0:
        run.stage("oracle", lambda: _stage_oracle(run))
    run.stage("faithfulness", lambda: _stage_faithfulness(run))
    if cfg.roles:
        run.stage("roles", lambda: _stage_roles(run))

    record = write_outputs(run, started, command or cfg.command())
    from circuitlab.reports.render import render_report

    render_report(out)
    say(f"clean {record['metrics']['clean']:+.3f} vs corrupt {record['metrics']['corrupt']:+.3f}; circuit "
        f"{record['circuit']['nodes']} nodes, {record['circuit']['edges']} edges; "
        + (f"CPR {record['faithfulness']['cpr']:.3f}, CMD {record['faithfulness']['cmd']:.3f}; "
           if record.get("faithfulness") else "")
        + f"{record['wall_seconds']:.0f}s")
    return record


__all__ = ["execute", "scores_table", "build_circuit", "bootstrap_ci", "node_agreement", "SCORE_COLUMNS", "STAGES"]
