"""Role detectors on tiny native models whose weights are set by hand, so the right answer is known."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from circuitlab.graphs.circuit import Selection, circuit_from_node_scores
from circuitlab.graphs.role_scores import (IOIPrompts, copying_scores, ioi_head_scores, repeated_random_tokens,
                                           repeated_token_scores)
from circuitlab.graphs.roles import (RoleThresholds, assign_roles, detect_backup_name_movers, detect_name_movers,
                                     detect_repeated_token_roles, detect_s_inhibition)
from circuitlab.patching.models import boot_native_model

V, P, DH, C = 24, 16, 40, 60.0  # vocab, context, d_head, attention sharpness
TOK, PREV = P, P + V            # residual layout: [positions | token | previous token]


@pytest.fixture(scope="module")
def hand_model():
    """Layer 0: head 0 previous-token, head 1 duplicate-token. Layer 1: head 0 induction that copies,
    head 1 uniform attention whose OV anti-copies. Residual = one-hot position | token | previous token."""
    torch.manual_seed(0)
    model = boot_native_model(dict(n_layers=2, d_model=P + 2 * V, n_heads=2, d_head=DH, d_vocab=V, n_ctx=P,
                                   attn_only=True, normalization_type=None, positional_embedding_type="standard",
                                   seed=0))
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    for t in range(V):
        sd["embed.weight"][t, TOK + t] = 1.0
        sd["unembed.weight"][t, TOK + t] = 1.0
    for p in range(P):
        sd["pos_embed.weight"][p, p] = 1.0
    q0, k0, v0, o0 = (sd[f"blocks.0.attn.{m}.weight"] for m in "qkvo")
    for p in range(P):                       # head 0: query at p matches key at p-1
        q0[p, p] = C
        if p + 1 < DH:
            k0[p + 1, p] = 1.0
    for t in range(V):                       # head 0 copies the token it attends to into PREV
        v0[t, TOK + t] = 1.0
        o0[PREV + t, t] = 1.0
    for t in range(V):                       # head 1: same token, minus itself
        q0[DH + t, TOK + t] = C
        k0[DH + t, TOK + t] = 1.0
    for p in range(P):
        q0[DH + V + p, p] = -C
        k0[DH + V + p, p] = 1.0
    q1, k1, v1, o1 = (sd[f"blocks.1.attn.{m}.weight"] for m in "qkvo")
    for t in range(V):                       # head 0: my token matches a position whose previous token it was
        q1[t, TOK + t] = C
        k1[t, PREV + t] = 1.0
        v1[t, TOK + t] = 1.0
        o1[TOK + t, t] = 1.0
        v1[DH + t, TOK + t] = 1.0            # head 1: anti-copying OV, no QK (uniform attention)
        o1[TOK + t, DH + t] = -1.0
    model.load_state_dict(sd, strict=False)
    return model


def test_hand_model_has_the_intended_attention(hand_model):
    prompts = repeated_random_tokens(V, 7, 4, seed=1)
    _, cache = hand_model.run_with_cache(prompts.tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    pat = cache["blocks.0.attn.hook_pattern"]
    assert pat[0, 0, 5, 4] > 0.99  # previous token
    assert pat[0, 1, 9, 2] > 0.99  # duplicate: position 9 repeats position 2


def test_repeated_token_scores_find_the_built_heads(hand_model):
    prompts = repeated_random_tokens(V, 7, 8, seed=2, bos_id=V - 1, high=V - 1)
    scores = repeated_token_scores(hand_model, prompts).set_index(["layer", "head"])
    assert scores.loc[(0, 0), "previous_token"] > 0.95
    assert scores.loc[(0, 1), "duplicate_token"] > 0.95
    assert scores.loc[(1, 0), "induction"] > 0.95
    # independent brute force: average the pattern entries one by one
    _, cache = hand_model.run_with_cache(prompts.tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    pat = cache["blocks.1.attn.hook_pattern"]
    brute = np.mean([pat[b, 1, i, i - 7 + 1].item() for b in range(8) for i in range(8, 15)])
    assert scores.loc[(1, 1), "induction"] == pytest.approx(brute, abs=1e-6)
    brute_prev = np.mean([cache["blocks.0.attn.hook_pattern"][b, 1, i, i - 1].item() for b in range(8)
                          for i in range(2, 15)])
    assert scores.loc[(0, 1), "previous_token"] == pytest.approx(brute_prev, abs=1e-6)

    roles = detect_repeated_token_roles(hand_model, prompts)
    found = {(r.layer, r.head, r.role) for r in roles.itertuples()}
    assert found == {(0, 0, "previous_token"), (0, 1, "duplicate_token"), (1, 0, "induction")}
    ind = json.loads(roles[roles.role == "induction"].evidence.iloc[0])
    assert ind["copying"] == pytest.approx(1.0, abs=1e-6) and ind["measured_on"] == "repeated random tokens"


def test_copying_score_signs(hand_model):
    copy = copying_scores(hand_model, [(1, 0), (1, 1)], n_tokens=V).set_index(["layer", "head"])["copying"]
    assert copy[(1, 0)] == pytest.approx(1.0, abs=1e-6) and copy[(1, 1)] == pytest.approx(-1.0, abs=1e-6)


def test_copying_score_matches_full_eigendecomposition(tiny_gqa_model):
    m = tiny_gqa_model
    got = copying_scores(m, [(1, 3)], n_tokens=20, seed=3)["copying"].iloc[0]
    sample = torch.randperm(m.cfg.d_vocab, generator=torch.Generator().manual_seed(3))[:20]
    sd = m.state_dict()
    emb = m.W_E[sample]
    emb = emb / (emb.pow(2).mean(-1, keepdim=True) + m.cfg.eps).sqrt() * sd["blocks.1.ln1.weight"]
    full = emb @ m.W_V[1, 3 // 2] @ m.W_O[1, 3] @ (sd["ln_final.weight"][:, None] * m.W_U[:, sample])  # 20 x 20
    eig = torch.linalg.eigvals(full.double())
    assert got == pytest.approx((eig.real.sum() / eig.abs().sum()).item(), abs=1e-5)


def _ioi_like(model, batch=6, seq=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, seq), generator=gen)
    positions = {"IO": torch.full((batch,), 2), "S1": torch.full((batch,), 3), "S2": torch.full((batch,), 6),
                 "END": torch.tensor([9, 8, 9, 7, 9, 9])[:batch]}
    positions["S1+1"] = positions["S1"] + 1
    return IOIPrompts(tokens, positions)


def test_ioi_scores_match_a_direct_decomposition(tiny_gqa_model):
    """DLA of all heads + the rest of the residual stream must add up to the logit difference."""
    m = tiny_gqa_model
    pr = _ioi_like(m)
    scores = ioi_head_scores(m, pr)
    rows = torch.arange(6)
    end = pr.positions["END"]
    io, s = pr.ids()
    names = ("blocks.0.hook_resid_pre", "blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out", "ln_final.hook_scale",
             "blocks.1.attn.hook_pattern")
    logits, cache = m.run_with_cache(pr.tokens, names_filter=lambda n: n in names)
    ld = (logits[rows, end, io] - logits[rows, end, s]).mean().item()
    sd = m.state_dict()
    rest = cache["blocks.0.hook_resid_pre"] + cache["blocks.0.hook_mlp_out"] + cache["blocks.1.hook_mlp_out"]
    rest = rest + sd["blocks.0.attn.o.bias"] + sd["blocks.1.attn.o.bias"]
    rest = rest[rows, end] / cache["ln_final.hook_scale"][rows, end] * sd["ln_final.weight"]
    rest_dla = ((rest * (m.W_U[:, io] - m.W_U[:, s]).T).sum(-1)
                + sd["unembed.bias"][io] - sd["unembed.bias"][s]).mean().item()
    assert scores["dla_io_minus_s"].sum() + rest_dla == pytest.approx(ld, abs=1e-4)
    pat = cache["blocks.1.attn.hook_pattern"]
    brute = np.mean([pat[b, 2, end[b], 2].item() for b in range(6)])
    assert scores.set_index(["layer", "head"]).loc[(1, 2), "attn_end_io"] == pytest.approx(brute, abs=1e-6)


def test_name_mover_thresholds_on_synthetic_scores():
    df = pd.DataFrame({"layer": [9, 9, 10, 11, 8], "head": [9, 6, 7, 2, 3], "attn_end_io": [0.6, 0.1, 0.5, 0.3, 0.05],
                       "attn_end_s2": [0.1, 0.1, 0.1, 0.1, 0.6], "dla_io_minus_s": [1.2, 2.0, -0.8, 0.05, 1.5]})
    roles = detect_name_movers(df, RoleThresholds(name_mover_attention=0.2, name_mover_dla=0.1))
    assert {(r.layer, r.head, r.role) for r in roles.itertuples()} == {
        (9, 9, "name_mover"), (10, 7, "negative_name_mover"), (8, 3, "s_suppression")}
    assert roles.set_index("role").loc["negative_name_mover", "score"] == pytest.approx(0.8)


def test_one_role_per_head_by_the_name_it_attends_more():
    """A head attending both names and raising IO−S was labelled name_mover and s_suppression with one score; now
    the name it attends more decides, and the evidence keeps both attentions."""
    df = pd.DataFrame({"layer": [5, 6], "head": [0, 1], "attn_end_io": [0.3, 0.5], "attn_end_s2": [0.5, 0.3],
                       "dla_io_minus_s": [0.4, 0.4]})
    thresholds = RoleThresholds(name_mover_attention=0.2, name_mover_dla=0.1)
    roles = detect_name_movers(df, thresholds)
    assert sorted((r.layer, r.head, r.role) for r in roles.itertuples()) == [(5, 0, "s_suppression"),
                                                                           (6, 1, "name_mover")]
    evidence = json.loads(roles.set_index("role").loc["s_suppression", "evidence"])
    assert (evidence["attn_end_io"], evidence["attn_end_s2"]) == (0.3, 0.5)
    plain = detect_name_movers(df, thresholds, include_s_suppression=False)  # Wang et al.'s classes only
    assert sorted((r.layer, r.head, r.role) for r in plain.itertuples()) == [(5, 0, "name_mover"), (6, 1, "name_mover")]


def test_backup_name_movers_mechanics(tiny_gqa_model):
    pr = _ioi_like(tiny_gqa_model)
    # name movers in the last layer: nothing downstream can take over
    last = detect_backup_name_movers(tiny_gqa_model, pr, [(1, 0)], RoleThresholds(backup_dla_increase=1e-9,
                                                                                  name_mover_attention=0.0))
    assert last.empty
    # ablating a layer-0 head moves layer-1 DLAs; the ablated head itself never counts as backup
    first = detect_backup_name_movers(tiny_gqa_model, pr, [(0, 0), (0, 1)],
                                      RoleThresholds(backup_dla_increase=-1e9, name_mover_attention=0.0,
                                                     name_mover_dla=-1e9))
    assert {(r.layer, r.head) for r in first.itertuples()} == {(0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)}
    assert json.loads(first.evidence.iloc[0])["ablated"] == ["a0.h0", "a0.h1"]


def test_s_inhibition_from_path_patching_table():
    effects = pd.DataFrame({"sender": ["a7.h3", "a7.h3", "a8.h6", "a7.h9", "m7", "a6.h1"],
                            "receiver": ["a9.h9", "a9.h6", "a9.h9", "a9.h9", "a9.h9", "a9.h9"],
                            "channel": ["q", "q", "q", "k", "q", "q"],
                            "effect": [0.2, 0.1, 0.12, 0.5, 0.9, -0.3]})
    roles = detect_s_inhibition(effects, [(9, 9), (9, 6)])
    # 7.9 only via k; m7 not a head; 6.1 works against the behaviour (signed effect)
    assert list(zip(roles["layer"], roles["head"])) == [(7, 3), (8, 6)]
    assert roles.score.iloc[0] == pytest.approx(0.3)
    joint = pd.DataFrame({"sender": ["a7.h3", "a6.h0"], "receiver": ["a9.h9,a9.h6", "a9.h9,a3.h3"],
                          "channel": ["q", "q"], "effect": [0.4, 0.9]})
    assert list(detect_s_inhibition(joint, ["a9.h9", "a9.h6"])["head"]) == [3]
    with pytest.raises(ValueError, match="lack column"):
        detect_s_inhibition(effects.drop(columns="channel"), [(9, 9)])


def test_assign_roles_keeps_strongest_and_all():
    g = circuit_from_node_scores(pd.DataFrame({"component": ["head", "head"], "layer": [0, 1], "head": [0, 0],
                                               "effect": [0.5, 0.7]}), Selection(top_k=2))
    roles = pd.DataFrame([
        {"layer": 0, "head": 0, "role": "previous_token", "score": 0.9, "threshold": 0.4, "evidence": "{}"},
        {"layer": 0, "head": 0, "role": "duplicate_token", "score": 0.5, "threshold": 0.3, "evidence": "{}"},
        {"layer": 5, "head": 5, "role": "induction", "score": 0.9, "threshold": 0.3, "evidence": "{}"}])
    out = assign_roles(g, roles)
    assert out.nodes["a0.h0"]["role"] == "previous_token"
    assert json.loads(out.nodes["a0.h0"]["roles"]) == ["previous_token", "duplicate_token"]
    assert json.loads(out.nodes["a0.h0"]["evidence"])["roles"]["duplicate_token"]["score"] == 0.5
    assert out.nodes["a1.h0"]["role"] == "" and "a5.h5" not in out and g.nodes["a0.h0"]["role"] == ""


@pytest.mark.slow
def test_smollm2_has_measured_induction_and_name_movers(smollm2):
    from circuitlab.tasks import get_task

    torch.set_num_threads(2)
    rep = repeated_random_tokens(smollm2.cfg.d_vocab, 8, 4, seed=0, bos_id=1, low=1000)
    roles = detect_repeated_token_roles(smollm2, rep)
    induction = roles[roles.role == "induction"]
    assert len(induction) >= 1 and (induction["layer"] > 0).all()
    assert all(json.loads(e)["copying"] > 0 for e in induction.evidence)
    pairs = get_task("ioi").generate(smollm2, 8, seed=0)
    scores = ioi_head_scores(smollm2, IOIPrompts(pairs.clean_tokens, pairs.positions, pairs.answer_ids,
                                                 pairs.wrong_ids))
    movers = detect_name_movers(scores)
    assert (movers.role == "name_mover").any()
