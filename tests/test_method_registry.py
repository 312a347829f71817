"""The method registry (`patching/methods/`): entries carry their callable, and `circuitlab run --method
acdc|random` reports a circuit from the method's OWN ranking (one batch vs many: tests/test_batched.py)."""

import json

import pandas as pd
import pytest

from circuitlab.patching.methods import METHODS, get_method
from circuitlab.reports.cli import main


def test_registry_entries_carry_their_callable():
    for name, method in METHODS.items():
        assert method.name == name and callable(method.score) and method.level in ("edge", "node")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


@pytest.mark.parametrize("method", ["random", "acdc"])
def test_run_reports_the_methods_own_circuit(tiny_dir, tmp_path, method):
    out = tmp_path / method
    args = ["run", "--model", tiny_dir, "--out", str(out), "--method", method, "--quiet", "--no-roles",
            "--resid-positions", "none", "--positions", "none", "--task", "repeated_tokens", "--n", "4",
            "--task-option", "seq_len=4", "--n-boot", "20", "--percents", "10,100", "--oracle-edges", "0",
            "--acdc-threshold", "0.001"]
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    faithful = record["circuit_faithfulness"]
    assert faithful["method"] == "ranking-edges" and faithful["ranking"] == f"{method} edge ranking"
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    edges = scores[(scores["component"] == "edge") & (scores["method"] == method)].copy()
    key = pd.to_numeric(edges["score"], errors="coerce").fillna(0.0).abs()
    if method == "acdc":  # kept edges rank above removed ones
        kept = edges["kept"].astype(str).str.lower() == "true"
        key = key.where(~kept, key + 1e6)
    key = dict(zip(edges["edge"], key))
    items = set(faithful["items"])
    assert 0 < len(items) < len(key)
    # a prefix of the method's own ranking (not EAP-IG's): every kept edge ranks at least as high as every other
    assert min(key[e] for e in items) >= max(v for e, v in key.items() if e not in items)
