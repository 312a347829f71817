"""The phase-change report (report.html, self-contained, and report.md with figures/), from a study's saved files.

Reads only what `circuitlab.reports.phase` wrote (summary.json, checkpoints.csv, heads.csv, composition.csv,
checkpoints/<L>L/train_log.csv), renders figures with `reports.phase_figures` and pages with the Jinja2
templates `templates/phase.html.j2` and `templates/phase.md.j2`.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jinja2
import networkx as nx
import numpy as np
import pandas as pd

from circuitlab.graphs.ablation import InductionAblation
from circuitlab.graphs.circuit import add_edge, add_node, new_circuit
from circuitlab.graphs.phase import steepest_drop
from circuitlab.reports import phase_figures, plots, store
from circuitlab.reports.figures import png_bytes
from circuitlab.reports.page import page_script, sort_key
from circuitlab.reports.plots import plotly_js

TEMPLATES = Path(__file__).parent / "templates"


def acceptance(checkpoints: pd.DataFrame, heads: pd.DataFrame, windows: dict[str, object],
               joints: dict[str, InductionAblation], composition: pd.DataFrame | None = None) -> dict[str, object]:
    """The issue's acceptance criteria, measured from the run's own tables (values and pass/fail).

    - ICL drop: the steepest fall of the 2L ICL score over the evenly spaced checkpoints lies in the window
      (`graphs.phase.PhaseWindow`); reported beside it: the early transient (step 0 → first grid step) of both
      models, the 1L model's change over the window, and the steepest fall of the 2L − 1L gap on the grid.
    - Ablation: the induction heads together remove ≥ 70 % of the final ICL score, and ablating as many heads
      outside the induction circuit (not induction heads, not their layer-0 K-composition partners) removes on
      average at most half as much; the maximum over those sets and over all non-induction heads is reported.
    - K-composition (reads `composition`, the final checkpoints' `composition_scores`): for each labelled
      induction head, the layer-0 head with the highest K-composition into it must be a labelled previous-token
      head, and its OV and QK eigenvalue scores are positive.
    """
    out: dict[str, Any] = {}
    final = checkpoints.sort_values("step").groupby("model").tail(1).set_index("model")
    if {"1L", "2L"} <= set(final.index):
        a, b = float(final.loc["1L", "icl_score"]), float(final.loc["2L", "icl_score"])
        se = {m: float(final.loc[m, "icl_se"]) if "icl_se" in final else None for m in ("1L", "2L")}
        out["icl_2L_vs_1L"] = {"icl_1L": a, "icl_2L": b, "ratio": b / a if a else None,
                               "icl_se_1L": se["1L"], "icl_se_2L": se["2L"],
                               "pass": bool(b < 0 and (a >= 0 or b / a >= 2.0))}
    w = windows.get("2L")
    if w:
        out["window_2L"] = {"found": w["found"], "start": w["start"], "end": w["end"],
                            "fraction_of_training": w["fraction_of_training"],
                            "top_induction_before": w["top_induction_before"],
                            "top_induction_after": w["top_induction_after"],
                            "pass": bool(w["found"] and w["fraction_of_training"] is not None
                                         and w["fraction_of_training"] <= 0.2)}
        out["icl_drop_in_window_2L"] = _icl_drop(checkpoints, windows, w)
    j = joints.get("2L")
    if j is not None and j.zero_induction is not None:
        ind, oth, anyo = j.zero_induction.fraction_removed, j.zero_others, j.zero_any_other
        assert oth is not None and anyo is not None and j.mean_induction is not None and j.mean_others is not None
        out["ablation_2L"] = {"induction_heads": list(j.induction_heads), "partners": dict(j.partners),
                              "fraction_removed_zero": ind,
                              "fraction_removed_mean": j.mean_induction.fraction_removed,
                              "other_heads": list(j.other_heads),
                              "others_mean_fraction_removed_zero": oth.mean_fraction_removed,
                              "others_max_fraction_removed_zero": oth.max_fraction_removed,
                              "others_worst_set_zero": list(oth.worst_set),
                              "others_mean_fraction_removed_mean": j.mean_others.mean_fraction_removed,
                              "any_other_mean_fraction_removed_zero": anyo.mean_fraction_removed,
                              "any_other_max_fraction_removed_zero": anyo.max_fraction_removed,
                              "max_also_under_half": bool(oth.max_fraction_removed <= 0.5 * ind),
                              "pass": bool(ind >= 0.7 and oth.mean_fraction_removed <= 0.5 * ind)}
    if "2L" in set(heads["model"]):
        last = heads[(heads["model"] == "2L") & (heads["step"] == heads[heads["model"] == "2L"]["step"].max())]
        ind = last[last["label"] == "induction"]
        prev_heads = set(last[(last["layer"] == 0) & (last["label"] == "previous_token")]["node"])
        comp = composition if composition is not None and len(composition) else None
        if comp is not None:
            comp = comp[comp["model"] == "2L"]
        rows = []
        for r in ind.itertuples():
            top_k = None
            if comp is not None:
                into = comp[(comp["receiver"] == r.node) & comp["sender"].str.startswith("a0.")]
                top_k = str(into.loc[into["k_comp"].idxmax(), "sender"]) if len(into) else None
            rows.append({"head": r.node, "ov_copying": r.ov_copying, "qk_matching": r.qk_matching,
                         "qk_via": r.qk_via, "k_comp_from_prev": r.k_comp_from_prev,
                         "top_k_comp_layer0_sender": top_k})
        out["induction_heads_2L"] = {"heads": rows, "layer0_previous_token_heads": sorted(prev_heads),
                                     "pass": bool(rows) and all(r["ov_copying"] > 0 and r["qk_matching"] > 0
                                                                and r["top_k_comp_layer0_sender"] in prev_heads
                                                                for r in rows)}
    return out


def _icl_drop(checkpoints: pd.DataFrame, windows: dict[str, Any], w: dict[str, Any]) -> dict[str, Any]:
    """The ICL-drop criterion of the 2L window, with the 1L control over the same steps."""
    out = {"window": [w["start"], w["end"]], "grid_spacing": w.get("grid_spacing"),
           "steepest_icl_drop_on_grid": w["steepest_icl_drop"], "steepest_icl_drop_value": w.get("steepest_icl_drop_value"),
           "icl_change_in_window": (w["icl_after"] - w["icl_before"]) if w["found"] else None,
           "share_of_run_icl_change_in_window": w["icl_change_in_window"],
           "early_icl_change_2L": w.get("early_icl_change"),
           "steepest_icl_drop_any_checkpoints": w.get("steepest_icl_drop_any")}
    icl = {m: g.set_index("step")["icl_score"] for m, g in checkpoints.groupby("model")}
    if "1L" in icl and "1L" in windows:
        one = icl["1L"]
        out["early_icl_change_1L"] = windows["1L"].get("early_icl_change")
        if w["found"] and {w["start"], w["end"]} <= set(one.index):
            out["icl_change_in_window_1L"] = float(one[w["end"]] - one[w["start"]])
        grid = [s for s in range(w["grid_spacing"] or 1, w["total_steps"] + 1, w["grid_spacing"] or 1)
                if s in one.index and s in icl["2L"].index] if w.get("grid_spacing") else []
        if len(grid) > 1:
            gap = np.array([icl["2L"][s] - one[s] for s in grid])
            pair, value = steepest_drop(np.array(grid), gap)
            out["steepest_drop_of_2L_minus_1L_on_grid"] = list(pair)
            out["steepest_drop_of_2L_minus_1L_value"] = value
            out["gap_drop_in_window"] = bool(w["found"] and w["start"] <= pair[0] and pair[1] <= w["end"])
    out["pass"] = bool(w["found"] and w["steepest_icl_drop_in_window"])
    return out


def _circuit(heads: pd.DataFrame, comp: pd.DataFrame | None, model: str, step: int) -> nx.MultiDiGraph:
    """Labelled heads (and heads whose zero ablation moves the ICL score by ≥ 10% of the largest) at a step."""
    sub = heads[(heads["model"] == model) & (heads["step"] == step)]
    n_layers = int(sub["n_layers"].iloc[0])
    graph = new_circuit(f"{model} step {step}", "phase", n_layers)
    effect = sub["delta_icl_zero"].abs()
    top = float(effect.max()) if effect.notna().any() else 0.0
    keep = sub[(sub["label"] != "") | ((effect >= 0.1 * top) & (top > 0))]
    add_node(graph, "input")
    add_node(graph, "logits")
    for r in keep.itertuples():
        score = float(r.delta_icl_zero) if pd.notna(r.delta_icl_zero) else float(r.induction)
        add_node(graph, r.node, score=score, role=r.label)
        add_edge(graph, "input", r.node, "resid", abs(score))
        add_edge(graph, r.node, "logits", "resid", abs(score))
    if comp is not None and len(comp):
        for r in keep.itertuples():
            for s in keep.itertuples():
                if s.layer < r.layer:
                    k = comp[(comp["sender"] == s.node) & (comp["receiver"] == r.node) & (comp["model"] == model)]
                    if len(k):
                        add_edge(graph, s.node, r.node, "k", float(k["k_comp"].iloc[0]))
    return graph


def _logs(run_dir: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for path in sorted((run_dir / "checkpoints").glob("*/train_log.csv")):
        out[path.parent.name] = store.read_csv(path)
    return out


def interactive_figures(run_dir: Path, summary: dict[str, object], checkpoints: pd.DataFrame,
                        heads: pd.DataFrame) -> dict[str, str]:
    """stem -> Plotly JSON for the figures report.html shows with hover (the others stay PNG)."""
    windows = summary.get("windows", {})
    out = {"loss_icl": plots.loss_icl_over_training(checkpoints, _logs(run_dir), windows)}
    for model in heads["model"].unique():
        out[_induction_stem(model)] = plots.head_scores_over_training(heads, str(model), windows.get(str(model)))
    return out


def _induction_stem(model: Any) -> str:
    return f"induction_{model}".replace("/", "_").replace("@", "_")


def build_figures(run_dir: Path, summary: dict[str, object], checkpoints: pd.DataFrame,
                  heads: pd.DataFrame) -> list[tuple[str, str, bytes]]:
    """(stem, caption, png) for every figure of the report."""
    windows = summary.get("windows", {})
    figs = [("loss_icl", "Training loss and ICL score over training; shaded: phase-change window",
             png_bytes(phase_figures.loss_icl_figure(checkpoints, _logs(run_dir), windows)))]
    for model in heads["model"].unique():
        figs.append((_induction_stem(model), f"{model}: per-head induction score over training",
                     png_bytes(phase_figures.induction_over_training(heads, str(model), windows.get(str(model))))))
    final = heads[heads["step"] == heads.groupby("model")["step"].transform("max")]
    figs.append(("eigen_scatter", "OV copying vs QK matching eigenvalue scores at the final checkpoint",
                 png_bytes(phase_figures.eigen_scatter(final))))
    comp_path = run_dir / "composition.csv"
    comp = store.read_csv(comp_path) if comp_path.is_file() and comp_path.stat().st_size > 1 else None
    if comp is not None and len(comp):
        for model in comp["model"].unique():
            figs.append((f"composition_{model}", f"{model}: Q/K/V-composition scores (final checkpoint)",
                         png_bytes(phase_figures.composition_heatmap(comp, str(model)))))
    for model, w in windows.items():
        if not w.get("found"):
            continue
        for when, step in (("before", w["start"]), ("after", w["end"])):
            if ((heads["model"] == model) & (heads["step"] == step)).any():
                graph = _circuit(heads, comp, model, int(step))
                figs.append((f"circuit_{model}_{when}", f"{model}: circuit {when} the window (step {step})",
                             png_bytes(phase_figures.circuit_figure(graph, f"{model} {when} (step {step})"))))
    return figs


def _tables(summary: dict[str, Any], checkpoints: pd.DataFrame, heads: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    final = heads[heads["step"] == heads.groupby("model")["step"].transform("max")]
    cols = ["model", "node", "label", "previous_token", "previous_token_top", "induction", "ov_copying", "qk_matching", "qk_via",
            "k_comp_from_prev", "delta_icl_zero", "delta_icl_mean", "patch_effect"]
    windows = pd.DataFrame([{"model": k, **{c: v[c] for c in ("found", "start", "end", "fraction_of_training",
                                                              "top_induction_before", "top_induction_after",
                                                              "icl_before", "icl_after", "icl_final",
                                                              "icl_change_in_window", "steepest_icl_drop",
                                                              "steepest_icl_drop_in_window", "early_icl_change",
                                                              "steepest_icl_drop_any", "loss_slope_ratio", "reason")
                                 if c in v}}
                            for k, v in summary.get("windows", {}).items()])
    shown = checkpoints[[c for c in ("model", "step", "tokens", "icl_score", "icl_se", "mean_loss", "train_loss",
                                     "top_induction", "top_induction_head") if c in checkpoints]]
    return [("Phase-change windows", windows), ("Heads at the final checkpoint", final[cols]),
            ("Checkpoints", shown)]


def render_phase_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.html, report.md and figures/*.png for a phase study folder; returns the two report paths."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    checkpoints = store.read_csv(run_dir / "checkpoints.csv")
    heads = store.read_csv(run_dir / "heads.csv")
    for col in ("label", "qk_via", "node", "model"):
        heads[col] = heads[col].fillna("").astype(str).replace("nan", "")
    figs = build_figures(run_dir, summary, checkpoints, heads)
    for stem, _, png in figs:
        store.write_bytes(run_dir / "figures" / f"{stem}.png", png)
    tables = _tables(summary, checkpoints, heads)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=jinja2.select_autoescape(["html"]),
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))
    env.filters["sortkey"] = sort_key
    interactive = interactive_figures(run_dir, summary, checkpoints, heads)
    context = {"summary": summary, "acceptance": summary.get("acceptance", {}), "tables": tables,
               "figures": [(stem, caption, "" if stem in interactive else base64.b64encode(png).decode("ascii"),
                            interactive.get(stem)) for stem, caption, png in figs],
               "plotly_js": plotly_js(), "script": page_script(),
               "config": summary.get("config", {}), "title": "circuitlab: the induction-head phase change",
               "command": _command(summary.get("config", {}))}
    html_path = store.write_text(run_dir / "report.html", env.get_template("phase.html.j2").render(**context))
    md_path = store.write_text(run_dir / "report.md", env.get_template("phase.md.j2").render(**context))
    return html_path, md_path


def _command(cfg: dict[str, Any]) -> str:
    if cfg.get("model"):
        return f"circuitlab phase --out {cfg['out']} --model {cfg['model']} --revisions {','.join(cfg['revisions'])}"
    keys = ("steps", "batch_size", "n_ctx", "d_model", "n_heads", "lr", "repeat_prob", "periodic_prob", "min_period",
            "max_period", "seed")
    flags = " ".join(f"--{k.replace('_', '-')} {cfg[k]}" for k in keys if k in cfg)
    return f"circuitlab phase --out {cfg.get('out')} --layers {','.join(map(str, cfg.get('layers', [])))} {flags}"
