"""The README's notebook example runs: on the tiny model (fast) and exactly as written on SmolLM2 (slow)."""

import re
from pathlib import Path

import pytest

import circuitlab

README = Path(__file__).resolve().parents[1] / "README.md"


def _notebook_block() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"## In a notebook\s+```python\n(.*?)```", text, re.S)
    assert match, "README lost its '## In a notebook' python block"
    return match.group(1)


def test_readme_example_runs_on_a_tiny_model(tiny_model, monkeypatch, capsys):
    code = _notebook_block()
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.setattr(circuitlab, "load_model", lambda name: tiny_model)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    out = capsys.readouterr().out
    assert "faithfulness on new prompts:" in out and "effect" in out
    assert scope["circuit"].n_edges == 200 and scope["graph"].number_of_edges() <= 200
    faith = circuitlab.evaluate(scope["held_out"], scope["circuit"]).faithfulness
    assert f"{faith:.2f}" in out


@pytest.mark.slow
def test_readme_example_runs_on_smollm2(smollm2, monkeypatch, capsys):
    monkeypatch.setattr(circuitlab, "load_model", lambda name: smollm2 if name == "smollm2-135m" else None)
    scope: dict = {}
    exec(compile(_notebook_block(), str(README), "exec"), scope)
    assert scope["circuit"].n_edges == 200
    assert "faithfulness on new prompts:" in capsys.readouterr().out
