"""Fast unit tests of the task library on the SmolLM2 tokenizer, a GPT-2-style toy tokenizer and a tiny native model."""

import logging

import pytest
import torch

from circuitlab.tasks import (PAD_ID, CapitalsTask, GreaterThanTask, IOITask, RepeatedTokensTask,
                   TaskUnsupportedError, get_task, list_tasks)
from circuitlab.tasks import data
from circuitlab.tasks.greater_than import year_token_ids
from circuitlab.tasks.tokens import resolve
from tests.conftest import TINY_CONFIG
from tests.test_tasks_helpers import gpt2_style_tokenizer, odd_year_tokenizer, smollm2_tokenizer


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def year_tok():
    return gpt2_style_tokenizer()


def _bos_ids(tok, text):
    """Independent tokenization: BOS id then the text's ids (what `model.to_tokens` does for SmolLM2)."""
    return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------- registry
def test_registry_names_aliases_and_unknown():
    assert list_tasks() == ["ioi", "capitals", "repeated_tokens", "greater_than"]
    assert isinstance(get_task("capital_lookup"), CapitalsTask)
    assert isinstance(get_task("induction"), RepeatedTokensTask)
    assert isinstance(get_task("IOI"), IOITask)
    assert isinstance(get_task("greater_than"), GreaterThanTask)
    with pytest.raises(ValueError) as err:
        get_task("docstring")
    for name in list_tasks():
        assert name in str(err.value)
    for name in list_tasks():
        task = get_task(name)
        assert task.name == name and task.metric_name and task.description and task.roles


# ---------------------------------------------------------------------------------------------- IOI
def test_ioi_pairs_have_right_roles_and_texts(tok):
    pairs = IOITask().generate(tok, 24, seed=3)
    assert len(pairs) == 24 and pairs.roles == ["IO", "S1", "S1+1", "S2", "END"]
    assert pairs.clean_tokens.shape == pairs.corrupt_tokens.shape and pairs.attention_mask is not None
    assert len(set(pairs.lengths.tolist())) >= 3  # templates of every length, right-padded
    for i in range(len(pairs)):
        row = pairs.meta.iloc[i]
        length = int(pairs.attention_mask[i].sum())
        assert pairs.attention_mask[i].tolist() == [1] * length + [0] * (pairs.seq_len - length)
        assert (pairs.clean_tokens[i, length:] == pairs.info["pad_id"]).all()
        clean = pairs.clean_tokens[i, :length].tolist()
        assert clean == _bos_ids(tok, pairs.clean_texts[i])
        assert pairs.corrupt_tokens[i, :length].tolist() == _bos_ids(tok, pairs.corrupt_texts[i])
        assert row["order"] == row["family"] and row["template"] in (
            data.IOI_WANG_BABA_TEMPLATES[row["template_id"]], data.abba_from_baba(data.IOI_WANG_BABA_TEMPLATES[row["template_id"]]))
        at = lambda role: tok.decode([clean[int(pairs.positions[role][i])]])  # noqa: E731
        assert at("IO") == " " + row["IO"] and at("S1") == " " + row["S"] and at("S2") == " " + row["S"]
        assert int(pairs.positions["S1+1"][i]) == int(pairs.positions["S1"][i]) + 1
        assert int(pairs.positions["END"][i]) == len(clean) - 1 and at("END") == " to"
        assert pairs.clean_texts[i].endswith(" to") and pairs.clean_texts[i].count(row["S"]) >= 2
        assert tok.decode(pairs.answer_ids[i].tolist()) == " " + row["IO"]
        assert tok.decode(pairs.wrong_ids[i].tolist()) == " " + row["S"]
        io_first = int(pairs.positions["IO"][i]) < int(pairs.positions["S1"][i])
        assert io_first == (row["family"] == "ABBA")
        # ABC: exactly the three name positions differ, and hold three names unrelated to IO and S.
        differ = (pairs.clean_tokens[i] != pairs.corrupt_tokens[i]).nonzero().flatten().tolist()
        assert differ == sorted(int(pairs.positions[r][i]) for r in ("IO", "S1", "S2"))
        others = {row["corrupt_IO"], row["corrupt_S1"], row["corrupt_S2"]}
        assert len(others) == 3 and not others & {row["IO"], row["S"]}
    assert len(set(pairs.clean_texts)) == 24
    assert pairs.info["prompt_length"] == pairs.seq_len


def test_ioi_s2_io_flip_and_families(tok):
    pairs = IOITask().generate(tok, 12, seed=0, corruption="s2_io_flip", family="BABA")
    assert set(pairs.meta["family"]) == {"BABA"}
    for i in range(len(pairs)):
        differ = (pairs.clean_tokens[i] != pairs.corrupt_tokens[i]).nonzero().flatten().tolist()
        assert differ == [int(pairs.positions["S2"][i])]
        assert pairs.corrupt_tokens[i, pairs.positions["S2"][i]] == pairs.answer_ids[i, 0]
        assert int(pairs.positions["S1"][i]) < int(pairs.positions["IO"][i])
    abba = IOITask().generate(tok, 6, seed=0, templates="ABBA")
    assert set(abba.meta["family"]) == {"ABBA"}
    assert set(IOITask().generate(tok, 6, seed=0, template_family="ABBA").meta["family"]) == {"ABBA"}


def test_ioi_seed_determinism(tok):
    a = IOITask().generate(tok, 10, seed=11)
    b = IOITask().generate(tok, 10, seed=11)
    c = IOITask().generate(tok, 10, seed=12)
    assert torch.equal(a.clean_tokens, b.clean_tokens) and torch.equal(a.corrupt_tokens, b.corrupt_tokens)
    assert a.clean_texts == b.clean_texts and a.clean_texts != c.clean_texts


def test_ioi_filters_names_with_count_and_errors_when_none_left(tok, caplog):
    with caplog.at_level(logging.INFO, logger="circuitlab.tasks"):
        pairs = IOITask().generate(tok, 4, seed=0, names=["Mary", "John", "Tom", "Sam", "Ben", "Zachary", "Cynthia"])
    assert "kept 5 of 7" in caplog.text and "Zachary" in caplog.text
    assert set(pairs.meta["IO"]) | set(pairs.meta["S"]) <= {"Mary", "John", "Tom", "Sam", "Ben"}
    with pytest.raises(ValueError, match="single tokens"):
        IOITask().generate(tok, 4, names=["Zachary", "Cynthia", "Jacqueline", "Mary"])


def test_ioi_bad_options_and_too_many_prompts(tok):
    with pytest.raises(ValueError, match="corruption"):
        IOITask().generate(tok, 4, corruption="xyz")
    with pytest.raises(ValueError, match="family"):
        IOITask().generate(tok, 4, family="AABB")
    with pytest.raises(ValueError, match="unknown option"):
        IOITask().generate(tok, 4, colour="red")
    small = dict(names=["Mary", "John", "Tom", "Sam", "Ben"], places=["store"], objects=["ring"],
                 templates=["Then {S} and {IO} went to the {PLACE}. {S} gave a {OBJECT} to"], family="BABA")
    assert len(IOITask().generate(tok, 20, **small)) == 20  # 5 × 4 ordered name pairs
    with pytest.raises(ValueError, match="at most 20"):
        IOITask().generate(tok, 21, **small)
    with pytest.raises(ValueError, match="positive"):
        IOITask().generate(tok, 0)


def test_ioi_needs_a_tokenizer(tiny_model):
    with pytest.raises(ValueError, match="tokenizer"):
        IOITask().generate(tiny_model, 4)


def test_logit_diff_metric_matches_manual_and_broadcasts(tok):
    task = IOITask()
    pairs = IOITask().generate(tok, 5, seed=1)
    vocab = 49152
    logits = torch.randn(5, pairs.seq_len, vocab, generator=torch.Generator().manual_seed(0))
    manual = torch.tensor([logits[b, int(pairs.positions["END"][b]), int(pairs.answer_ids[b, 0])]
                           - logits[b, int(pairs.positions["END"][b]), int(pairs.wrong_ids[b, 0])] for b in range(5)])
    assert torch.allclose(task.metric(logits, pairs), manual)
    stacked = torch.stack([logits, 2 * logits, -logits])  # [3, B, S, V]: leading patch dimension
    out = task.metric(stacked, pairs)
    assert out.shape == (3, 5) and torch.allclose(out, torch.stack([manual, 2 * manual, -manual]))
    at = task.gather(stacked, pairs)
    assert at.shape == (3, 5, 1, vocab) and torch.allclose(task.metric_at(at, pairs), out)
    assert task.read_positions(pairs).shape == (5, 1)
    leaf = logits.clone().requires_grad_()
    task.metric(leaf, pairs).sum().backward()
    assert int((leaf.grad != 0).sum()) == 10 and float(leaf.grad.sum()) == 0.0


# ----------------------------------------------------------------------------------------- capitals
def test_capitals_pairs(tok, caplog):
    with caplog.at_level(logging.INFO, logger="circuitlab.tasks"):
        pairs = CapitalsTask().generate(tok, 30, seed=0)
    assert "not single tokens and were dropped" in caplog.text
    info = pairs.info
    assert info["facts_total"] >= 60 and info["facts_with_token_answer"] < info["facts_total"]
    assert pairs.roles == ["subject_first", "subject_last", "END"]
    for i in range(len(pairs)):
        row = pairs.meta.iloc[i]
        length = int(pairs.lengths[i])
        assert pairs.clean_tokens[i, :length].tolist() == _bos_ids(tok, pairs.clean_texts[i])
        assert pairs.corrupt_tokens[i, :length].tolist() == _bos_ids(tok, pairs.corrupt_texts[i])
        s0, s1 = int(pairs.positions["subject_first"][i]), int(pairs.positions["subject_last"][i])
        assert tok.decode(pairs.clean_tokens[i, s0:s1 + 1].tolist()) == " " + row["country"]
        assert tok.decode(pairs.corrupt_tokens[i, s0:s1 + 1].tolist()) == " " + row["corrupt_country"]
        differ = (pairs.clean_tokens[i] != pairs.corrupt_tokens[i]).nonzero().flatten()
        assert len(differ) and int(differ.min()) >= s0 and int(differ.max()) <= s1
        assert tok.decode(pairs.answer_ids[i].tolist()) == " " + row["capital"]
        assert tok.decode(pairs.wrong_ids[i].tolist()) == " " + row["corrupt_capital"]
        assert row["capital"] != row["corrupt_capital"]
        assert int(pairs.positions["END"][i]) == length - 1
        assert row["template"].replace("{country}", row["country"]) == pairs.clean_texts[i]


def test_capitals_errors(tok):
    with pytest.raises(ValueError, match="needs a model"):
        CapitalsTask().generate(tok, 4, filter_correct=True)
    with pytest.raises(ValueError, match="single tokens"):
        CapitalsTask().generate(tok, 2, facts=[("Thailand", "Bangkok"), ("Nepal", "Kathmandu"), ("France", "Paris")])
    first = CapitalsTask().generate(tok, 2, facts=[("Thailand", "Bangkok"), ("Nepal", "Kathmandu")],
                                    answer_tokens="first", templates=["The capital of {country} is"])
    assert tok.decode(first.answer_ids[first.meta.index[first.meta.country == "Nepal"][0]].tolist()) \
        == tok.decode(tok(" Kathmandu", add_special_tokens=False)["input_ids"][:1])
    with pytest.raises(ValueError, match="partner"):
        CapitalsTask().generate(tok, 1, facts=[("France", "Paris"), ("Portugal", "Paris")])
    facts = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome")]
    with pytest.raises(ValueError, match="at most 3"):
        CapitalsTask().generate(tok, 4, facts=facts, templates=["The capital of {country} is"])


# ------------------------------------------------------------------------------------ repeated tokens
def test_repeated_tokens_on_tokenizer(tok):
    task = RepeatedTokensTask()
    pairs = task.generate(tok, 6, seed=0, seq_len=10)
    assert pairs.seq_len == 21 and (pairs.clean_tokens[:, 0] == 1).all()
    first, second = pairs.clean_tokens[:, 1:11], pairs.clean_tokens[:, 11:]
    assert torch.equal(first, second) and torch.equal(pairs.corrupt_tokens[:, 11:], first)
    special = set(tok.all_special_ids)
    for i in range(6):
        assert len(set(first[i].tolist())) == 10 and not set(first[i].tolist()) & special
        assert not set(first[i].tolist()) & set(pairs.corrupt_tokens[i, 1:11].tolist())
    assert [int(pairs.positions[r][0]) for r in task.roles] == [1, 10, 11, 20, 20]
    read = task.read_positions(pairs)
    assert read.shape == (6, 9) and read[0].tolist() == list(range(11, 20))
    assert torch.equal(pairs.answer_ids, pairs.clean_tokens.gather(1, read + 1))


def test_repeated_tokens_tiny_model_metric_and_losses(tiny_model):
    task = RepeatedTokensTask()
    pairs = task.generate(tiny_model, 4, seed=2, seq_len=8)
    assert pairs.seq_len == 16 and int(pairs.clean_tokens.max()) < TINY_CONFIG["d_vocab"]
    assert pairs.clean_texts[0].startswith("<") and pairs.info["bos_id"] is None
    with torch.no_grad():
        logits = tiny_model(pairs.clean_tokens)
    logprobs = logits.log_softmax(-1)
    manual = torch.tensor([sum(float(logprobs[b, t, pairs.clean_tokens[b, t + 1]]) for t in range(8, 15)) / 7
                           for b in range(4)])
    assert torch.allclose(task.metric(logits, pairs), manual, atol=1e-5)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           pairs.clean_tokens[:, 1:].reshape(-1), reduction="none").view(4, 15)
    assert torch.allclose(task.per_position_loss(logits, pairs.clean_tokens), ce, atol=1e-5)
    first, repeat = task.half_losses(logits, pairs)
    assert torch.allclose(first, ce[:, 0:7].mean(-1), atol=1e-5) and torch.allclose(repeat, -manual, atol=1e-5)
    stacked = torch.stack([logits, logits * 0.5])
    assert task.metric(stacked, pairs).shape == (2, 4)
    logit_task = get_task("induction", metric="mean_logit")
    assert logit_task.metric_name == "mean_logit"
    manual_logit = torch.stack([logits[b, 8:15].gather(-1, pairs.clean_tokens[b, 9:16, None])[:, 0].mean()
                                for b in range(4)])
    assert torch.allclose(logit_task.metric(logits, pairs), manual_logit, atol=1e-5)
    with_bos = task.generate(tiny_model, 3, seed=0, seq_len=8, bos_id=0)
    assert (with_bos.clean_tokens[:, 0] == 0).all() and int((with_bos.clean_tokens[:, 1:] == 0).sum()) == 0
    assert int(with_bos.positions["second_start"][0]) == 9


def test_repeated_tokens_errors(tiny_model):
    task = RepeatedTokensTask()
    with pytest.raises(ValueError, match="distinct tokens"):
        task.generate(tiny_model, 2, seq_len=33)
    with pytest.raises(ValueError, match="context"):
        task.generate(_WideVocab(), 2, seq_len=40)
    assert len(task.generate(tiny_model, 12, seq_len=2, token_range=(0, 4))) == 12  # 4 · 3 ordered pairs
    with pytest.raises(ValueError, match="at most 12"):
        task.generate(tiny_model, 13, seq_len=2, token_range=(0, 4))
    with pytest.raises(ValueError, match="metric"):
        RepeatedTokensTask(metric="accuracy")
    a = task.generate(tiny_model, 5, seed=7, seq_len=5)
    b = task.generate(tiny_model, 5, seed=7, seq_len=5)
    assert torch.equal(a.clean_tokens, b.clean_tokens) and torch.equal(a.corrupt_tokens, b.corrupt_tokens)


class _WideVocab:
    """A stand-in bridge with a big vocabulary but a short context, to test the context check."""

    def __init__(self):
        self.tokenizer = None
        self.cfg = type("Cfg", (), dict(d_vocab=1000, n_ctx=64, default_prepend_bos=True))()


# -------------------------------------------------------------------------------------- greater-than
def test_greater_than_digit_mode_answer_sets(tok):
    """SmolLM2 writes years digit by digit: the answers are the tens digits above YY's, the wrongs those below."""
    digit = {d: tok(str(d), add_special_tokens=False)["input_ids"] for d in range(10)}
    assert all(len(v) == 1 for v in digit.values())
    cases = {32: ([4, 5, 6, 7, 8, 9], [0, 1, 2]), 10: ([2, 3, 4, 5, 6, 7, 8, 9], [0]),
             89: ([9], [0, 1, 2, 3, 4, 5, 6, 7]), 55: ([6, 7, 8, 9], [0, 1, 2, 3, 4])}
    for yy, (greater, smaller) in cases.items():
        pairs = GreaterThanTask().generate(tok, 1, nouns=["war"], years=(yy, yy))
        assert pairs.info["year_mode"] == "digit" and pairs.info["years"] == [yy, yy]
        assert pairs.clean_texts == [f"The war lasted from the year 17{yy} to the year 17"]
        good, bad = pairs.valid_answer_ids(0)
        assert good == [digit[d][0] for d in greater] and bad == [digit[d][0] for d in smaller]
        assert pairs.answer_ids.shape[1] == 100 and (pairs.wrong_ids[0, len(bad):] == PAD_ID).all()
    assert GreaterThanTask().generate(tok, 4).info["years"] == [10, 89]  # the default 2..98, cut to tens 1..8
    with pytest.raises(ValueError, match="10..89"):
        GreaterThanTask().generate(tok, 2, years=(2, 9))


def test_greater_than_refuses_tokenizers_of_neither_kind():
    with pytest.raises(TaskUnsupportedError, match="two tokenizations") as err:
        GreaterThanTask().generate(odd_year_tokenizer(), 4)
    assert "' 17', '0', '0'" in str(err.value) and "' 173', '0'" in str(err.value)


def test_greater_than_pairs_and_metric(year_tok):
    task = GreaterThanTask()
    pairs = task.generate(year_tok, 20, seed=0, nouns=["war", "siege", "empire", "xyzzy"])
    assert pairs.info["nouns_dropped"] == 0 and set(pairs.meta["noun"]) <= {"war", "siege", "empire", "xyzzy"}
    assert "xyzzy" in set(pairs.meta["noun"]) and len(set(pairs.lengths.tolist())) == 2  # every length, padded
    years = year_token_ids(resolve(year_tok))
    for i in range(len(pairs)):
        yy = int(pairs.meta["year"].iloc[i])
        assert pairs.clean_texts[i] == f"The {pairs.meta['noun'].iloc[i]} lasted from the year 17{yy:02d} to the year 17"
        assert year_tok.decode([int(pairs.clean_tokens[i, pairs.positions["YY"][i]])]) == f"{yy:02d}"
        assert year_tok.decode([int(pairs.corrupt_tokens[i, pairs.positions["YY"][i]])]) == "01"
        assert year_tok.decode([int(pairs.clean_tokens[i, pairs.positions["XX1"][i]])]) == " 17"
        assert year_tok.decode([int(pairs.clean_tokens[i, pairs.positions["END"][i]])]) == " 17"
        noun_end = int(pairs.positions["noun"][i])
        assert year_tok.decode(pairs.clean_tokens[i, :noun_end + 1].tolist()).endswith(" " + pairs.meta["noun"].iloc[i])
        assert year_tok.decode(pairs.clean_tokens[i, noun_end + 1:noun_end + 2].tolist()) == " lasted"
        good, bad = pairs.valid_answer_ids(i)
        assert good == years[yy + 1:] and bad == years[:yy + 1]
        assert pairs.answer_ids.shape[1] == 100 and (pairs.answer_ids[i, len(good):] == PAD_ID).all()
    logits = torch.randn(2, 20, pairs.seq_len, len(year_tok), generator=torch.Generator().manual_seed(1))
    probs = logits[:, torch.arange(20), pairs.positions["END"]].softmax(-1)
    manual = torch.zeros(2, 20)
    for b in range(20):
        yy = int(pairs.meta["year"].iloc[b])
        manual[:, b] = probs[:, b, years[yy + 1:]].sum(-1) - probs[:, b, years[:yy + 1]].sum(-1)
    assert torch.allclose(task.metric(logits, pairs), manual, atol=1e-6)
    with pytest.raises(ValueError, match="at most 6"):
        task.generate(year_tok, 7, nouns=["war", "siege"], years=(10, 12))


def test_bos_conventions(tok, tiny_model):
    assert resolve(tok).bos_id == 1 and resolve(tok, prepend_bos=False).bos_id is None
    assert resolve(tiny_model).bos_id is None and resolve(tiny_model, bos_id=3).bos_id == 3
    no_bos = IOITask().generate(tok, 3, seed=0, prepend_bos=False)
    with_bos = IOITask().generate(tok, 3, seed=0)
    assert torch.equal(no_bos.clean_tokens, with_bos.clean_tokens[:, 1:])
    assert torch.equal(no_bos.positions["S2"], with_bos.positions["S2"] - 1)
