"""Role detection edge case: no head qualifies as an induction head."""


def test_repeated_token_roles_without_any_induction_head(tiny_model):
    """No head reaches the induction threshold: the copying merge must still give a well-formed table."""
    from circuitlab.graphs.role_scores import repeated_random_tokens
    from circuitlab.graphs.roles import RoleThresholds, detect_repeated_token_roles

    prompts = repeated_random_tokens(tiny_model.cfg.d_vocab, 6, 4, seed=0)
    table = detect_repeated_token_roles(tiny_model, prompts, RoleThresholds(induction=2.0))
    assert "induction" not in set(table["role"])
