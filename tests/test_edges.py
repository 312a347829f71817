"""Edge-level methods on tiny native models: exact edge patching, EAP, EAP-IG, ACDC, oracle, faithfulness."""

import math

import pytest
import torch

from circuitlab.patching.acdc import acdc
from circuitlab.patching.activation import PatchingConfig, activation_patching
from circuitlab.graphs.scores import EdgeScores
from circuitlab.patching.attribution import eap_ig_scores, eap_scores, exact_edge_scores, oracle_check, spearman
from circuitlab.patching.edges import evaluate_edge_masks, prepare_edges
from circuitlab.patching.topology import ComputationalGraph
from circuitlab.patching.faithfulness import faithfulness_curve
from circuitlab.patching.models import boot_native_model
from tests.conftest import TINY_CONFIG
from tests.toy import ToyTask, toy_pairs


@pytest.mark.parametrize("name", ["tiny_model", "tiny_gqa_model"])
def test_full_graph_is_clean_and_empty_graph_is_corrupt(request, name):
    model = request.getfixturevalue(name)
    task, pairs = ToyTask(), toy_pairs(model.cfg.d_vocab)
    ctx = prepare_edges(model, task, pairs)
    with torch.no_grad():
        clean = task.metric(model(pairs.clean_tokens), pairs)
        corrupt = task.metric(model(pairs.corrupt_tokens), pairs)
    values = evaluate_edge_masks(ctx, torch.stack([torch.ones(ctx.graph.n_edges), torch.zeros(ctx.graph.n_edges)]))
    assert (values[0] - clean).abs().max() <= 1e-4
    assert (values[1] - corrupt).abs().max() <= 1e-4


def test_graph_names_and_counts():
    g = ComputationalGraph(n_layers=2, n_heads=4, n_kv=2)
    # layer 0: 12 attention receivers (q, k, v of each of the 4 query heads; k/v per query head even with
    # 2 key/value heads) read input; mlp0 reads input + 4 heads
    # layer 1: 12 receivers read 1 + 5 senders; mlp1 reads 1 + 5 + 4; logits read all 11 senders
    assert g.n_edges == 12 * 1 + 5 + 12 * 6 + 10 + 11
    assert "a0.h1->a1.h3<k>" in g.edge_names and "m0->a1.h3<q>" in g.edge_names and "a1.h2->m1" in g.edge_names
    assert g.receiver_info(g.attn_receivers(1).start + 4 + 3) == (1, "k", 3)
    with pytest.raises(ValueError, match="not in this model's graph"):
        g.edge_index("a1.h0->a0.h0<q>")
    with pytest.raises(ValueError, match="unknown node name"):
        g.edge_index("head->a0.h0<q>")


def test_corrupting_all_outputs_of_a_head_equals_noising_that_head(tiny_model):
    """Independent check against activation patching (itself checked against transformer_lens)."""
    task, pairs = ToyTask(), toy_pairs(tiny_model.cfg.d_vocab, seed=3)
    ctx = prepare_edges(tiny_model, task, pairs)
    g = ctx.graph
    noised = activation_patching(tiny_model, task, pairs, "z", config=PatchingConfig(direction="noise"))
    masks = torch.ones(len(noised), g.n_edges)
    for i, row in enumerate(noised.itertuples()):
        masks[i, g.edge_sender == g.head_sender(row.layer, row.head)] = 0.0
    values = evaluate_edge_masks(ctx, masks).mean(1)
    assert torch.allclose(values, torch.tensor(noised["metric"].to_numpy(), dtype=values.dtype), atol=1e-4)


def test_eap_equals_finite_difference_of_edge_masks(tiny_model):
    task, pairs = ToyTask(), toy_pairs(tiny_model.cfg.d_vocab, seed=4)
    ctx = prepare_edges(tiny_model, task, pairs)
    scores = eap_scores(ctx)
    picks = torch.argsort(scores.abs(), descending=True)[:4].tolist() + [0, ctx.graph.n_edges - 1]
    eps = 1e-3
    masks = torch.ones(2 * len(picks), ctx.graph.n_edges, dtype=torch.float64)
    for i, e in enumerate(picks):
        masks[2 * i, e] = 1 + eps
        masks[2 * i + 1, e] = 1 - eps
    with torch.no_grad():
        values = evaluate_edge_masks(ctx, masks.float()).double().mean(1)
    for i, e in enumerate(picks):
        derivative = (values[2 * i] - values[2 * i + 1]) / (2 * eps)  # dm/dc at c = 1
        assert math.isclose(scores[e].item(), derivative.item(), rel_tol=2e-2, abs_tol=2e-3), ctx.graph.edge_names[e]


def test_eap_ig_with_one_step_is_eap_and_steps_converge(tiny_model):
    task, pairs = ToyTask(), toy_pairs(tiny_model.cfg.d_vocab, seed=5)
    ctx = prepare_edges(tiny_model, task, pairs)
    assert torch.allclose(eap_ig_scores(ctx, steps=1), eap_scores(ctx), atol=1e-5)
    ig = eap_ig_scores(ctx, steps=20)
    # Completeness of integrated gradients over inputs: input->* edges sum to the clean-corrupt gap
    # only approximately (the path is through embeddings); check it is close to the total effect.
    g = ctx.graph
    total = ig[g.edge_sender == 0].sum().item()
    assert math.isclose(total, ctx.clean_metric - ctx.corrupt_metric, rel_tol=0.05, abs_tol=0.02)


def test_node_scores_are_sums_of_outgoing_edges(tiny_model):
    task, pairs = ToyTask(), toy_pairs(tiny_model.cfg.d_vocab, seed=6)
    ctx = prepare_edges(tiny_model, task, pairs)
    scores = eap_scores(ctx)
    typed = EdgeScores(ctx.graph, scores, "eap", ctx.clean_metric - ctx.corrupt_metric)
    nodes, edges = typed.node_scores().frame, typed.to_frame()
    assert len(nodes) == ctx.graph.n_senders - 1  # every head and MLP
    for row in nodes.itertuples():
        name = f"a{row.layer}.h{row.head}" if row.component == "z" else f"m{row.layer}"
        assert math.isclose(row.score, edges.loc[edges.sender == name, "score"].sum(), abs_tol=1e-5)
        assert math.isclose(row.effect, row.score / (ctx.clean_metric - ctx.corrupt_metric), rel_tol=1e-9)


def _dead_heads_model():
    model = boot_native_model(TINY_CONFIG)
    state = model.state_dict()
    d_head = TINY_CONFIG["d_head"]
    dead = [(0, 1), (1, 2), (2, 0)]
    for layer, head in dead:
        for key in state:
            if key.endswith(f"blocks.{layer}.attn.o.weight"):
                state[key][:, head * d_head:(head + 1) * d_head] = 0.0
    model.load_state_dict(state, strict=False)
    return model, dead


def test_acdc_threshold_zero_removes_dead_heads_and_keeps_the_output():
    model, dead = _dead_heads_model()
    task, pairs = ToyTask(), toy_pairs(model.cfg.d_vocab, seed=7)
    ctx = prepare_edges(model, task, pairs)
    g = ctx.graph
    result = acdc(ctx, threshold=0.0)
    for layer, head in dead:
        out_edges = g.edge_sender == g.head_sender(layer, head)
        assert not result.kept[out_edges].any(), f"dead head a{layer}.h{head} kept an outgoing edge"
    values = evaluate_edge_masks(ctx, result.kept.float())
    assert (values[0] - ctx.clean_values).abs().max() <= 1e-4
    exact = exact_edge_scores(ctx, range(g.n_edges))
    assert result.kept[exact.abs() > 1e-3].all(), "an edge that matters on its own was removed"
    assert result.kept.sum() < g.n_edges


def test_acdc_large_threshold_prunes_more(tiny_model):
    task, pairs = ToyTask(), toy_pairs(tiny_model.cfg.d_vocab, seed=8)
    ctx = prepare_edges(tiny_model, task, pairs)
    small, large = acdc(ctx, 1e-4, objective="metric"), acdc(ctx, 0.5, objective="metric")
    assert large.kept.sum() <= small.kept.sum()
    with pytest.raises(ValueError, match="objective 'loss'"):
        acdc(ctx, 0.1, objective="loss")


@pytest.mark.parametrize("name", ["tiny_model", "tiny_gqa_model"])
def test_oracle_check_and_faithfulness(request, name):
    model = request.getfixturevalue(name)
    task, pairs = ToyTask(), toy_pairs(model.cfg.d_vocab, batch=6, seed=9)
    ctx = prepare_edges(model, task, pairs)
    scores = eap_ig_scores(ctx)
    rho, sample = oracle_check(ctx, scores, n_edges=40)
    assert len(sample) == 40 and sample["edge"].is_unique
    assert rho == pytest.approx(sample["approx"].rank().corr(sample["exact"].rank()))  # Pearson of pandas ranks
    masks = torch.ones(len(sample), ctx.graph.n_edges)
    for i, name in enumerate(sample["edge"]):
        masks[i, ctx.graph.edge_index(name)] = 0.0
    by_masks = ctx.clean_metric - evaluate_edge_masks(ctx, masks).mean(1)
    assert torch.allclose(by_masks, torch.tensor(sample["exact"].to_numpy(), dtype=by_masks.dtype), atol=1e-4)
    result = faithfulness_curve(ctx, scores, n_boot=50)
    full = result.curve[(result.curve.percent == 100.0)]
    assert (full["faithfulness"] - 1.0).abs().max() <= 1e-4
    low, high = result.cpr_ci
    assert low < high and low <= result.cpr <= high  # a real interval (6 pairs differ) around the estimate
    absolute = result.curve[result.curve.selection == "absolute"].sort_values("percent")
    x, gaps = absolute["percent"].to_numpy() / 100.0, (1.0 - absolute["faithfulness"]).abs().to_numpy()
    assert result.cmd == pytest.approx(float(((gaps[1:] + gaps[:-1]) / 2 * (x[1:] - x[:-1])).sum()))  # trapezoids
    with pytest.raises(ValueError, match="NaN"):
        faithfulness_curve(ctx, scores * float("nan"))


def test_spearman_handles_ties():
    assert math.isclose(spearman([1, 2, 2, 3], [10, 20, 20, 30]), 1.0)
    assert math.isclose(spearman([1, 2, 3], [3, 2, 1]), -1.0)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_ablated_context_empty_graph_is_the_ablated_run(tiny_model, ablation):
    """Every head and MLP output ablated (and the embeddings): compare with explicit bridge hooks. Mean ablation
    is the mean over the corrupted prompts (the one definition, `activation.mean_ablation`): a clean mean fails."""
    from circuitlab.patching.components import hook_name
    from circuitlab.patching.edges import ablated_context

    task, pairs = ToyTask(), toy_pairs(tiny_model.cfg.d_vocab, seed=10)
    ctx = ablated_context(prepare_edges(tiny_model, task, pairs), ablation)
    n_layers = tiny_model.cfg.n_layers
    with torch.no_grad():
        names = [hook_name("z", l) for l in range(n_layers)] + [hook_name("mlp_out", l) for l in range(n_layers)]
        _, cache = tiny_model.run_with_cache(pairs.corrupt_tokens, names_filter=lambda n: n in names + ["hook_embed"])

    def replace(name):
        def hook(act, hook):
            if ablation == "zero":
                return torch.zeros_like(act)
            return cache[name].mean(0, keepdim=True).expand_as(act)
        return hook

    def embed_hook(act, hook):  # token embedding; learned positions come separately in this model
        return torch.zeros_like(act) if ablation == "zero" else cache["hook_embed"].mean(0, keepdim=True).expand_as(act)

    pos_name = "hook_pos_embed" if "hook_pos_embed" in tiny_model.hook_dict else "pos_embed.hook_out"

    def pos_hook(act, hook):
        return torch.zeros_like(act) if ablation == "zero" else act

    hooks = [(n, replace(n)) for n in names] + [("hook_embed", embed_hook), (pos_name, pos_hook)]
    with torch.no_grad():
        logits = tiny_model.run_with_hooks(pairs.clean_tokens, fwd_hooks=hooks)
    expected = task.metric(logits, pairs)
    assert (ctx.corrupt_values - expected).abs().max() <= 1e-4
    full = evaluate_edge_masks(ctx, torch.ones(1, ctx.graph.n_edges))[0]
    assert (full - ctx.clean_values).abs().max() <= 1e-4
