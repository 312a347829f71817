"""PromptPairs: JSONL round trips, subsets, validation, and errors that name the misaligned texts."""

import json
import math

import pandas as pd
import pytest
import torch

from circuitlab.tasks import IOITask, PromptPairs, get_task
from circuitlab.tasks.base import check_aligned
from tests.test_tasks_helpers import gpt2_style_tokenizer, smollm2_tokenizer


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


# -------------------------------------------------------------------------------------- PromptPairs
@pytest.mark.parametrize("name", ["ioi", "capitals", "repeated_tokens", "greater_than"])
def test_jsonl_round_trip_is_exact(name, tok, tmp_path):
    source = gpt2_style_tokenizer() if name == "greater_than" else tok
    pairs = get_task(name).generate(source, 7, seed=5)
    path = pairs.save_jsonl(tmp_path / f"{name}.jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == 7
    first = json.loads(lines[0])
    for key in ("clean_text", "corrupt_text", "clean_ids", "corrupt_ids", "answer_ids", "wrong_ids", "positions"):
        assert key in first
    assert first["positions"] == {r: int(pairs.positions[r][0]) for r in pairs.roles}
    again = PromptPairs.load_jsonl(path)
    _assert_pairs_equal(pairs, again)


def _assert_pairs_equal(a, b):
    assert a.task == b.task and a.clean_texts == b.clean_texts and a.corrupt_texts == b.corrupt_texts
    for field in ("clean_tokens", "corrupt_tokens", "answer_ids", "wrong_ids"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.roles == b.roles and all(torch.equal(a.positions[r], b.positions[r]) for r in a.roles)
    pd.testing.assert_frame_equal(a.meta, b.meta)
    assert a.info == b.info and (a.attention_mask is None) == (b.attention_mask is None)


def test_jsonl_round_trip_with_odd_meta_and_mask(tmp_path):
    pairs = PromptPairs(task="x", clean_tokens=torch.tensor([[1, 2, 3], [1, 4, 5]]),
                        corrupt_tokens=torch.tensor([[1, 2, 9], [1, 4, 8]]), answer_ids=torch.tensor([[3], [5]]),
                        wrong_ids=torch.tensor([[9], [8]]), positions={"END": torch.tensor([2, 2])},
                        clean_texts=["a \"b\"\n", "ü"], corrupt_texts=["c", "d"],
                        meta=pd.DataFrame({"f": [0.1, math.pi], "i": [1, 2], "s": ["x", "y"], "b": [True, False]}),
                        attention_mask=torch.ones(2, 3, dtype=torch.long), info={"k": [1, 2]})
    again = PromptPairs.load_jsonl(pairs.save_jsonl(tmp_path / "p.jsonl"))
    _assert_pairs_equal(pairs, again)
    assert torch.equal(again.attention_mask, pairs.attention_mask)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        PromptPairs.load_jsonl(tmp_path / "bad.jsonl")


def test_subset_and_to(tok):
    pairs = IOITask().generate(tok, 8, seed=0)
    sub = pairs.subset([5, 1])
    assert len(sub) == 2 and sub.clean_texts == [pairs.clean_texts[5], pairs.clean_texts[1]]
    assert torch.equal(sub.clean_tokens, pairs.clean_tokens[[5, 1]])
    assert sub.meta["IO"].tolist() == pairs.meta["IO"].iloc[[5, 1]].tolist() and list(sub.meta.index) == [0, 1]
    assert torch.equal(sub.positions["S2"], pairs.positions["S2"][[5, 1]])
    assert len(pairs.subset(slice(0, 3))) == 3 and len(pairs.subset(3)) == 1
    mask = torch.zeros(8, dtype=torch.bool)
    mask[[0, 7]] = True
    assert pairs.subset(mask).clean_texts == [pairs.clean_texts[0], pairs.clean_texts[7]]
    with pytest.raises(IndexError):
        pairs.subset([8])
    moved = pairs.to("cpu")
    assert moved.clean_tokens.device.type == "cpu" and torch.equal(moved.answer_ids, pairs.answer_ids)
    assert "n=8" in repr(pairs)


def test_prompt_pairs_validation():
    good = dict(task="x", clean_tokens=torch.zeros(2, 3, dtype=torch.long), corrupt_tokens=torch.zeros(2, 3, dtype=torch.long),
                answer_ids=torch.zeros(2, 1, dtype=torch.long), wrong_ids=torch.zeros(2, 1, dtype=torch.long),
                positions={"END": torch.tensor([2, 2])}, clean_texts=["a", "b"], corrupt_texts=["c", "d"],
                meta=pd.DataFrame(index=range(2)))
    PromptPairs(**good)
    with pytest.raises(ValueError, match="identical shapes"):
        PromptPairs(**{**good, "corrupt_tokens": torch.zeros(2, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="outside"):
        PromptPairs(**{**good, "positions": {"END": torch.tensor([2, 3])}})
    with pytest.raises(ValueError, match="answer_ids"):
        PromptPairs(**{**good, "answer_ids": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(TypeError, match="integer"):
        PromptPairs(**{**good, "clean_tokens": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="one row per pair"):
        PromptPairs(**{**good, "meta": pd.DataFrame(index=range(3))})


def test_check_aligned_names_the_texts():
    with pytest.raises(ValueError) as err:
        check_aligned([[1, 2, 3]], [[1, 2]], ["the clean one"], ["the corrupt one"])
    assert "the clean one" in str(err.value) and "the corrupt one" in str(err.value)
