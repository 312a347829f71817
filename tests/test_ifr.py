"""Information flow routes (`patching/methods/ifr.py`) against a hand computation from plain TransformerLens hooks,
and through `discover`, prompt batches, the benchmark and `circuitlab run --method ifr`."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import circuitlab
from circuitlab.graphs.benchmark import run_method
from circuitlab.patching.batched import Batches
from circuitlab.patching.components import head_node, mlp_node
from circuitlab.patching.models import boot_native_model, save_model
from circuitlab.reports.cli import main
from circuitlab.tasks import get_task
from tests.conftest import TINY_CONFIG


def _hand_scores(model, tokens):
    """{(sender, receiver node): importance}: sender contributions read with TL hooks (embedding = resid_pre 0,
    head h = z_h W_O[h] without the bias, MLP = hook_mlp_out), proximities computed one position at a time."""
    cfg = model.cfg
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.attn.hook_z" for l in range(cfg.n_layers)]
    names += [f"blocks.{l}.hook_mlp_out" for l in range(cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    order = [("input", cache["blocks.0.hook_resid_pre"])]
    readers = []  # (receiver node, how many senders it reads)
    for layer in range(cfg.n_layers):
        readers += [(head_node(layer, h), len(order)) for h in range(cfg.n_heads)]
        z, w_o = cache[f"blocks.{layer}.attn.hook_z"], model.W_O[layer]
        order += [(head_node(layer, h), z[:, :, h] @ w_o[h]) for h in range(cfg.n_heads)]
        readers.append((mlp_node(layer), len(order)))
        order.append((mlp_node(layer), cache[f"blocks.{layer}.hook_mlp_out"]))
    readers.append(("logits", len(order)))
    batch, seq = tokens.shape
    out = {}
    for receiver, k in readers:
        total = np.zeros(k)
        for b in range(batch):
            for p in range(seq):
                parts = [c[b, p].double() for _, c in order[:k]]
                y = sum(parts)
                prox = np.array([max(float(y.abs().sum() - (y - c).abs().sum()), 0.0) for c in parts])
                total += prox / prox.sum() / (batch * seq)
        out.update({(order[j][0], receiver): total[j] for j in range(k)})
    return out


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_gqa_model"])
def test_ifr_scores_equal_a_hand_computation_from_hooks(fixture, request):
    model = request.getfixturevalue(fixture)
    task = get_task("repeated_tokens")
    pairs = task.generate(model, 3, seed=2, seq_len=4)
    found = circuitlab.discover(model, task, pairs, "ifr")
    edges = found.edge_scores
    g = edges.graph
    expected = _hand_scores(model, pairs.clean_tokens)
    got = edges.scores.numpy()
    want = np.array([expected[(g.sender_names[s], g.receiver_names[r])]
                     for s, r in zip(g.edge_sender.tolist(), g.edge_receiver.tolist())])
    assert np.abs(got - want).max() < 1e-5
    assert want.std() > 0.01  # the scores differ across edges: the comparison can fail
    per_receiver = np.zeros(g.n_receivers)
    np.add.at(per_receiver, g.edge_receiver.numpy(), got)
    assert np.allclose(per_receiver, 1.0, atol=1e-6)  # normalised over each receiver's senders
    # prompt batches of two give the same all-prompt mean
    batched = circuitlab.discover(model, task, pairs, "ifr", context=Batches(model, task, pairs, batch_size=2))
    assert torch.allclose(batched.edge_scores.scores, edges.scores, atol=1e-9)
    # the benchmark reaches it through the registry, with the same numbers
    ranking, _, _ = run_method("ifr", model, task, pairs)
    assert torch.allclose(ranking.double(), edges.scores, atol=1e-6)


def test_cli_run_method_ifr(tmp_path):
    directory = tmp_path / "model"
    save_model(boot_native_model(TINY_CONFIG), directory)
    out = tmp_path / "ifr"
    assert main(["run", "--model", str(directory), "--out", str(out), "--method", "ifr", "--quiet", "--no-roles",
                 "--resid-positions", "none", "--positions", "none", "--task", "repeated_tokens", "--n", "4",
                 "--task-option", "seq_len=4", "--n-boot", "20", "--percents", "10,100", "--oracle-edges", "10"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["method"] == "ifr"
    edges = pd.read_csv(out / "scores.csv", keep_default_na=False)
    edges = edges[edges["component"] == "edge"]
    assert set(edges["method"]) == {"ifr"} and edges["score"].astype(float).between(0, 1).all()
    faithful = record["circuit_faithfulness"]  # the circuit comes from ifr's own edge ranking
    assert faithful["method"] == "ranking-edges" and faithful["ranking"] == "ifr edge ranking"
    top = edges.sort_values("score", ascending=False, kind="stable")["edge"].tolist()
    assert faithful["items"][0] in top[:sum(edges["score"] == edges["score"].max())]
