"""The report's figures, drawn with matplotlib (Agg) from a run's saved tables. Each returns a Figure."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from circuitlab.reports.summaries import CircuitSummary, FaithfulnessSummary  # noqa: E402


def png_bytes(fig: plt.Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (and closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _norm(values: np.ndarray) -> TwoSlopeNorm:
    finite = values[np.isfinite(values)]
    top = float(np.abs(finite).max()) if finite.size else 1.0
    top = top if top > 0 else 1.0
    return TwoSlopeNorm(vcenter=0.0, vmin=-top, vmax=top)


def baseline_figure(baseline: pd.DataFrame, metric: str, ci: dict[str, tuple[float, float]]) -> plt.Figure:
    """Per-prompt clean and corrupt metric, with the mean and its 95% bootstrap interval."""
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    rng = np.random.default_rng(0)
    for i, (col, color) in enumerate((("clean", "#2b8cbe"), ("corrupt", "#e34a33"))):
        values = baseline[col].to_numpy(dtype=float)
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=14, alpha=0.6, color=color)
        lo, hi = ci.get(col, (np.nan, np.nan))
        ax.errorbar([i + 0.28], [values.mean()], yerr=[[values.mean() - lo], [hi - values.mean()]], fmt="o",
                    color="black", capsize=4)
    for a, b in zip(baseline["clean"], baseline["corrupt"]):
        ax.plot([0, 1], [a, b], color="#999999", lw=0.4, alpha=0.5)
    ax.axhline(0, color="#cccccc", lw=0.8)
    ax.set_xticks([0, 1], ["clean", "corrupt"])
    ax.set_xlim(-0.5, 1.6)
    ax.set_ylabel(metric or "metric")
    ax.set_title("Does the model do the task? (mean, 95% CI)")
    return fig


def head_heatmaps(panels: list[tuple[str, pd.DataFrame]]) -> plt.Figure:
    """Layer × head heatmaps of normalized effect, one panel per (title, grid)."""
    n = len(panels)
    first = panels[0][1]
    width = min(22.0, 1.6 + 0.42 * first.shape[1] * n + 1.2 * n)
    height = min(14.0, 1.6 + 0.28 * first.shape[0])
    fig, axes = plt.subplots(1, n, figsize=(max(5.0, width), max(3.0, height)), squeeze=False)
    for ax, (title, grid) in zip(axes[0], panels):
        values = grid.to_numpy(dtype=float)
        image = ax.imshow(values, cmap="RdBu", norm=_norm(values), aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="effect (0 = corrupt, 1 = clean)")
    fig.tight_layout()
    return fig


def mlp_figure(series: list[tuple[str, pd.Series]]) -> plt.Figure:
    """MLP effect per layer, one bar group per (label, series indexed by layer)."""
    fig, ax = plt.subplots(figsize=(7.0, 3.2))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series):
        ax.bar(values.index.to_numpy(dtype=float) + i * width - 0.4 + width / 2, values.to_numpy(dtype=float),
               width=width, label=label)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel("effect")
    ax.set_title("MLP effects")
    ax.legend(fontsize=8)
    return fig


def resid_heatmap(grid: pd.DataFrame, labels: list[str]) -> plt.Figure:
    """Residual stream (resid_pre) patching: layer × position, positions labelled with their tokens."""
    values = grid.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.55 * grid.shape[1]), max(3.0, 1.2 + 0.32 * grid.shape[0])))
    image = ax.imshow(values, cmap="RdBu", norm=_norm(values), aspect="auto")
    ax.set_xticks(range(grid.shape[1]), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index])
    ax.set_xlabel("position (token of the first prompt [role])")
    ax.set_ylabel("layer (resid_pre)")
    ax.set_title("Residual stream patching (clean into corrupt)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="effect")
    fig.tight_layout()
    return fig


def faithfulness_figure(curve: pd.DataFrame, summary: FaithfulnessSummary | None) -> plt.Figure:
    """Faithfulness f(k) of top-k% circuits, signed and absolute selections, with bootstrap bands."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    colors = {"signed": "#1b9e77", "absolute": "#7570b3"}
    for selection, group in curve.groupby("selection", sort=False):
        group = group.sort_values("percent")
        x = group["percent"].to_numpy(dtype=float)
        ax.plot(x, group["faithfulness"], marker="o", ms=3, color=colors.get(str(selection)), label=str(selection))
        ax.fill_between(x, group["ci_low"].astype(float), group["ci_high"].astype(float),
                        color=colors.get(str(selection)), alpha=0.2)
    ax.axhline(1.0, color="black", lw=0.6, ls="--")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("edges kept (% of all edges)")
    ax.set_ylabel("faithfulness (0 = corrupt, 1 = full model)")
    title = "Faithfulness of top-k circuits"
    if summary:
        title += f"\nCPR {summary.cpr:.3f}, CMD {summary.cmd:.3f}"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def circuit_size_figure(curve: pd.DataFrame, summary: CircuitSummary) -> plt.Figure:
    """Exact faithfulness against circuit size for each ranking (discovery solid, held-out dashed, 95% bands),
    the chosen circuit marked on both prompt sets and the target as a line."""
    fig, ax = plt.subplots(figsize=(6.8, 4.0))
    palette = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"]
    for i, (ranking, group) in enumerate(curve.groupby("ranking", sort=False)):
        group, color = group.sort_values("size"), palette[i % len(palette)]
        x = group["size"].to_numpy(dtype=float)
        for suffix, style, label in (("", "-", "discovery"), ("_heldout", "--", "held-out")):
            ax.plot(x, group[f"faithfulness{suffix}"].astype(float), ls=style, marker="o", ms=3, color=color,
                    label=f"{ranking}, {label}")
            ax.fill_between(x, group[f"ci_low{suffix}"].astype(float), group[f"ci_high{suffix}"].astype(float),
                            color=color, alpha=0.12)
    size = float((summary.sizes.edges if summary.level == "edge" else summary.sizes.heads))
    ax.scatter([size, size], [summary.discovery, summary.heldout], marker="*", s=140, color="black", zorder=5,
               label=f"chosen circuit ({summary.method}): discovery, held-out")
    ax.axhline(float(summary.target), color="red", lw=0.8, ls=":", label=f"target {summary.target}")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel(f"circuit size ({'edges' if summary.level == 'edge' else 'heads kept'})")
    ax.set_ylabel("faithfulness (0 = corrupt, 1 = full model)")
    ax.set_title("Exact faithfulness against circuit size", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def agreement_figure(panels: list[tuple[str, np.ndarray, np.ndarray, str, str]]) -> plt.Figure:
    """Scatter plots of approximate vs exact scores: (title, x, y, xlabel, ylabel) per panel."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.0), squeeze=False)
    for ax, (title, x, y, xlabel, ylabel) in zip(axes[0], panels):
        ax.scatter(x, y, s=12, alpha=0.7)
        finite = np.concatenate([x[np.isfinite(x)], y[np.isfinite(y)]])
        if finite.size:
            lo, hi = float(finite.min()), float(finite.max())
            ax.plot([lo, hi], [lo, hi], color="#999999", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def iia_heatmap(grid: pd.DataFrame, title: str) -> plt.Figure:
    """Held-out IIA over layers × sites (0 to 1), the `circuitlab localize` heatmap of one featurizer."""
    fig, ax = plt.subplots(figsize=(max(4.0, 2.0 + 0.7 * grid.shape[1]), max(3.0, 1.2 + 0.28 * grid.shape[0])))
    image = ax.imshow(grid.to_numpy(dtype=float), cmap="Reds", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index], fontsize=7)
    ax.set(xlabel="site (component@position)", ylabel="layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="test IIA")
    fig.tight_layout()
    return fig
