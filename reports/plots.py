"""The report's interactive figures, drawn with Plotly from the same tables as `reports.figures` (the PNGs of
report.md). Each returns the figure as Plotly JSON; report.html inlines plotly.js once, so nothing is fetched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from circuitlab.patching.components import head_node
from circuitlab.reports.summaries import CircuitSummary, FaithfulnessSummary

PALETTE = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"]
EFFECT = "effect (0 = corrupt, 1 = clean)"


def plotly_js() -> str:
    """plotly.js from the plotly wheel, to inline in a page (no CDN)."""
    return get_plotlyjs()


def to_json(fig: go.Figure) -> str:
    """Figure JSON safe inside a <script> element."""
    fig.update_layout(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50), autosize=True)
    return pio.to_json(fig, validate=False).replace("</", "<\\/")


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _limit(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    top = float(finite.max()) if finite.size else 1.0
    return top if top > 0 else 1.0


def per_prompt(baseline: pd.DataFrame, texts: list[str], metric: str, ci: dict[str, tuple[float, float]],
               circuit: np.ndarray | None = None) -> str:
    """Clean and corrupt metric of every prompt pair (hover: the prompt), means with 95% bootstrap intervals, and
    the faithful circuit's metric on each pair where the run has it."""
    fig = go.Figure()
    x = np.arange(len(baseline))
    if circuit is not None:
        fig.add_scatter(x=x, y=circuit, mode="markers", name="circuit", text=texts,
                        marker=dict(color="#31a354", size=9, symbol="diamond-open"),
                        hovertemplate=f"pair %{{x}}<br>circuit {metric} %{{y:.4g}}<br>%{{text}}<extra></extra>")
    for col, color in (("clean", "#2b8cbe"), ("corrupt", "#e34a33")):
        values = baseline[col].to_numpy(float)
        lo, hi = ci.get(col, (np.nan, np.nan))
        fig.add_scatter(x=x, y=values, mode="markers", name=col, marker=dict(color=color, size=7), text=texts,
                        hovertemplate=f"pair %{{x}}<br>{col} {metric} %{{y:.4g}}<br>%{{text}}<extra></extra>")
        fig.add_hline(y=float(values.mean()), line=dict(color=color, dash="dot", width=1))
        fig.add_hrect(y0=lo, y1=hi, fillcolor=color, opacity=0.1, line_width=0)
    fig.update_layout(title=f"{metric} per prompt pair (dotted: mean; band: its 95% CI)", xaxis_title="prompt pair",
                      yaxis_title=metric, height=380)
    return to_json(fig)


def head_heatmaps(panels: list[tuple[str, pd.DataFrame]]) -> str:
    """Layer × head heatmaps of normalized effect with hover, one column per (title, grid), shared colour scale."""
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for t, _ in panels], horizontal_spacing=0.08)
    top = max(_limit(g.to_numpy(float)) for _, g in panels)
    for i, (title, grid) in enumerate(panels, start=1):
        names = [[head_node(int(layer), int(head)) for head in grid.columns] for layer in grid.index]
        fig.add_heatmap(z=grid.to_numpy(float), x=[str(c) for c in grid.columns], y=[str(r) for r in grid.index],
                        text=names, colorscale="RdBu", zmid=0, zmin=-top, zmax=top, showscale=i == len(panels),
                        colorbar=dict(title="effect"), row=1, col=i,
                        hovertemplate=f"{title}<br>%{{text}}: %{{z:.4g}}<extra></extra>")
        fig.update_xaxes(title_text="head", row=1, col=i)
        fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=i)
    fig.update_layout(height=min(900, 220 + 18 * len(panels[0][1].index)))
    return to_json(fig)


def mlp_bars(series: list[tuple[str, pd.Series]]) -> str:
    """MLP effect per layer (bars, one trace per estimate)."""
    fig = go.Figure()
    for label, values in series:
        fig.add_bar(x=values.index.to_numpy(int), y=values.to_numpy(float), name=label,
                    hovertemplate=f"{label}: m%{{x}} %{{y:.4g}}<extra></extra>")
    fig.update_layout(title="MLP effects", xaxis_title="layer", yaxis_title=EFFECT, height=340, barmode="group")
    return to_json(fig)


def resid_heatmap(grid: pd.DataFrame, labels: list[str]) -> str:
    """Residual stream patching, layer × position, with the tokens and roles on the position axis."""
    values = grid.to_numpy(float)
    top = _limit(values)
    fig = go.Figure(go.Heatmap(z=values, x=labels, y=[str(r) for r in grid.index], colorscale="RdBu", zmid=0,
                               zmin=-top, zmax=top, colorbar=dict(title="effect"),
                               hovertemplate="layer %{y}, position %{x}<br>effect %{z:.4g}<extra></extra>"))
    fig.update_layout(title="Residual stream patching (clean into corrupt)", height=min(900, 240 + 16 * len(grid)),
                      xaxis=dict(title="position (token [role])", type="category", tickangle=-50),
                      yaxis=dict(title="layer (resid_pre)", autorange="reversed", type="category"))
    return to_json(fig)


def _band(fig: go.Figure, x: np.ndarray, low: np.ndarray, high: np.ndarray, color: str, group: str) -> None:
    fig.add_scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([high, low[::-1]]), fill="toself", mode="lines",
                    fillcolor=_rgba(color, 0.15), line=dict(width=0), hoverinfo="skip", showlegend=False,
                    legendgroup=group)


def faithfulness_curve(curve: pd.DataFrame, summary: FaithfulnessSummary | None, chosen_percent: float | None) -> str:
    """f(k) of the top-k% edge circuits, signed and absolute selection, 95% bands; the chosen circuit's size."""
    fig = go.Figure()
    for i, (selection, group) in enumerate(curve.groupby("selection", sort=False)):
        group, color = group.sort_values("percent"), PALETTE[i % len(PALETTE)]
        x = group["percent"].to_numpy(float)
        _band(fig, x, group["ci_low"].to_numpy(float), group["ci_high"].to_numpy(float), color, str(selection))
        fig.add_scatter(x=x, y=group["faithfulness"].to_numpy(float), mode="lines+markers", name=str(selection),
                        line=dict(color=color), legendgroup=str(selection),
                        customdata=np.stack([group["n_edges"], group["ci_low"], group["ci_high"]], axis=1),
                        hovertemplate=f"{selection}: top %{{x}}% = %{{customdata[0]}} edges<br>f = %{{y:.4g}} "
                                      "(95% CI %{customdata[1]:.3g} to %{customdata[2]:.3g})<extra></extra>")
    if chosen_percent is not None:
        fig.add_vline(x=chosen_percent, line=dict(color="black", dash="dash", width=1),
                      annotation_text="chosen circuit", annotation_position="top left")
    fig.add_hline(y=1.0, line=dict(color="#888", dash="dot", width=1))
    title = "Faithfulness of top-k% edge circuits"
    if summary:
        title += f" (CPR {summary.cpr:.3f}, CMD {summary.cmd:.3f})"
    fig.update_layout(title=title, xaxis=dict(title="edges kept (% of all edges)", type="log"),
                      yaxis_title="faithfulness (0 = corrupt, 1 = full model)", height=400)
    return to_json(fig)


def circuit_size_curve(curve: pd.DataFrame, summary: CircuitSummary) -> str:
    """Exact faithfulness against circuit size per ranking (discovery solid, held-out dashed, bands), the chosen
    circuit starred and the target as a line."""
    fig = go.Figure()
    for i, (ranking, group) in enumerate(curve.groupby("ranking", sort=False)):
        group, color = group.sort_values("size"), PALETTE[i % len(PALETTE)]
        x = group["size"].to_numpy(float)
        for suffix, dash, label in (("", "solid", "discovery"), ("_heldout", "dash", "held-out")):
            name = f"{ranking}, {label}"
            _band(fig, x, group[f"ci_low{suffix}"].to_numpy(float), group[f"ci_high{suffix}"].to_numpy(float), color,
                  name)
            fig.add_scatter(x=x, y=group[f"faithfulness{suffix}"].to_numpy(float), mode="lines+markers", name=name,
                            legendgroup=name, line=dict(color=color, dash=dash),
                            hovertemplate=f"{name}<br>size %{{x}}: f = %{{y:.4g}}<extra></extra>")
    unit = "edges" if summary.level == "edge" else "heads"
    size = float(getattr(summary.sizes, unit))
    fig.add_scatter(x=[size, size], y=[summary.discovery, summary.heldout], mode="markers", name="chosen circuit",
                    marker=dict(symbol="star", size=16, color="black"), text=["discovery", "held-out"],
                    hovertemplate=f"chosen circuit ({summary.method}), %{{text}}<br>{unit} %{{x}}: f = %{{y:.4g}}"
                                  "<extra></extra>")
    fig.add_hline(y=float(summary.target), line=dict(color="red", dash="dot", width=1),
                  annotation_text=f"target {summary.target}")
    fig.update_layout(title="Exact faithfulness against circuit size", height=420,
                      xaxis=dict(title=f"circuit size ({unit} kept)", type="log"),
                      yaxis_title="faithfulness (0 = corrupt, 1 = full model)")
    return to_json(fig)


def agreement(panels: list[tuple[str, np.ndarray, np.ndarray, str, str, list[str]]]) -> str:
    """Approximate against exact effects, one scatter per (title, x, y, xlabel, ylabel, names), hover names."""
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels])
    for i, (title, x, y, xlabel, ylabel, names) in enumerate(panels, start=1):
        fig.add_scatter(x=x, y=y, mode="markers", text=names, showlegend=False, row=1, col=i,
                        hovertemplate="%{text}<br>approx %{x:.4g}<br>exact %{y:.4g}<extra></extra>")
        finite = np.concatenate([x[np.isfinite(x)], y[np.isfinite(y)]])
        if finite.size:
            lo, hi = float(finite.min()), float(finite.max())
            fig.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="#999", dash="dash", width=1),
                            hoverinfo="skip", showlegend=False, row=1, col=i)
        fig.update_xaxes(title_text=xlabel, row=1, col=i)
        fig.update_yaxes(title_text=ylabel, row=1, col=i)
    fig.update_layout(height=400)
    return to_json(fig)


def _window_shapes(fig: go.Figure, windows: dict[str, Any], row: int | None = None, col: int | None = None) -> None:
    for i, (name, w) in enumerate(windows.items()):
        if w and w.get("found"):
            fig.add_vrect(x0=w["start"], x1=w["end"], fillcolor=PALETTE[i % len(PALETTE)], opacity=0.12, line_width=0,
                          annotation_text=f"{name} window", annotation_position="top left", row=row, col=col)


def loss_icl_over_training(checkpoints: pd.DataFrame, logs: dict[str, pd.DataFrame], windows: dict[str, object]) -> str:
    """Training loss (smoothed) and held-out ICL score (± one standard error) over training, per model, with each
    model's phase-change window shaded."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["Training loss (smoothed)",
                                                        "In-context learning score (held-out text)"])
    for i, (name, group) in enumerate(checkpoints.groupby("model", sort=False)):
        color, group = PALETTE[i % len(PALETTE)], group.sort_values("step")
        log = logs.get(str(name))
        if log is not None and len(log):
            smooth = log["loss"].rolling(max(1, len(log) // 50), min_periods=1, center=True).mean()
            fig.add_scatter(x=log["step"], y=smooth, mode="lines", name=f"{name} loss", line=dict(color=color),
                            hovertemplate=f"{name}: step %{{x}}<br>loss %{{y:.4g}}<extra></extra>", row=1, col=1)
        x, y = group["step"].to_numpy(float), group["icl_score"].to_numpy(float)
        if "icl_se" in group and group["icl_se"].notna().any():
            se = group["icl_se"].fillna(0.0).to_numpy(float)
            fig.add_scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([y + se, (y - se)[::-1]]),
                            fill="toself", mode="lines",
                            fillcolor=_rgba(color, 0.15), line=dict(width=0), hoverinfo="skip", showlegend=False,
                            row=1, col=2)
        fig.add_scatter(x=x, y=y, mode="lines+markers", name=f"{name} ICL", line=dict(color=color),
                        hovertemplate=f"{name}: step %{{x}}<br>ICL score %{{y:.4g}}<extra></extra>", row=1, col=2)
    _window_shapes(fig, windows, row=1, col=2)
    late, early = int(checkpoints["late"].iloc[0]), int(checkpoints["early"].iloc[0])
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="training loss", row=1, col=1)
    fig.update_yaxes(title_text=f"loss@{late} − loss@{early}", row=1, col=2)
    fig.update_layout(height=400)
    return to_json(fig)


def head_scores_over_training(heads: pd.DataFrame, model: str, window: dict[str, object] | None) -> str:
    """Every head's induction (prefix-matching) score over the checkpoints, one line per head, hover per point."""
    fig = go.Figure()
    sub = heads[heads["model"] == model]
    for node, group in sub.groupby("node"):
        group = group.sort_values("step")
        strong = float(group["induction"].max()) >= 0.3
        fig.add_scatter(x=group["step"], y=group["induction"], mode="lines+markers", name=str(node),
                        line=dict(width=2.5 if strong else 1), opacity=1.0 if strong else 0.5,
                        hovertemplate=f"{node}: step %{{x}}<br>induction %{{y:.3f}}<extra></extra>")
    _window_shapes(fig, {model: window} if window else {})
    fig.update_layout(title=f"{model}: per-head induction score over training", height=380,
                      xaxis_title="step", yaxis=dict(title="induction (prefix-matching) score", range=[-0.02, 1.02]))
    return to_json(fig)


def method_intervals(metric: str, methods: list[str],
                     groups: list[tuple[str, list[tuple[float, float, float, int] | None]]]) -> str:
    """A sweep metric per group (model / task) and method: the mean with its 95% interval as an error bar."""
    fig = go.Figure()
    labels = [label for label, _ in groups]
    for j, method in enumerate(methods):
        cells = [values[j] for _, values in groups]
        mean = [c[0] if c else None for c in cells]
        plus = [(c[2] - c[0]) if c and np.isfinite(c[2]) else None for c in cells]
        minus = [(c[0] - c[1]) if c and np.isfinite(c[1]) else None for c in cells]
        text = [("n/a" if not c else f"{c[0]:.3f}" + (f" [{c[1]:.3f}, {c[2]:.3f}]" if np.isfinite(c[1]) else ""))
                for c in cells]
        fig.add_bar(x=labels, y=mean, name=method, marker_color=PALETTE[j % len(PALETTE)], text=text,
                    textposition="none", error_y=dict(type="data", symmetric=False, array=plus, arrayminus=minus),
                    hovertemplate=f"{method}<br>%{{x}}<br>{metric} %{{text}}<extra></extra>")
    fig.update_layout(title=f"{metric} by method (mean, 95% interval)", barmode="group", height=380,
                      yaxis_title=metric)
    return to_json(fig)


def iia_heatmap(grid: pd.DataFrame, title: str) -> str:
    """Held-out IIA over layers × sites (0 to 1), the `circuitlab localize` heatmap of one featurizer."""
    z = [[None if v != v else float(v) for v in row] for row in grid.to_numpy(float)]  # plain numbers, gaps as null
    fig = go.Figure(go.Heatmap(z=z, x=[str(c) for c in grid.columns], y=[str(r) for r in grid.index],
                               colorscale="Reds", zmin=0, zmax=1, colorbar=dict(title="test IIA"),
                               hovertemplate="layer %{y}, %{x}<br>test IIA %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, height=min(900, 240 + 16 * len(grid)),
                      xaxis=dict(title="site (component@position)", type="category"),
                      yaxis=dict(title="layer", autorange="reversed", type="category"))
    return to_json(fig)
