"""`circuitlab run` chooses its circuit by exact faithfulness and reports it on held-out pairs (tiny model)."""

import json

from circuitlab.reports.cli import main
from tests.test_cli import FAST, tiny_dir  # noqa: F401  (fixture)


def test_run_reports_the_heldout_faithfulness_of_its_circuit(tiny_dir, tmp_path):  # noqa: F811
    out = tmp_path / "np"
    assert main(["run", "--model", tiny_dir, "--out", str(out), "--method", "node-pruning", "--mask-steps", "20",
                 "--faithfulness-target", "0.5", "--heldout-n", "5", "--stability-resamples", "2", "--quiet",
                 "--no-roles", "--resid-positions", "none", *FAST]) == 0
    record = json.loads((out / "run.json").read_text())
    summary = record["circuit_faithfulness"]
    assert record["config"]["method"] == "eap-ig" and record["config"]["circuit_method"] == "node-pruning"
    assert summary["method"] == "node-pruning" and summary["n_heldout"] == 5 and summary["n_discovery"] == 6
    assert summary["heldout_ci"][0] <= summary["heldout"] <= summary["heldout_ci"][1] or summary["heldout_ci"][0] != summary["heldout_ci"][0]
    heldout = [json.loads(line) for line in (out / "heldout_pairs.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(heldout) == 5 and not {p["clean_text"] for p in heldout} & {p["clean_text"] for p in pairs}
    graph_nodes = {n["id"] for n in json.loads((out / "circuit.json").read_text())["nodes"]}
    assert set(summary["items"]) <= graph_nodes | {"input", "logits"}
    report = (out / "report.md").read_text()
    assert f"Held-out faithfulness {summary['heldout']:.3f}" in report
    assert "Stability" in report and (out / "stability.csv").is_file() and (out / "faithful_curve.csv").is_file()
    assert "--circuit-method node-pruning" in record["command"]
