"""Drawing circuits with matplotlib (Agg backend, no pygraphviz): a layered layout by layer.

x is the computation order (input, then per layer its heads and its MLP, then logits); heads of one layer
share a column and are spread vertically, the MLP sits in its own column just right of them. Nodes are
coloured by role (legend), edge width grows with |score|, and edge colour shows the channel.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402

from circuitlab.patching.topology import sort_key  # noqa: E402

ROLE_COLORS = {
    "name_mover": "#d62728", "backup_name_mover": "#ff9896", "negative_name_mover": "#9467bd",
    "s_inhibition": "#1f77b4", "s_suppression": "#8c564b", "induction": "#2ca02c", "duplicate_token": "#bcbd22",
    "previous_token": "#17becf", "": "#dddddd",
}
KIND_COLORS = {"input": "#f7f7f7", "logits": "#f7f7f7", "mlp": "#fdd0a2"}
CHANNEL_COLORS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#d62728", "resid": "#555555"}


def layered_layout(graph: nx.MultiDiGraph) -> dict[str, tuple[float, float]]:
    """Positions: x by layer (MLPs half a step right of their layer's heads), y spread within a column."""
    columns: dict[float, list[str]] = {}
    for node in sorted(graph.nodes, key=sort_key):
        data = graph.nodes[node]
        if data["kind"] == "input":
            x = -1.0
        elif data["kind"] == "logits":
            layers = [d["layer"] for _, d in graph.nodes(data=True) if d["kind"] in ("head", "mlp")]
            x = (max(layers) + 1.0) if layers else 0.0
        else:
            x = data["layer"] + (0.5 if data["kind"] == "mlp" else 0.0)
        columns.setdefault(x, []).append(node)
    pos = {}
    # Occupied columns sit side by side (a 30-layer model's circuit would otherwise be mostly empty space
    # with a layer's MLP crowding its heads); tick labels name each column's layer.
    for rank, x in enumerate(sorted(columns)):
        nodes = columns[x]
        n = len(nodes)
        for i, node in enumerate(nodes):
            pos[node] = (float(rank), (i - (n - 1) / 2.0))
    return pos


def _column_label(data: dict) -> str:
    if data["kind"] in ("input", "logits"):
        return data["kind"]
    return f"MLP {data['layer']}" if data["kind"] == "mlp" else f"attn {data['layer']}"


def draw_circuit(graph: nx.MultiDiGraph, path: str | os.PathLike[str] | None = None, *, title: str | None = None,
                 max_width: float = 4.0, figsize: tuple[float, float] | None = None) -> plt.Figure:
    """Draw a circuit; with `path` ending in .svg / .png / .pdf, also write the file. Returns the figure."""
    pos = layered_layout(graph)
    xs = [p[0] for p in pos.values()] or [0.0]
    ys = [p[1] for p in pos.values()] or [0.0]
    if figsize is None:
        figsize = (max(6.0, 1.1 * (max(xs) - min(xs) + 2)), max(4.0, 0.6 * (max(ys) - min(ys) + 2)))
    fig, ax = plt.subplots(figsize=figsize)
    scores = [abs(d.get("score", 0.0)) for _, _, d in graph.edges(data=True)]
    top = max(scores) if scores and max(scores) > 0 else 1.0
    for u, v, ch, data in graph.edges(keys=True, data=True):
        width = 0.4 + max_width * abs(data.get("score", 0.0)) / top
        (x0, y0), (x1, y1) = pos[u], pos[v]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", lw=width, color=CHANNEL_COLORS.get(ch, "#555555"),
                                    alpha=0.55, shrinkA=11, shrinkB=11,
                                    connectionstyle=f"arc3,rad={ {'q': 0.08, 'k': -0.08, 'v': 0.16}.get(ch, 0.0)}"))
    roles_seen = set()
    for node, (x, y) in pos.items():
        data = graph.nodes[node]
        role = data.get("role", "")
        color = ROLE_COLORS.get(role, "#aaaaaa") if data["kind"] == "head" else KIND_COLORS.get(data["kind"], "#dddddd")
        if data["kind"] == "head":
            roles_seen.add(role)
        ax.scatter([x], [y], s=900, c=color, edgecolors="black", zorder=3)
        ax.text(x, y, node, ha="center", va="center", fontsize=7, zorder=4)
    handles = [plt.Line2D([], [], marker="o", ls="", markersize=10, markerfacecolor=ROLE_COLORS.get(r, "#aaaaaa"),
                          markeredgecolor="black", label=r or "no role") for r in sorted(roles_seen)]
    handles += [plt.Line2D([], [], color=c, lw=2, label=f"channel {ch}") for ch, c in CHANNEL_COLORS.items()
                if any(k == ch for _, _, k in graph.edges(keys=True))]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_xlabel("layer")
    labels = {pos[node][0]: _column_label(data) for node, data in graph.nodes(data=True)}
    ax.set_xticks(sorted(labels))
    ax.set_xticklabels([labels[x] for x in sorted(labels)], fontsize=8, rotation=30)
    ax.set_yticks([])
    ax.set_xlim(min(xs) - 0.7, max(xs) + 0.7)
    ax.set_ylim(min(ys) - 1.0, max(ys) + 1.0)
    ax.set_title(title or graph.graph.get("name", "circuit"))
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        if path.suffix.lower() not in (".svg", ".png", ".pdf"):
            raise ValueError(f"{path}: drawing formats are .svg, .png and .pdf")
        fig.savefig(path)
    return fig
