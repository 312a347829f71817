"""Counterfactual files and the causal models' datasets: parsing, per-side roles, one-line errors, round trip."""

from __future__ import annotations

import json

import pytest

from circuitlab.tasks import TaskUnsupportedError
from circuitlab.tasks.causal import causal_model
from circuitlab.tasks.counterfactual import read_counterfactuals
from circuitlab.tasks.records import DataError
from tests.hf_tiny import smollm2_tokenizer
from tests.test_tasks_helpers import gpt2_style_tokenizer, odd_year_tokenizer


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROW = {"base": "When Mary and John went to the store, John gave a drink to",
       "source": "When Anna and John went to the store, John gave a drink to", "expected": " Anna",
       "base_answer": " Mary", "variable": "io", "roles": {"IO": {"base": " Mary", "source": " Anna"}},
       "meta": {"k": 1}}


def test_file_roles_resolve_per_side(tmp_path, tok):
    other = dict(ROW, source="Then John and Anna talked. John gave a drink to", roles={"IO": " Anna"})
    # each side finds its own role text: a role that is absent on one side is an error naming that side
    with pytest.raises(DataError, match=r"row 1, field 'roles.IO': ' Anna' does not occur in the base text"):
        read_counterfactuals(_write(tmp_path / "a.jsonl", [other]), tok)
    row = dict(ROW, source="Then John and Mary sat. John gave a drink to", expected=" Mary", base_answer=" Mary",
               roles={"IO": " Mary"})
    cf = read_counterfactuals(_write(tmp_path / "b.jsonl", [ROW, row]), tok)
    ids = tok(" Mary", add_special_tokens=False)["input_ids"]
    assert int(cf.base_tokens[0, int(cf.base_positions["IO"][0])]) == ids[0]
    assert int(cf.source_tokens[1, int(cf.source_positions["IO"][1])]) == ids[0]
    assert int(cf.source_positions["IO"][1]) != int(cf.base_positions["IO"][1])
    assert cf.source_mask is not None  # the second source is shorter: right-padded, END per prompt
    assert int(cf.source_positions["END"][1]) == int(cf.source_mask[1].sum()) - 1


@pytest.mark.parametrize("change, message", [
    ({"expected": " Mxyzptlk"}, "field 'expected': ' Mxyzptlk' is"),
    ({"expected": None}, "field 'expected': is missing"),
    ({"variable": ""}, "field 'variable'"),
    ({"base": ""}, "field 'base': must be a non-empty text"),
    ({"roles": {"IO": " Zed"}}, "' Zed' does not occur"),
    ({"roles": {"END": " to"}}, "END is always each prompt's last token"),
])
def test_bad_rows_get_one_line_errors(tmp_path, tok, change, message):
    path = _write(tmp_path / "bad.jsonl", [ROW, dict(ROW, **change)])
    with pytest.raises(DataError, match=message) as info:
        read_counterfactuals(path, tok)
    assert "row 2" in str(info.value) and "\n" not in str(info.value)


def test_csv_and_saved_file_round_trip(tmp_path, tok):
    csv = tmp_path / "cf.csv"
    csv.write_text("base,source,expected,variable,role:S2,template\n"
                   f"\"{ROW['base']}\",\"{ROW['source']}\", Anna,io, John,t1\n", encoding="utf-8")
    cf = read_counterfactuals(csv, tok)
    assert cf.variable == "io" and cf.meta["template"].iloc[0] == "t1"
    built = causal_model("ioi").counterfactuals(tok, "order", 6, seed=2).with_split(0.5, seed=0)
    saved = built.save_jsonl(tmp_path / "counterfactuals.jsonl")
    again = read_counterfactuals(saved, tok)
    assert again.split == built.split
    assert (again.base_tokens == built.base_tokens).all() and (again.source_tokens == built.source_tokens).all()
    for role in built.roles:
        assert (again.base_positions[role] == built.base_positions[role]).all()
        assert (again.source_positions[role] == built.source_positions[role]).all()
    assert (again.expected_ids == built.expected_ids).all()


def test_causal_models_answers(tok):
    """Each causal model's expected token follows from the source's value of the variable."""
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    cf = causal_model("ioi").counterfactuals(tok, "io", 4, seed=0)
    for i in range(4):  # io: the source's IO name, found at the source's IO position
        assert int(cf.expected_ids[i, 0]) == int(cf.source_tokens[i, int(cf.source_positions["IO"][i])])
    cf = causal_model("ioi").counterfactuals(tok, "s", 4, seed=0)
    for i in range(4):  # s: the base's subject (the other first mention becomes the repeated one)
        assert int(cf.expected_ids[i, 0]) == int(cf.base_tokens[i, int(cf.base_positions["S1"][i])])
        assert cf.meta["expected"].iloc[i] == cf.meta["base_s"].iloc[i]
    cf = causal_model("capitals").counterfactuals(tok, "country", 4, seed=0)
    assert all(int(cf.expected_ids[i, 0]) == enc(" " + k) for i, k in enumerate(
        dict(__import__("circuitlab.tasks.data", fromlist=["CAPITALS"]).CAPITALS)[c]
        for c in cf.meta["source_country"]))
    cf = causal_model("repeated_tokens").counterfactuals(tok, "next", 4, seed=0)
    for i in range(4):  # next: the source's token after the earlier occurrence
        assert int(cf.expected_ids[i, 0]) == int(cf.source_tokens[i, int(cf.source_positions["next"][i])])
    with pytest.raises(ValueError, match="has no variable 'xyz'"):
        causal_model("ioi").counterfactuals(tok, "xyz", 2)


def test_greater_than_year(tok):
    """year: the expected set is every two-digit year above the source's YY (GPT-2 style), or every tens digit above
    its tens digit (SmolLM2, digit by digit); tokenizers of neither kind are refused."""
    with pytest.raises(TaskUnsupportedError, match="two tokenizations"):
        causal_model("greater_than").counterfactuals(odd_year_tokenizer(), "year", 2)
    digit = [tok(str(d), add_special_tokens=False)["input_ids"][0] for d in range(10)]
    cf = causal_model("greater_than").counterfactuals(tok, "year", 6, seed=0)
    for i in range(6):
        yb, ys = int(cf.meta["base_year"].iloc[i]), int(cf.meta["source_year"].iloc[i])
        assert 10 <= min(yb, ys) and max(yb, ys) <= 89 and yb // 10 != ys // 10
        assert cf.source_texts[i].endswith(f"from the year 17{ys:02d} to the year 17")
        assert [t for t in cf.expected_ids[i].tolist() if t >= 0] == digit[ys // 10 + 1:]
        assert [t for t in cf.base_answer_ids[i].tolist() if t >= 0] == digit[yb // 10 + 1:]
        at = int(cf.source_positions["YY"][i])
        assert cf.source_tokens[i, at - 1:at + 2].tolist() == [digit[7], digit[ys // 10], digit[ys % 10]]
    gt = gpt2_style_tokenizer()
    cf = causal_model("greater_than").counterfactuals(gt, "year", 4, seed=0)
    for i in range(4):
        yy = int(cf.meta["source_year"].iloc[i])
        expected = [t for t in cf.expected_ids[i].tolist() if t >= 0]
        assert len(expected) == 99 - yy  # years yy+1 .. 99
        assert int(cf.source_tokens[i, int(cf.source_positions["YY"][i])]) not in expected
