"""Induction measurements on hand-built weights whose answers are known (tests/induction_toy.py)."""

import json
import math

import pytest
import torch

from circuitlab.graphs.ablation import icl_ablation, joint_icl_ablation, repeated_tokens_patching
from circuitlab.graphs.induction import (ProbeOptions, composition_scores, eigen_score, head_scores, qk_scores,
                                        repeated_prompts)
from circuitlab.graphs.role_scores import copying_scores
from circuitlab.patching.models import boot_native_model
from circuitlab.patching.loss import loss_by_position
from circuitlab.tasks.corpus import icl_positions, icl_score
from tests.induction_toy import N_CTX, V, induction_model

BOS = 0
PROBE = ProbeOptions(n=8, half=7, seed=0, bos_id=BOS)


@pytest.fixture(scope="module")
def toy():
    return induction_model()


def _row(frame, layer, head):
    return frame[(frame["layer"] == layer) & (frame["head"] == head)].iloc[0]


def test_attention_scores_name_the_wired_heads(toy):
    scores = head_scores(toy, PROBE)
    prev, dup, ind = _row(scores, 0, 0), _row(scores, 0, 1), _row(scores, 1, 0)
    assert prev["previous_token"] > 0.99
    assert ind["induction"] > 0.99
    # the duplicate-token head attends to the earlier occurrence and to itself, half each
    assert dup["duplicate_token"] == pytest.approx(0.5, abs=0.01)
    others = scores.drop(index=scores[(scores["layer"] == 1) & (scores["head"] == 0)].index)
    assert others["induction"].max() < 0.2
    assert _row(scores, 1, 1)["previous_token"] < 0.2


def test_ov_copying_of_a_pure_copying_matrix(toy):
    copy = copying_scores(toy)
    assert _row(copy, 1, 0)["copying"] == pytest.approx(1.0, abs=1e-6)
    assert _row(copy, 0, 0)["copying"] == 0.0  # writes only the previous-token subspace, which W_U ignores
    # an anti-copying head: negate the induction head's W_O
    state = toy.state_dict()
    flipped = boot_native_model(dict(toy.cfg.to_dict(), seed=0) | {"dtype": torch.float32})
    flipped.load_state_dict({k: (-v if k == "blocks.1.attn.o.weight" else v) for k, v in state.items()}, strict=False)
    assert _row(copying_scores(flipped), 1, 0)["copying"] == pytest.approx(-1.0, abs=1e-6)


def test_eigen_score_known_spectra():
    assert eigen_score(torch.eye(5), torch.eye(5)) == pytest.approx(1.0)
    assert eigen_score(torch.eye(5), -torch.eye(5)) == pytest.approx(-1.0)
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # eigenvalues ±i: real parts cancel
    assert eigen_score(rot, torch.eye(2)) == pytest.approx(0.0, abs=1e-12)
    diag = torch.diag(torch.tensor([3.0, -1.0]))
    assert eigen_score(diag, torch.eye(2)) == pytest.approx(0.5)


def test_qk_matching_goes_through_the_previous_token_head(toy):
    qk = qk_scores(toy)
    ind = _row(qk, 1, 0)
    assert ind["qk_matching"] == pytest.approx(1.0, abs=1e-6)
    assert ind["qk_via"] == "a0.h0"
    assert ind["qk_direct"] == 0.0  # its keys read no raw token
    assert _row(qk, 0, 1)["qk_direct"] == pytest.approx(1.0, abs=1e-6)  # duplicate-token head matches tokens


def test_composition_scores_find_k_composition_only(toy):
    comp = composition_scores(toy)
    pair = comp[(comp["sender"] == "a0.h0") & (comp["receiver"] == "a1.h0")].iloc[0]
    assert pair["k_comp"] > 0.1
    assert pair["q_comp"] == 0.0 and pair["v_comp"] == 0.0
    into_ind = comp[comp["receiver"] == "a1.h0"].sort_values("k_comp", ascending=False)
    assert into_ind.iloc[0]["sender"] == "a0.h0"
    # K-composition of M = W_QK (W_OV)^T: the induction head reads exactly the subspace a0.h0 writes
    d_head = toy.cfg.d_head
    wq, wk = toy.W_Q[1, 0], toy.W_K[1, 0]
    ov = toy.W_V[0, 0] @ toy.W_O[0, 0]
    qk = wq @ wk.T
    expected = float((qk @ ov.T).norm() / (qk.norm() * ov.norm()))
    assert pair["k_comp"] == pytest.approx(expected, rel=1e-5)
    assert d_head > 0


def _repeated_text(n=12, half=11, seed=1):
    gen = torch.Generator().manual_seed(seed)
    first = torch.stack([1 + torch.randperm(V - 1, generator=gen)[: min(half, V - 1)] for _ in range(n)])
    seq = torch.cat([torch.zeros(n, 1, dtype=torch.long), first, first, first], 1)
    return seq[:, :N_CTX]


def test_loss_by_position_and_icl_score_on_repeats(toy):
    tokens = _repeated_text()
    losses = loss_by_position(toy, tokens)
    assert math.isnan(float(losses[0]))
    # first occurrence: unpredictable (~log V); repeats (from position 1 + 7 + 1 on): copied, loss ~0
    assert float(losses[2]) > 1.0
    assert float(losses[12:].max()) < 0.05
    assert tokens.shape[1] == 22 and icl_positions(22) == (21, 2)
    assert icl_score(losses) == pytest.approx(float(losses[21] - losses[2]))
    assert icl_score(losses) < -1.0


def test_icl_positions_paper_and_scaled():
    assert icl_positions(1024) == (500, 50)
    assert icl_positions(512) == (500, 50)
    assert icl_positions(256) == (255, 26)
    with pytest.raises(ValueError, match="at least 12"):
        icl_positions(8)


def test_ablating_the_induction_head_removes_icl(toy):
    tokens = _repeated_text()
    table = icl_ablation(toy, tokens)
    zero = table[table["ablation"] == "zero"].set_index(["layer", "head"])
    assert zero.loc[(1, 0), "delta_icl"] > 1.0  # ICL gone
    assert zero.loc[(0, 0), "delta_icl"] > 1.0  # its previous-token partner too
    assert abs(zero.loc[(0, 1), "delta_icl"]) < 1e-6 and abs(zero.loc[(1, 1), "delta_icl"]) < 1e-6
    joint = joint_icl_ablation(toy, tokens, [(1, 0)])
    assert joint.fraction_removed > 0.9 and joint.heads == ("a1.h0",)
    other = joint_icl_ablation(toy, tokens, [(1, 1)])
    assert abs(other.fraction_removed) < 1e-6


def test_exact_patching_effect_on_repeated_tokens(toy):
    frame = repeated_tokens_patching(toy, n=8, seq_len=3, token_range=(1, V))
    eff = frame.set_index(["layer", "head"])["effect"]
    assert eff[(1, 0)] == pytest.approx(1.0, abs=0.02)
    assert abs(eff[(1, 1)]) < 1e-6 and abs(eff[(0, 1)]) < 1e-6


def test_joint_ablation_and_acceptance_name_the_wired_circuit(toy, tmp_path):
    """The run's labels, joint ablations and K-composition criterion on the hand-wired pair."""
    import pandas as pd

    from circuitlab.graphs.phase import joint_induction_ablation, label_heads
    from circuitlab.patching.models import save_model
    from circuitlab.reports.phase_report import acceptance

    heads = head_scores(toy, PROBE)
    heads["label"] = label_heads(heads)
    assert dict(zip(zip(heads["layer"], heads["head"]), heads["label"])) == {
        (0, 0): "previous_token", (0, 1): "", (1, 0): "induction", (1, 1): ""}
    save_model(toy, tmp_path / "toy")
    joint = joint_induction_ablation(tmp_path / "toy", _repeated_text(), heads, seed=0)
    assert joint.induction_heads == ("a1.h0",) and joint.zero_induction.fraction_removed > 0.9
    assert joint.partners == {"a1.h0": "a0.h0"}  # its K-composition partner: inside the circuit
    assert joint.other_heads == ("a0.h1", "a1.h1")  # the heads outside it write nothing
    assert joint.zero_others.sets == 2 and abs(joint.zero_others.max_fraction_removed) < 1e-6
    assert joint.zero_any_other.worst_set == ("a0.h0",)  # over every non-induction head: the partner
    assert joint.zero_any_other.max_fraction_removed > 0.2
    saved = json.loads(json.dumps(joint.to_dict()))  # summary.json's form reads back to the same record
    assert saved["zero_any_other"]["worst_set"] == ["a0.h0"] and "reason" not in saved
    assert type(joint).from_dict(saved) == joint
    table = heads.assign(model="2L", step=0, node=[f"a{l}.h{h}" for l, h in zip(heads["layer"], heads["head"])],
                         k_comp_from_prev=float("nan"))
    comp = composition_scores(toy).assign(model="2L")
    checkpoints = pd.DataFrame({"model": ["2L"], "step": [0], "icl_score": [-1.0]})
    found = acceptance(checkpoints, table, {}, {}, comp)["induction_heads_2L"]
    assert [r["top_k_comp_layer0_sender"] for r in found["heads"]] == ["a0.h0"] and found["pass"]
    swapped = comp.assign(k_comp=[-1.0 if s == "a0.h0" else k for s, k in zip(comp["sender"], comp["k_comp"])])
    assert not acceptance(checkpoints, table, {}, {}, swapped)["induction_heads_2L"]["pass"]
    # the circuit's other half is the top layer-0 K-composer only when it is a labelled previous-token head
    from circuitlab.graphs.phase import induction_partners

    assert induction_partners(heads, comp) == {"a1.h0": "a0.h0"}
    assert induction_partners(heads, swapped) == {"a1.h0": None}  # a0.h1 now tops K-composition: not previous-token


def test_a_smeared_previous_token_head_is_labelled_by_where_it_attends_most():
    """a0.h0 rewired to spread attention over i−1 (most), i−2, i−3 and itself: mean attention to i−1 falls under
    0.4 but i−1 stays its most-attended key everywhere, so it is labelled previous-token."""
    import numpy as np

    from circuitlab.graphs.phase import label_heads
    from circuitlab.graphs.role_scores import repeated_token_scores
    from tests.induction_toy import D_HEAD, POS

    model = induction_model()
    state = model.state_dict()
    k0 = state["blocks.0.attn.k.weight"].clone()
    for j in range(N_CTX):  # key at position j also matches queries at j (self), j+2 and j+3, a little less
        for offset, logit in ((0, -0.5), (2, -0.3), (3, -0.6)):
            if j + offset < D_HEAD:
                k0[j + offset, POS + j] = 1.0 + logit / 60.0
    model.load_state_dict({"blocks.0.attn.k.weight": k0}, strict=False)
    prompts = repeated_prompts(V, PROBE)
    scores = repeated_token_scores(model, prompts)
    row = _row(scores, 0, 0)
    assert 0.3 < row["previous_token"] < 0.4  # ≈ 1 / (1 + e^-0.3 + e^-0.5 + e^-0.6)
    _, cache = model.run_with_cache(prompts.tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    pat = cache["blocks.0.attn.hook_pattern"][:, 0]
    top = np.mean([float(pat[b, i, i - 1] > torch.cat([pat[b, i, :i - 1], pat[b, i, i:]]).max())
                   for b in range(pat.shape[0]) for i in range(2, 15)])  # brute force over the BOS-offset queries
    assert row["previous_token_top"] == pytest.approx(top) and top == 1.0
    full = head_scores(model, PROBE)
    full["label"] = label_heads(full)
    assert _row(full, 0, 0)["label"] == "previous_token"
    assert _row(full, 1, 1)["label"] == ""  # uniform attention: i−1 never strictly on top
    # `circuitlab run`'s role detector labels by the same rule
    from circuitlab.graphs.roles import detect_repeated_token_roles

    roles = detect_repeated_token_roles(model, prompts, with_copying=False)
    prev = roles[roles["role"] == "previous_token"]
    assert (0, 0) in set(zip(prev["layer"], prev["head"])) and (1, 1) not in set(zip(prev["layer"], prev["head"]))
