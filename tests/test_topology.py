"""The one graph topology (patching.topology): who reads whom, in names and in indices, counted by hand."""

import pytest

from circuitlab.patching.components import parse_edge
from circuitlab.patching.topology import ComputationalGraph, can_read, sender_nodes, sort_key


@pytest.mark.parametrize("src,dst,sequential,parallel", [
    ("input", "a0.h0", True, True), ("a0.h1", "a0.h0", False, False), ("a0.h1", "m0", True, False),
    ("m0", "a1.h0", True, True), ("m0", "m0", False, False), ("a1.h0", "m0", False, False),
    ("m1", "logits", True, True), ("logits", "a3.h0", False, False), ("a0.h0", "input", False, False),
])
def test_can_read_by_hand(src, dst, sequential, parallel):
    assert can_read(src, dst) is sequential
    assert can_read(src, dst, parallel=True) is parallel


@pytest.mark.parametrize("parallel,attn_only,expected", [
    # 2 layers, 2 heads. Sequential: layer-0 q/k/v (6) read input; m0 reads input + 2 heads; layer-1 q/k/v (6)
    # read 4 senders; m1 reads 6; logits read all 7 -> 6 + 3 + 24 + 6 + 7.
    (False, False, 46),
    # parallel blocks: an MLP reads what its layer's heads read (m0: 1, m1: 4)
    (True, False, 42),
    # attention only: 6 * 1 + 6 * 3 + 5
    (False, True, 29),
])
def test_edge_counts_by_hand(parallel, attn_only, expected):
    g = ComputationalGraph(2, 2, 2, attn_only, parallel)
    assert g.n_edges == expected
    assert all(can_read(*parse_edge(e)[:2], parallel=parallel) for e in g.edge_names)
    assert g.sender_names == sender_nodes(2, 2, attn_only)


def test_index_topology_matches_names():
    g = ComputationalGraph(3, 2, 1, parallel=True)
    for r, dst in enumerate(g.receiver_names):
        readers = [s for s in g.sender_names if can_read(s, dst, parallel=True)]
        assert g.senders_before(r) == len(readers)
        assert g.sender_names[: g.senders_before(r)] == readers


def test_sort_key_is_computation_order():
    names = ["logits", "m1", "a1.h1", "a1.h0", "m0", "a0.h3", "input"]
    assert sorted(names, key=sort_key) == ["input", "a0.h3", "m0", "a1.h0", "a1.h1", "m1", "logits"]


def test_ground_truth_forward_uses_the_same_edges():
    from circuitlab.graphs.groundtruth import verify
    from circuitlab.patching.models import boot_native_model
    from tests.conftest import TINY_CONFIG

    model = boot_native_model(dict(TINY_CONFIG, normalization_type=None, act_fn="relu"))
    w = verify.weights_of(model)
    cfg = model.cfg
    g = ComputationalGraph(cfg.n_layers, cfg.n_heads, cfg.n_heads, bool(cfg.attn_only))
    assert set(verify.all_edges(w)) == set(g.edge_names)
