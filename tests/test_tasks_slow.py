"""Acceptance numbers of the task library on SmolLM2-135M (slow: real model)."""

import logging

import pytest
import torch

from circuitlab.patching.normalize import normalize
from circuitlab.tasks import TaskUnsupportedError, get_task

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


def test_greater_than_says_smollm2_cannot(smollm2):
    with pytest.raises(TaskUnsupportedError, match="digit"):
        get_task("greater_than").generate(smollm2, 8)
