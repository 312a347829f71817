"""Small faithful circuits: exact node/edge masked forwards, selection by faithfulness, learned masks, greedy
refinement, held-out splits and stability, on tiny models and the ground-truth models."""

import pytest
import torch

from circuitlab.graphs.benchmark import adapt_groundtruth
from circuitlab.graphs.faithful import FaithfulConfig, find_faithful_circuit
from circuitlab.graphs.greedy import complete_by_exact_gain, greedy_refine
from circuitlab.graphs.groundtruth import list_groundtruth, load_groundtruth
from circuitlab.graphs.selection import (NOISE, candidate_order, edge_evaluator, node_evaluator,
                                         select_by_faithfulness)
from circuitlab.graphs.stability import inclusion_frequency, subset_context
from circuitlab.patching.components import node_kind, parse_edge
from circuitlab.patching.activation import PatchingConfig, activation_patching
from circuitlab.patching.attribution import eap_ig_scores
from circuitlab.patching.edge_masks import edge_masked_metric
from circuitlab.patching.edges import ablated_context, evaluate_edge_masks, prepare_edges
from circuitlab.patching.mask_learning import MaskConfig, learn_masks
from circuitlab.patching.node_masks import expand_to_edges, node_mask, node_masked_metric
from circuitlab.reports.config import RunConfig
from circuitlab.reports.faithful import run_circuit
from tests.test_edges import _dead_heads_model
from tests.toy import ToyTask, toy_pairs

# Counterfactual under which every true component of a ground-truth model is visible (see graphs.benchmark):
# tracr_reverse's length sub-circuit is constant across inputs, so only zero ablation sees it.
GT_COUNTERFACTUAL = {"tracr_reverse": "zero"}


@pytest.mark.parametrize("name", ["tiny_model", "tiny_gqa_model"])
def test_node_masks_equal_edge_patching_and_noising(request, name):
    model = request.getfixturevalue(name)
    task, pairs = ToyTask(), toy_pairs(model.cfg.d_vocab, seed=2)
    ctx = prepare_edges(model, task, pairs)
    masks = torch.rand(4, ctx.graph.n_senders, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = node_masked_metric(ctx, masks)
    assert torch.allclose(ours, evaluate_edge_masks(ctx, expand_to_edges(ctx, masks)), atol=1e-4)
    # one head corrupted, everything else kept = activation patching (noising) of that head's z
    noised = activation_patching(model, task, pairs, "z", config=PatchingConfig(direction="noise"))
    masks = 1.0 - torch.stack([node_mask(ctx, [f"a{r.layer}.h{r.head}"], keep_input=False)
                               for r in noised.itertuples()])  # everything kept but one head
    with torch.no_grad():
        values = node_masked_metric(ctx, masks).mean(1)
    assert torch.allclose(values, torch.tensor(noised["metric"].to_numpy(), dtype=values.dtype), atol=1e-4)


def test_differentiable_edge_forward_matches_engine_and_finite_differences(tiny_gqa_model):
    task, pairs = ToyTask(), toy_pairs(tiny_gqa_model.cfg.d_vocab, seed=5)
    ctx = prepare_edges(tiny_gqa_model, task, pairs)
    masks = torch.rand(2, ctx.graph.n_edges, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    masks = masks.float().requires_grad_(True)
    values = edge_masked_metric(ctx, masks)
    assert torch.allclose(values, evaluate_edge_masks(ctx, masks.detach()), atol=1e-5)
    values[0].mean().backward()
    for e in (0, ctx.graph.n_edges // 2, ctx.graph.n_edges - 1):
        bumped = masks.detach().clone()[:1].repeat(2, 1)
        bumped[0, e] += 1e-2
        bumped[1, e] -= 1e-2
        fd = (evaluate_edge_masks(ctx, bumped).mean(1) @ torch.tensor([1.0, -1.0])) / 2e-2
        assert abs(float(fd) - float(masks.grad[0, e])) <= 2e-2 * max(1.0, abs(float(fd)))


def test_selection_never_includes_a_zero_score_edge():
    model, dead = _dead_heads_model()
    task, pairs = ToyTask(), toy_pairs(model.cfg.d_vocab, seed=7)
    ctx = prepare_edges(model, task, pairs)
    scores = eap_ig_scores(ctx, steps=3)
    g = ctx.graph
    dead_edges = torch.zeros(g.n_edges, dtype=torch.bool)
    for layer, head in dead:
        dead_edges |= g.edge_sender == g.head_sender(layer, head)
    assert (scores[dead_edges] == 0).all()  # the premise: dead heads' edges score exactly zero
    evaluator = edge_evaluator(ctx)
    for target in (0.5, 0.95, 10.0):  # 10.0 is unreachable: the selection stops at the last candidate
        chosen = select_by_faithfulness(evaluator, scores, target, n_boot=50)
        index = [g.edge_index(e) for e in chosen.items]
        assert all(float(scores[i]) != 0.0 for i in index)
        assert not dead_edges[index].any()
        assert chosen.reached == (target < 10.0)
    assert len(candidate_order(torch.tensor([0.0, 1e-12, 2.0, -1.0]))) == 2


def test_selection_is_the_smallest_faithful_prefix(tiny_model):
    task, pairs = ToyTask(), toy_pairs(tiny_model.cfg.d_vocab, seed=11, batch=6)
    ctx = prepare_edges(tiny_model, task, pairs)
    evaluator = node_evaluator(ctx, heads_only=False)
    scores = torch.linspace(1.0, 2.0, len(evaluator.items))  # an arbitrary but fixed ranking
    chosen = select_by_faithfulness(evaluator, scores, 0.7, n_boot=100)
    order = candidate_order(scores)
    prefixes = torch.zeros(len(order), len(evaluator.items))
    for k in range(1, len(order) + 1):
        prefixes[k - 1, order[:k]] = 1.0
    values = evaluator.values(prefixes)  # independent: every prefix evaluated
    f = (values.mean(1) - ctx.corrupt_metric) / (ctx.clean_metric - ctx.corrupt_metric)
    k = chosen.size
    assert chosen.reached and f[k - 1] >= 0.7 and abs(f[k - 1] - chosen.faithfulness) < 1e-4
    assert k > 1 and f[k - 2] < 0.7  # the prefix one item smaller is not faithful
    assert bool((f[k - 1:] >= 0.7).all())  # stable: every larger prefix reaches the target too
    eager = select_by_faithfulness(evaluator, scores, 0.7, n_boot=100, stable=False)
    first = next(i for i, v in enumerate(f) if v >= 0.7) + 1  # without `stable`: the first prefix that reaches it (2 here)
    assert first < k and eager.size == first and eager.reached


def _gt_context(name: str, n: int = 16, seed: int = 0):
    gt = load_groundtruth(name)
    cf = GT_COUNTERFACTUAL.get(name, "resample")
    task, pairs = adapt_groundtruth(gt, n, seed, counterfactual=cf)
    ctx = prepare_edges(gt.model, task, pairs)
    return gt, (ablated_context(ctx, "zero") if cf == "zero" else ctx)


@pytest.mark.parametrize("name", list_groundtruth())
def test_learned_node_masks_recover_the_true_circuit(name):
    gt, ctx = _gt_context(name)
    result = learn_masks(ctx, MaskConfig(level="node", heads_only=False, steps=300))  # default sparsity
    true = {n for n in gt.true_nodes if n not in ("input", "logits")}
    assert true <= set(result.circuit)  # open gates (planted_marker's distractors are weak, not inert)
    chosen = select_by_faithfulness(node_evaluator(ctx, heads_only=False), result.keep_probability, 0.8,
                                    absolute=False, n_boot=100)
    assert chosen.reached and set(chosen.items) == true, "the chosen circuit must be exactly the true one"
    assert not set(chosen.items) & set(gt.distractors)


def test_learned_edge_masks_recover_the_true_edges():
    gt, ctx = _gt_context("induction_handwired")
    result = learn_masks(ctx, MaskConfig(level="edge", steps=300))
    chosen = select_by_faithfulness(edge_evaluator(ctx), result.keep_probability, 0.8, absolute=False, n_boot=100)
    nodes = {part for e in chosen.items for part in parse_edge(e)[:2]}
    assert chosen.reached
    assert {e for e in gt.true_edges if node_kind(parse_edge(e)[0]) == "head"} <= set(chosen.items)
    assert not nodes & set(gt.distractors)


def test_greedy_prunes_inert_heads_and_methods_agree_on_groundtruth():
    gt, ctx = _gt_context("induction_handwired")
    evaluator = node_evaluator(ctx, heads_only=False)
    scores = torch.ones(len(evaluator.items))
    refined = greedy_refine(evaluator, evaluator.items, scores, 0.8)  # start from everything
    assert refined.reached and set(refined.items) == {"a0.h0", "a1.h0"}
    _, held = _gt_context("induction_handwired", seed=5)
    config = FaithfulConfig(heads_only=False, n_boot=100, masks=MaskConfig(steps=150))
    for method in ("single-effect", "greedy", "node-pruning"):
        result = find_faithful_circuit(ctx, method, config, heldout=held)
        assert set(result.circuit.items) == {"a0.h0", "a1.h0"}, method
        assert result.heldout[0] >= 0.8 and result.sizes.heads == 2


def test_stability_on_bootstrap_resamples():
    gt, ctx = _gt_context("planted_marker")
    sub = subset_context(ctx, [0, 0, 3])
    assert sub.clean_values.shape == (3,) and torch.equal(sub.clean.senders[1], ctx.clean.senders[0])
    evaluator_of = lambda c: node_evaluator(c, heads_only=False)  # noqa: E731
    frame = inclusion_frequency(
        ctx, lambda c: select_by_faithfulness(evaluator_of(c), torch.arange(8.0, 0.0, -1.0), 0.8, n_boot=0).items,
        n_resamples=3, seed=0, reference=["a0.h2", "a1.h1"])
    freq = dict(zip(frame["item"], frame["frequency"]))
    assert freq["a0.h2"] == 1.0 and freq["a1.h1"] == 1.0
    assert frame["frequency"].between(0, 1).all()


def test_heldout_split_shares_no_template():
    from circuitlab.tasks import get_task
    from circuitlab.tasks.split import heldout_split, shared_templates, split_pairs
    from tests.test_tasks_helpers import smollm2_tokenizer

    disc, held = heldout_split(get_task("ioi"), smollm2_tokenizer(), 12, 10, seed=3)
    assert len(disc) == 12 and len(held) == 10
    assert not set(disc.meta["template_id"]) & set(held.meta["template_id"])
    assert shared_templates(disc, held) == set()
    assert not set(disc.clean_texts) & set(held.clean_texts)
    for part in (disc, held):  # each side keeps only its own padding (a position no prompt reaches breaks labels)
        assert part.seq_len == int(part.lengths.max())
    with pytest.raises(ValueError, match="larger pool"):
        split_pairs(disc, 10, 10)


@pytest.mark.parametrize("name", list_groundtruth())
def test_run_circuit_on_groundtruth_is_the_true_one(name):
    """`circuitlab run`'s default circuit (`reports.faithful.run_circuit` with `RunConfig()`: EAP-IG ranking, the
    smallest faithful prefix, completed by exact gain where the ranking falls short) keeps every true head and
    nothing else: distractors and zero-weight heads are inert or weak. So do greedy refinement and the same
    selection over heads and MLPs. tracr_reverse's a0.h0 scores -1.7e-8 under EAP-IG (noise): it must enter by
    its exact gain, not by its score."""
    gt, ctx = _gt_context(name)
    _, held = _gt_context(name, seed=5)
    true = {n for n in gt.true_nodes if n not in ("input", "logits")}
    found = run_circuit(RunConfig(), ctx, held)
    assert found.method == "eap-ig" and found.level == "node"
    assert set(found.circuit.items) == {n for n in true if node_kind(n) == "head"}, sorted(found.circuit.items)
    assert found.circuit.reached and found.heldout[0] >= 0.8
    config = FaithfulConfig(heads_only=False, n_boot=50)
    for method in ("eap-ig", "greedy"):
        found = find_faithful_circuit(ctx, method, config, heldout=held)
        assert set(found.circuit.items) == true, (method, sorted(set(found.circuit.items) ^ true))
        assert found.circuit.reached and found.heldout[0] >= 0.8, method
        scores = found.ranking.set_index("item")["score"]
        blind = {n for n in true if abs(float(scores[n])) <= NOISE * float(scores.abs().max())}
        assert set(found.circuit.added) == blind, method  # exactly the true items the ranking could not see
    if name == "tracr_reverse":
        assert blind == {"a0.h0"}


def test_completion_adds_no_inert_component_even_when_the_target_is_unreachable():
    """Completion by exact gain adds the true head a ranking missed and never an inert one (their exact gains are
    exactly zero), even when it cannot reach the target and keeps looking; members whose removal costs nothing go."""
    gt, ctx = _gt_context("induction_handwired")
    evaluator = node_evaluator(ctx, heads_only=False)
    pool = [i for i in evaluator.items if i != "a1.h0"]
    done = complete_by_exact_gain(evaluator, ["a1.h0"], pool, target=10.0)
    assert done.items == ["a0.h0", "a1.h0"] and done.added == ["a0.h0"] and not done.reached
    inert = [i for i in evaluator.items if i not in ("a0.h0", "a1.h0")]
    done = complete_by_exact_gain(evaluator, ["a1.h0", *inert], ["a0.h0"], target=0.8)
    assert done.items == ["a0.h0", "a1.h0"] and done.reached  # inert members pruned: their removal costs nothing


def test_greedy_criterion_is_two_sided():
    """Greedy refinement does not reward overshoot: on a linear toy whose circuit is known by hand (metric = sum of
    kept weights; removing the negative item would give f = 1.6), pruning stops within [0.8, 1.2]; a one-sided
    f >= 0.8 would drop the negative item first."""
    from circuitlab.graphs.selection import CircuitEvaluator, within

    weights = torch.tensor([0.5, 0.45, -0.6, 0.55, 0.1])  # sums to 1.0: the full model
    evaluator = CircuitEvaluator([f"a0.h{i}" for i in range(5)], lambda m: (m @ weights).unsqueeze(1).repeat(1, 3),
                                 torch.full((3,), 1.0), torch.zeros(3))
    refined = greedy_refine(evaluator, evaluator.items, torch.ones(5), 0.8)
    assert refined.reached and within(refined.faithfulness, 0.8) and 0.8 <= refined.faithfulness <= 1.2
    assert "a0.h2" in refined.items  # the opposing item stays: without it f would overshoot
    kept = evaluator.mask(refined.items) @ weights
    assert abs(float(kept) - refined.faithfulness) < 1e-6  # independent: the hand-computed sum
    assert refined.items == ["a0.h0", "a0.h1", "a0.h2", "a0.h3"]  # a0.h4 (0.1) is the only free removal
    assert not within(1.6, 0.8) and within(1.2, 0.8) and not within(0.79, 0.8)
