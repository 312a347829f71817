"""Rendering a run's report (report.html, self-contained, and report.md with figures/) from a `RunResult`.

`circuitlab run` renders the result it holds in memory; `circuitlab report RUN_DIR` reads the same result back
with `reports.save.load_result` (no model needed) and renders it with the same code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from circuitlab.graphs.draw import draw_circuit, layered_layout
from circuitlab.graphs.variables import CARRIES_RULE
from circuitlab.patching.components import head_node
from circuitlab.reports import figures, plots, store
from circuitlab.reports.explorer import build_explorer
from circuitlab.reports.faithful import faithful_paragraphs
from circuitlab.reports.page import fmt as _fmt
from circuitlab.reports.page import Section, to_html, to_markdown
from circuitlab.reports.result import RunResult
from circuitlab.reports.rundir import record_rendered
from circuitlab.reports.save import load_result
from circuitlab.reports.summaries import CircuitSummary


def build_sections(result: RunResult) -> tuple[dict[str, object], list[Section]]:
    """The report's content, in the order a researcher reads it."""
    record = result.record()
    baseline = result.baseline
    cfg, metrics, model = record["config"], record["metrics"], record["model"]
    method = cfg["method"]
    sections: list[Section] = []

    # 1. task and model
    intro = Section("Task and model")
    intro.paragraphs.append(f"Task {record['task']['name']}: {record['task']['description']}. "
                            f"{record['n_pairs']} prompt pairs (seed {cfg['seed']}); metric {metrics['metric']}.")
    intro.paragraphs.append(f"Model {model['name']} ({model.get('architecture', '')}, {model['n_layers']} layers, "
                            f"{model['n_heads']} heads, {model['n_key_value_heads']} key/value heads, d_model "
                            f"{model['d_model']}), weight hash {model['weight_hash']}. Method {method}.")
    intro.paragraphs.append(_engine_text(model.get("engine") or {}))
    pairs = result.pairs
    shown = min(3, len(pairs))
    examples = pd.DataFrame({"clean": pairs.clean_texts[:shown], "corrupt": pairs.corrupt_texts[:shown]})
    for role, where in pairs.positions.items():
        examples[f"{role} at"] = where[:shown].tolist()
    intro.tables.append(("Example pairs (token position of each role)", examples))
    sections.append(intro)

    # 2. does the model do the task
    base = Section("Does the model do the task?")
    base.paragraphs.append(
        f"Clean {metrics['metric']} {_fmt(metrics['clean'])} (95% CI {_fmt(metrics['clean_ci'][0])} to "
        f"{_fmt(metrics['clean_ci'][1])}); corrupt {_fmt(metrics['corrupt'])} (95% CI "
        f"{_fmt(metrics['corrupt_ci'][0])} to {_fmt(metrics['corrupt_ci'][1])}). Difference "
        f"{_fmt(metrics['difference'])} (95% CI {_fmt(metrics['difference_ci'][0])} to "
        f"{_fmt(metrics['difference_ci'][1])}); clean above corrupt on "
        f"{100 * metrics['fraction_clean_above_corrupt']:.0f}% of pairs. Effects below are normalized: "
        "0 = corrupt run, 1 = clean run.")
    ci = {"clean": tuple(metrics["clean_ci"]), "corrupt": tuple(metrics["corrupt_ci"])}
    base.figures.append(("baseline", f"{metrics['metric']} of each prompt pair on the clean and the corrupted prompt, "
                         "with the means and their 95% bootstrap intervals",
                         figures.png_bytes(figures.baseline_figure(baseline, metrics["metric"], ci))))
    circuit = result.circuit_prompts
    circuit = None if circuit is None or len(circuit) != len(baseline) else circuit["circuit"].to_numpy(float)
    base.plots["baseline"] = plots.per_prompt(baseline, list(pairs.clean_texts), metrics["metric"], ci, circuit)
    prompts = pd.DataFrame({"pair": np.arange(len(baseline)), "clean prompt": list(pairs.clean_texts)[:len(baseline)],
                            "clean": baseline["clean"].to_numpy(float), "corrupt": baseline["corrupt"].to_numpy(float)})
    if circuit is not None:  # the faithful circuit alone (the rest corrupted), on the same prompt
        prompts["circuit"] = circuit
    base.tables.append(("Per prompt pair: the metric on the clean and the corrupted prompt" + (
                        ", and with only the faithful circuit kept clean" if circuit is not None else "") +
                        " (sort by a column to see where the model or the circuit fails)",
                        prompts.assign(difference=prompts["clean"] - prompts["corrupt"])))
    sections.append(base)

    # 3. heatmaps
    heat = Section("Where the effect is: heads, MLPs, residual stream")
    exact = result.exact
    if exact is None:  # --positions none: no exact patching in this run
        exact = pd.DataFrame(columns=["component", "layer", "head", "position", "role", "effect", "node"])
        heat.paragraphs.append("Exact activation patching of heads and MLPs was skipped in this run (--positions none).")
    heads = exact[exact["component"] == "z"]
    panels = []
    where = heads["position"].astype("Int64").astype(str).replace("<NA>", "all positions")
    for label, group in heads.groupby(heads["role"].where(heads["role"] != "", where), sort=False):
        title = "exact activation patching" + ("" if label in ("", "all positions") else f" at {label}")
        panels.append((title, group.pivot_table(index="layer", columns="head", values="effect", aggfunc="mean")))
    approx = result.nodes if method != "activation" else result.nodes.iloc[0:0]
    approx_heads = approx[approx["component"] == "z"]
    if not approx_heads.empty:
        panels.append((f"{method} node attribution",
                       approx_heads.pivot_table(index="layer", columns="head", values="effect", aggfunc="mean")))
    if panels:
        heat.figures.append(("heads", "Normalized effect of each attention head (layer × head): exact activation "
                             "patching of its output from the clean into the corrupted run (0 = corrupt, 1 = clean)"
                             + (f", and {method} node attribution" if not approx_heads.empty else ""),
                             figures.png_bytes(figures.head_heatmaps(panels[:4]))))
        heat.plots["heads"] = plots.head_heatmaps(panels[:4])
    mlps = exact[exact["component"] == "mlp_out"]
    if not mlps.empty:
        series = [("exact", mlps.groupby("layer")["effect"].mean())]
        approx_mlps = approx[approx["component"] == "mlp_out"]
        if not approx_mlps.empty:
            series.append((method, approx_mlps.groupby("layer")["effect"].mean()))
        heat.figures.append(("mlps", "Normalized effect of each layer's MLP output, patched exactly from the clean "
                             "into the corrupted run" + (f", with {method}'s estimate" if len(series) > 1 else ""),
                             figures.png_bytes(figures.mlp_figure(series))))
        heat.plots["mlps"] = plots.mlp_bars(series)
    resid = result.resid
    if resid is not None and not resid.empty:
        labels_all = model.get("position_labels", [])
        if _absolute(resid):
            grid = resid.pivot_table(index="layer", columns="position", values="effect", aggfunc="mean")
            labels = [f"{p}: {labels_all[int(p)]}" if int(p) < len(labels_all) else str(p) for p in grid.columns]
        else:
            grid = resid.pivot_table(index="layer", columns="role", values="effect", aggfunc="mean")
            grid = grid[[r for r in record["task"]["roles"] if r in grid.columns]]
            labels = list(grid.columns)
        absolute = _absolute(resid)
        mixed = absolute and any(label.startswith("*") for label in labels_all)
        heat.figures.append(("resid", "Normalized effect of patching the residual stream before each layer (rows) at "
                             "each position (columns) from the clean into the corrupted run" +
                             (": columns are absolute positions; a token is shown where every prompt has the same "
                              "one there, * where prompts differ (different templates or lengths), with the role "
                              "found there in every prompt" if mixed else ""),
                             figures.png_bytes(figures.resid_heatmap(grid, labels))))
        heat.plots["resid"] = plots.resid_heatmap(grid, labels)
    top = heads.assign(_abs=heads["effect"].abs()).sort_values("_abs", ascending=False).head(10)
    top = top.assign(position=[(str(role) if role else "all") if pd.isna(p) else str(int(p))  # empty: all or a role
                               for p, role in zip(top["position"], top["role"])])
    heat.tables.append(("Top heads by exact |effect|", top[["node", "position", "role", "effect"]].reset_index(drop=True)))
    sections.append(heat)

    # 4. circuit
    graph = result.circuit
    circ = Section("The circuit")
    faithful = result.faithful
    forced = any(cfg.get(k) is not None for k in ("top_fraction", "threshold", "top_k"))
    if faithful and not forced:
        circ.paragraphs += faithful_paragraphs(faithful)
        how = f"the smallest faithful circuit found by {faithful.method}"
        circ.paragraphs.append(f"{graph.number_of_nodes()} nodes and {graph.number_of_edges()} edges"
                               + (" (edges implied between the kept heads; MLPs are recomputed, not drawn)"
                                  if graph.graph.get("mlps_recomputed") else "") + ". Nodes are coloured by measured role.")
    else:
        how = f"selected from {method} scores ({_selection_text(cfg)})"
        circ.paragraphs.append(f"{graph.number_of_nodes()} nodes and {graph.number_of_edges()} edges, {how}. Nodes "
                               "are coloured by measured role.")
        if faithful:
            circ.paragraphs.append("The size was forced by the options above; the smallest faithful circuit is "
                                   "reported under Faithfulness.")
    circ.figures.append(("circuit", f"The circuit ({how}): heads and MLPs coloured by their measured role, edges "
                         "from input to logits", figures.png_bytes(
        draw_circuit(graph, title=f"{record['task']['name']} circuit ({method})", figsize=_circuit_size(graph)))))
    circ.explorer = build_explorer(result).to_json()
    baselines = {k[4:-5]: v for k, v in graph.graph.items() if k.startswith("iia_") and k.endswith("_none")}
    if baselines:  # run --variables (`graphs.variables`)
        circ.paragraphs.append("Variables measured at each head's output (held-out IIA; no-intervention baseline "
                               + ", ".join(f"{v} {b:.2f}" for v, b in sorted(baselines.items())) + f"): {CARRIES_RULE}. "
                               "The explorer colours heads by the variable they carry (the colour-by control switches "
                               "to roles or to one variable).")
    nodes = []
    for name, data in graph.nodes(data=True):
        if data.get("kind") in ("head", "mlp"):
            nodes.append({"node": name, "role": data.get("role", ""), "score": data.get("score", 0.0),
                          "exact effect": data.get("exact_effect", float("nan")),
                          **({"carries": data.get("carries", "")} if baselines else {}),
                          **{k: v for k, v in sorted(data.items()) if k.startswith(("iia_", "graded_"))}})
    if nodes:
        circ.tables.append(("Circuit nodes", pd.DataFrame(nodes).sort_values("score", key=abs, ascending=False)))
    sections.append(circ)

    # 5. roles
    roles = result.roles
    role_section = Section("Roles with evidence")
    if roles is None:
        role_section.paragraphs.append("Role detection was switched off for this run (--no-roles).")
    elif roles.empty:
        role_section.paragraphs.append("No head reached a role threshold.")
    else:
        in_circuit = set(graph.nodes)
        table = roles.assign(head=[head_node(int(a), int(b)) for a, b in zip(roles["layer"], roles["head"])])
        table["in circuit"] = table["head"].isin(in_circuit)
        table = table.sort_values(["in circuit", "score"], ascending=[False, False])
        role_section.paragraphs.append(f"{len(table)} role detections on {table['head'].nunique()} heads "
                                       f"({int(table['in circuit'].sum())} in the circuit). Evidence: the measured "
                                       "scores behind each role (see graphs.roles).")
        evidence = pd.json_normalize([json.loads(e or "{}") for e in table["evidence"]], sep=" ")
        columns = table[["head", "role", "score", "threshold", "in circuit"]].reset_index(drop=True)
        role_section.tables.append(("Roles (evidence: the measured scores behind each role, one column each)",
                                    pd.concat([columns, evidence.reset_index(drop=True)], axis=1)))
    sections.append(role_section)

    # 6. faithfulness
    faith = Section("Faithfulness")
    curve = result.faithfulness
    summary = result.faithfulness_summary
    if curve is not None and summary is not None:
        faith.paragraphs.append(
            f"CPR (area under f, signed selection; higher is better) {_fmt(summary.cpr)} (95% CI "
            f"{_fmt(summary.cpr_ci[0])} to {_fmt(summary.cpr_ci[1])}); CMD (area under |1 - f|, absolute "
            f"selection; 0 is best) {_fmt(summary.cmd)} (95% CI {_fmt(summary.cmd_ci[0])} to "
            f"{_fmt(summary.cmd_ci[1])}). Circuits keep the top-k% edges clean and corrupt the rest (exact).")
        faith.figures.append(("faithfulness", "Faithfulness f(k) = (m(C_k) − m(∅)) / (m(M) − m(∅)) of the circuit of the "
                              "top k% edges, measured by exact edge patching, with 95% bootstrap bands over prompts",
                              figures.png_bytes(figures.faithfulness_figure(curve, summary))))
        total = int(curve["n_edges"].max())
        chosen = faithful.sizes.edges if faithful is not None and faithful.level == "edge" else None
        faith.plots["faithfulness"] = plots.faithfulness_curve(curve, summary, 100.0 * chosen / total if chosen else None)
    else:
        faith.paragraphs.append("No faithfulness curve was computed for this run.")
    if faithful:
        _faithful_circuit(faith, result, faithful, forced)
    sections.append(faith)

    # 7. agreement
    agree = Section("Exact vs approximate")
    agreement = record.get("node_agreement") or {}
    fig_panels = []
    if agreement.get("compared_with"):
        best = exact[exact["component"].isin(["z", "mlp_out"])]
        best = best.assign(_abs=best["effect"].abs()).sort_values("_abs", ascending=False).drop_duplicates("node")
        merged = best.set_index("node")["effect"].to_frame("exact").join(
            approx[approx["component"].isin(["z", "mlp_out"])].set_index("node")["effect"].rename("approx"), how="inner")
        agree.paragraphs.append(f"Node level: {method} node effects vs exact activation patching of all "
                                f"{agreement['n_nodes']} heads and MLPs: Spearman {_fmt(agreement['spearman'])}.")
        fig_panels.append((f"nodes: Spearman {_fmt(agreement['spearman'])}", merged["approx"].to_numpy(float),
                           merged["exact"].to_numpy(float), f"{method} effect", "exact effect", list(merged.index)))
    elif result.exact is None:
        agree.paragraphs.append("Node level: no exact activation patching in this run (--positions none).")
    else:
        agree.paragraphs.append("Node level: the method is exact activation patching itself.")
    oracle = result.oracle
    if oracle is not None and result.oracle_summary is not None:
        rho = result.oracle_summary.spearman
        agree.paragraphs.append(f"Edge level (oracle check): {len(oracle)} edges (half the top by |score|, half at "
                                f"random) re-scored by exact edge patching: Spearman {_fmt(rho)}.")
        fig_panels.append((f"edges: Spearman {_fmt(rho)}", oracle["approx_effect"].to_numpy(float),
                           oracle["exact_effect"].to_numpy(float), "approximate effect", "exact effect",
                           [str(e) for e in oracle["edge"]] if "edge" in oracle.columns else [""] * len(oracle)))
    if fig_panels:
        agree.figures.append(("agreement", f"{method}'s estimated effects against exact patching of the same heads, MLPs "
                              "and sampled edges (each point one component or edge; Spearman rank correlation in "
                              "the titles)", figures.png_bytes(figures.agreement_figure([p[:5] for p in fig_panels]))))
        agree.plots["agreement"] = plots.agreement(fig_panels)
    sections.append(agree)

    # 8. reproduce
    repro = Section("Reproduce")
    repro.paragraphs.append("Run this command (from the repository root, with HF_HUB_OFFLINE=1) to reproduce "
                            "the run; the same arguments resume an interrupted run:")
    repro.code = record["command"]
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in record.get("timings", {}).items())
    repro.paragraphs.append(f"Timings: {timings}; wall {record.get('wall_seconds', 0):.0f}s. Versions: "
                            + ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items()) + ".")
    sections.append(repro)
    return record, sections


def _faithful_circuit(faith: Section, result: RunResult, summary: CircuitSummary, forced: bool) -> None:
    """The faithful circuit's part of the Faithfulness section: size curves, baseline, stability."""
    if forced:
        faith.paragraphs += faithful_paragraphs(summary)
    curve = result.faithful_curve
    if curve is not None and not curve.empty:
        faith.figures.append(("circuit_size", "Exact faithfulness against circuit size on the discovery pairs (solid) "
                              "and the held-out pairs (dashed), 95% bootstrap bands; the star is the chosen circuit",
                              figures.png_bytes(figures.circuit_size_figure(curve, summary))))
        faith.plots["circuit_size"] = plots.circuit_size_curve(curve, summary)
        faith.tables.append(("Exact faithfulness vs circuit size, per ranking (discovery and held-out pairs, 95% "
                             "bootstrap intervals)", curve))
    if result.stability is not None:
        faith.tables.append(("Stability: how often each component is in the circuit found on bootstrap resamples "
                             "of the discovery pairs", result.stability))


def _absolute(frame: pd.DataFrame) -> bool:
    """Whether every row of a patching table is at an absolute position (NA = all positions or a role's)."""
    position = frame["position"].astype("Int64")
    return bool(position.notna().all() and (position >= 0).all())


def _engine_text(engine: dict[str, Any]) -> str:
    """Which backend computed every number of the run, and why (run.json's model.engine)."""
    backend = engine.get("backend")
    if backend == "fast":
        return ("Backend: fast (circuitlab's layer-, position- and readout-restricted runner, whose logits were "
                "checked equal to the model's own forward before any number was computed).")
    if backend == "hook":
        return ("Backend: hook (exact, slower: every number is a forward pass of the model itself with hooks), "
                f"because {engine.get('reason') or 'it was chosen'}.")
    return "Backend: not recorded (a run from before circuitlab recorded it)."


def _circuit_size(graph: Any) -> tuple[float, float]:
    """A drawing size that stays readable in a page: at most 16 inches wide, taller for crowded layers."""
    pos = layered_layout(graph)
    xs = [p[0] for p in pos.values()] or [0.0]
    per_column: dict[float, int] = {}
    for x, _ in pos.values():
        per_column[x] = per_column.get(x, 0) + 1
    width = min(16.0, max(7.0, 1.1 * (max(xs) - min(xs) + 2)))
    return width, max(4.0, 0.7 * max(per_column.values(), default=1) + 2.0)


def _selection_text(cfg: dict[str, Any]) -> str:
    if cfg["method"] == "acdc":
        return f"edges ACDC kept at threshold {cfg['acdc_threshold']}"
    for key, label in (("top_fraction", "top fraction"), ("threshold", "|score| threshold"), ("top_k", "top k")):
        if cfg.get(key) is not None:
            return f"{label} {cfg[key]}"
    return "default: top 50 edges / 20 components, widened until input connects to logits"


def render_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Re-render report.html, report.md and figures/*.png of a finished run directory from its saved result."""
    return render_result(load_result(run_dir), run_dir)


def render_result(result: RunResult, run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.html, report.md and figures/*.png of a result into its run directory."""
    run_dir = Path(run_dir)
    record, sections = build_sections(result)
    written = []
    for section in sections:
        for stem, _, png in section.figures:
            store.write_bytes(run_dir / "figures" / f"{stem}.png", png)
            written.append(f"figures/{stem}.png")
    html_path = store.write_text(run_dir / "report.html", to_html(record, sections))
    md_path = store.write_text(run_dir / "report.md", to_markdown(record, sections))

    record_rendered(run_dir, written + ["report.html", "report.md"])
    return html_path, md_path
