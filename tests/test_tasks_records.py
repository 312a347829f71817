"""Your own data: from_records / load_task on JSONL and CSV, per-prompt roles, metrics, and one clear
error per kind of bad row (file, row and field named)."""

import json

import pytest
import torch

from circuitlab.tasks import DataError, IOITask, from_records, get_task, load_task
from circuitlab.tasks.records import read_records
from tests.test_tasks_helpers import smollm2_tokenizer

ROWS = [
    {"clean": "When Mary and John went to the store, John gave a drink to",
     "corrupt": "When Alice and Bob went to the store, Carl gave a drink to", "answer": " Mary", "wrong": " John",
     "roles": {"IO": " Mary", "S2": {"text": " John", "occurrence": 2}}},
    {"clean": "Then Mary and John left. John thanked", "corrupt": "Then Alice and Bob left. Carl thanked",
     "answer": " Mary", "wrong": [" John"], "roles": {"IO": [5, 9], "S2": "John thanked"}},
    {"clean": "Mary met John. John called", "corrupt": "Alice met Bob. Carl called", "answer": " Mary",
     "wrong": " John", "roles": {"IO": "Mary", "S2": " John called"}, "meta": {"kind": "short"}},
]


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_records_give_padded_pairs_with_per_prompt_roles(tok):
    pairs = from_records(ROWS).generate(tok)
    lengths = pairs.lengths.tolist()
    assert len(set(lengths)) == 3 and pairs.seq_len == max(lengths)
    for i, row in enumerate(ROWS):
        ids = [tok.bos_token_id] + tok(row["clean"], add_special_tokens=False)["input_ids"]
        assert pairs.clean_tokens[i, :lengths[i]].tolist() == ids
        assert pairs.attention_mask[i].tolist() == [1] * lengths[i] + [0] * (pairs.seq_len - lengths[i])
        at = {r: tok.decode([ids[int(pairs.positions[r][i])]]) for r in pairs.roles}
        assert at["IO"].strip() == "Mary" and at["S2"] == " John" and int(pairs.positions["END"][i]) == lengths[i] - 1
    assert pairs.roles == ["IO", "S2", "END"] and pairs.meta.loc[2, "kind"] == "short"
    assert tok.decode(pairs.answer_ids[:, 0].tolist()) == " Mary Mary Mary"


def test_metrics_against_hand_computation(tok):
    pairs = from_records(ROWS).generate(tok)
    logits = torch.randn(2, len(pairs), pairs.seq_len, len(tok), generator=torch.Generator().manual_seed(0))
    mary, john = tok(" Mary")["input_ids"][0], tok(" John")["input_ids"][0]
    end = pairs.positions["END"]
    rows = torch.arange(len(pairs))
    at_end = logits[:, rows, end]  # [2, B, V]
    logit = from_records(ROWS).metric(logits, pairs)
    assert torch.allclose(logit, at_end[..., mary] - at_end[..., john])
    probs = torch.softmax(at_end, -1)
    prob = from_records(ROWS, metric="prob_diff").metric(logits, pairs)
    assert torch.allclose(prob, probs[..., mary] - probs[..., john])
    two = [dict(ROWS[0], answer=[" Mary", " Anna"], wrong=" John")]
    p2 = from_records(two).generate(tok)
    anna = tok(" Anna")["input_ids"][0]
    lg = logits[:, :1, :p2.seq_len]
    last = lg[:, 0, int(p2.positions["END"][0])]
    assert torch.allclose(from_records(two).metric(lg, p2)[:, 0], (last[:, mary] + last[:, anna]) / 2 - last[:, john])


def test_kl_metric_is_zero_on_clean_and_positive_divergence(tiny_model):
    rows = [{"clean_ids": [1, 2, 3, 4], "corrupt_ids": [1, 5, 3, 4], "positions": {}, "clean": "a", "corrupt": "b"},
            {"clean_ids": [1, 2, 3], "corrupt_ids": [1, 6, 3], "positions": {}, "clean": "c", "corrupt": "d"}]
    task = from_records(rows, metric="kl")
    pairs = task.generate(tiny_model)
    with torch.no_grad():
        clean = task.metric(tiny_model(pairs.clean_tokens), pairs)
        corrupt = task.metric(tiny_model(pairs.corrupt_tokens), pairs)
        single = task.metric(tiny_model(pairs.corrupt_tokens[1:, :3]), pairs.subset([1]))
    assert torch.allclose(clean, torch.zeros(2), atol=1e-5) and bool((corrupt < 0).all())
    assert torch.allclose(single, corrupt[1:], atol=1e-5)  # padding does not change the prompt's value


def test_jsonl_and_csv_files_and_run_output_are_inputs(tok, tmp_path):
    task = load_task(_write_jsonl(tmp_path / "pairs.jsonl", ROWS))
    pairs = task.generate(tok)
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("clean,corrupt,answer,wrong,role:IO,span:S2,kind\n"
                        f"\"{ROWS[0]['clean']}\",\"{ROWS[0]['corrupt']}\", Mary, John, Mary,37:42,a\n"
                        f"{ROWS[2]['clean']},{ROWS[2]['corrupt']}, Mary, John,Mary,14:19,b\n", encoding="utf-8")
    from_csv = get_task(str(csv_path)).generate(tok)
    assert torch.equal(from_csv.clean_tokens, pairs.subset([0, 2]).clean_tokens)
    assert torch.equal(from_csv.positions["S2"], pairs.positions["S2"][[0, 2]])
    assert list(from_csv.meta["kind"]) == ["a", "b"]
    # The pairs.jsonl a run writes (save_jsonl) reads back as a task giving the same pairs.
    ioi = IOITask().generate(tok, 6, seed=1)
    again = load_task(ioi.save_jsonl(tmp_path / "run" / "pairs.jsonl")).generate(tok)
    for name in ("clean_tokens", "corrupt_tokens", "answer_ids", "wrong_ids", "attention_mask"):
        assert torch.equal(getattr(again, name), getattr(ioi, name)), name
    assert all(torch.equal(again.positions[r], ioi.positions[r]) for r in ioi.roles)


BAD = {
    "missing_field": ([{k: v for k, v in ROWS[0].items() if k != "corrupt"}], "row 1, field 'corrupt'", "is missing"),
    "multi_token_answer": ([dict(ROWS[0]), dict(ROWS[1], answer=" Maryland Smithsonian")], "row 2, field 'answer'",
                           "needs one token"),
    "lengths_differ": ([dict(ROWS[0], corrupt="When Alice and Bob went to the store, Carl gave a drink to the")],
                       "row 1, field 'corrupt'", "same number of tokens"),
    "role_not_found": ([dict(ROWS[0], roles={"IO": " Zed"})], "row 1, field 'roles.IO'", "does not occur"),
    "not_json": (None, "row 2", "not valid JSON"),
    "not_utf8": (None, "row 2", "not valid UTF-8"),
    "empty": (None, "holds no rows", "add one row"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_names_file_row_and_field(case, tok, tmp_path):
    rows, where, what = BAD[case]
    path = tmp_path / "data.jsonl"
    if case == "not_json":
        path.write_text(json.dumps(ROWS[0]) + "\n{\"clean\": 'single quotes'}\n")
    elif case == "not_utf8":
        path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + json.dumps(ROWS[1]).encode()[:-2] + b"\xff\xfe\"}\n")
    elif case == "empty":
        path.write_text("\n\n")
    else:
        _write_jsonl(path, rows)
    with pytest.raises(DataError) as err:
        load_task(path).generate(tok)
    message = str(err.value)
    assert str(path) in message and where in message and what in message, message


CSV_HEAD = "clean,corrupt,answer,wrong\n"
CSV_OK = "Then Mary left. John thanked,Then Alice left. Carl thanked, Mary, John\n"


@pytest.mark.parametrize("body, where, what", [
    # the quote opens on line 3 and swallows the rest of the file: the error names line 3, not the file's end
    (CSV_OK + '"When Mary went, John gave,When Alice went, Carl gave, Mary, John\n' + CSV_OK + CSV_OK,
     "row 3:", "never closed (it runs to line 5)"),
    # a closed quoted cell spanning lines 3-4 and a blank line 5 are fine; the bad row is named by its own line 6
    (CSV_OK + '"When Mary went,\n John gave",When Alice went Carl gave, Mary, John\n\n'
     + "Mary met John. John called,, Mary, John\n", "row 6, field 'corrupt'", "non-empty text"),
])
def test_csv_errors_name_the_line_where_the_row_starts(tmp_path, body, where, what):
    path = tmp_path / "pairs.csv"
    path.write_text(CSV_HEAD + body, encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_records(path)
    assert where in str(err.value) and what in str(err.value), str(err.value)


def test_records_errors_in_python_name_the_row(tok):
    with pytest.raises(DataError, match=r"<records>, row 2, field 'answer'"):
        from_records([ROWS[0], {"clean": "a", "corrupt": "b", "wrong": " x", "roles": {"IO": "a", "S2": "a"}}])
    with pytest.raises(DataError, match="row 1, field 'metric'"):
        from_records([dict(ROWS[0], metric="accuracy")])
    with pytest.raises(DataError, match="row 2, field 'roles'"):
        from_records([ROWS[0], dict(ROWS[1], roles={"X": " Mary"})])
    with pytest.raises(ValueError, match="at most 3"):
        from_records(ROWS).generate(tok, 4)
