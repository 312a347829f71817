"""Circuits that carry variables: each circuit head's interchange-intervention accuracy (IIA) for task variables.

For every head of a circuit and every variable of the task's causal model (`tasks.causal`), the IIA of swapping
that head's output (`z`) at the END position from a source prompt into a base prompt, on held-out
counterfactual pairs (`patching.localize`: train/test split, DAS trained on the train pairs only; one prepared
set of base/source runs per variable shared by every head and featurizer). Stored as node attributes
`iia_<variable>` (full vector) and `iia_<variable>_das<k>` (DAS, k = 1..4 dimensions of the head's d_head), with
the graded effect beside each (`graded_<variable>[_das<k>]`, `patching.localize`), so
they travel with the NetworkX circuit into GraphML / node-link JSON and the report; the graph attribute
`iia_<variable>_none` is the no-intervention baseline on the same held-out pairs (how often the base run already
says the expected token), the floor a head must clear to carry the variable (`carried_variable`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import networkx as nx
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.graphs.roles import ROLES
from circuitlab.patching.components import parse_node
from circuitlab.patching.hook_backend import ModelRunner
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


def head_selection(spec: str) -> tuple[str, ...]:
    """`--variables-heads`: "all" (every circuit head) or comma-separated roles (every circuit head with that
    role) and head names (`a23.h0`); a ValueError names a bad item."""
    items = tuple(v.strip() for v in spec.split(",") if v.strip()) or ("all",)
    for item in items:
        if item == "all" or item in ROLES:
            continue
        try:
            ok = parse_node(item).kind == "head"
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{item!r} is neither 'all', a role ({', '.join(ROLES)}) nor a head name like a9.h6")
    return items


def selected_heads(graph: nx.DiGraph, spec: str = "all") -> list[str]:
    """The circuit's head nodes that `spec` (`head_selection`) picks, in the graph's order."""
    items = set(head_selection(spec))
    return [name for name, data in graph.nodes(data=True) if parse_node(name).kind == "head"
            and ("all" in items or name in items or str(data.get("role", "")) in items)]


DAS_DIMS = (1, 2, 3, 4)
MARGIN = 0.1
CARRIES_RULE = (f"a head carries the variable whose best held-out IIA at its output (full vector or DAS k = "
                f"{DAS_DIMS[0]}..{DAS_DIMS[-1]}) exceeds that variable's no-intervention baseline by the most, if by "
                f"more than {MARGIN}; otherwise it carries none")


def head_variables(graph: nx.DiGraph, model: TransformerBridge, task: str | Counterfactuals, variables: Sequence[str],
                   *, n: int, seed: int = 0, steps: int = LocalizeConfig.steps, n_boot: int = 200,
                   runner: ModelRunner | None = None, heads: str = "all") -> nx.DiGraph:
    """Annotate each head node of `graph` (in place, also returned) with its test-split IIA per variable, the
    graded effect beside it (`graded_<variable>[_das<k>]`: mean(LD_int − LD_none) / (2·mean|LD_none|), LD = expected
    minus base-answer logit; 0 = nothing moved, 1 = the base's margin fully reversed) and `carries` (the variable
    it carries by `CARRIES_RULE`, "" for none).

    `task`: a built-in task (its causal model draws `n` pairs per variable with `seed`, half held out for the
    measurement) or a `Counterfactuals` (its own pairs for its one variable). `runner`: the engine runner to
    intervene through (default: `make_runner`'s choice for the model). `heads`: which circuit heads
    (`head_selection`: all, roles, head names); the others get no attributes."""
    heads = sorted((node.layer, node.head, name) for name in selected_heads(graph, heads)
                   if (node := parse_node(name)).kind == "head")
    if not heads:
        return graph
    sites = {Site("z", layer, "last", head): name for layer, head, name in heads}
    config = LocalizeConfig(featurizers=("full", "das"), dims=DAS_DIMS, steps=steps, seed=seed, n_boot=n_boot)
    names = []
    for variable in variables:
        result = localize(model, task, variable, sites=list(sites), n=n, config=config, runner=runner)
        names.append(result.variable)
        for row in result.rows:
            if row.split != "test":
                continue
            if row.featurizer == "none":
                graph.graph[f"iia_{result.variable}_none"] = float(row.iia)
            elif row.featurizer in ("full", "das"):
                name = sites[Site("z", row.layer, "last", row.head)]
                key = result.variable if row.featurizer == "full" else f"{result.variable}_das{row.dims}"
                graph.nodes[name][f"iia_{key}"] = float(row.iia)
                graph.nodes[name][f"graded_{key}"] = float(row.graded)
    for _, _, name in heads:
        graph.nodes[name]["carries"] = carried_variable(graph.nodes[name], graph.graph, names)
    return graph


def carried_variable(node: Mapping[str, object], graph_attrs: Mapping[str, object], variables: Sequence[str]) -> str:
    """The variable a head carries by `CARRIES_RULE` from its stored `iia_<var>[_das<k>]` attributes ("" for none)."""
    best, margin = "", MARGIN
    for variable in variables:
        iias = [float(v) for key, v in node.items()
                if (key == f"iia_{variable}" or key.startswith(f"iia_{variable}_das")) and v is not None and v == v]
        if not iias:
            continue
        above = max(iias) - float(graph_attrs.get(f"iia_{variable}_none", 0.0))
        if above > margin:
            best, margin = variable, above
    return best


__all__ = ["CARRIES_RULE", "DAS_DIMS", "MARGIN", "carried_variable", "head_selection", "head_variables", "selected_heads",
           "variable_names"]
