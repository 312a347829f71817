"""`circuitlab localize` end to end on the hand-wired subspace model, from a counterfactual file.

Checks the outputs (iia.parquet/csv columns, counterfactuals.jsonl, rotations.safetensors, report, run.json
hashes), that the written counterfactuals.jsonl is itself valid input giving the same table, and that the
numbers equal the Python API's; a bad file fails with one line and leaves --out untouched.
"""

from __future__ import annotations

import json

import pandas as pd
from safetensors.torch import load_file

from circuitlab.graphs.groundtruth.subspace import build_subspace_model
from circuitlab.patching.interchange import Site
from circuitlab.patching.localize import RESULT_COLUMNS, LocalizeConfig, localize
from circuitlab.patching.models import save_model
from circuitlab.reports import rundir
from circuitlab.reports.cli import main
from circuitlab.reports.localize_report import LocalizeRecord


def _check_report(out, frame):
    """The standard report: each featurizer's heatmap (Plotly data in report.html, a PNG for report.md) holds
    the test IIA of iia.csv at each layer × site; the controls table sits beside it."""
    html, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    assert not (out / "localize.html").exists() and "circuitlab localize: x in" in html
    for feat in ("full", "pca", "das"):
        start = html.index(f'id="data-iia_{feat}">') + len(f'id="data-iia_{feat}">')
        heat = json.loads(html[start:html.index("</script>", start)])["data"][0]
        test = frame[(frame.featurizer == feat) & (frame.split == "test")]
        for i, layer in enumerate(heat["y"]):
            for j, site in enumerate(heat["x"]):
                assert heat["z"][i][j] == test[(test.layer == int(layer)) & (test.position == site.split("@")[1])].iia.max()
        assert f"Controls beside {feat}" in html and f"figures/iia_{feat}.png" in md
        assert (out / "figures" / f"iia_{feat}.png").stat().st_size > 1000


def test_localize_cli_from_file(tmp_path, capsys):
    gt = build_subspace_model(seed=0)
    model_dir = save_model(gt.model, tmp_path / "model")
    data = gt.counterfactuals(24, seed=1).save_jsonl(tmp_path / "cf.jsonl")
    out = tmp_path / "run"
    args = ["localize", "--task", str(data), "--model", str(model_dir), "--out", str(out), "--positions", "x,END",
            "--featurizers", "full,pca,das", "--dims", "2", "--steps", "5", "--quiet"]
    assert main(args) == 0
    frame = pd.read_csv(out / "iia.csv")
    assert list(frame.columns) == RESULT_COLUMNS
    assert set(frame.featurizer) == {"none", "full", "pca", "das", "random"}
    assert set(frame.split) == {"train", "test"}
    assert frame.n.sum() > 0 and (frame.iia_low <= frame.iia + 1e-9).all() and (frame.iia <= frame.iia_high + 1e-9).all()
    table = pd.read_parquet(out / "iia.parquet")  # the same rows as the CSV ("" positions read back as NaN there)
    pd.testing.assert_frame_equal(table.fillna({"position": ""}), frame.fillna({"position": ""}), check_dtype=False)
    record = json.loads((out / "run.json").read_text())
    rundir.verify_outputs(out, record)
    assert record["split"]["train"] + record["split"]["test"] == 24
    rotations = load_file(str(out / "rotations.safetensors"))
    assert rotations["resid_pre.L0@x/das2"].shape == (2, 32)
    assert record["engine"]["requested"] == "auto" and record["engine"]["backend"] == "fast"
    typed = LocalizeRecord.from_dict(record)  # run.json reads back to the record it was written from
    assert typed.n_train + typed.n_test == 24 and typed.config.dims == (2,) and typed.engine.architecture is None
    assert json.dumps(typed.to_dict()) == json.dumps({k: v for k, v in record.items()
                                                      if k not in ("wall_seconds", "outputs")})
    _check_report(out, frame)

    # The same numbers from the Python API (same pairs, split, seed and sites).
    from circuitlab.tasks.counterfactual import read_counterfactuals

    cf = read_counterfactuals(out / "counterfactuals.jsonl", gt.model)
    api = localize(gt.model, cf, sites=[Site("resid_pre", 0, "x"), Site("resid_pre", 0, "END")],
                   config=LocalizeConfig(featurizers=("full", "pca", "das"), dims=(2,), steps=5, top_sites=4))
    pd.testing.assert_frame_equal(api.to_frame(), table, check_dtype=False, atol=1e-6)

    # counterfactuals.jsonl is valid --task input and reproduces the table.
    again = tmp_path / "again"
    assert main(args[:2] + [str(out / "counterfactuals.jsonl")] + args[3:5] + ["--out", str(again)] + args[7:]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(again / "iia.parquet"), table)

    # --backend hook (the exact hook runner) gives the same table; the record says which backend ran.
    hook = tmp_path / "hook"
    assert main(args[:5] + ["--out", str(hook)] + args[7:] + ["--backend", "hook"]) == 0
    assert json.loads((hook / "run.json").read_text())["engine"] == {"backend": "hook", "requested": "hook",
                                                                     "reason": "asked for (backend hook)"}
    pd.testing.assert_frame_equal(pd.read_parquet(hook / "iia.parquet"), table, check_dtype=False, atol=1e-4)

    capsys.readouterr()  # `circuitlab report` re-renders run folders; a localize folder's report is written with it
    assert main(["report", str(out)]) == 2 and "holds a circuitlab localize result" in capsys.readouterr().err

    # A bad file: one line, nothing written.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"base_ids": [0, 7, 2, 3, 1], "source_ids": [0, 9, 2, 3, 1], "variable": "x", '
                   '"positions": {"base": {"x": 1}, "source": {"x": 1}}}\n')
    capsys.readouterr()
    assert main(["localize", "--task", str(bad), "--model", str(model_dir), "--out", str(tmp_path / "no"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "row 1, field 'expected_id': is missing" in err
    assert not (tmp_path / "no").exists()
