"""Edge circuits chosen on validation prompts (`graphs.selection.select_validated`) and edge pruning started from
EAP-IG with early stopping on validation prompts (`patching.mask_learning`, `graphs.faithful`), on a tiny model;
every number is checked against a brute-force evaluation of every prefix."""

import numpy as np
import torch

from circuitlab.graphs.faithful import FaithfulConfig, find_faithful_circuit, pruning_init
from circuitlab.graphs.selection import candidate_order, edge_evaluator, select_validated, size_grid, within
from circuitlab.patching.attribution import eap_ig_scores
from circuitlab.patching.edges import evaluate_edge_masks, prepare_edges
from circuitlab.patching.mask_learning import MaskConfig, keep_probability, learn_masks
from tests.toy import ToyTask, toy_pairs

TARGET = 0.7


def _contexts(model):
    task = ToyTask()
    return (prepare_edges(model, task, toy_pairs(model.cfg.d_vocab, seed=11, batch=6)),
            prepare_edges(model, task, toy_pairs(model.cfg.d_vocab, seed=12, batch=6)))


def _prefix_faithfulness(ctx, order):
    masks = torch.zeros(len(order), ctx.graph.n_edges)
    for k in range(1, len(order) + 1):
        masks[k - 1, order[:k]] = 1.0
    values = evaluate_edge_masks(ctx, masks).double().mean(1).numpy()
    return (values - ctx.corrupt_metric) / (ctx.clean_metric - ctx.corrupt_metric)


def test_validated_selection_is_the_smallest_prefix_within_band_on_both_sets(tiny_model):
    ctx, val = _contexts(tiny_model)
    scores = eap_ig_scores(ctx, steps=3)
    chosen = select_validated(edge_evaluator(ctx), edge_evaluator(val), scores, TARGET, n_boot=50)
    assert chosen.reached and chosen.size < ctx.graph.n_edges - 5  # the random toy's curve crosses late
    firsts = {}
    for absolute in (False, True):
        order = candidate_order(scores, absolute=absolute)
        f_disc, f_val = _prefix_faithfulness(ctx, order), _prefix_faithfulness(val, order)
        ok = np.array([within(a, TARGET) and within(b, TARGET) for a, b in zip(f_disc, f_val)])
        grid = [k for k in size_grid(len(order)) if ok[k - 1]]
        firsts[absolute] = grid[0] if grid else None
        if absolute == bool(chosen.curve["absolute"].iloc[0]):
            k = chosen.size
            assert chosen.items == [ctx.graph.edge_names[i] for i in order[:k]]
            assert ok[k - 1] and (k == 1 or not ok[k - 2])  # within on both sets; one edge fewer is not
            assert abs(chosen.faithfulness - f_disc[k - 1]) < 1e-4 and abs(chosen.validation[0] - f_val[k - 1]) < 1e-4
            assert chosen.validation[1][0] <= chosen.validation[0] <= chosen.validation[1][1]
    assert chosen.size <= min(v for v in firsts.values() if v is not None)  # the smaller of the two orders


def test_early_stopping_keeps_the_best_checked_masks(tiny_model):
    ctx, _ = _contexts(tiny_model)
    script, seen = iter([3.0, 1.0, 2.0, 5.0, 6.0, 0.5]), []

    def monitor(log_alpha):
        seen.append(log_alpha.clone())
        return next(script)

    init = pruning_init(torch.arange(ctx.graph.n_edges, dtype=torch.float32), 0.1, 3.0)
    assert int((init > 0).sum()) == round(0.1 * ctx.graph.n_edges) and bool((init[-5:] > 0).all())
    cfg = MaskConfig(level="edge", steps=40, check_every=4, patience=3, sparsity=1e-3)
    result = learn_masks(ctx, cfg, init=init, monitor=monitor)
    assert len(seen) == 5 and len(result.history) == 20  # stopped after 3 checks without improvement
    assert result.best_step == 7 and torch.equal(result.log_alpha, seen[1])
    assert not torch.equal(seen[0], init)  # it trained from the given start


def test_edge_pruning_with_validation_reports_validation_faithfulness(tiny_model):
    ctx, val = _contexts(tiny_model)
    cfg = FaithfulConfig(target=TARGET, n_boot=20, init_from_scores=True, init_fraction=0.2, eap_ig_steps=2,
                         edge_masks=MaskConfig(level="edge", steps=12, check_every=4, sparsity=1e-3))
    result = find_faithful_circuit(ctx, "edge-pruning", cfg, heldout=val, validation=val)
    row = result.row()
    mask = torch.zeros(ctx.graph.n_edges)
    mask[[ctx.graph.edge_index(e) for e in result.circuit.items]] = 1.0
    f_val = float((evaluate_edge_masks(val, mask).double().mean() - val.corrupt_metric)
                  / (val.clean_metric - val.corrupt_metric))
    assert abs(row["validation_faithfulness"] - f_val) < 1e-4 and abs(row["heldout_faithfulness"] - f_val) < 1e-4
    assert "EAP-IG" in result.notes and "kept step" in result.notes
    gates = int((torch.tensor(result.ranking["score"].to_numpy()) > keep_probability(torch.zeros(1), cfg.edge_masks)).sum())
    assert gates in set(result.circuit.curve["size"])  # the learner's own circuit is measured, not skipped by the grid
