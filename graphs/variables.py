"""Circuits that carry variables: each circuit head's interchange-intervention accuracy (IIA) for task variables.

For every head of a circuit and every variable of the task's causal model (`tasks.causal`), the IIA of swapping
that head's output (`z`) at the END position from a source prompt into a base prompt, on held-out
counterfactual pairs (`patching.localize`: train/test split, DAS trained on the train pairs only). Stored as node
attributes `iia_<variable>` (full vector) and `iia_<variable>_das1` (DAS, one dimension), so they travel with
the NetworkX circuit into GraphML / node-link JSON and the report.
"""

from __future__ import annotations

from typing import Sequence

import networkx as nx
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.components import parse_node
from circuitlab.patching.interchange import Site
from circuitlab.patching.localize import LocalizeConfig, localize
from circuitlab.tasks.causal import causal_model
from circuitlab.tasks.counterfactual import Counterfactuals


def variable_names(spec: str, task: str) -> list[str]:
    """`io,s` -> the names, each checked against `task`'s causal model (a ValueError naming the known ones)."""
    names = [v.strip() for v in spec.split(",") if v.strip()]
    known = causal_model(task).variables  # a ValueError listing the tasks that have one
    bad = [v for v in names if v not in known] or ([] if names else [spec])
    if bad:
        raise ValueError(f"task {task!r} has no variable {', '.join(map(repr, bad))}: its causal model has "
                         f"{', '.join(sorted(known))}")
    return names


def head_variables(graph: nx.DiGraph, model: TransformerBridge, task: str | Counterfactuals, variables: Sequence[str],
                   *, n: int, seed: int = 0,
                   steps: int = 30, n_boot: int = 200) -> nx.DiGraph:
    """Annotate each head node of `graph` (in place, also returned) with its test-split IIA per variable.

    `task`: a built-in task (its causal model draws `n` pairs per variable with `seed`, half held out for the
    measurement) or a `Counterfactuals` (its own pairs for its one variable)."""
    heads = sorted((node.layer, node.head, name) for name in graph.nodes
                   if (node := parse_node(name)).kind == "head")
    if not heads:
        return graph
    sites = {Site("z", layer, "last", head): name for layer, head, name in heads}
    config = LocalizeConfig(featurizers=("full", "das"), dims=(1,), steps=steps, seed=seed, n_boot=n_boot)
    for variable in variables:
        result = localize(model, task, variable, sites=list(sites), n=n, config=config)
        for row in result.rows:
            if row.split != "test" or row.featurizer not in ("full", "das"):
                continue
            name = sites[Site("z", row.layer, "last", row.head)]
            key = f"iia_{variable}" if row.featurizer == "full" else f"iia_{variable}_das{row.dims}"
            graph.nodes[name][key] = float(row.iia)
    return graph


__all__ = ["head_variables", "variable_names"]
