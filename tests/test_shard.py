"""Sharded sweeps (patching.shard) equal one process: head × position patching and exact edge scores."""

import torch

from circuitlab.graphs.benchmark import adapt_groundtruth
from circuitlab.graphs.groundtruth import MODELS_DIR, load_groundtruth
from circuitlab.patching.activation import activation_patching
from circuitlab.patching.attribution import exact_edge_scores
from circuitlab.patching.edges import prepare_edges
from circuitlab.patching.shard import (sharded_activation_patching, sharded_exact_edge_scores, split_edges,
                                       split_layers)


def test_split_layers_and_edges():
    assert split_layers(range(5), 2) == [(0, 1, 2), (3, 4)]
    assert split_layers([3], 4) == [(3,)]
    edges = ["a1.h0->logits", "input->a0.h0<q>", "a0.h0->a1.h0<k>", "m0->a1.h0<v>", "input->m0"]
    parts = split_edges(edges, 2)
    assert sorted(i for p in parts for i in p) == list(range(5))
    assert parts == [[1, 2, 3, 4], [0]]  # receiver layers {0, 1} | logits


def test_sharded_sweeps_equal_one_process():
    gt = load_groundtruth("tracr_reverse")
    task, pairs = adapt_groundtruth(gt, 4, 0)
    folder = str(MODELS_DIR / "tracr_reverse")  # each shard loads its own copy from here
    n_layers = int(gt.model.cfg.n_layers)
    one = activation_patching(gt.model, task, pairs, "z", positions="each")
    sharded = sharded_activation_patching(folder, task, pairs, "z", positions="each", n_layers=n_layers, n_shards=3)
    assert sharded[["layer", "head", "position"]].values.tolist() == one[["layer", "head", "position"]].values.tolist()
    assert (sharded["metric"] - one["metric"]).abs().max() <= 1e-6 and one["effect"].abs().max() > 0.1
    ctx = prepare_edges(gt.model, task, pairs)
    edges = list(ctx.graph.edge_names)
    exact = exact_edge_scores(ctx, edges)
    split = sharded_exact_edge_scores(folder, task, pairs, edges, n_shards=3)
    assert torch.allclose(split, exact, atol=1e-6, rtol=0) and exact.abs().max() > 0.1


def test_cli_patch_with_shards_equals_one_process(tmp_path):
    import pandas as pd

    from circuitlab.patching.models import boot_native_model, save_model
    from circuitlab.reports.cli import main
    from tests.conftest import TINY_CONFIG

    model = tmp_path / "tiny"
    save_model(boot_native_model(TINY_CONFIG), model)
    args = ["patch", "--task", "repeated_tokens", "--model", str(model), "--component", "head", "--positions", "0,3,END",
            "--n", "3", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--shards", "2", "--out", str(tmp_path / "two")]) == 0
    one, two = pd.read_csv(tmp_path / "one" / "scores.csv"), pd.read_csv(tmp_path / "two" / "scores.csv")
    assert len(one) == 3 * 4 * 3 and one[["layer", "head", "position"]].equals(two[["layer", "head", "position"]])
    assert (one["metric"] - two["metric"]).abs().max() <= 1e-6
    assert main([*args, "--shards", "0", "--out", str(tmp_path / "bad")]) == 2
