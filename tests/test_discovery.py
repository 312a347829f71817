"""`discover` / `evaluate` and the typed results, checked against hook-based ablation (an independent engine)."""

import networkx as nx
import pytest
import torch

import circuitlab
from circuitlab.graphs.circuit import Selection
from circuitlab.graphs.evaluate import Ablator
from circuitlab.graphs.io import from_mib
from circuitlab.patching.methods import method_names
from circuitlab.graphs.scores import Circuit
from circuitlab.patching.edges import prepare_edges
from circuitlab.tasks import get_task


@pytest.fixture(scope="module")
def setup(tiny_model):
    task = get_task("repeated_tokens")
    pairs = task.generate(tiny_model, 6, seed=0, seq_len=5)
    return tiny_model, task, pairs, prepare_edges(tiny_model, task, pairs)


def _hook_metric(model, task, pairs, nodes):
    """m(clean run with every head/MLP outside `nodes` given its corrupted output), through TL hooks."""
    read = task.read_positions(pairs)
    rows = torch.arange(read.shape[0])[:, None]

    def metric(logits):
        return task.metric_at(logits[rows, read], pairs).mean()

    ablator = Ablator(model, pairs.clean_tokens, pairs.corrupt_tokens, metric, ablation="corrupt")
    return ablator.metric_with(nodes)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_gqa_model"])
def test_node_circuits_evaluate_as_node_ablation(fixture, request):
    model = request.getfixturevalue(fixture)
    task = get_task("repeated_tokens")
    pairs = task.generate(model, 6, seed=1, seq_len=5)
    ctx = prepare_edges(model, task, pairs)
    found = circuitlab.discover(model, task, pairs, "attribution", context=ctx)
    for k in (1, 3, 6):
        circuit = found.node_scores.top_k(k)
        assert circuit.kind == "node" and len(circuit.nodes) == k
        got = circuitlab.evaluate(ctx, circuit).metric
        assert got == pytest.approx(_hook_metric(model, task, pairs, circuit.nodes), abs=1e-4)


def test_edge_circuits_full_and_empty(setup):
    model, task, pairs, ctx = setup
    found = circuitlab.discover(model, task, pairs, "eap", context=ctx)
    graph = found.edge_scores.graph
    full = circuitlab.evaluate(ctx, Circuit(graph, torch.ones(graph.n_edges, dtype=torch.bool)))
    empty = circuitlab.evaluate(ctx, Circuit(graph, torch.zeros(graph.n_edges, dtype=torch.bool)))
    clean_run = _hook_metric(model, task, pairs, [n for n in graph.sender_names if n != "input"])
    assert full.metric == pytest.approx(clean_run, abs=1e-4) and full.faithfulness == pytest.approx(1.0, abs=1e-4)
    assert empty.faithfulness == pytest.approx(0.0, abs=1e-4)


def test_every_registered_method_gives_a_connected_circuit(setup):
    model, task, pairs, ctx = setup
    for method in (m for m in method_names() if m != "acdc"):  # ACDC: one forward per edge, tested by test_cli
        found = circuitlab.discover(model, task, pairs, method, context=ctx)
        assert found.circuit.connected(), method
        assert len(found.node_scores.frame) == 15 and found.node_scores.frame["score"].notna().all()
        assert (found.edge_scores is None) == (method in ("activation", "attribution"))
        graph = found.circuit.to_networkx()
        assert isinstance(graph, nx.DiGraph) and "input" in graph and "logits" in graph


def test_edge_scores_frame_top_k_and_mib(setup):
    model, task, pairs, ctx = setup
    scores = circuitlab.discover(model, task, pairs, "eap-ig", context=ctx, steps=2).edge_scores
    frame = scores.to_frame()
    assert list(frame["edge"]) == scores.graph.edge_names
    gap = ctx.clean_metric - ctx.corrupt_metric
    assert frame["effect"].to_numpy() == pytest.approx(frame["score"].to_numpy() / gap, rel=1e-4)  # float32 means
    circuit = scores.top_k(30)
    top = frame.assign(a=frame["score"].abs()).nlargest(30, "a")["edge"]
    assert set(circuit.edge_names()) == set(top)
    mib = scores.to_mib(circuit)
    assert len(mib["edges"]) == scores.graph.n_edges
    assert {e for e, v in mib["edges"].items() if v["in_graph"]} == set(top)
    roundtrip = from_mib(mib)
    if circuit.connected():
        assert set(roundtrip.edges(keys=True)) == set(circuit.to_networkx().edges(keys=True))
    assert scores.select(Selection(top_fraction=1.0)).n_edges == scores.graph.n_edges


def test_bad_method_and_option_name_the_input(setup):
    model, task, pairs, ctx = setup
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        circuitlab.discover(model, task, pairs, "nope", context=ctx)
    with pytest.raises(ValueError, match="stepz"):
        circuitlab.discover(model, task, pairs, "eap", context=ctx, stepz=3)
    with pytest.raises(ValueError, match="not heads or MLPs"):
        Circuit.from_nodes(ctx.graph, ["a9.h0"])
