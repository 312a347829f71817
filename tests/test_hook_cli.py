"""`circuitlab run --task ioi --method eap-ig` on a model the fast runner is made to refuse: the run completes on
the exact hook backend, and run.json and both reports say which backend ran and why."""

import json
import math

import pytest

from circuitlab.patching import engine
from circuitlab.patching.runner import UnsupportedModelError
from circuitlab.reports.cli import main
from tests.hf_tiny import build_tiny

REASON = "the fast runner does not reproduce GPT2LMHeadModel exactly (forced by this test)"


@pytest.mark.slow  # ~20 s of CPU, most of it drawing the report
def test_ioi_eap_ig_run_on_the_hook_backend(tmp_path, monkeypatch):
    def refuse(model, **kwargs):
        raise UnsupportedModelError(REASON)

    monkeypatch.setattr(engine, "Runner", refuse)
    model_dir = build_tiny("gpt2", tmp_path / "gpt2")
    out = tmp_path / "run"
    args = ["run", "--model", str(model_dir), "--task", "ioi", "--method", "eap-ig", "--out", str(out), "--quiet",
            "--n", "4", "--n-boot", "20", "--percents", "10,50,100", "--oracle-edges", "10", "--steps", "2",
            "--resid-positions", "none"]
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["model"]["engine"]["backend"] == "hook" and record["model"]["engine"]["reason"] == REASON
    cpr = record["faithfulness"]["cpr"]
    assert isinstance(cpr, float) and math.isfinite(cpr), cpr  # NaN is saved as null
    for name in ("report.md", "report.html"):
        text = (out / name).read_text()
        assert "Backend: hook" in text and "forced by this test" in text
