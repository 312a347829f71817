"""Published circuits as data: GPT-2-small IOI (Wang et al., arXiv 2211.00593) and greater-than (Hanna et
al., arXiv 2305.00586), stored in `graphs/data/*.json` with their sources, for users who run GPT-2.

The IOI file keeps the paper's 7 classes (26 heads). ACDC (arXiv 2304.14997) encodes the same 26 heads
in 6 groups (backup name movers merged into name movers) and builds its *edge* ground truth by keeping
all MLPs, every q/k/v letter between kept heads, edges within a group, and only some class pairs — it
drops duplicate-token -> S-inhibition, which the paper's Figure 2 draws. We instead encode the paper's
class-to-class edges with the channel we read from its text (S-inhibition -> name movers' queries,
previous-token -> induction keys, induction and duplicate-token -> S-inhibition values); those channel
letters are our reading and are marked as such in the data file's notes. Class edges connect only heads
in strictly increasing layers.
"""

from __future__ import annotations

import json
from importlib import resources

import networkx as nx

from circuitlab.graphs.circuit import add_edge, add_node, finish, new_circuit
from circuitlab.patching.components import head_node, mlp_node, parse_node
from circuitlab.patching.topology import can_read

REFERENCES = {"ioi": "ioi_gpt2_small.json", "ioi_gpt2_small": "ioi_gpt2_small.json",
              "greater_than": "greater_than_gpt2_small.json",
              "greater_than_gpt2_small": "greater_than_gpt2_small.json"}


def reference_names() -> list[str]:
    """Names accepted by `reference_circuit`."""
    return sorted(REFERENCES)


def load_reference_data(name: str) -> dict[str, object]:
    """The raw data (classes, edges, sources) of a published circuit."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference circuit {name!r}; known: {', '.join(reference_names())}")
    text = resources.files("circuitlab.graphs").joinpath("data", REFERENCES[name]).read_text()
    return json.loads(text)


def reference_classes(name: str) -> dict[str, list[str]]:
    """Class name -> node names (`a9.h9`, `m8`) of a published circuit; MLPs under the class `mlps`."""
    data = load_reference_data(name)
    classes = {cls: [head_node(layer, head) for layer, head in heads] for cls, heads in data["classes"].items()}
    if data.get("mlps"):
        classes["mlps"] = [mlp_node(layer) for layer in data["mlps"]]
    return classes


def reference_circuit(name: str) -> nx.MultiDiGraph:
    """A published circuit as a circuit graph; each node's `role` is its class and `evidence` cites the
    sources. Edges are expanded from the class edges of the data file (only layer-order-valid pairs)."""
    data = load_reference_data(name)
    classes = reference_classes(name)
    classes.update(input=["input"], logits=["logits"])
    graph = new_circuit(data["name"], "published", data["n_layers"])
    cites = [s["arxiv"] for s in data["sources"]]
    for cls, nodes in classes.items():
        for node in nodes:
            if cls in ("input", "logits"):
                add_node(graph, node)
                continue
            role = "" if cls == "mlps" else cls
            add_node(graph, node, role=role, roles=json.dumps([role] if role else []),
                     evidence=json.dumps({"class": cls, "sources": cites}))
    for edge in data["class_edges"]:
        for src in classes[edge["from"]]:
            for dst in classes[edge["to"]]:
                if src == dst or not can_read(src, dst):
                    continue
                is_head = parse_node(dst).kind == "head"
                for channel in edge["channels"]:
                    if channel in ("q", "k", "v") and not is_head:
                        continue
                    add_edge(graph, src, dst, channel, 1.0, "published")
    return finish(graph)
