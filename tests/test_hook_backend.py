"""The exact hook backend: same numbers as the fast runner (itself checked against naive hooks), chosen automatically
when the fast runner's self-check fails, with the reason recorded; every method runs on it."""

import pytest
import torch

from circuitlab.patching import engine
from circuitlab.patching.activation import activation_patching
from circuitlab.patching.edges import evaluate_edge_masks
from circuitlab.patching.engine import engine_context
from circuitlab.patching.hook_backend import HookRunner
from circuitlab.patching.path import path_patching
from circuitlab.patching.runner import UnsupportedModelError
from tests.toy import ToyTask, toy_pairs


@pytest.mark.parametrize("name", ["tiny_model", "tiny_gqa_model"])
def test_hook_backend_equals_fast_runner(request, name):
    model = request.getfixturevalue(name)
    task, pairs = ToyTask(), toy_pairs(model.cfg.d_vocab, seed=12)
    fast = engine_context(model, task, pairs)
    slow = engine_context(model, task, pairs, runner=HookRunner(model))
    assert slow.backend == "hook" and torch.allclose(fast.clean_values, slow.clean_values, atol=1e-5)
    # resid_mid: TL-native bridges alias hook_resid_mid to ln2.hook_in, so a plain edit there misses the skip
    assert slow.runner.mid_is_stream is False
    for kind, positions in (("z", "all"), ("z", ["X"]), ("q", [4]), ("k", "all"), ("v", [6]), ("pattern", [9]),
                            ("resid_pre", [3]), ("resid_mid", [3]), ("resid_mid", "all"), ("mlp_out", [5]),
                            ("resid_post", [2])):
        a = activation_patching(model, task, pairs, kind, positions=positions, context=fast)
        b = activation_patching(model, task, pairs, kind, positions=positions, context=slow)
        assert torch.allclose(torch.tensor(a["metric"].to_numpy()), torch.tensor(b["metric"].to_numpy()),
                              atol=1e-4), kind
    for channel in "qkv":  # k/v per query head, also under grouped-query attention (tiny_gqa_model)
        a = path_patching(model, task, pairs, "all", ["a1.h1", "a1.h2"], channel, context=fast)
        b = path_patching(model, task, pairs, "all", ["a1.h1", "a1.h2"], channel, context=slow)
        assert torch.allclose(torch.tensor(a["metric"].to_numpy()), torch.tensor(b["metric"].to_numpy()),
                              atol=1e-4), channel


def test_unreproduced_model_falls_back_with_a_reason(tiny_model, monkeypatch):
    def refuse(model, **kwargs):
        raise UnsupportedModelError("the fast runner does not reproduce Toy exactly (max |logit diff| 1)")

    monkeypatch.setattr(engine, "Runner", refuse)
    task, pairs = ToyTask(), toy_pairs(tiny_model.cfg.d_vocab, seed=13)
    ctx = engine_context(tiny_model, task, pairs)
    assert ctx.describe() == {"backend": "hook", "reason": "the fast runner does not reproduce Toy exactly "
                                                           "(max |logit diff| 1)"}
    assert len(activation_patching(tiny_model, task, pairs, "z", context=ctx)) == 12
    full = evaluate_edge_masks(ctx, torch.ones(1, ctx.graph.n_edges))[0]  # edge methods run on the hook backend
    assert torch.allclose(full, ctx.clean_values, atol=1e-4)
