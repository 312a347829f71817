"""Prompt batches: every method over batches of 2 (each trimmed to its own longest prompt) equals one padded
batch to 1e-5; the batch size follows the memory budget."""

import numpy as np
import pytest
import torch

from circuitlab.patching.acdc import acdc
from circuitlab.patching.activation import PatchingConfig, activation_patching
from circuitlab.patching.attribution import eap_ig_scores, eap_scores, exact_edge_scores, oracle_check
from circuitlab.patching.batched import Batches, batch_size_for, bytes_per_prompt
from circuitlab.graphs.discovery import discover, evaluate
from circuitlab.patching.edges import ablated_context, evaluate_edge_masks, prepare_edges
from circuitlab.patching.faithfulness import faithfulness_curve
from circuitlab.patching.path import path_patching
from circuitlab.tasks import from_records
from tests.test_padding import _rows


@pytest.fixture(scope="module")
def data(tiny_model):
    task = from_records(_rows(tiny_model.cfg.d_vocab, seed=3))
    pairs = task.generate(tiny_model)
    return tiny_model, task, pairs, Batches(tiny_model, task, pairs, batch_size=2)


def _close(a, b, tol=1e-5):
    a, b = (torch.as_tensor(np.array(x, dtype=np.float64)) for x in (a, b))
    assert a.shape == b.shape and (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item()), (a, b)


def test_batches_are_trimmed_and_cover_every_prompt(data):
    _, _, pairs, batched = data
    parts = list(batched.parts())
    assert [len(p) for p in parts] == [2, 2, 1] and sum(len(p) for p in parts) == len(pairs)
    assert [p.seq_len for p in parts] == [9, 11, 8]


def test_edge_methods_equal_one_batch(data):
    model, task, pairs, batched = data
    ctx = prepare_edges(model, task, pairs)
    clean, corrupt = batched.baseline()
    _close(clean, ctx.clean_values)
    _close(corrupt, ctx.corrupt_values)
    _close(batched.weighted(eap_scores), eap_scores(ctx))
    ig = batched.weighted(lambda c: eap_ig_scores(c, steps=3))
    _close(ig, eap_ig_scores(ctx, steps=3))
    masks = (torch.rand(3, ctx.graph.n_edges, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    _close(batched.evaluate_edge_masks(masks), evaluate_edge_masks(ctx, masks))
    edges = list(range(0, ctx.graph.n_edges, 29))
    _close(batched.exact_edge_scores(edges), exact_edge_scores(ctx, edges))
    rho, frame = batched.oracle_check(ig, n_edges=30)
    rho1, frame1 = oracle_check(ctx, ig, n_edges=30)
    assert list(frame["edge"]) == list(frame1["edge"]) and abs(rho - rho1) < 1e-9
    curve = batched.faithfulness_curve(ig, percents=(1, 10, 100), n_boot=20)
    one = faithfulness_curve(ctx, ig, percents=(1, 10, 100), n_boot=20)
    _close(curve.curve["faithfulness"], one.curve["faithfulness"])
    _close([curve.cpr, curve.cmd], [one.cpr, one.cmd])
    # ACDC over batches: contexts kept alive (a list), or rebuilt one batch at a time (Batches, memory flat in n)
    for objective, many in (("metric", list(batched.edge_contexts())), ("kl", batched)):
        a, b = acdc(many, 0.02, objective=objective), acdc(ctx, 0.02, objective=objective)
        assert torch.equal(a.kept, b.kept) and a.forwards == b.forwards
        _close(torch.nan_to_num(a.scores), torch.nan_to_num(b.scores))


def test_activation_and_path_patching_equal_one_batch(data):
    model, task, pairs, batched = data
    for component, positions in (("z", "all"), ("mlp_out", ["S2", "END"]), ("resid_pre", "each"), ("k", [2])):
        one = activation_patching(model, task, pairs, component, positions=positions)
        many = batched.activation_patching(component, positions=positions)
        _close(many["metric"], one["metric"])
        _close(many["effect"], one["effect"])
        assert list(many["layer"]) == list(one["layer"]) and list(many["position"]) == list(one["position"])
    kwargs = dict(senders=["a0.h0", ["a0.h1", "a1.h2"]], receivers=["a2.h0"], channel="v", receiver_positions="END")
    _close(batched.path_patching(**kwargs)["effect"], path_patching(model, task, pairs, **kwargs)["effect"])



def test_mean_ablation_takes_the_mean_over_every_batch(data):
    """Mean ablation over batches of 2 uses the dataset's per-position means (two passes), as one batch does."""
    model, task, pairs, batched = data
    for component, positions, direction in (("z", "all", "noise"), ("pattern", ["END"], "denoise"),
                                            ("resid_pre", "each", "noise")):
        config = PatchingConfig(source="mean", direction=direction)
        one = activation_patching(model, task, pairs, component, positions=positions, config=config)
        many = batched.activation_patching(component, positions=positions, config=config)
        _close(many["metric"], one["metric"])
    ablated = ablated_context(prepare_edges(model, task, pairs), "mean")
    mean_batches = batched.with_ablation("mean")
    _close(mean_batches.baseline()[1], ablated.corrupt_values)
    _close(mean_batches.weighted(eap_scores), eap_scores(ablated))
    masks = (torch.rand(2, ablated.graph.n_edges, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    _close(mean_batches.evaluate_edge_masks(masks), evaluate_edge_masks(ablated, masks))
    found = discover(model, task, pairs, "eap", context=batched, ablation="mean")
    _close(found.edge_scores.scores, eap_scores(ablated))
    # evaluate(circuit) over batches equals one context
    one, many = evaluate(ablated, found.circuit), evaluate(mean_batches, found.circuit)
    _close(many.circuit, one.circuit)
    _close([many.faithfulness], [one.faithfulness])


def test_batch_size_follows_the_memory_budget(data):
    model, _, pairs, _ = data
    per = bytes_per_prompt(model, pairs.seq_len)
    assert batch_size_for(model, pairs, 10 * per / 2**20) == 10
    assert batch_size_for(model, pairs, 1e-6) == 1


def test_ioi_role_scores_equal_one_batch(data):
    """IOI head scores and the backup-name-mover ablation (means over every prompt, layer by layer) in batches
    of 2 equal one forward over all prompts with the means taken inside it (the reference hook below)."""
    import json

    from circuitlab.graphs.role_scores import final_norm_scale
    from circuitlab.graphs.role_scores import IOIPrompts, ioi_head_scores
    from circuitlab.graphs.roles import RoleThresholds, detect_backup_name_movers
    from circuitlab.patching.components import hook_name

    model, _, pairs, _ = data
    prompts = IOIPrompts(pairs.clean_tokens, pairs.positions, pairs.answer_ids, pairs.wrong_ids)
    one, many = ioi_head_scores(model, prompts), ioi_head_scores(model, prompts, batch_size=2)
    cols = [c for c in one.columns if c.startswith(("attn_", "dla_"))]
    _close(many[cols].to_numpy(), one[cols].to_numpy())
    movers = {0: [1], 1: [2, 3]}  # two layers: the second layer's mean is taken with the first ablated
    rows, end = torch.arange(len(pairs)), pairs.positions["END"].long()

    def in_forward_mean(heads):
        def hook(z, hook):
            z = z.clone()
            at_end = z[rows, end]
            at_end[:, heads] = at_end[:, heads].mean(0, keepdim=True)
            z[rows, end] = at_end
            return z
        return hook

    reference = ioi_head_scores(model, prompts, final_scale=final_norm_scale(model, prompts),
                                fwd_hooks=[(hook_name("z", layer), in_forward_mean(h)) for layer, h in movers.items()])
    low = RoleThresholds(name_mover_attention=-1.0, name_mover_dla=-1e9, backup_dla_increase=-1e9)
    found = detect_backup_name_movers(model, prompts, [(l, h) for l, hs in movers.items() for h in hs], low,
                                      batch_size=2).sort_values(["layer", "head"])
    assert len(found) == model.cfg.n_layers * model.cfg.n_heads - 3
    expected = reference.set_index(["layer", "head"]).loc[list(zip(found["layer"], found["head"]))]
    got = [json.loads(e) for e in found["evidence"]]
    _close([e["dla_io_minus_s_ablated"] for e in got], expected["dla_io_minus_s"].to_numpy())
    _close([e["attn_end_io_ablated"] for e in got], expected["attn_end_io"].to_numpy())
