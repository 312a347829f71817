"""Activation patching: parity with transformer_lens.patching, GQA, directions, and bad input."""

import math

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp

from circuitlab.patching.activation import PatchingConfig, activation_patching, load_results, save_results
from circuitlab.patching.components import hook_name
from tests.toy import ToyTask, toy_pairs

TL_FUNCTIONS = [
    ("z", "all", tlp.get_act_patch_attn_head_out_all_pos, ("layer", "head")),
    ("z", "each", tlp.get_act_patch_attn_head_out_by_pos, ("layer", "position", "head")),
    ("resid_pre", "each", tlp.get_act_patch_resid_pre, ("layer", "position")),
    ("attn_out", "each", tlp.get_act_patch_attn_out, ("layer", "position")),
    ("mlp_out", "each", tlp.get_act_patch_mlp_out, ("layer", "position")),
    ("q", "all", tlp.get_act_patch_attn_head_q_all_pos, ("layer", "head")),
    ("k", "all", tlp.get_act_patch_attn_head_k_all_pos, ("layer", "head")),
    ("v", "each", tlp.get_act_patch_attn_head_v_by_pos, ("layer", "position", "head")),
    ("pattern", "all", tlp.get_act_patch_attn_head_pattern_all_pos, ("layer", "head")),
    ("pattern", "each", tlp.get_act_patch_attn_head_pattern_by_pos, ("layer", "head", "position")),
]


def _tl_metric(model, task, pairs):
    with torch.no_grad():
        clean = task.metric(model(pairs.clean_tokens), pairs).mean()
        corrupt = task.metric(model(pairs.corrupt_tokens), pairs).mean()
    return lambda logits: (task.metric(logits, pairs).mean() - corrupt) / (clean - corrupt)


@pytest.mark.parametrize("model_name", ["tiny_model", "tiny_mha_rotary"])
@pytest.mark.parametrize("kind,positions,tl_fn,order", TL_FUNCTIONS, ids=[f"{k}-{p}" for k, p, _, _ in TL_FUNCTIONS])
def test_matches_transformer_lens(request, model_name, kind, positions, tl_fn, order):
    model = request.getfixturevalue(model_name)
    task, pairs = ToyTask(), toy_pairs(model.cfg.d_vocab)
    with torch.no_grad():
        _, cache = model.run_with_cache(pairs.clean_tokens)
        reference = tl_fn(model, pairs.corrupt_tokens, cache, _tl_metric(model, task, pairs))
    frame = activation_patching(model, task, pairs, kind, positions=positions, config=PatchingConfig(chunk_size=3))
    ours = torch.tensor(frame.sort_values(list(order))["effect"].to_numpy()).view(reference.shape)
    assert (ours - reference.float()).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def tiny_mha_rotary():
    from circuitlab.patching.models import boot_native_model

    return boot_native_model(dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=48, d_vocab=64, n_ctx=64,
                                  act_fn="silu", gated_mlp=True, normalization_type="RMS",
                                  positional_embedding_type="rotary", seed=3))


def _hook_reference(model, task, pairs, kind, layer, head, position, base, source):
    """Independent check: one bridge forward per patch with an explicit TransformerLens hook."""
    with torch.no_grad():
        _, src_cache = model.run_with_cache(source, names_filter=hook_name(kind, layer))
    src = src_cache[hook_name(kind, layer)]

    def hook(act, hook):
        act = act.clone()
        index = [slice(None), slice(None) if position is None else position]
        if head is not None:
            index.append(head)
        act[tuple(index)] = src[tuple(index)]
        return act

    with torch.no_grad():
        logits = model.run_with_hooks(base, fwd_hooks=[(hook_name(kind, layer), hook)])
    return task.metric(logits, pairs).mean().item()


@pytest.mark.parametrize("kind", ["k", "v", "q", "z"])
def test_grouped_query_attention_heads(tiny_gqa_model, kind):
    model = tiny_gqa_model
    task, pairs = ToyTask(), toy_pairs(model.cfg.d_vocab, seed=1)
    frame = activation_patching(model, task, pairs, kind, positions=[4])
    n = model.cfg.n_key_value_heads if kind in ("k", "v") else model.cfg.n_heads
    assert sorted(frame["head"].unique()) == list(range(n))
    for row in frame.itertuples():
        expected = _hook_reference(model, task, pairs, kind, row.layer, row.head, 4, pairs.corrupt_tokens,
                                   pairs.clean_tokens)
        assert math.isclose(row.metric, expected, abs_tol=1e-4)


def test_noising_and_ablation_sources(tiny_model):
    task, pairs = ToyTask(), toy_pairs(tiny_model.cfg.d_vocab, seed=2)
    noise = activation_patching(tiny_model, task, pairs, "z", config=PatchingConfig(direction="noise"))
    for row in noise.itertuples():
        expected = _hook_reference(tiny_model, task, pairs, "z", row.layer, row.head, None, pairs.clean_tokens,
                                   pairs.corrupt_tokens)
        assert math.isclose(row.metric, expected, abs_tol=1e-4)
    zero = activation_patching(tiny_model, task, pairs, "attn_out", positions=[9],
                               config=PatchingConfig(direction="noise", source="zero"))

    def zero_hook(act, hook):
        act = act.clone()
        act[:, 9] = 0
        return act

    for row in zero.itertuples():
        with torch.no_grad():
            logits = tiny_model.run_with_hooks(pairs.clean_tokens, fwd_hooks=[(hook_name("attn_out", row.layer), zero_hook)])
        assert math.isclose(row.metric, task.metric(logits, pairs).mean().item(), abs_tol=1e-4)


def test_role_positions_patch_each_prompt_at_its_own_position(tiny_model):
    task, pairs = ToyTask(), toy_pairs(tiny_model.cfg.d_vocab, seed=4)
    frame = activation_patching(tiny_model, task, pairs, "resid_pre", positions=["X"], layers=[1])
    roles = pairs.positions["X"]

    def hook(act, hook):
        act = act.clone()
        rows = torch.arange(act.shape[0])
        act[rows, roles] = clean_cache[rows, roles]
        return act

    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(pairs.clean_tokens, names_filter=hook_name("resid_pre", 1))
        clean_cache = cache[hook_name("resid_pre", 1)]
        logits = tiny_model.run_with_hooks(pairs.corrupt_tokens, fwd_hooks=[(hook_name("resid_pre", 1), hook)])
    assert frame["role"].tolist() == ["X"]
    assert math.isclose(frame["metric"][0], task.metric(logits, pairs).mean().item(), abs_tol=1e-4)


def test_results_round_trip(tmp_path, tiny_model):
    task, pairs = ToyTask(), toy_pairs(tiny_model.cfg.d_vocab)
    frame = activation_patching(tiny_model, task, pairs, "z", positions=["X", "END"])
    for name in ("r.csv", "r.parquet"):
        again = load_results(save_results(frame, tmp_path / name))
        pd.testing.assert_frame_equal(frame.reset_index(drop=True), again, check_dtype=False)


def test_bad_input_errors(tiny_model):
    task, pairs = ToyTask(), toy_pairs(tiny_model.cfg.d_vocab)
    with pytest.raises(ValueError, match="unknown component 'neuron'"):
        activation_patching(tiny_model, task, pairs, "neuron")
    with pytest.raises(ValueError, match="position 50 is out of range"):
        activation_patching(tiny_model, task, pairs, "z", positions=[50])
    with pytest.raises(ValueError, match="unknown position role 'IO'"):
        activation_patching(tiny_model, task, pairs, "z", positions=["IO"])
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        activation_patching(tiny_model, task, pairs, "z", layers=[7])
    with pytest.raises(ValueError, match="head 9 is out of range"):
        activation_patching(tiny_model, task, pairs, "z", heads=[9])
    with pytest.raises(ValueError, match="direction 'sideways'"):
        activation_patching(tiny_model, task, pairs, "z", config=PatchingConfig(direction="sideways"))
    short = toy_pairs(tiny_model.cfg.d_vocab)
    short.corrupt_tokens = short.corrupt_tokens[:, :-1]
    with pytest.raises(ValueError, match="differ in shape"):
        activation_patching(tiny_model, task, short, "z")

    class NaNTask(ToyTask):
        def metric_at(self, logits_at, pairs):
            return super().metric_at(logits_at, pairs) * float("nan")

    with pytest.raises(ValueError, match="NaN"):
        activation_patching(tiny_model, NaNTask(), pairs, "z")

    class ScalarTask(ToyTask):
        def metric_at(self, logits_at, pairs):
            return super().metric_at(logits_at, pairs).mean()

    with pytest.raises(ValueError, match="one value per prompt"):
        activation_patching(tiny_model, ScalarTask(), pairs, "z")
