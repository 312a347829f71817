"""Edge methods on the exact hook backend (`patching.hook_edges`): equal to the fast engine on the same model, and
one edge score equal to a naive two-pass computation over the bridge's own hooks."""

import pytest
import torch

from circuitlab.graphs.benchmark import visible_edges
from circuitlab.patching.acdc import acdc
from circuitlab.patching.attribution import eap_ig_scores, eap_scores, exact_edge_scores
from circuitlab.patching.edge_masks import edge_masked_metric
from circuitlab.patching.edges import evaluate_edge_masks
from circuitlab.patching.engine import engine_context
from circuitlab.patching.faithfulness import faithfulness_curve
from circuitlab.patching.hook_backend import HookRunner
from circuitlab.patching.models import boot_native_model
from circuitlab.patching.node_masks import evaluate_node_masks
from tests.toy import ToyTask, toy_pairs


def _contexts(model, seed):
    task, pairs = ToyTask(), toy_pairs(model.cfg.d_vocab, seed=seed)
    fast = engine_context(model, task, pairs, check_gap=False)
    slow = engine_context(model, task, pairs, runner=HookRunner(model), check_gap=False)
    assert fast.backend == "fast" and slow.backend == "hook"
    return fast, slow


def _close(a, b, atol=1e-4):
    return float((a - b).abs().max()) <= atol


@pytest.mark.parametrize("name", ["tiny_model", "tiny_gqa_model"])
def test_hook_edge_methods_equal_fast(request, name):
    model = request.getfixturevalue(name)
    fast, slow = _contexts(model, seed=12)
    g = fast.graph
    assert _close(fast.clean.senders, slow.clean.senders) and _close(fast.corrupt.senders, slow.corrupt.senders)
    masks = (torch.rand(4, g.n_edges, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    a, b = evaluate_edge_masks(fast, masks), evaluate_edge_masks(slow, masks)
    assert _close(a, b) and float((a[0] - a[1]).abs().max()) > 1e-3  # masks differ, so this compares something
    soft = torch.rand(2, g.n_edges, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grads = [torch.autograd.grad(edge_masked_metric(c, soft).sum(), soft)[0] for c in (fast, slow)]
    assert _close(*grads) and float(grads[0].abs().max()) > 1e-3
    eap = eap_scores(fast)
    assert _close(eap, eap_scores(slow)) and float(eap.abs().max()) > 1e-2
    assert _close(eap_ig_scores(fast, steps=2), eap_ig_scores(slow, steps=2))
    edges = list(range(0, g.n_edges, 9))
    assert _close(exact_edge_scores(fast, edges), exact_edge_scores(slow, edges))
    nodes = (torch.rand(3, g.n_senders, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    assert _close(evaluate_node_masks(fast, nodes), evaluate_node_masks(slow, nodes))
    names = [g.edge_names[i] for i in range(0, g.n_edges, 5)]
    seen = visible_edges(fast, names)
    assert seen == visible_edges(slow, names)
    f_fast, f_slow = faithfulness_curve(fast, eap, n_boot=20), faithfulness_curve(slow, eap, n_boot=20)
    assert abs(f_fast.cpr - f_slow.cpr) < 1e-4 and abs(f_fast.cmd - f_slow.cmd) < 1e-4


def test_hook_acdc_equals_fast():
    model = boot_native_model(dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_vocab=64, n_ctx=32, attn_only=True,
                                   normalization_type="RMS", positional_embedding_type="rotary", n_key_value_heads=1,
                                   seed=3))  # 31 edges: ACDC tests each one
    fast, slow = _contexts(model, seed=3)
    a, b = acdc(fast, 0.02, objective="metric"), acdc(slow, 0.02, objective="metric")
    assert torch.equal(a.kept, b.kept) and 0 < int(a.kept.sum()) < fast.graph.n_edges


def test_hook_edge_score_equals_naive_two_pass(tiny_model):
    """a0.h1 -> a2.h3<q>, corrupted alone: pass 1 computes head 3's query from its altered input (resid_pre of
    layer 2 minus the edge's clean-corrupt difference, z W_O from cached hook_z); pass 2 puts it into a clean run."""
    fast, slow = _contexts(tiny_model, seed=5)
    model, task, pairs = tiny_model, fast.task, fast.pairs
    names = ["blocks.0.attn.hook_z", "blocks.2.hook_resid_pre"]
    with torch.no_grad():
        _, clean = model.run_with_cache(pairs.clean_tokens, names_filter=lambda n: n in names)
        _, corrupt = model.run_with_cache(pairs.corrupt_tokens, names_filter=lambda n: n in names)
        w_o = model.W_O[0, 1]
        delta = (clean["blocks.0.attn.hook_z"][:, :, 1] - corrupt["blocks.0.attn.hook_z"][:, :, 1]) @ w_o
        got = {}
        model.run_with_hooks(pairs.clean_tokens, fwd_hooks=[
            ("blocks.2.hook_resid_pre", lambda act, hook: clean["blocks.2.hook_resid_pre"] - delta),
            ("blocks.2.attn.hook_q", lambda act, hook: got.setdefault("q", act.clone()))])

        def put(act, hook):
            act = act.clone()
            act[:, :, 3] = got["q"][:, :, 3]
            return act

        logits = model.run_with_hooks(pairs.clean_tokens, fwd_hooks=[("blocks.2.attn.hook_q", put)])
        naive = fast.clean_metric - float(task.metric(logits, pairs).mean())
    for ctx in (fast, slow):
        score = float(exact_edge_scores(ctx, ["a0.h1->a2.h3<q>"])[0])
        assert abs(score - naive) < 1e-4 and abs(naive) > 1e-4
