"""Gradient methods turn gradients on themselves: they give the same scores when called under torch.no_grad(), so
no fixture needs to switch gradients on globally (conftest checks that none changes global torch state)."""

import torch

from circuitlab.patching.attribution import eap_scores
from circuitlab.patching.edges import prepare_edges
from tests.toy import ToyTask, toy_pairs


def test_eap_under_no_grad_equals_eap(tiny_model):
    ctx = prepare_edges(tiny_model, ToyTask(), toy_pairs(tiny_model.cfg.d_vocab, seed=3, batch=4))
    plain = eap_scores(ctx)
    with torch.no_grad():
        quiet = eap_scores(ctx)
    assert plain.abs().max() > 0 and torch.equal(plain, quiet)
