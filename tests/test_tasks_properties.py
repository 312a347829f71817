"""Hypothesis property tests: every generated pair is aligned, roles point at the right tokens, seeds reproduce."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitlab.tasks import get_task
from tests.test_tasks_helpers import gpt2_style_tokenizer, smollm2_tokenizer

PROPS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
seeds = st.integers(min_value=0, max_value=2**31 - 1)


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def _decode_at(tok, tokens, position):
    return tok.decode([int(tokens[int(position)])])


def _aligned(pairs):
    assert pairs.clean_tokens.shape == pairs.corrupt_tokens.shape
    assert len(set(pairs.clean_texts)) == len(pairs)  # distinct prompts
    for role in pairs.roles:
        assert pairs.positions[role].shape == (len(pairs),)


@PROPS
@given(seed=seeds, n=st.integers(1, 12), corruption=st.sampled_from(["abc", "s2_io_flip"]),
       family=st.sampled_from(["mixed", "BABA", "ABBA"]))
def test_ioi_properties(tok, seed, n, corruption, family):
    task = get_task("ioi")
    pairs = task.generate(tok, n, seed=seed, corruption=corruption, family=family)
    _aligned(pairs)
    assert len(pairs) == n
    for i in range(n):
        length = int(pairs.lengths[i])
        row, clean, corrupt = pairs.meta.iloc[i], pairs.clean_tokens[i, :length], pairs.corrupt_tokens[i, :length]
        assert clean.tolist() == [tok.bos_token_id] + tok(pairs.clean_texts[i], add_special_tokens=False)["input_ids"]
        assert corrupt.tolist() == [tok.bos_token_id] + tok(pairs.corrupt_texts[i], add_special_tokens=False)["input_ids"]
        pos = {r: int(pairs.positions[r][i]) for r in pairs.roles}
        assert _decode_at(tok, clean, pos["IO"]) == " " + row["IO"]
        assert _decode_at(tok, clean, pos["S1"]) == _decode_at(tok, clean, pos["S2"]) == " " + row["S"]
        assert pos["S1+1"] == pos["S1"] + 1 and pos["END"] == length - 1
        assert pos["S2"] > max(pos["IO"], pos["S1"])
        assert _decode_at(tok, corrupt, pos["S2"]) == " " + row["corrupt_S2"]
        assert _decode_at(tok, corrupt, pos["IO"]) == " " + row["corrupt_IO"]
        if family != "mixed":
            assert row["family"] == family
    again = task.generate(tok, n, seed=seed, corruption=corruption, family=family)
    assert torch.equal(again.clean_tokens, pairs.clean_tokens) and again.corrupt_texts == pairs.corrupt_texts


@PROPS
@given(seed=seeds, n=st.integers(1, 20))
def test_capitals_properties(tok, seed, n):
    task = get_task("capitals")
    pairs = task.generate(tok, n, seed=seed)
    _aligned(pairs)
    for i in range(n):
        row = pairs.meta.iloc[i]
        first, last = int(pairs.positions["subject_first"][i]), int(pairs.positions["subject_last"][i])
        assert tok.decode(pairs.clean_tokens[i, first:last + 1].tolist()) == " " + row["country"]
        assert tok.decode(pairs.corrupt_tokens[i, first:last + 1].tolist()) == " " + row["corrupt_country"]
        assert torch.equal(pairs.clean_tokens[i, :first], pairs.corrupt_tokens[i, :first])
        assert torch.equal(pairs.clean_tokens[i, last + 1:], pairs.corrupt_tokens[i, last + 1:])
        assert int(pairs.answer_ids[i, 0]) != int(pairs.wrong_ids[i, 0])
    again = task.generate(tok, n, seed=seed)
    assert again.clean_texts == pairs.clean_texts and again.corrupt_texts == pairs.corrupt_texts


@PROPS
@given(seed=seeds, n=st.integers(1, 8), seq_len=st.integers(2, 25), bos=st.booleans())
def test_repeated_tokens_properties(tiny_model, seed, n, seq_len, bos):
    task = get_task("repeated_tokens")
    pairs = task.generate(tiny_model, n, seed=seed, seq_len=seq_len, bos_id=5 if bos else None)
    _aligned(pairs)
    p = 1 if bos else 0
    pos = {r: pairs.positions[r] for r in pairs.roles}
    for i in range(n):
        clean, corrupt = pairs.clean_tokens[i], pairs.corrupt_tokens[i]
        fs, fe, ss, se = (int(pos[r][i]) for r in ("first_start", "first_end", "second_start", "second_end"))
        assert (fs, fe - fs + 1, se - ss + 1, se) == (p, seq_len, seq_len, len(clean) - 1)
        assert torch.equal(clean[fs:fe + 1], clean[ss:se + 1]) and torch.equal(corrupt[ss:se + 1], clean[fs:fe + 1])
        assert not set(corrupt[fs:fe + 1].tolist()) & set(clean[fs:fe + 1].tolist())
        assert len(set(clean[fs:fe + 1].tolist())) == seq_len
        if bos:
            assert int(clean[0]) == int(corrupt[0]) == 5 and 5 not in clean[1:].tolist()
    read = task.read_positions(pairs)
    assert torch.equal(pairs.answer_ids, pairs.clean_tokens.gather(1, read + 1))
    again = task.generate(tiny_model, n, seed=seed, seq_len=seq_len, bos_id=5 if bos else None)
    assert torch.equal(again.clean_tokens, pairs.clean_tokens) and torch.equal(again.corrupt_tokens, pairs.corrupt_tokens)


@PROPS
@given(seed=seeds, n=st.integers(1, 30))
def test_greater_than_properties(seed, n):
    tok = gpt2_style_tokenizer()
    pairs = get_task("greater_than").generate(tok, n, seed=seed)
    _aligned(pairs)
    for i in range(n):
        yy = int(pairs.meta["year"].iloc[i])
        at = int(pairs.positions["YY"][i])
        assert tok.decode([int(pairs.clean_tokens[i, at])]) == f"{yy:02d}"
        assert tok.decode([int(pairs.corrupt_tokens[i, at])]) == "01"
        differ = (pairs.clean_tokens[i] != pairs.corrupt_tokens[i]).nonzero().flatten().tolist()
        assert differ == ([at] if yy != 1 else [])
        good, bad = pairs.valid_answer_ids(i)
        assert len(good) == 99 - yy and len(bad) == yy + 1 and not set(good) & set(bad)
        assert sorted(tok.decode([t]) for t in good + bad) == [f"{y:02d}" for y in range(100)]
