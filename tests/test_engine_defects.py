"""Regression tests for six correctness defects of the engine (issue 11), each against an independent computation."""

import json

import pandas as pd
import pytest
import torch

from circuitlab.patching.attribution import exact_edge_scores
from circuitlab.patching.components import hook_name
from circuitlab.patching.edges import prepare_edges
from circuitlab.patching.topology import ComputationalGraph
from circuitlab.patching.models import boot_native_model
from circuitlab.reports.summaries import ModelRecord
from tests.toy import ToyTask, toy_pairs

GQA = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=48, d_vocab=64, n_ctx=64, act_fn="silu",
           gated_mlp=True, normalization_type="RMS", positional_embedding_type="rotary", n_key_value_heads=2, seed=1)


def _only_head_alive(config, layer, alive):
    """A GQA model whose layer `layer` writes through query head `alive` only (the others' W_O are zero)."""
    model = boot_native_model(config)
    state = model.state_dict()
    d_head = config["d_head"]
    for key in state:
        if key.endswith(f"blocks.{layer}.attn.o.weight"):
            for head in range(config["n_heads"]):
                if head != alive:
                    state[key][:, head * d_head:(head + 1) * d_head] = 0.0
    model.load_state_dict(state, strict=False)
    return model


@pytest.fixture(scope="module")
def gqa_h1():
    """True circuit through a1.h1: the second query head of key/value group 0 (heads 0 and 1)."""
    return _only_head_alive(GQA, 1, 1)


def test_gqa_key_value_edges_belong_to_their_query_head(gqa_h1):
    from circuitlab.graphs.circuit import circuit_from_edge_scores
    from circuitlab.graphs.io import from_mib, to_mib

    task, pairs = ToyTask(), toy_pairs(64, seed=2)
    ctx = prepare_edges(gqa_h1, task, pairs)
    g = ctx.graph
    names = [n for n in g.edge_names if n.endswith(("a1.h0<k>", "a1.h0<v>", "a1.h1<k>", "a1.h1<v>"))]
    exact = exact_edge_scores(ctx, names)
    by_name = dict(zip(names, exact.tolist()))
    dead = [abs(v) for n, v in by_name.items() if "a1.h0<" in n]
    alive = [abs(v) for n, v in by_name.items() if "a1.h1<" in n]
    assert max(dead) < 1e-6, "a dead query head's key/value edges carry an effect: edges index the wrong head"
    assert max(alive) > 1e-3
    # the same edges through the mask formulation (one forward per circuit)
    from circuitlab.patching.edges import evaluate_edge_masks

    masks = torch.ones(len(names), g.n_edges)
    for i, n in enumerate(names):
        masks[i, g.edge_index(n)] = 0.0
    by_masks = ctx.clean_metric - evaluate_edge_masks(ctx, masks).mean(1)
    assert torch.allclose(by_masks, exact, atol=1e-5)
    # circuit builder and MIB round trip keep the key/value edges on the live head
    from circuitlab.graphs.circuit import Selection

    every = exact_edge_scores(ctx, range(g.n_edges))
    circuit = circuit_from_edge_scores(pd.DataFrame({"edge": g.edge_names, "score": every.numpy()}),
                                       Selection(threshold=1e-6))
    assert "a1.h1" in circuit and "a1.h0" not in circuit
    assert {k for _, v, k in circuit.edges(keys=True) if v == "a1.h1"} >= {"k", "v"}
    again = from_mib(to_mib(circuit))
    assert {(u, v, k) for u, v, k in again.edges(keys=True)} == {(u, v, k) for u, v, k in circuit.edges(keys=True)}


def test_gqa_path_patching_key_edits_one_query_head(gqa_h1):
    """Path patching into the keys of dead query head a1.h0 must not touch its live sibling a1.h1."""
    from circuitlab.patching.path import path_patching

    task, pairs = ToyTask(), toy_pairs(64, seed=3)
    for channel in ("k", "v"):
        dead = path_patching(gqa_h1, task, pairs, senders="heads", receivers=["a1.h0"], channel=channel)
        assert dead["effect"].abs().max() < 1e-6, channel
        live = path_patching(gqa_h1, task, pairs, senders="heads", receivers=["a1.h1"], channel=channel)
        assert live["effect"].abs().max() > 1e-3, channel


def test_gqa_path_patching_key_equals_bridge_hooks(gqa_h1):
    """Independent check: recomputing a1.h1's key from the sender-patched stream, by hand over bridge hooks."""
    from circuitlab.patching.activation import PatchingConfig
    from circuitlab.patching.path import path_patching

    task, pairs = ToyTask(), toy_pairs(64, seed=4)
    frame = path_patching(gqa_h1, task, pairs, senders=["a0.h2"], receivers=["a1.h1"], channel="k",
                          config=PatchingConfig(direction="noise"))
    model = gqa_h1
    with torch.no_grad():
        _, corrupt = model.run_with_cache(pairs.corrupt_tokens)
        # pass 1: clean run with a0.h2's output from the corrupt run (MLPs recompute; no heads between)
        captured = {}

        def sender(act, hook):
            act = act.clone()
            act[:, :, 2] = corrupt[hook_name("z", 0)][:, :, 2]
            return act

        def grab(act, hook):
            captured["resid"] = act.clone()
            return act

        model.run_with_hooks(pairs.clean_tokens, fwd_hooks=[(hook_name("z", 0), sender),
                                                            (hook_name("resid_pre", 1), grab)])
        resid1 = captured["resid"]
        # pass 2: only head 1's key recomputed; its group sibling head 0 keeps the clean key. With W_O of
        # head 0 zero, that equals replacing key/value head 0 for the whole group.
        ln = model.blocks[1].ln1
        k_alt = ln(resid1) @ model.W_K[1, 0] + model.b_K[1, 0]

        def hook(act, hook):
            act = act.clone()
            act[:, :, 0] = k_alt
            return act

        logits = model.run_with_hooks(pairs.clean_tokens, fwd_hooks=[(hook_name("k", 1), hook)])
    expected = task.metric(logits, pairs).mean().item()
    assert abs(frame["metric"].iloc[0] - expected) < 1e-4


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    from circuitlab.patching.models import load_model
    from tests.hf_tiny import build_tiny

    return load_model(str(build_tiny("gpt_neox", tmp_path_factory.mktemp("neox"))))


def test_parallel_block_mlp_edge_scores_equal_bridge_hooks(neox):
    """An MLP receiver in a parallel block: its layer's attention output must survive (GPT-NeoX)."""
    task = ToyTask()
    pairs = toy_pairs(neox.cfg.d_vocab, batch=3, seq=8, seed=5)
    ctx = prepare_edges(neox, task, pairs)
    g = ctx.graph
    assert g.parallel
    names = ["input->m0", "input->m1", "a0.h1->m1"]
    exact = exact_edge_scores(ctx, names)
    for name, score in zip(names, exact.tolist()):
        e = g.edge_index(name)
        layer = int(name[-1])
        delta = ctx.clean.senders[:, :, int(g.edge_sender[e])] - ctx.corrupt.senders[:, :, int(g.edge_sender[e])]

        def hook(act, hook):
            return act - delta

        with torch.no_grad():
            logits = neox.run_with_hooks(pairs.clean_tokens, fwd_hooks=[(f"blocks.{layer}.ln2.hook_in", hook)])
        expected = ctx.clean_metric - task.metric(logits, pairs).mean().item()
        assert abs(score - expected) < 1e-4 * max(1.0, abs(expected)), name


def test_dla_centres_the_final_layernorm():
    """Direct logit attribution equals TransformerLens's apply_ln_to_stack on an LN model."""
    from circuitlab.graphs.role_scores import IOIPrompts, ioi_head_scores
    from tests.conftest import TINY_CONFIG

    model = boot_native_model(TINY_CONFIG)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (4, 8), generator=g)
    positions = {"IO": torch.full((4,), 1), "S1": torch.full((4,), 2), "S2": torch.full((4,), 5),
                 "END": torch.full((4,), 7)}
    scores = ioi_head_scores(model, IOIPrompts(tokens, positions))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    io, s = tokens[:, 1], tokens[:, 2]
    direction = (model.W_U[:, io] - model.W_U[:, s]).T  # [batch, d_model]
    for layer in range(model.cfg.n_layers):
        z = cache[hook_name("z", layer)]  # [batch, pos, head, d_head]
        stack = torch.einsum("bphd,hdm->hbpm", z, model.W_O[layer])  # [head, batch, pos, d_model]
        normed = cache.apply_ln_to_stack(stack, layer=None, pos_slice=None)[:, :, -1]
        normed = normed * model.state_dict()["ln_final.weight"]
        expected = torch.einsum("hbm,bm->hb", normed, direction).mean(1)
        ours = torch.tensor(scores[scores.layer == layer].sort_values("head")["dla_io_minus_s"].to_numpy())
        assert torch.allclose(ours.float(), expected.float(), atol=1e-4), layer


def test_report_graph_keeps_parallel_blocks():
    from circuitlab.reports import run as run_module

    meta = {"name": "gptj-tiny", "weight_hash": "0", "n_layers": 2, "n_heads": 4, "n_key_value_heads": 4,
            "d_model": 16, "d_vocab": 10, "attn_only": False, "parallel_attn_mlp": True}

    class Result:
        model = ModelRecord.from_dict(meta)  # as a saved run.json's model entry reads back

    class Config:
        edge_positions = "none"  # plain edges (--edge-positions roles: `PositionalGraph`)

    class FakePipeline:
        result = Result()
        cfg = Config()

    graph = run_module.Pipeline.graph(FakePipeline())
    assert graph.parallel
    assert graph.n_edges == ComputationalGraph(2, 4, 4, False, True).n_edges


def test_s_inhibition_uses_the_signed_effect():
    from circuitlab.graphs.roles import detect_s_inhibition

    effects = pd.DataFrame({"sender": ["a1.h0", "a1.h0", "a1.h2", "a1.h3"],
                            "receiver": ["a3.h0", "a3.h1", "a3.h0", "a3.h1"], "channel": ["q"] * 4,
                            "effect": [0.2, 0.1, -0.4, 0.01]})
    found = detect_s_inhibition(effects, ["a3.h0", "a3.h1"])
    assert list(zip(found["layer"], found["head"])) == [(1, 0)], "a head pushing the other way is not S-inhibition"
    evidence = json.loads(found["evidence"].iloc[0])
    assert abs(found["score"].iloc[0] - 0.3) < 1e-9 and abs(evidence["abs_effect"] - 0.3) < 1e-9
