"""The one registry of circuit-discovery methods, shared by `discover`, the command line and the benchmark.

Each method is either an *edge* method (scores every edge of the computational graph) or a *node* method
(scores every head and MLP; edge rankings are derived from node scores, see `graphs.discovery`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """A discovery method: its level (`edge`/`node`), whether it is exact, a one-line description and the
    largest graph it runs on unless forced (None = any)."""

    name: str
    level: str
    exact: bool
    note: str
    max_edges: int | None = None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("eap-ig", "edge", False, "EAP with gradients integrated over input embeddings corrupt -> clean"),
    Method("eap", "edge", False, "edge attribution patching: (a_clean - a_corrupt) . dm/dx_receiver at the clean run"),
    Method("acdc", "edge", True, "greedy exact edge pruning; score = objective change, kept edges ranked above "
                                 "removed ones", max_edges=5000),
    Method("activation", "node", True, "exact node patching (noising) of every head z and MLP out; edge score = "
                                       "min(|s_u|, |s_v|)"),
    Method("attribution", "node", False, "attribution patching of every head and MLP (sum of its outgoing EAP "
                                         "edge scores)"),
    Method("random", "edge", False, "seeded standard-normal edge scores (chance reference)"),
)}

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
EDGE_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.level == "edge")
# what the methods benchmark runs by default (attribution ranks nodes exactly as eap does)
BENCHMARK_METHODS: tuple[str, ...] = ("activation", "eap", "eap-ig", "acdc", "random")


def get_method(name: str) -> Method:
    """The registered method called `name`; a ValueError listing the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHOD_NAMES)}")
    return METHODS[name]


__all__ = ["BENCHMARK_METHODS", "EDGE_METHODS", "METHODS", "METHOD_NAMES", "Method", "get_method"]
