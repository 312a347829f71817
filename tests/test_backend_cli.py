"""`--backend auto|fast|hook` and `--positions -1` from the command line, on a tiny GPT-J (HF-backed bridge, where
TransformerLens 4.3 discards edits of `attn.hook_pattern`) with prompts of three token lengths."""

import json

import pandas as pd
import pytest

from circuitlab.reports.cli import main
from tests.hf_tiny import build_tiny


@pytest.fixture(scope="module")
def gptj_dir(tmp_path_factory):
    return str(build_tiny("gptj", tmp_path_factory.mktemp("gptj") / "model"))


def _rows():
    """Token-id rows of lengths 5, 9 and 7 (corrupt differs at positions 1-2)."""
    rows = []
    for i, length in enumerate((5, 9, 7)):
        clean = [(37 * i + 11 * k + 3) % 500 for k in range(length)]
        corrupt = list(clean)
        corrupt[1], corrupt[2] = (clean[1] + 101) % 500, (clean[2] + 211) % 500
        rows.append({"clean_ids": clean, "corrupt_ids": corrupt, "answer_ids": [(13 * i + 5) % 500],
                     "wrong_ids": [(13 * i + 77) % 500], "positions": {"X": 2}})
    return rows


def _data(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _patch(model, data, out, *extra):
    return main(["patch", "--task", data, "--model", model, "--out", str(out), "--quiet", *extra])


def test_pattern_on_gptj_fast_runs_hook_refuses(gptj_dir, tmp_path, capsys):
    data = _data(tmp_path / "rows.jsonl", _rows())
    args = ("--component", "pattern", "--positions", "-1")
    assert _patch(gptj_dir, data, tmp_path / "fast", *args, "--backend", "fast") == 0
    record = json.loads((tmp_path / "fast" / "run.json").read_text())
    assert record["engine"]["backend"] == "fast" and record["engine"]["requested"] == "fast"
    capsys.readouterr()
    assert _patch(gptj_dir, data, tmp_path / "hook", *args, "--backend", "hook") == 1
    err = capsys.readouterr().err
    assert "GPTJForCausalLM" in err and "--backend fast" in err and "hook_pattern" in err, err
    assert not (tmp_path / "hook").exists()
    assert _patch(gptj_dir, data, tmp_path / "bad", *args, "--backend", "fastest") == 2
    assert "--backend 'fastest' is unknown" in capsys.readouterr().err


def test_negative_position_equals_per_prompt_runs_on_both_backends(gptj_dir, tmp_path):
    rows = _rows()
    alone = []
    for i, row in enumerate(rows):
        assert _patch(gptj_dir, _data(tmp_path / f"row{i}.jsonl", [row]), tmp_path / f"alone{i}",
                      "--component", "z", "--positions", "-1", "--backend", "fast") == 0
        alone.append(pd.read_csv(tmp_path / f"alone{i}" / "scores.csv")["metric"].to_numpy())
    expected = sum(alone) / len(alone)
    data = _data(tmp_path / "rows.jsonl", rows)
    for backend in ("fast", "hook"):
        assert _patch(gptj_dir, data, tmp_path / backend, "--component", "z", "--positions", "-1",
                      "--backend", backend) == 0
        frame = pd.read_csv(tmp_path / backend / "scores.csv")
        assert (frame["position"] == -1).all()
        assert abs(frame["metric"].to_numpy() - expected).max() <= 1e-4 * max(1.0, abs(expected).max()), backend
        assert json.loads((tmp_path / backend / "run.json").read_text())["engine"]["backend"] == backend
