"""Reference circuits, evaluation metrics (against brute-force computations) and drawing."""

import itertools
import json

import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
import pandas as pd
import pytest
import torch

from circuitlab.graphs.circuit import Selection, circuit_from_edge_scores, circuit_from_node_scores
from circuitlab.graphs.draw import draw_circuit, layered_layout
from circuitlab.graphs.evaluate import (Ablator, compare_edges, compare_nodes, completeness, edge_score_auroc, faithfulness,
                             minimality, node_score_auroc, roc_auc)
from circuitlab.graphs.io import read_graphml, write_graphml
from circuitlab.graphs.reference import load_reference_data, reference_circuit, reference_classes


def test_ioi_reference_has_26_heads_in_7_classes():
    classes = reference_classes("ioi")
    assert len(classes) == 7
    heads = [h for hs in classes.values() for h in hs]
    assert len(heads) == 26 and len(set(heads)) == 26
    assert classes["name_mover"] == ["a9.h9", "a9.h6", "a10.h0"]
    assert set(classes["negative_name_mover"]) == {"a10.h7", "a11.h10"}
    g = reference_circuit("ioi")
    assert nx.is_directed_acyclic_graph(g)
    assert {n for n, d in g.nodes(data=True) if d["kind"] == "head"} == set(heads)  # none pruned away
    assert g.nodes["a7.h3"]["role"] == "s_inhibition"
    assert g.has_edge("a7.h3", "a9.h9") and "q" in g["a7.h3"]["a9.h9"]
    assert "k" in g["a2.h2"]["a5.h5"] and g.has_edge("a4.h11", "a5.h5")
    assert not g.has_edge("input", "a5.h5")  # no direct input -> induction (as in ACDC)
    assert all(s["arxiv"] for s in load_reference_data("ioi")["sources"])


def test_greater_than_reference():
    g = reference_circuit("greater_than")
    heads = {n for n, d in g.nodes(data=True) if d["kind"] == "head"}
    assert heads == {"a5.h1", "a5.h5", "a6.h1", "a6.h9", "a7.h10", "a8.h8", "a8.h11", "a9.h1"}
    assert {n for n, d in g.nodes(data=True) if d["kind"] == "mlp"} == {"m8", "m9", "m10", "m11"}
    assert g.has_edge("a8.h8", "m8") and g.has_edge("m8", "m9") and not g.has_edge("a9.h1", "m8")
    assert "2305.00586" in json.dumps(load_reference_data("greater_than"))
    with pytest.raises(ValueError, match="unknown reference"):
        reference_circuit("docstring")


def _brute_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_pairwise_brute_force(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    labels = rng.random(40) < 0.3
    labels[0], labels[1] = True, False
    assert roc_auc(scores, labels) == pytest.approx(_brute_auc(scores, labels))


def test_roc_auc_edges_cases():
    assert roc_auc([3, 2, 1], [True, False, False]) == 1.0
    assert roc_auc([1, 1, 1], [True, False, False]) == 0.5
    with pytest.raises(ValueError, match="both positives and negatives"):
        roc_auc([1, 2], [True, True])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([1, float("nan")], [True, False])


def test_compare_against_reference():
    ref = reference_circuit("ioi")
    found = circuit_from_node_scores(pd.DataFrame({
        "component": ["head"] * 4 + ["mlp"], "layer": [9, 9, 10, 3, 0], "head": [9, 6, 7, 3, np.nan],
        "effect": [0.9, 0.5, -0.4, 0.3, 0.6]}), Selection(threshold=0.1))
    nodes = compare_nodes(found, ref)
    assert (nodes.tp, nodes.fp, nodes.fn) == (3, 2, 23)
    assert nodes.precision == pytest.approx(3 / 5) and nodes.recall == pytest.approx(3 / 26)
    assert compare_nodes(found, ref, heads_only=True).fp == 1
    assert compare_nodes(ref, ref).f1 == 1.0 and compare_edges(ref, ref).f1 == 1.0
    edges = compare_edges(found, ref, match_channels=False)
    assert edges.tp == len({("input", "a9.h9"), ("input", "a9.h6"), ("input", "a10.h7"), ("a9.h9", "logits"),
                            ("a9.h6", "logits"), ("a10.h7", "logits")})
    # scores of every GPT-2 head: reference heads get higher scores except two
    members = {n for n, d in ref.nodes(data=True) if d["kind"] == "head"}
    scores = {f"a{l}.h{h}": (1.0 if f"a{l}.h{h}" in members else 0.0) for l in range(12) for h in range(12)}
    scores["a9.h9"], scores["a0.h0"] = 0.0, 1.0
    auc = node_score_auroc(scores, ref)
    labels = [k in members for k in scores]
    assert auc == pytest.approx(_brute_auc(list(scores.values()), labels)) and auc < 1.0


def test_edge_score_auroc():
    ref = circuit_from_edge_scores(pd.DataFrame({"edge": ["input->a0.h1<q>", "a0.h1->logits"], "score": [1.0, 1.0]}),
                                   Selection(threshold=0.5))
    scores = pd.DataFrame({"edge": ["input->a0.h1<q>", "a0.h1->logits", "input->a0.h1<k>", "input->logits"],
                           "score": [0.9, -0.8, 0.85, 0.1]})
    assert edge_score_auroc(scores, ref) == pytest.approx(_brute_auc([0.9, 0.8, 0.85, 0.1], [1, 1, 0, 0]))
    assert edge_score_auroc(scores, ref, match_channels=False) == pytest.approx(
        _brute_auc([0.9, 0.8, 0.85, 0.1], [1, 1, 1, 0]))


def _ld_metric(answer, wrong):
    def metric(logits):
        return (logits[:, -1, answer] - logits[:, -1, wrong]).mean()
    return metric


def test_faithfulness_completeness_minimality(tiny_model):
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 64, (8, 10), generator=gen)
    corrupt = torch.randint(0, 64, (8, 10), generator=gen)
    metric = _ld_metric(3, 5)
    keep = ["a2.h1", "m2", "a1.h0"]
    out = faithfulness(tiny_model, keep, clean, corrupt, metric, ablation="corrupt")
    # independent: patch every other head/MLP output with its corrupt activation by hand
    _, cache = tiny_model.run_with_cache(corrupt, names_filter=lambda n: n.endswith("hook_z") or n.endswith("hook_mlp_out"))
    hooks = []
    for layer in range(3):
        drop = [h for h in range(4) if f"a{layer}.h{h}" not in keep]
        def zhook(z, hook, layer=layer, drop=drop):
            z = z.clone()
            z[:, :, drop] = cache[f"blocks.{layer}.attn.hook_z"][:, :, drop]
            return z
        hooks.append((f"blocks.{layer}.attn.hook_z", zhook))
        if f"m{layer}" not in keep:
            hooks.append((f"blocks.{layer}.hook_mlp_out", lambda a, hook, layer=layer: cache[f"blocks.{layer}.hook_mlp_out"]))
    with torch.no_grad():
        manual = metric(tiny_model.run_with_hooks(clean, fwd_hooks=hooks)).item()
        full = metric(tiny_model(clean)).item()
        empty = metric(tiny_model(corrupt)).item()  # everything patched, embeddings clean: not the same run
    assert out["metric_circuit"] == pytest.approx(manual, abs=1e-5)
    assert out["metric_model"] == pytest.approx(full, abs=1e-5)
    assert out["faithfulness"] == pytest.approx((manual - out["metric_empty"]) / (full - out["metric_empty"]))
    assert np.isfinite(empty)
    ab = Ablator(tiny_model, clean, corrupt, metric, "mean")
    with pytest.raises(ValueError, match="not components"):
        ab.metric_with(["a7.h0"])
    g = circuit_from_node_scores(pd.DataFrame({"component": ["head", "mlp", "head"], "layer": [1, 2, 2],
                                               "head": [0, np.nan, 1], "effect": [0.5, 0.4, 0.3]}), Selection(top_k=3))
    g.nodes["a1.h0"]["role"] = "induction"
    comp = completeness(tiny_model, g, clean, corrupt, metric)
    assert set(comp.knockout) == {"role:induction", "a1.h0", "m2", "a2.h1"}
    row = comp.set_index("knockout").loc["a1.h0"]
    everything = set(ab.components)
    assert row.metric_model_minus_k == pytest.approx(ab.metric_with(everything - {"a1.h0"}), abs=1e-6)
    assert row.metric_circuit_minus_k == pytest.approx(ab.metric_with({"m2", "a2.h1"}), abs=1e-6)
    assert row.gap == pytest.approx(abs(row.metric_circuit_minus_k - row.metric_model_minus_k))
    mini = minimality(tiny_model, g, clean, corrupt, metric)
    assert list(mini.node) == sorted(["a1.h0", "m2", "a2.h1"])
    row = mini.set_index("node").loc["m2"]
    assert row.metric_without == pytest.approx(ab.metric_with(["a1.h0", "a2.h1"]), abs=1e-6)


def test_draw_writes_svg_and_png(tmp_path):
    g = reference_circuit("ioi")
    pos = layered_layout(g)
    assert pos["input"][0] < pos["a0.h1"][0] < pos["a9.h9"][0] < pos["logits"][0]
    assert pos["a9.h9"][0] == pos["a9.h6"][0] and pos["a9.h9"][1] != pos["a9.h6"][1]
    fig = draw_circuit(g, tmp_path / "ioi.svg")
    plt.close(fig)
    assert (tmp_path / "ioi.svg").read_text().lstrip().startswith("<?xml")
    fig = draw_circuit(read_graphml(write_graphml(g, tmp_path / "g.graphml")), tmp_path / "ioi.png")
    plt.close(fig)
    assert (tmp_path / "ioi.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="drawing formats"):
        draw_circuit(g, tmp_path / "x.gif")
