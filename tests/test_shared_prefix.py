"""Patched forwards that start at the first position where they change anything (the shared prefix of the clean
and corrupted prompts, `EngineContext.shared_prefix`, `patching.prefix`) equal the plain computation on
the exact hook backend (every position, the bridge's own forward with hooks), on padded batches of different
lengths whose prompts differ from their corruption at different positions; ablations fall back to position 0."""

import numpy as np
import pytest
import torch

from circuitlab.patching.activation import PatchingConfig, activation_patching
from circuitlab.patching.attribution import exact_edge_scores
from circuitlab.patching import edges as edges_module
from circuitlab.patching.edges import ablated_context, evaluate_edge_masks
from circuitlab.patching.engine import engine_context
from circuitlab.patching.hook_backend import HookRunner
from circuitlab.patching.node_masks import evaluate_node_masks
from circuitlab.patching.runner import Runner
from circuitlab.tasks import from_records, get_task
from tests.hf_tiny import build_tiny

LENGTHS = (7, 10, 8, 9)
FIRST = (2, 4, 3, 2)  # each prompt's first corrupted position: the batch shares positions 0-1


def _task(vocab: int):
    g = torch.Generator().manual_seed(5)
    rows = []
    for length, first in zip(LENGTHS, FIRST):
        clean = torch.randint(0, vocab, (length,), generator=g).tolist()
        corrupt = list(clean)
        for p in (first, first + 1):
            corrupt[p] = (clean[p] + 1 + int(torch.randint(0, vocab - 1, (1,), generator=g))) % vocab
        answer, wrong = torch.randperm(vocab, generator=g)[:2].tolist()
        rows.append({"clean_ids": clean, "corrupt_ids": corrupt, "answer_ids": [answer], "wrong_ids": [wrong],
                     "positions": {"IO": first, "S2": length - 3}})
    return from_records(rows)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    from circuitlab.patching.models import load_model

    root = tmp_path_factory.mktemp("prefix_models")
    return {family: load_model(str(build_tiny(family, root / family))) for family in ("gpt2", "gpt_neox")}


def _model(request, name):
    if name.startswith("hf_"):
        return request.getfixturevalue("hf_models")[name[3:]]
    return request.getfixturevalue(name)


def _close(a, b, tol=1e-5):
    a, b = (torch.as_tensor(np.array(x, dtype=np.float64)) for x in (a, b))
    assert a.shape == b.shape and (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item()), (a, b)


@pytest.mark.parametrize("name", ["tiny_model", "tiny_gqa_model", "hf_gpt2", "hf_gpt_neox"])
def test_windowed_forwards_equal_the_hook_backend(request, name):
    model = _model(request, name)
    task = _task(model.cfg.d_vocab)
    pairs = task.generate(model)
    assert pairs.attention_mask is not None
    fast = engine_context(model, task, pairs)
    plain = engine_context(model, task, pairs, runner=HookRunner(model))
    assert fast.backend == "fast" and fast.shared_prefix == 2 and plain.shared_prefix == 0
    kinds = [("z", "all"), ("resid_pre", "each"), ("z", [-1, -3]), ("pattern", ["S2"]), ("v", ["IO"])]
    if not model.cfg.attn_only:
        kinds.append(("mlp_out", "all"))
    for kind, positions in kinds:
        for direction in ("denoise", "noise"):
            config = PatchingConfig(direction=direction)
            a = activation_patching(model, task, pairs, kind, positions=positions, config=config, context=fast)
            b = activation_patching(model, task, pairs, kind, positions=positions, config=config, context=plain)
            _close(a["metric"].to_numpy(), b["metric"].to_numpy(), 1e-4)
    g = torch.Generator().manual_seed(0)
    n = fast.graph.n_edges  # sparse, dense (inputs as every difference minus the dropped ones), empty, full
    edges = torch.cat([(torch.rand(2, n, generator=g) < 0.4).float(), (torch.rand(1, n, generator=g) < 0.97).float(),
                       torch.zeros(1, n), torch.ones(1, n)])
    _close(evaluate_edge_masks(fast, edges), evaluate_edge_masks(plain, edges), 1e-4)
    nodes = (torch.rand(3, fast.graph.n_senders, generator=g) < 0.5).float()
    _close(evaluate_node_masks(fast, nodes), evaluate_node_masks(plain, nodes), 1e-4)
    chosen = torch.randperm(fast.graph.n_edges, generator=g)[:24].tolist()
    _close(exact_edge_scores(fast, chosen), exact_edge_scores(plain, chosen), 1e-4)


def test_ablations_fall_back_to_the_full_window(tiny_model, monkeypatch):
    task = _task(tiny_model.cfg.d_vocab)
    pairs = task.generate(tiny_model)
    ctx = engine_context(tiny_model, task, pairs)
    starts = []
    run = Runner.run

    def recording(self, resid, **kwargs):
        starts.append(kwargs.get("pos0", 0))
        return run(self, resid, **kwargs)

    monkeypatch.setattr(Runner, "run", recording)
    activation_patching(tiny_model, task, pairs, "z", context=ctx)
    assert starts and min(starts) == 2  # clean into corrupt: the shared prefix is skipped
    for source in ("zero", "mean"):  # the source differs from the base run at position 0: every position runs
        starts.clear()
        frame = activation_patching(tiny_model, task, pairs, "z", config=PatchingConfig(source=source), context=ctx)
        assert starts and set(starts) == {0}
        plain = activation_patching(tiny_model, task, pairs, "z", config=PatchingConfig(source=source),
                                    context=engine_context(tiny_model, task, pairs, runner=HookRunner(tiny_model)))
        _close(frame["metric"].to_numpy(), plain["metric"].to_numpy(), 1e-4)
    for ablation in ("zero", "mean"):
        assert ablated_context(ctx, ablation).shared_prefix == 0
    # a patch that writes only where source and base agree changes nothing and runs no forward
    starts.clear()
    frame = activation_patching(tiny_model, task, pairs, "resid_pre", positions=[0, 1], context=ctx)
    assert not starts
    _close(frame["metric"].to_numpy(), np.full(len(frame), ctx.corrupt_metric), 1e-6)


def test_logits_only_where_the_metric_reads(hf_models):
    """IOI's metric reads two logits per prompt: patched forwards compute only those (`Task.metric_tokens`); the
    numbers equal full logits, and a task whose declaration leaves out a logit it reads fails loudly."""
    model = hf_models["gpt2"]
    task = get_task("ioi")
    pairs = task.generate(model, 4, seed=1)
    ctx = engine_context(model, task, pairs)
    assert ctx.metric_vocab is not None and len(ctx.metric_vocab) <= 8
    fast = activation_patching(model, task, pairs, "z", context=ctx)
    edges = (torch.rand(2, ctx.graph.n_edges, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    restricted = evaluate_edge_masks(ctx, edges)
    ctx.metric_vocab = None  # every logit
    _close(fast["metric"].to_numpy(), activation_patching(model, task, pairs, "z", context=ctx)["metric"].to_numpy())
    _close(restricted, evaluate_edge_masks(ctx, edges))

    class Undeclared(type(task)):
        def metric_tokens(self, pairs):
            return pairs.answer_ids[:, 0].unique()  # leaves out the wrong names' logits

    wrong = Undeclared()
    with pytest.raises(ValueError, match="metric_tokens"):
        activation_patching(model, wrong, pairs, "z", context=engine_context(model, wrong, pairs))


def test_each_distinct_circuit_runs_once(tiny_gqa_model):
    """Repeated circuits run once; with full_is_clean the whole graph is read as the clean run (which it is: the
    same row evaluated by the masked forward gives the clean metric)."""
    task = _task(tiny_gqa_model.cfg.d_vocab)
    pairs = task.generate(tiny_gqa_model)
    ctx = engine_context(tiny_gqa_model, task, pairs)
    g = torch.Generator().manual_seed(2)
    some = (torch.rand(2, ctx.graph.n_edges, generator=g) < 0.5).float()
    ones = torch.ones(1, ctx.graph.n_edges)
    masks = torch.cat([some, ones, some[:1], ones])
    seen = []
    distinct = edges_module.distinct_circuits(ctx, masks, lambda m: seen.append(len(m)) or
                                              evaluate_edge_masks(ctx, m), full_is_clean=True)
    assert seen == [2]
    plain = torch.cat([evaluate_edge_masks(ctx, row[None]) for row in masks])  # every row by the masked forward
    _close(distinct, plain, 1e-5)
    _close(plain[2], ctx.clean_values, 1e-5)
    nodes = (torch.rand(2, ctx.graph.n_senders, generator=g) < 0.5).float()
    nodes = torch.cat([nodes, torch.ones(1, ctx.graph.n_senders), nodes])
    _close(evaluate_node_masks(ctx, nodes, full_is_clean=True), evaluate_node_masks(ctx, nodes), 1e-5)
