"""`circuitlab run` chooses its circuit by exact faithfulness and reports it on held-out pairs (tiny model)."""

import json

import pandas as pd
import pytest

from circuitlab.reports.cli import main
from circuitlab.reports.save import load_result
from tests.test_cli import FAST


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_reports_the_heldout_faithfulness_of_its_circuit(tiny_dir, tmp_path):
    out = tmp_path / "np"
    assert main(["run", "--model", tiny_dir, "--out", str(out), "--method", "node-pruning", "--mask-steps", "20",
                 "--faithfulness-target", "0.5", "--heldout-n", "5", "--stability-resamples", "2", "--quiet",
                 "--no-roles", "--resid-positions", "none", *FAST]) == 0
    record = json.loads((out / "run.json").read_text())
    summary = record["circuit_faithfulness"]
    assert record["config"]["method"] == "eap-ig" and record["config"]["circuit_method"] == "node-pruning"
    assert summary["method"] == "node-pruning" and summary["n_heldout"] == 5 and summary["n_discovery"] == 6
    lo, hi = summary["heldout_ci"]
    assert lo <= summary["heldout"] <= hi
    heldout, pairs = _lines(out / "heldout_pairs.jsonl"), _lines(out / "pairs.jsonl")
    assert len(heldout) == 5 and not {p["clean_text"] for p in heldout} & {p["clean_text"] for p in pairs}
    graph_nodes = {n["id"] for n in json.loads((out / "circuit.json").read_text())["nodes"]}
    assert set(summary["items"]) <= graph_nodes and len(summary["items"]) == summary["sizes"]["heads"]
    report = (out / "report.md").read_text()
    assert f"Held-out faithfulness {summary['heldout']:.3f}" in report
    assert "Stability" in report and (out / "stability.csv").is_file() and (out / "faithful_curve.csv").is_file()
    assert (out / "figures" / "circuit_size.png").is_file()
    assert "--circuit-method node-pruning" in record["command"]
    stability = pd.read_csv(out / "stability.csv")
    assert stability["frequency"].between(0, 1).all() and set(summary["items"]) <= set(stability["item"])

    # round trip: the saved result reads back whole, and re-rendering states the same numbers
    result = load_result(out)
    assert result.faithful.to_dict() == summary and result.faithful.sizes.heads == summary["sizes"]["heads"]
    assert result.heldout_pairs.clean_texts == [p["clean_text"] for p in heldout]
    for name in ("faithful_curve", "faithful_ranking", "stability"):
        assert getattr(result, name) is not None and len(getattr(result, name)) > 0, name
    pd.testing.assert_frame_equal(result.faithful_curve.reset_index(drop=True),
                                  pd.read_parquet(out / "tables" / "faithful_curve.parquet"))
    assert main(["report", str(out)]) == 0
    assert f"Held-out faithfulness {summary['heldout']:.3f}" in (out / "report.md").read_text()


def test_default_run_chooses_its_circuit_by_faithfulness(tiny_dir, tmp_path):
    """Default options: the smallest faithful prefix of the run's EAP-IG ranking; the curve holds the baseline ranking too; the
    circuit's heads all have scores clear of zero; a forced size keeps the forced circuit and still reports."""
    out = tmp_path / "default"
    assert main(["run", "--model", tiny_dir, "--out", str(out), "--quiet", "--no-roles", "--resid-positions", "none",
                 "--heldout-n", "4", *FAST]) == 0
    record = json.loads((out / "run.json").read_text())
    summary = record["circuit_faithfulness"]
    assert summary["method"] == "eap-ig" and "eap-ig" in summary["ranking"]
    assert record["circuit"] == summary["sizes"]  # run.json's circuit size is the circuit stage's, not the drawing's
    assert summary["sizes"]["heads"] == len(summary["items"])
    ranking = pd.read_parquet(out / "tables" / "faithful_ranking.parquet").set_index("item")["score"]
    assert all(abs(ranking[i]) > 0 for i in summary["items"])
    curve = pd.read_csv(out / "faithful_curve.csv")
    assert curve["ranking"].str.contains("single exact effect").any() and summary["baseline"]["heads"] >= 1
    if summary["reached"]:
        assert summary["discovery"] >= summary["target"]
    assert "Baseline, top-k heads by single exact effect" in (out / "report.md").read_text()
    # a memory budget that allows only small prompt batches: the circuit stage evaluates batch by batch (it says
    # so) and finds the same circuit with the same faithfulness as one batch of every prompt
    small = tmp_path / "small"
    assert main(["run", "--model", tiny_dir, "--out", str(small), "--quiet", "--no-roles", "--resid-positions", "none",
                 "--heldout-n", "4", "--memory-budget", "1", *FAST]) == 0
    batched = json.loads((small / "run.json").read_text())["circuit_faithfulness"]
    assert "evaluated in prompt batches of <= " in batched["notes"] and "prompt batches" not in summary["notes"]
    assert batched["items"] == summary["items"] and batched["baseline"]["heads"] == summary["baseline"]["heads"]
    for key in ("discovery", "heldout"):
        assert batched[key] == pytest.approx(summary[key], abs=1e-5)
        assert batched[key + "_ci"] == pytest.approx(summary[key + "_ci"], abs=1e-5)
    forced = tmp_path / "forced"
    assert main(["run", "--model", tiny_dir, "--out", str(forced), "--quiet", "--no-roles", "--resid-positions", "none",
                 "--heldout-n", "4", "--top-fraction", "0.5", *FAST]) == 0
    text = (forced / "report.md").read_text()
    assert "The size was forced" in text and "Held-out faithfulness" in text
    drawn = json.loads((forced / "circuit.json").read_text())  # a forced size: the selected graph is the circuit
    heads = sum(n["id"].startswith("a") for n in drawn["nodes"])
    assert json.loads((forced / "run.json").read_text())["circuit"]["heads"] == heads > 0


@pytest.mark.parametrize("args, message", [(["--faithfulness-target", "1.5"], "faithfulness-target"),
                                           (["--circuit-method", "magic"], "circuit-method"),
                                           (["--heldout-n", "1"], "heldout-n")])
def test_bad_faithful_options_are_refused(tmp_path, capsys, args, message):
    assert main(["run", "--out", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()
