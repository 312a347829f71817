"""The method registry (`patching/methods/`): entries carry their callable, and `circuitlab run --method
acdc|random` reports a circuit from the method's OWN ranking (one batch vs many: tests/test_batched.py)."""

import dataclasses
import json

import pandas as pd
import pytest

from circuitlab.patching.methods import (METHODS, SEARCHES, alias_names, get_method, get_search, run_method_names,
                                         search_names)
from circuitlab.reports.cli import main
from circuitlab.reports.config import make_config


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


def test_circuit_searches_are_registered_and_reused_only_where_they_rank_that_methods_scores():
    for method in METHODS.values():
        assert get_search(method.circuit).name == method.circuit  # every method's own circuit search exists
    with pytest.raises(ValueError, match="circuit search 'nope' is unknown"):
        dataclasses.replace(get_method("eap"), circuit="nope")
    assert get_search("eap-ig").can_reuse("eap-ig") and not get_search("eap").can_reuse("eap-ig")
    assert get_search("greedy").can_reuse("eap") and not get_search("single-effect").can_reuse("eap-ig")
    assert all(get_search("ranking-edges").can_reuse(m) for m in METHODS)
    assert get_search("greedy").ranking_label() == "eap-ig (greedy starts from its faithful prefix)"
    assert run_method_names() == tuple(METHODS) + alias_names() and "greedy" in alias_names()
    assert make_config({"method": "greedy"}).method == "eap-ig"  # an alias: EAP-IG scores, the greedy circuit
    assert set(search_names("edge")) == {n for n, s in SEARCHES.items() if s.level == "edge"}
