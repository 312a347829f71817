"""Bidirectional models mask padding: on a right-padded batch, real tokens do not attend to the pads (which they
otherwise would, unlike in a causal model), so every method equals the per-prompt runs to 1e-5."""

import pytest
import torch

from circuitlab.patching.activation import activation_patching, prepare
from circuitlab.patching.attribution import eap_ig_scores, eap_scores, exact_edge_scores
from circuitlab.patching.edges import evaluate_edge_masks, prepare_edges
from circuitlab.patching.models import boot_native_model
from circuitlab.patching.path import path_patching
from circuitlab.tasks import from_records
from circuitlab.tasks.batching import prompt_batches
from tests.conftest import TINY_CONFIG
from tests.test_padding import _close, _rows, check_edge_methods


@pytest.fixture(scope="module")
def setup():
    model = boot_native_model(dict(TINY_CONFIG, attention_dir="bidirectional", seed=4))
    task = from_records(_rows(model.cfg.d_vocab, seed=5))
    pairs = task.generate(model)
    singles = list(prompt_batches(pairs, 1))
    assert pairs.attention_mask is not None and all(p.attention_mask is None for p in singles)
    return model, task, pairs, singles


def test_pads_would_leak_without_the_mask(setup):
    model, _, pairs, singles = setup
    with torch.no_grad():
        unmasked = model(pairs.clean_tokens)  # the bridge itself: real tokens see the pads
        alone = model(singles[0].clean_tokens)
    n = singles[0].seq_len
    assert (unmasked[0, :n] - alone[0]).abs().max() > 1e-3  # so the tests below can fail


def test_baselines_and_activation_patching(setup):
    model, task, pairs, singles = setup
    ctx = prepare(model, task, pairs)
    _close(ctx.clean_values, torch.cat([prepare(model, task, p).clean_values for p in singles]))
    _close(ctx.corrupt_values, torch.cat([prepare(model, task, p).corrupt_values for p in singles]))
    for component, positions in (("z", "all"), ("resid_pre", ["S2", "END"]), ("pattern", ["END"]), ("mlp_out", "all")):
        padded = activation_patching(model, task, pairs, component, positions=positions)
        alone = [activation_patching(model, task, p, component, positions=positions)["metric"] for p in singles]
        _close(padded["metric"].to_numpy(), torch.tensor([list(a) for a in alone]).mean(0))


def test_path_patching(setup):
    model, task, pairs, singles = setup
    kwargs = dict(senders=["a0.h0", ["a0.h1", "a0.h2"]], receivers=["a1.h0", "a2.h3"], channel="q",
                  receiver_positions="END")
    padded = path_patching(model, task, pairs, **kwargs)
    alone = torch.tensor([list(path_patching(model, task, p, **kwargs)["metric"]) for p in singles]).mean(0)
    _close(padded["metric"].to_numpy(), alone)


def test_edge_methods(setup):
    model, task, pairs, singles = setup
    ctx = prepare_edges(model, task, pairs)
    contexts = [prepare_edges(model, task, p) for p in singles]
    check_edge_methods(ctx, contexts, n_masks=3, seed=2, steps=2, stride=41)


def test_ioi_roles_refuse_padded_bidirectional_prompts(setup):
    """Role scores run the bridge itself (no padding mask): on padded prompts of a bidirectional model they
    would be silently wrong, so they refuse."""
    from circuitlab.graphs.roles import RoleThresholds, ioi_roles

    model, task, pairs, _ = setup
    with pytest.raises(ValueError, match="bidirectional"):
        ioi_roles(model, task, pairs, RoleThresholds())
