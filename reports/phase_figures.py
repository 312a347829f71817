"""Figures of the phase-change report (matplotlib, Agg). Each returns a Figure; see reports.figures.png_bytes."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import networkx as nx  # noqa: E402

from circuitlab.graphs.draw import draw_circuit

COLORS = {"1L": "#1f77b4", "2L": "#d62728", "3L": "#2ca02c"}


def _shade(ax: Any, window: dict[str, Any] | None, color: str) -> None:
    if window and window.get("found"):
        ax.axvspan(window["start"], window["end"], color=color, alpha=0.15)


def loss_icl_figure(checkpoints: pd.DataFrame, logs: dict[str, pd.DataFrame], windows: dict[str, object]) -> plt.Figure:
    """Training loss (smoothed) and held-out ICL score over training, each model's phase-change window shaded."""
    fig, (ax_loss, ax_icl) = plt.subplots(1, 2, figsize=(11.0, 3.8))
    for name, group in checkpoints.groupby("model", sort=False):
        color = COLORS.get(str(name), None)
        log = logs.get(str(name))
        if log is not None and len(log):
            window = max(1, len(log) // 50)
            ax_loss.plot(log["step"], log["loss"].rolling(window, min_periods=1, center=True).mean(), color=color,
                         label=str(name))
        group = group.sort_values("step")
        ax_icl.plot(group["step"], group["icl_score"], marker="o", ms=3, color=color, label=str(name))
        if "icl_se" in group and group["icl_se"].notna().any():  # ± one standard error over evaluation windows
            ax_icl.fill_between(group["step"], group["icl_score"] - group["icl_se"],
                                group["icl_score"] + group["icl_se"], color=color, alpha=0.15, linewidth=0)
        for ax in (ax_loss, ax_icl):
            _shade(ax, windows.get(str(name)), color or "#999999")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (smoothed)")
    ax_loss.set_title("Training loss (phase-change window shaded)")
    ax_icl.axhline(0.0, color="black", lw=0.6)
    ax_icl.set_xlabel("step")
    late, early = int(checkpoints["late"].iloc[0]), int(checkpoints["early"].iloc[0])
    ax_icl.set_ylabel(f"ICL score: loss@{late} − loss@{early}")
    ax_icl.set_title("In-context learning score (held-out text)")
    for ax in (ax_loss, ax_icl):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def induction_over_training(heads: pd.DataFrame, model: str, window: dict[str, object] | None) -> plt.Figure:
    """Every head's prefix-matching (induction) score over training, one line per head."""
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    sub = heads[heads["model"] == model]
    for node, group in sub.groupby("node"):
        group = group.sort_values("step")
        strong = float(group["induction"].max()) >= 0.3
        ax.plot(group["step"], group["induction"], lw=2.0 if strong else 0.8, alpha=1.0 if strong else 0.5,
                label=str(node) if strong else None)
    _shade(ax, window, "#999999")
    ax.axhline(0.2, color="#999999", ls=":", lw=0.8)
    ax.axhline(0.5, color="#999999", ls="--", lw=0.8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("induction (prefix-matching) score")
    ax.set_title(f"{model}: per-head induction score over training")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def eigen_scatter(final_heads: pd.DataFrame) -> plt.Figure:
    """OV copying vs QK matching eigenvalue scores per head at the final checkpoint; induction heads in red."""
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for model, group in final_heads.groupby("model", sort=False):
        ind = group["label"] == "induction"
        ax.scatter(group.loc[~ind, "ov_copying"], group.loc[~ind, "qk_matching"], s=30, alpha=0.7,
                   marker="o" if model == "2L" else "s", color="#777777", label=f"{model} other heads")
        if ind.any():
            ax.scatter(group.loc[ind, "ov_copying"], group.loc[ind, "qk_matching"], s=60, color="#d62728",
                       marker="*", label=f"{model} induction heads")
        for r in group.itertuples():
            ax.annotate(f"{model}:{r.node}", (r.ov_copying, r.qk_matching), fontsize=6, alpha=0.7)
    ax.axhline(0, color="black", lw=0.6)
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("OV copying score Σλ/Σ|λ|")
    ax.set_ylabel("QK matching score Σλ/Σ|λ|")
    ax.set_title("OV vs QK eigenvalue scores (final)")
    ax.legend(fontsize=7, loc="lower left")
    return fig


def composition_heatmap(comp: pd.DataFrame, model: str) -> plt.Figure:
    """Sender (earlier layer) × receiver heads, one panel per composition kind."""
    sub = comp[comp["model"] == model]
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.6), squeeze=False)
    for ax, kind in zip(axes[0], ("q_comp", "k_comp", "v_comp")):
        grid = sub.pivot_table(index="sender", columns="receiver", values=kind)
        image = ax.imshow(grid.to_numpy(float), cmap="viridis", aspect="auto", vmin=0.0)
        ax.set_xticks(range(grid.shape[1]), list(grid.columns), rotation=60, fontsize=7)
        ax.set_yticks(range(grid.shape[0]), list(grid.index), fontsize=7)
        ax.set_xlabel("receiver")
        ax.set_ylabel("sender")
        ax.set_title(f"{model}: {kind.replace('_', '-')}osition", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def circuit_figure(graph: nx.MultiDiGraph, title: str) -> plt.Figure:
    """A circuit drawn with graphs.draw (layered, roles coloured)."""
    return draw_circuit(graph, title=title, figsize=(6.5, 4.0))
