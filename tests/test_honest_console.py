"""The console tells the truth (issue 26): held-out only when it is, one circuit size, valid JSON files."""

import json

import numpy as np
import pandas as pd
import pytest

from circuitlab.graphs.circuit import add_node, evidence_json, new_circuit
from circuitlab.graphs.roles import assign_roles
from circuitlab.reports.cli import main

FAST = ["--n-boot", "20", "--percents", "10,100", "--oracle-edges", "10", "--resid-positions", "none",
        "--no-roles", "--steps", "2", "--method", "eap"]


def _rows(n, nan_meta=False):
    rows = []
    for i in range(n):
        clean = [(3 * i + 7 * k + 1) % 64 for k in range(6 + i % 2)]
        corrupt = list(clean)
        corrupt[2] = (clean[2] + 17) % 64
        meta = {"weight": float("nan") if nan_meta and i == 0 else 1.0 + i}
        rows.append({"clean_ids": clean, "corrupt_ids": corrupt, "answer_ids": [(5 * i + 3) % 64],
                     "wrong_ids": [(5 * i + 11) % 64], "meta": meta})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json.dumps writes NaN for the test's NaN
    return str(path)


def _strict(line):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(line, parse_constant=refuse)


def test_small_file_is_not_called_held_out_and_sizes_agree(tiny_dir, tmp_path, capsys):
    data = _write(tmp_path / "rows.jsonl", _rows(3, nan_meta=True))
    out = tmp_path / "run"
    assert main(["run", "--task", data, "--model", tiny_dir, "--out", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert "not held out: the file has 3 rows" in text and "--heldout-n" in text, text
    assert "(held-out)" not in text and "held-out faithfulness" not in text, text
    sizes = [line for line in text.splitlines() if "circuit" in line and "edges" in line]
    summary = json.loads((out / "run.json").read_text())["circuit_faithfulness"]["sizes"]
    expected = f"{summary['heads']} heads, {summary['mlps']} MLPs, {summary['edges']} edges"
    assert sizes and all(expected in line for line in sizes), (sizes, expected)
    for name in ("pairs.jsonl", "heldout_pairs.jsonl"):
        for line in (out / name).read_text().splitlines():
            _strict(line)  # null, never a bare NaN
    _strict((out / "run.json").read_text())


def test_one_row_file_refuses_before_any_work(tiny_dir, tmp_path, capsys):
    data = _write(tmp_path / "one.jsonl", _rows(1))
    out = tmp_path / "run"
    assert main(["run", "--task", data, "--model", tiny_dir, "--out", str(out), *FAST, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--heldout-n" in err and "1" in err, err
    assert not out.exists() and not (tmp_path / ".run.staging").exists()


@pytest.mark.parametrize("command", ["path", "patch"])
def test_top_list_ranks_by_distance_from_no_effect_in_the_run_direction(tiny_dir, tmp_path, capsys, command):
    """Noising leaves an unimportant component at effect 1 (the clean run): the list must start with the
    component farthest from 1, not with the effects nearest 1."""
    import pandas as pd

    out = tmp_path / command
    extra = ["--channel", "logits"] if command == "path" else ["--component", "head"]
    assert main([command, "--model", tiny_dir, "--task", "repeated_tokens", "--n", "4", "--out", str(out),
                 "--direction", "noise", *extra]) == 0
    text = capsys.readouterr().out
    frame = pd.read_csv(out / "scores.csv")
    far = frame.loc[(frame["effect"] - 1.0).abs().idxmax()]
    near = frame.loc[(frame["effect"] - 1.0).abs().idxmin()]
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if "effect" in line and "distance" in line)
    assert f"{far['effect']:.6f}"[:6] in lines[header + 2], (lines[header:header + 4], far)
    if len(frame) > 10:
        assert all(f"{near['effect']:.6f}"[:7] not in line for line in lines[header + 2:header + 12])


def test_scores_csv_never_writes_minus_one_for_all_positions(tiny_dir, tmp_path):
    """-1 as an input means each prompt's last token; "all positions" (and per-prompt roles) are written empty."""
    import csv

    rows = {}
    for spec in ("all", "END", "-1"):
        out = tmp_path / spec
        assert main(["patch", "--model", tiny_dir, "--task", "repeated_tokens", "--n", "4", "--out", str(out),
                     "--positions", spec, "--quiet"]) == 0
        with open(out / "scores.csv", newline="") as handle:
            rows[spec] = list(csv.DictReader(handle))
    assert {r["position"] for r in rows["all"]} == {""} and {r["role"] for r in rows["all"]} == {""}
    assert {r["position"] for r in rows["END"]} == {""} and {r["role"] for r in rows["END"]} == {"END"}
    assert {r["position"] for r in rows["-1"]} == {"-1"}


def _strict(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def test_node_evidence_is_strict_json_with_null_for_nan():
    """A role whose score or evidence holds NaN (a numpy float32 from a detector, a user's role table) is written
    into the node's `evidence` as `null`, never a bare `NaN` that JSON readers reject."""
    graph = new_circuit("c", "eap", 2)
    add_node(graph, "a1.h0", score=0.5, evidence=json.dumps({"method": "eap"}))
    roles = pd.DataFrame([{"layer": 1, "head": 0, "role": "name_mover", "score": 0.8, "threshold": float("nan"),
                           "evidence": json.dumps({"copy": 1.0})}])
    evidence = _strict(assign_roles(graph, roles).nodes["a1.h0"]["evidence"])
    assert evidence["roles"]["name_mover"] == {"score": 0.8, "threshold": None, "evidence": {"copy": 1.0}}
    assert _strict(evidence_json({"x": np.float32("nan"), "y": [float("inf"), np.float64(2.0)]})) == \
        {"x": None, "y": [None, 2.0]}
