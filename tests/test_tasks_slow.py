"""Acceptance numbers of the task library on SmolLM2-135M (slow: real model)."""

import logging

import pytest
import torch

from circuitlab.patching.normalize import normalize
from circuitlab.tasks import get_task
from circuitlab.tasks.split import rephrased_split

pytestmark = pytest.mark.slow


def _forward(model, tokens, chunk=32):
    with torch.no_grad():
        return torch.cat([model(tokens[i:i + chunk]) for i in range(0, len(tokens), chunk)])


def test_ioi_on_smollm2(smollm2):
    task = get_task("ioi")
    pairs = task.generate(smollm2, 64, seed=0, corruption="abc")
    for i in range(0, 64, 7):  # bridge tokenization agrees (prompts of several lengths, right-padded)
        length = int(pairs.lengths[i])
        assert torch.equal(smollm2.to_tokens(pairs.clean_texts[i])[0], pairs.clean_tokens[i, :length])
    assert len(set(pairs.lengths.tolist())) >= 4
    clean = task.metric(_forward(smollm2, pairs.clean_tokens), pairs)
    corrupt = task.metric(_forward(smollm2, pairs.corrupt_tokens), pairs)
    accuracy = float((clean > 0).float().mean())
    print(f"IOI on SmolLM2: accuracy {accuracy:.3f}, mean logit diff {clean.mean():.2f}, ABC {corrupt.mean():.2f}")
    assert accuracy >= 0.9
    assert float(clean.mean()) >= 2.0
    assert abs(float(corrupt.mean())) < 1.0
    assert float(normalize(corrupt.mean(), clean.mean(), corrupt.mean())) == 0.0


def test_capitals_on_smollm2(smollm2, caplog):
    task = get_task("capital_lookup")
    with caplog.at_level(logging.INFO, logger="circuitlab.tasks"):
        pairs = task.generate(smollm2, 16, seed=0, filter_correct=True)
    print(f"capitals on SmolLM2: {pairs.info}")
    assert "the model gets" in caplog.text
    assert pairs.info["facts_kept"] >= 30 and pairs.info["facts_correct"] >= pairs.info["facts_kept"]
    clean_logits = _forward(smollm2, pairs.clean_tokens)
    # Independent check of the filter: the top-1 next token of every kept prompt is its capital.
    top = clean_logits[torch.arange(len(pairs)), pairs.positions["END"]].argmax(-1)  # per-prompt END (padded)
    assert [smollm2.tokenizer.decode([int(t)]) for t in top] == [" " + c for c in pairs.meta["capital"]]
    clean = task.metric(clean_logits, pairs)
    corrupt = task.metric(_forward(smollm2, pairs.corrupt_tokens), pairs)
    assert (clean > 0).all() and float(corrupt.mean()) < 0


def test_repeated_tokens_on_smollm2(smollm2):
    task = get_task("induction")
    pairs = task.generate(smollm2, 8, seed=0, seq_len=20)
    logits = _forward(smollm2, pairs.clean_tokens)
    first, repeat = task.half_losses(logits, pairs)
    print(f"repeated tokens on SmolLM2: first-half loss {first.mean():.2f}, repeat loss {repeat.mean():.2f}")
    # Random tokens cost ~log(vocab) ≈ 11–15 nats; once the repeat starts, induction copies them (the first few
    # repeated tokens are still being "recognised", so the repeat mean is a few nats, not ~0).
    assert float(repeat.mean()) < 0.5 * float(first.mean())
    assert (repeat < first - 3).all()
    per_position = task.per_position_loss(logits, pairs.clean_tokens).mean(0)
    assert float(per_position[-10:].mean()) < 0.3 * float(first.mean())
    clean = task.metric(logits, pairs)
    corrupt = task.metric(_forward(smollm2, pairs.corrupt_tokens), pairs)
    assert torch.allclose(clean, -repeat, atol=1e-4)
    assert float(clean.mean()) > float(corrupt.mean()) + 3


def test_greater_than_on_smollm2_digit_mode(smollm2):
    """SmolLM2 writes years digit by digit: prompts end at the century, the metric compares tens digits."""
    tok = smollm2.tokenizer
    digit = [tok(str(d), add_special_tokens=False)["input_ids"] for d in range(10)]
    assert all(len(ids) == 1 for ids in digit)
    digit = [ids[0] for ids in digit]
    task = get_task("greater_than")
    pairs = task.generate(smollm2, 8, seed=0)
    assert pairs.info["year_mode"] == "digit" and len(pairs) == 8
    end = pairs.positions["END"]
    for i in range(8):
        noun, yy = pairs.meta["noun"].iloc[i], int(pairs.meta["year"].iloc[i])
        assert 10 <= yy <= 89
        assert pairs.clean_texts[i] == f"The {noun} lasted from the year 17{yy:02d} to the year 17"
        assert pairs.corrupt_texts[i] == f"The {noun} lasted from the year 1701 to the year 17"
        length = int(pairs.lengths[i])
        assert torch.equal(smollm2.to_tokens(pairs.clean_texts[i])[0], pairs.clean_tokens[i, :length])
        assert torch.equal(smollm2.to_tokens(pairs.corrupt_texts[i])[0], pairs.corrupt_tokens[i, :length])
        at = int(pairs.positions["YY"][i])
        assert pairs.clean_tokens[i, at - 1:at + 2].tolist() == [digit[7], digit[yy // 10], digit[yy % 10]]
        assert pairs.corrupt_tokens[i, at:at + 2].tolist() == [digit[0], digit[1]]
        differ = (pairs.clean_tokens[i] != pairs.corrupt_tokens[i]).nonzero().flatten().tolist()
        assert differ == [at] + ([at + 1] if yy % 10 != 1 else [])
        assert int(pairs.positions["XX1"][i]) == at - 1 and int(end[i]) == length - 1
        assert tok.decode(pairs.clean_tokens[i, int(end[i]) - 1:int(end[i]) + 1].tolist()) == "17"
        noun_end = int(pairs.positions["noun"][i])
        assert tok.decode(pairs.clean_tokens[i, 1:noun_end + 1].tolist()) == f"The {noun}"
    logits = _forward(smollm2, pairs.clean_tokens)
    corrupt_logits = _forward(smollm2, pairs.corrupt_tokens)
    tens = [int(y) // 10 for y in pairs.meta["year"]]
    for lg in (logits, corrupt_logits):
        probs = torch.softmax(lg[torch.arange(8), end].double(), -1)  # plain softmax at each prompt's END
        manual = torch.stack([probs[i, digit[tens[i] + 1:]].sum() - probs[i, digit[:tens[i]]].sum() for i in range(8)])
        got = task.metric_at(lg[torch.arange(8), end][:, None], pairs)
        assert torch.allclose(got.double(), manual, atol=1e-5)
    clean, corrupt = task.metric(logits, pairs), task.metric(corrupt_logits, pairs)
    print(f"greater-than on SmolLM2 (digit mode): clean {clean.mean():.3f}, corrupt {corrupt.mean():.3f}")
    assert float(clean.mean()) > float(corrupt.mean())


def test_greater_than_rephrasing_on_smollm2(smollm2):
    """The held-out sentence frame of `REPHRASINGS` works digit by digit too."""
    task = get_task("greater_than")
    disc, held = rephrased_split(task, smollm2, 4, 4, seed=0)
    assert held.info["year_mode"] == disc.info["year_mode"] == "digit"
    for i in range(4):
        noun, yy = held.meta["noun"].iloc[i], int(held.meta["year"].iloc[i])
        assert held.clean_texts[i] == f"The {noun} began in the year 17{yy:02d} and ended in the year 17"
        length = int(held.lengths[i])
        assert torch.equal(smollm2.to_tokens(held.clean_texts[i])[0], held.clean_tokens[i, :length])
        at = int(held.positions["YY"][i])
        assert smollm2.tokenizer.decode(held.clean_tokens[i, at - 1:at + 2].tolist()) == f"7{yy:02d}"
