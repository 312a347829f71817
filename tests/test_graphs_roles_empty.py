"""Role detection edge case: no head qualifies as an induction head."""

from circuitlab.graphs.role_scores import copying_scores, repeated_random_tokens, repeated_token_scores
from circuitlab.graphs.roles import ROLE_COLUMNS, RoleThresholds, detect_repeated_token_roles


def test_repeated_token_roles_without_any_induction_head(tiny_model):
    """The induction threshold sits just above the best head's score, so no head is a candidate and the copying
    merge runs on an empty frame: the other roles must still be exactly the heads over their thresholds."""
    prompts = repeated_random_tokens(tiny_model.cfg.d_vocab, 6, 4, seed=0)
    scores = repeated_token_scores(tiny_model, prompts)
    best = scores.loc[scores["induction"].idxmax()]
    loose = dict(previous_token=0.2, previous_token_top=0.25, duplicate_token=0.115)
    table = detect_repeated_token_roles(tiny_model, prompts, RoleThresholds(**loose, induction=best["induction"] + 1e-6))
    assert list(table.columns) == ROLE_COLUMNS
    assert "induction" not in set(table["role"])
    heads = lambda role: sorted(zip(table.loc[table.role == role, "layer"], table.loc[table.role == role, "head"]))
    prev = (scores["previous_token"] >= 0.2) | (scores["previous_token_top"] > 0.25)
    dup = scores["duplicate_token"] >= 0.115
    assert heads("previous_token") == sorted(zip(scores.loc[prev, "layer"], scores.loc[prev, "head"]))
    assert heads("duplicate_token") == sorted(zip(scores.loc[dup, "layer"], scores.loc[dup, "head"]))
    assert prev.any() and dup.any()  # the thresholds select something, so the check above is not vacuous
    assert not table["evidence"].str.contains("copying").any()  # no candidate: no copying score anywhere

    # at exactly the best score that head becomes the one candidate: an induction head iff it copies
    at_best = detect_repeated_token_roles(tiny_model, prompts, RoleThresholds(**loose, induction=best["induction"]))
    copies = float(copying_scores(tiny_model, [(int(best["layer"]), int(best["head"]))])["copying"].iloc[0]) > 0.0
    induction = at_best[at_best.role == "induction"]
    assert list(zip(induction["layer"], induction["head"])) == ([(int(best["layer"]), int(best["head"]))] if copies else [])
