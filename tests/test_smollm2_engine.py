"""The engine on the real model: SmolLM2-135M IOI (slow tests, run in CI)."""

import math

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp

from circuitlab.patching.activation import activation_patching, prepare
from circuitlab.patching.components import hook_name
from circuitlab.patching.edges import evaluate_edge_masks, prepare_edges
from circuitlab.patching.path import path_patching
from circuitlab.tasks import get_task
from tests.test_path import naive_path_patch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ioi(smollm2):
    task = get_task("ioi")
    return task, task.generate(smollm2, 8, seed=0, corruption="abc")


def test_head_sweep_matches_transformer_lens(smollm2, ioi):
    """Our full 270-head sweep against transformer_lens's own patching on 40 of the heads.

    TL patches one head per forward, so its whole sweep costs ~7 minutes here; it is compared on every layer
    (one seeded random head each) plus the ten heads with the largest effect, which is where a wrong number
    would matter most.
    """
    task, pairs = ioi
    frame = activation_patching(smollm2, task, pairs, "z", positions="all")
    assert frame.attrs["clean_metric"] > 2.0  # the model does IOI
    n_layers, n_heads = smollm2.cfg.n_layers, smollm2.cfg.n_heads
    ours = torch.tensor(frame.sort_values(["layer", "head"])["effect"].to_numpy()).view(n_layers, n_heads)
    generator = torch.Generator().manual_seed(0)
    chosen = {(layer, int(torch.randint(n_heads, (1,), generator=generator))) for layer in range(n_layers)}
    chosen |= {(int(i) // n_heads, int(i) % n_heads) for i in ours.abs().flatten().topk(10).indices}
    index = pd.DataFrame(sorted(chosen), columns=["layer", "head_index"])
    with torch.no_grad():
        clean = task.metric(smollm2(pairs.clean_tokens), pairs).mean()
        corrupt = task.metric(smollm2(pairs.corrupt_tokens), pairs).mean()
        _, cache = smollm2.run_with_cache(pairs.clean_tokens, names_filter=lambda n: n.endswith("hook_z"))
        reference = tlp.generic_activation_patch(
            smollm2, pairs.corrupt_tokens, cache,
            lambda lg: (task.metric(lg, pairs).mean() - corrupt) / (clean - corrupt),
            tlp.layer_head_vector_patch_setter, "z", index_df=index)
    expected = ours[index["layer"].to_numpy(), index["head_index"].to_numpy()]
    assert len(index) >= n_layers
    assert (expected - reference.float()).abs().max().item() <= 1e-4


def test_key_value_heads_of_grouped_query_attention(smollm2, ioi):
    task, pairs = ioi
    ctx = prepare(smollm2, task, pairs)
    for kind in ("k", "v"):
        frame = activation_patching(smollm2, task, pairs, kind, positions=["S2"], layers=[8, 20], context=ctx)
        assert sorted(frame["head"].unique()) == [0, 1, 2]  # 3 key/value heads
        # one key/value head per kind, patched at each prompt's own S2 position, against an explicit hook
        row = frame.iloc[1]
        positions = pairs.positions["S2"]
        with torch.no_grad():
            name = hook_name(kind, int(row["layer"]))
            _, cache = smollm2.run_with_cache(pairs.clean_tokens, names_filter=name)

            def hook(act, hook):
                act = act.clone()
                rows = torch.arange(act.shape[0])
                act[rows, positions, int(row["head"])] = cache[name][rows, positions, int(row["head"])]
                return act

            logits = smollm2.run_with_hooks(pairs.corrupt_tokens, fwd_hooks=[(name, hook)])
        assert math.isclose(row["metric"], task.metric(logits, pairs).mean().item(), abs_tol=1e-4)


def test_path_patching_to_late_queries_matches_naive(smollm2, ioi):
    task, pairs = ioi
    senders = ["a14.h1", "a20.h3", ["a18.h0", "a18.h5"]]
    frame = path_patching(smollm2, task, pairs, senders, ["a24.h2", "a25.h4"], "q", receiver_positions="END")
    for row in frame.itertuples():
        expected = naive_path_patch(smollm2, task, pairs, row.sender.split("+"), ["a24.h2", "a25.h4"], "q",
                                    "denoise", receiver_pos=pairs.positions["END"])
        assert math.isclose(row.metric, expected, abs_tol=1e-4), row.sender


def test_edge_patching_full_and_empty_graph(smollm2, ioi):
    task, pairs = ioi
    small = pairs.subset(range(3))
    ctx = prepare_edges(smollm2, task, small)
    assert ctx.graph.n_edges == 123211  # 30 layers x (9 q + 9 k + 9 v per query head + MLP) receivers, plus logits
    values = evaluate_edge_masks(ctx, torch.stack([torch.ones(ctx.graph.n_edges), torch.zeros(ctx.graph.n_edges)]))
    with torch.no_grad():
        clean = task.metric(smollm2(small.clean_tokens), small)
        corrupt = task.metric(smollm2(small.corrupt_tokens), small)
    assert (values[0] - clean).abs().max() <= 1e-3
    assert (values[1] - corrupt).abs().max() <= 1e-3
