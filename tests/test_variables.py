"""Circuits that carry variables (`graphs.variables`): each head's stored IIA against plain TransformerLens hooks."""

import dataclasses

import networkx as nx
import pytest
import torch

from circuitlab.graphs.variables import (DAS_DIMS, MARGIN, carried_variable, head_selection, head_variables,
                                        selected_heads, variable_names)
from circuitlab.tasks.causal import causal_model

HEADS = {"a0.h0": (0, 0), "a1.h3": (1, 3)}


def _tops(model, cf, layer, head):
    """Per pair, each prompt run alone without padding: (clean top token at END, top token with the head's z at
    END swapped in from the source's END), and the two END logit vectors."""
    name = f"blocks.{layer}.attn.hook_z"
    clean, swapped, logits = [], [], []
    for i in range(len(cf)):
        nb, ns = int(cf.base_mask[i].sum()), int(cf.source_mask[i].sum())
        base, source = cf.base_tokens[i:i + 1, :nb], cf.source_tokens[i:i + 1, :ns]
        with torch.no_grad():
            _, cache = model.run_with_cache(source, names_filter=lambda n: n == name)
            z_source = cache[name][0, ns - 1, head].clone()

            def swap(z, hook):
                z = z.clone()
                z[0, nb - 1, head] = z_source
                return z

            pair = (model(base)[0, nb - 1], model.run_with_hooks(base, fwd_hooks=[(name, swap)])[0, nb - 1])
            clean.append(int(pair[0].argmax()))
            swapped.append(int(pair[1].argmax()))
            logits.append(pair)
    return clean, swapped, logits


def _graded(logits, cf, test):
    """mean(LD_swapped − LD_clean) / (2·mean|LD_clean|) over the test pairs, LD = expected − base-answer logit."""
    ld = [[float(l[int(cf.expected_ids[i, 0])] - l[int(cf.base_answer_ids[i, 0])]) for l in logits[i]] for i in test]
    return sum(s - c for c, s in ld) / len(ld) / (2 * sum(abs(c) for c, _ in ld) / len(ld))


def test_head_iia_equals_plain_hook_interchange(tiny_model):
    cf = causal_model("repeated_tokens").counterfactuals(tiny_model, "next", 40, seed=0).with_split(0.5, seed=0)
    assert cf.base_mask is not None and not bool(cf.base_mask.all())  # padded prompts: positions resolved per prompt
    tops = {node: _tops(tiny_model, cf, *lh) for node, lh in HEADS.items()}
    clean, swapped, _ = tops["a0.h0"]
    # expected: a0.h0's intervened answer, so that its IIA is 1 and a no-op intervention (the clean answer, which
    # differs on some held-out pair), a wrong head or a wrong position gives less
    expected = torch.tensor([[t] for t in swapped])
    cf = dataclasses.replace(cf, expected_ids=expected)
    test = [i for i, s in enumerate(cf.split) if s == "test"]
    assert any(clean[i] != swapped[i] for i in test)
    graph = nx.DiGraph()
    graph.add_edge("a0.h0", "a1.h3")
    graph.add_node("m2")
    head_variables(graph, tiny_model, cf, ["next"], n=len(cf), steps=3, n_boot=20)
    none = sum(clean[i] == int(expected[i, 0]) for i in test) / len(test)  # the base run alone (any head's clean)
    assert graph.graph["iia_next_none"] == pytest.approx(none)
    for node in HEADS:
        clean, swapped, logits = tops[node]
        reference = sum(swapped[i] == int(expected[i, 0]) for i in test) / len(test)
        data = graph.nodes[node]
        assert data["iia_next"] == pytest.approx(reference), node
        assert data["graded_next"] == pytest.approx(_graded(logits, cf, test), rel=1e-4, abs=1e-6), node
        assert data["graded_next"] != 0.0  # the swap moved the logits
        assert reference != none  # not a no-op
        das = [data[f"iia_next_das{k}"] for k in DAS_DIMS]
        assert all(0.0 <= v <= 1.0 for v in das)
        assert data["carries"] == ("next" if max([reference] + das) - none > MARGIN else ""), node
    assert "iia_next" not in graph.nodes["m2"] and "carries" not in graph.nodes["m2"]


def test_carried_variable_rule():
    node = {"iia_io": 0.5, "iia_io_das1": 0.9, "iia_s": 0.6, "iia_s_das4": 0.2}
    assert carried_variable(node, {"iia_io_none": 0.0, "iia_s_none": 0.0}, ["io", "s"]) == "io"  # DAS counts
    assert carried_variable(node, {"iia_io_none": 0.85, "iia_s_none": 0.0}, ["io", "s"]) == "s"  # above baseline
    assert carried_variable(node, {"iia_io_none": 0.85, "iia_s_none": 0.55}, ["io", "s"]) == ""  # within the margin
    assert carried_variable({"iia_io": None}, {}, ["io"]) == ""


def test_variable_names_are_checked_against_the_causal_model():
    assert variable_names("io, s", "ioi") == ["io", "s"]
    with pytest.raises(ValueError, match=r"no variable 'foo'.*io, order, s"):
        variable_names("io,foo", "ioi")
    with pytest.raises(ValueError, match="has no causal model"):
        variable_names("x", "no_such_task")


def test_variables_heads_selection(tiny_model):
    graph = nx.DiGraph()
    graph.add_edge("a0.h0", "a1.h3")
    cf = causal_model("repeated_tokens").counterfactuals(tiny_model, "next", 8, seed=0)
    head_variables(graph, tiny_model, cf, ["next"], n=len(cf), steps=1, n_boot=10, heads="a1.h3")
    assert "iia_next_das4" in graph.nodes["a1.h3"] and not graph.nodes["a0.h0"]  # only the chosen head
    graph = nx.DiGraph()
    graph.add_node("a1.h0", role="name_mover")
    graph.add_node("a2.h3", role="induction")
    graph.add_node("a0.h1")
    graph.add_node("m1")
    assert selected_heads(graph) == ["a1.h0", "a2.h3", "a0.h1"]
    assert selected_heads(graph, "name_mover, a0.h1") == ["a1.h0", "a0.h1"]
    with pytest.raises(ValueError, match="'m1' is neither"):
        head_selection("name_mover,m1")
