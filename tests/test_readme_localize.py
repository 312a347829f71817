"""The README's causal-variable example runs as written (on the hand-wired ground-truth model, fast)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_localize_example_runs(capsys):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Causal variables"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README lost the python block of '## Causal variables'"
    scope: dict = {}
    exec(compile(match.group(1), str(README), "exec"), scope)
    best = scope["result"].best("das")
    assert (best.component, best.layer, best.position) == ("resid_pre", 0, "x") and best.iia >= 0.95
    assert "das" in capsys.readouterr().out
