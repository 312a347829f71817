"""One engine context per (model, task, pairs): one runner, one clean and one corrupted run, shared by every method."""

import torch

from circuitlab.patching.activation import activation_patching
from circuitlab.patching.attribution import eap_scores, exact_edge_scores
from circuitlab.patching.edges import evaluate_edge_masks
from circuitlab.patching.engine import EngineContext, engine_context
from circuitlab.patching.path import path_patching
from tests.toy import ToyTask, toy_pairs


def test_one_context_serves_every_method_with_two_runs(tiny_model, monkeypatch):
    task, pairs = ToyTask(), toy_pairs(tiny_model.cfg.d_vocab, seed=11)
    ctx = engine_context(tiny_model, task, pairs)
    assert isinstance(ctx, EngineContext) and ctx.backend == "fast" and ctx.describe()["backend"] == "fast"
    calls = []
    original = ctx.runner.full_run
    monkeypatch.setattr(ctx.runner, "full_run", lambda *a, **k: calls.append(1) or original(*a, **k))
    heads = activation_patching(tiny_model, task, pairs, "z", context=ctx)
    mlps = activation_patching(tiny_model, task, pairs, "mlp_out", context=ctx)
    path = path_patching(tiny_model, task, pairs, "heads", ["a2.h0"], "q", context=ctx)
    scores = eap_scores(ctx)
    masks = torch.ones(2, ctx.graph.n_edges)
    masks[1] = 0.0
    values = evaluate_edge_masks(ctx, masks)
    exact_edge_scores(ctx, [0, 5])
    assert calls == [], "a method re-ran the clean or corrupted prompts"
    assert len(heads) == 12 and len(mlps) == 3 and len(path) == 8 and scores.shape == (ctx.graph.n_edges,)
    # baselines computed once agree with the bridge and with the graph-form runs
    with torch.no_grad():
        clean = task.metric(tiny_model(pairs.clean_tokens), pairs)
        corrupt = task.metric(tiny_model(pairs.corrupt_tokens), pairs)
    assert torch.allclose(ctx.clean_values, clean, atol=1e-4) and torch.allclose(ctx.corrupt_values, corrupt, atol=1e-4)
    assert torch.allclose(values[0], ctx.clean_values, atol=1e-4) and torch.allclose(values[1], ctx.corrupt_values, atol=1e-4)
    plain, _, _ = ctx.edge_runner.plain(pairs.clean_tokens)
    assert torch.allclose(plain.senders, ctx.clean.senders, atol=1e-5)
