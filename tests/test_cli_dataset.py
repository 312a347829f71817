"""`circuitlab run --task FILE`: a dataset of prompts of several token lengths end to end, the run's own
pairs.jsonl as input again, and bad data failing with one error, a non-zero exit and `--out` untouched."""

import json

import pandas as pd
import pytest

from circuitlab.reports.cli import main

FAST = ["--n-boot", "20", "--percents", "10,100", "--oracle-edges", "10", "--resid-positions", "none",
        "--no-roles", "--steps", "2", "--quiet"]


def _rows():
    """Token-id rows (the tiny model has no tokenizer) of lengths 5, 7 and 9; corrupt differs at position 2."""
    rows = []
    for i, length in enumerate((5, 7, 9, 7, 5, 9)):
        clean = [(3 * i + 7 * k + 1) % 64 for k in range(length)]
        corrupt = list(clean)
        corrupt[2] = (clean[2] + 17) % 64
        rows.append({"clean_ids": clean, "corrupt_ids": corrupt, "answer_ids": [(5 * i + 3) % 64],
                     "wrong_ids": [(5 * i + 11) % 64], "positions": {"X": 2}, "meta": {"length": length}})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dataset_of_three_lengths_runs_end_to_end_and_reruns_from_its_pairs(tiny_dir, tmp_path):
    data = _write(tmp_path / "mine.jsonl", _rows())
    out = tmp_path / "run"
    assert main(["run", "--task", str(data), "--model", tiny_dir, "--out", str(out), "--method", "eap", *FAST]) == 0
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 6  # every row (no --n given)
    assert sorted({sum(p["attention_mask"]) for p in pairs}) == [5, 7, 9]
    assert [p["positions"]["END"] for p in pairs] == [4, 6, 8, 6, 4, 8] and all(p["positions"]["X"] == 2 for p in pairs)
    record = json.loads((out / "run.json").read_text())
    assert record["n_pairs"] == 6
    # The pairs.jsonl the run wrote is a valid input and gives the same baseline.
    again = tmp_path / "again"
    assert main(["run", "--task", str(out / "pairs.jsonl"), "--model", tiny_dir, "--out", str(again), "--method",
                 "eap", *FAST]) == 0
    first, second = (json.loads((d / "run.json").read_text())["metrics"] for d in (out, again))
    assert first["clean"] == pytest.approx(second["clean"], abs=1e-6)
    assert first["corrupt"] == pytest.approx(second["corrupt"], abs=1e-6)
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert len(scores[scores["component"] == "edge"]) > 100
    # Batches of 2 prompts (each trimmed to its longest) give the one-batch numbers.
    small = tmp_path / "small"
    assert main(["run", "--task", str(data), "--model", tiny_dir, "--out", str(small), "--method", "eap",
                 "--batch-size", "2", "--positions", "X,END", *FAST]) == 0
    big = tmp_path / "big"
    assert main(["run", "--task", str(data), "--model", tiny_dir, "--out", str(big), "--method", "eap",
                 "--positions", "X,END", *FAST]) == 0
    a, b = (pd.read_csv(d / "scores.csv", keep_default_na=False) for d in (small, big))
    assert list(a["edge"]) == list(b["edge"]) and list(a["method"]) == list(b["method"])
    for column in ("score", "effect", "metric"):
        x, y = a[column].replace("", "nan").astype(float), b[column].replace("", "nan").astype(float)
        assert ((x - y).abs().fillna(0) <= 1e-5 * (1 + y.abs().fillna(0))).all(), column
    fa, fb = (json.loads((d / "run.json").read_text())["faithfulness"] for d in (small, big))
    assert fa["cpr"] == pytest.approx(fb["cpr"], abs=1e-5) and fa["cmd"] == pytest.approx(fb["cmd"], abs=1e-5)


CASES = {
    "missing field": (lambda r: [dict(r[0]), {k: v for k, v in r[1].items() if k != "answer_ids"}], "row 2",
                      "'answer'"),
    "lengths differ": (lambda r: [dict(r[0], corrupt_ids=r[0]["corrupt_ids"] + [1])], "row 1", "'corrupt'"),
    "token out of vocabulary": (lambda r: [dict(r[0], answer_ids=[999])], "row 1", "'answer'"),
    "empty file": (lambda r: [], "holds no rows", ""),
    "not JSON": (None, "row 2", "not valid JSON"),
    "invalid UTF-8": (None, "row 1", "UTF-8"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_dataset_fails_cleanly_and_leaves_out_untouched(case, tiny_dir, tmp_path, capsys):
    make, where, what = CASES[case]
    path = tmp_path / "bad.jsonl"
    if case == "not JSON":
        path.write_text(json.dumps(_rows()[0]) + "\n[1, 2\n")
    elif case == "invalid UTF-8":
        path.write_bytes(b'{"clean": "caf\xe9", "corrupt": "x", "answer": " a", "wrong": " b"}\n')
    else:
        _write(path, make(_rows()))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    code = main(["run", "--task", str(path), "--model", tiny_dir, "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert code != 0 and err.count("error:") == 1 and str(path) in err and where in err and what in err, err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "earlier results"
    fresh = tmp_path / "fresh"
    assert main(["run", "--task", str(path), "--model", tiny_dir, "--out", str(fresh), *FAST]) != 0
    assert not fresh.exists()


def test_kl_metric_dataset_runs(tiny_dir, tmp_path):
    rows = [dict(r, metric="kl") for r in _rows()]
    for r in rows:
        r.pop("answer_ids"), r.pop("wrong_ids")
    out = tmp_path / "kl"
    assert main(["run", "--task", str(_write(tmp_path / "kl.jsonl", rows)), "--model", tiny_dir, "--out", str(out),
                 "--method", "eap", "--batch-size", "4", *FAST, "--positions", "none"]) == 0
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    assert metrics["clean"] == pytest.approx(0.0, abs=1e-5) and metrics["corrupt"] < 0  # minus KL from clean
    # --positions none skips exact patching (the slowest stage): no activation rows, and the report says so
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert "activation" not in set(scores["method"]) and "eap" in set(scores["method"])
    assert "skipped in this run (--positions none)" in (out / "report.md").read_text()


def test_patch_subcommand_takes_a_dataset(tiny_dir, tmp_path):
    data = _write(tmp_path / "mine.jsonl", _rows())
    out = tmp_path / "patch"
    assert main(["patch", "--task", str(data), "--model", tiny_dir, "--component", "head", "--positions", "X",
                 "--out", str(out), "--quiet"]) == 0
    assert len((out / "pairs.jsonl").read_text().splitlines()) == 6
    bad = _write(tmp_path / "bad.jsonl", [dict(_rows()[0], corrupt_ids=[1, 2])])
    assert main(["patch", "--task", str(bad), "--model", tiny_dir, "--out", str(tmp_path / "nope"), "--quiet"]) != 0
    assert not (tmp_path / "nope").exists()
