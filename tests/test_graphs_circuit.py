"""Circuit building, validation, and export/import round trips on synthetic scores."""

import json
import math

import networkx as nx
import numpy as np
import pandas as pd
import pytest

from circuitlab.graphs.circuit import (Selection, add_edge, select, circuit_from_edge_scores, circuit_from_node_scores,
                            circuit_from_path_patching, edge_names, new_circuit, validate_circuit)
from circuitlab.graphs.io import from_mib, read_graphml, read_json, read_mib, to_mib, write_graphml, write_json, write_mib


def node_scores() -> pd.DataFrame:
    rows = [("z", 0, 1, 0.9), ("z", 0, 2, 0.05), ("mlp_out", 0, np.nan, -0.4), ("z", 1, 0, 0.7),
            ("z", 1, 3, -0.01), ("mlp_out", 1, np.nan, 0.02), ("z", 2, 2, 0.5)]
    return pd.DataFrame(rows, columns=["component", "layer", "head", "effect"])


def edge_scores() -> pd.DataFrame:
    edges = {"input->a0.h1<q>": 0.3, "input->a0.h1<v>": 0.8, "a0.h1->a1.h0<k>": 0.6, "a0.h1->m1": -0.5,
             "a1.h0->logits": 0.9, "m1->logits": 0.4, "input->m0": 0.01, "m0->a2.h2<q>": 0.7,  # m0 dangles
             "a0.h2->a1.h0<v>": 0.02}
    return pd.DataFrame({"edge": list(edges), "score": list(edges.values())})


def test_selection_modes():
    s = pd.Series([0.1, -0.9, 0.5, 0.3])
    assert list(s[select(s, Selection(threshold=0.3))]) == [-0.9, 0.5, 0.3]
    assert list(s[select(s, Selection(top_k=2))]) == [-0.9, 0.5]
    assert list(s[select(s, Selection(top_fraction=0.5))]) == [-0.9, 0.5]
    assert list(s[select(s, Selection(top_k=1, absolute=False))]) == [0.5]
    with pytest.raises(ValueError, match="exactly one"):
        Selection(threshold=0.1, top_k=3)
    with pytest.raises(ValueError, match="top_fraction"):
        Selection(top_fraction=1.5)


def test_node_circuit_connects_in_layer_order():
    g = circuit_from_node_scores(node_scores(), Selection(threshold=0.3))
    assert set(g.nodes) == {"input", "a0.h1", "m0", "a1.h0", "a2.h2", "logits"}
    assert nx.is_directed_acyclic_graph(g) and isinstance(g, nx.DiGraph)
    # independent rule: a head reads strictly earlier layers; an MLP also reads heads of its own layer
    assert g.has_edge("a0.h1", "m0") and not g.has_edge("m0", "a0.h1")
    assert g.has_edge("m0", "a1.h0") and g.has_edge("a0.h1", "a2.h2") and not g.has_edge("a1.h0", "a0.h1")
    assert all(g.has_edge("input", n) and g.has_edge(n, "logits") for n in ["a0.h1", "m0", "a1.h0", "a2.h2"])
    assert g.nodes["m0"]["score"] == pytest.approx(-0.4) and g.nodes["m0"]["kind"] == "mlp"
    assert g.nodes["a1.h0"]["layer"] == 1 and g.nodes["a1.h0"]["head"] == 0 and g.nodes["logits"]["layer"] == 3
    assert g["a0.h1"]["a1.h0"]["resid"]["score"] == pytest.approx(0.7)  # weakest link
    top2 = circuit_from_node_scores(node_scores(), Selection(top_k=2))
    assert set(top2.nodes) == {"input", "a0.h1", "a1.h0", "logits"}


def test_node_circuit_per_position_rows_keep_best_position():
    df = pd.DataFrame({"component": ["head", "head", "mlp"], "layer": [0, 0, 1], "head": [1, 1, np.nan],
                       "effect": [0.2, 0.8, 0.5], "position": ["S2", "END", "END"]})
    g = circuit_from_node_scores(df, Selection(threshold=0.3))
    assert g.nodes["a0.h1"]["position"] == "END" and g.nodes["a0.h1"]["score"] == pytest.approx(0.8)


def test_edge_circuit_prunes_to_input_logits_paths():
    g = circuit_from_edge_scores(edge_scores(), Selection(threshold=0.1), method="eap")
    names = set(edge_names(g))
    # m0->a2.h2 is kept by score but a2.h2 never reaches logits; input->m0 is below threshold
    assert names == {"input->a0.h1<q>", "input->a0.h1<v>", "a0.h1->a1.h0<k>", "a0.h1->m1", "a1.h0->logits",
                     "m1->logits"}
    assert g["a0.h1"]["a1.h0"]["k"]["channel"] == "k" and g["a0.h1"]["a1.h0"]["k"]["method"] == "eap"
    assert g.nodes["a0.h1"]["score"] == pytest.approx(0.6 + 0.5)


def test_path_patching_circuit_connects_input_and_logits():
    df = pd.DataFrame({"sender": ["a7.h3", "a8.h6", "a2.h2"], "receiver": ["a9.h9", "a9.h9", "a5.h5"],
                       "channel": ["q", "q", "k"], "effect": [-0.3, -0.2, 0.001]})
    g = circuit_from_path_patching(df, Selection(threshold=0.1))
    assert set(g.nodes) == {"input", "a7.h3", "a8.h6", "a9.h9", "logits"}
    assert g.has_edge("input", "a7.h3") and g.has_edge("a9.h9", "logits") and not g.has_edge("input", "a9.h9")
    assert g["a7.h3"]["a9.h9"]["q"]["score"] == pytest.approx(-0.3)


@pytest.mark.parametrize("bad, message", [
    (pd.DataFrame({"edge": ["a1.h0->a0.h1<q>", "input->a1.h0<q>", "a0.h1->logits"], "score": [1., 1., 1.]}), "layer order"),
    (pd.DataFrame({"edge": ["a0.h1->b3", "input->a0.h1<q>"], "score": [1., 1.]}), "unknown node name 'b3'"),
    (pd.DataFrame({"edge": ["input->a0.h1<q>", "a0.h1->logits"], "score": [1., float("nan")]}), "NaN"),
    (pd.DataFrame({"edge": ["input->a0.h1<q>", "a0.h1->logits"], "score": [0.1, 0.1]}), "kept nothing"),
    (pd.DataFrame({"edge": ["input->a0.h1<q>"], "score": [1.0]}), "no logits"),
    (pd.DataFrame({"edge": [], "score": []}), "empty"),
    (pd.DataFrame({"edges": ["input->a0.h1<q>"]}), "lacks column"),
    (pd.DataFrame({"edge": ["input->m0<q>"], "score": [1.0]}), "only lead into attention heads"),
])
def test_bad_edge_input_gives_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        circuit_from_edge_scores(bad, Selection(threshold=0.5))


def test_bad_node_input_gives_clear_errors():
    df = node_scores()
    df.loc[2, "effect"] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        circuit_from_node_scores(df, Selection(top_k=3))
    with pytest.raises(ValueError, match="not a graph node"):
        circuit_from_node_scores(pd.DataFrame({"component": ["resid_pre"], "layer": [0], "head": [np.nan],
                                               "effect": [1.0]}), Selection(top_k=1))
    with pytest.raises(ValueError, match="unknown component"):
        circuit_from_node_scores(pd.DataFrame({"component": ["neuron"], "layer": [0], "head": [0],
                                               "effect": [1.0]}), Selection(top_k=1))


def test_cycle_is_reported_by_name():
    g = new_circuit()
    add_edge(g, "a0.h1", "a1.h2", "v", 1.0)
    g.add_edge("a1.h2", "a0.h1", key="resid", channel="resid", score=1.0, method="")
    with pytest.raises(ValueError, match="cycle a0.h1 -> a1.h2 -> a0.h1|cycle a1.h2 -> a0.h1 -> a1.h2"):
        validate_circuit(g)


def _assert_same(a: nx.MultiDiGraph, b: nx.MultiDiGraph) -> None:
    matcher = nx.algorithms.isomorphism.MultiDiGraphMatcher(a, b, node_match=lambda x, y: x == y,
                                                            edge_match=lambda x, y: x == y)
    assert matcher.is_isomorphic()
    assert dict(a.nodes(data=True)) == dict(b.nodes(data=True))
    assert {(u, v, k): d for u, v, k, d in a.edges(keys=True, data=True)} == \
        {(u, v, k): d for u, v, k, d in b.edges(keys=True, data=True)}
    for key in ("name", "method", "n_layers"):
        assert a.graph[key] == b.graph[key]


def _rich_circuit() -> nx.MultiDiGraph:
    g = circuit_from_node_scores(pd.DataFrame({"component": ["head", "head", "mlp"], "layer": [0, 1, 1],
                                               "head": [1, 2, np.nan], "effect": [0.25, -0.125, 1e-7],
                                               "position": ["S2", None, "END"]}), Selection(top_k=3))
    g.nodes["a0.h1"].update(role="previous_token", roles=json.dumps(["previous_token", "induction"]),
                            evidence=json.dumps({"score": 0.93, "prompts": 16}))
    return g


def test_graphml_and_json_round_trips(tmp_path):
    g = _rich_circuit()
    _assert_same(g, read_graphml(write_graphml(g, tmp_path / "c.graphml")))
    _assert_same(g, read_json(write_json(g, tmp_path / "c.json")))
    assert "position" not in read_graphml(tmp_path / "c.graphml").nodes["a1.h2"]
    e = circuit_from_edge_scores(edge_scores(), Selection(threshold=0.1))
    _assert_same(e, read_graphml(write_graphml(e, tmp_path / "e.graphml")))
    _assert_same(e, read_json(write_json(e, tmp_path / "e.json")))


def test_mib_round_trip_keeps_edge_scores(tmp_path):
    g = circuit_from_edge_scores(edge_scores(), Selection(threshold=0.1), method="eap-ig")
    all_scores = dict(zip(edge_scores()["edge"], edge_scores()["score"]))
    path = write_mib(g, tmp_path / "mib.json", n_layers=3, n_heads=4, d_model=32, all_edge_scores=all_scores)
    raw = json.loads(path.read_text())
    assert raw["cfg"] == {"n_layers": 3, "n_heads": 4, "parallel_attn_mlp": False, "d_model": 32}
    assert raw["edges"]["input->m0"] == {"score": 0.01, "in_graph": False}
    back = read_mib(path)
    ours = {f"{u}->{v}" + (f"<{k}>" if k != "resid" else ""): d["score"] for u, v, k, d in g.edges(keys=True, data=True)}
    theirs = {f"{u}->{v}" + (f"<{k}>" if k != "resid" else ""): d["score"] for u, v, k, d in back.edges(keys=True, data=True)}
    assert ours == theirs
    # every scored edge comes back when in_graph is ignored (then pruned to input->logits paths)
    full = from_mib(raw, in_graph_only=False)
    assert "input->m0" not in edge_names(full)  # m0 only feeds a2.h2, which never reaches logits
    assert "a0.h2" not in full  # never fed by input
    assert math.isclose(full["a0.h1"]["m1"]["resid"]["score"], -0.5)


def test_mib_export_expands_implied_head_edges():
    g = _rich_circuit()
    mib = to_mib(g)
    assert {"input->a0.h1<q>", "input->a0.h1<k>", "input->a0.h1<v>", "a0.h1->m1", "m1->logits"} <= set(mib["edges"])
    with pytest.raises(ValueError, match="missing top-level key 'edges'"):
        from_mib({"cfg": {}, "nodes": {}})


def test_node_to_edge_ranking_signed_and_absolute():
    from circuitlab.graphs.scores import NodeScores
    from circuitlab.patching.topology import ComputationalGraph

    g = ComputationalGraph(1, 2, 2, attn_only=True)
    nodes = NodeScores.from_values(g, ["a0.h0", "a0.h1"], [0.5, -0.8], 1.0, "by hand", True)
    ranked = {}
    for absolute in (True, False):
        values = nodes.edge_ranking(absolute=absolute).tolist()
        ranked[absolute] = dict(zip(g.edge_names, values))
    assert ranked[True]["input->a0.h0<q>"] == 0.5 and ranked[True]["a0.h1->logits"] == 0.8
    assert ranked[False]["input->a0.h0<q>"] == 0.5 and ranked[False]["a0.h1->logits"] == -0.8
    assert ranked[True]["input->logits"] == 0.8 and ranked[False]["input->logits"] == 0.5  # largest |s| / largest s
