"""Sweeps (`circuitlab sweep`): grid expansion, resume after a kill, failing cells, content addresses."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from circuitlab.graphs.groundtruth import MODELS_DIR
from circuitlab.reports.cells import Cell, cell_key
from circuitlab.reports.config import ConfigError
from circuitlab.reports.grid import SweepSpec, run_sweep

REPO = Path(__file__).resolve().parents[1]


def _spec(models, methods=("eap", "activation"), **options):
    return SweepSpec.from_dict({"kind": "bench", "grid": {"model": list(models), "method": list(methods)},
                                "options": {"n": 4, "n_boot": 20, **options}, "resources": {"num_cpus": 1}})


def test_grid_expands_validates_and_excludes():
    spec = SweepSpec.from_dict({"kind": "run", "grid": {"task": ["ioi", "capitals"], "method": ["eap", "acdc"],
                                                        "seed": [0, 1]},
                                "options": {"n": 4, "model": "m"}, "exclude": [{"task": "capitals", "method": "acdc"}]})
    cells = spec.cells()
    assert len(cells) == 6
    assert all(c.params["n"] == 4 and "out" not in c.params for c in cells)
    assert not any(c.params["task"] == "capitals" and c.params["method"] == "acdc" for c in cells)
    assert len({cell_key(c) for c in cells}) == 6
    for bad, message in [({"grid": {"method": ["nope"]}}, "unknown method"),
                         ({"grid": {"method": ["eap"]}, "options": {"bogus": 1}}, "bogus"),
                         ({"grid": {"method": []}}, "empty"),
                         ({"grid": {"method": ["eap"]}, "resources": {"gpus": 1}}, "gpus"),
                         ({"grid": {"method": ["eap"]}, "options": {"out": "x"}}, "out"),
                         ({"kind": "nope", "grid": {"method": ["eap"]}}, "kind")]:
        with pytest.raises(ConfigError, match=message):
            SweepSpec.from_dict(bad).cells()


def test_cell_key_follows_params_threads_and_weights(tmp_path):
    model = tmp_path / "gt"
    shutil.copytree(MODELS_DIR / "planted_marker", model)
    cell = Cell("bench", {"model": str(model), "method": "eap", "n": 4})
    key = cell_key(cell)
    assert cell_key(Cell("bench", dict(cell.params), {"num_gpus": 1})) == key  # GPUs do not change results
    assert cell_key(Cell("bench", dict(cell.params), {"num_cpus": 2})) != key  # threads can (reduction order)
    assert cell_key(Cell("bench", {**cell.params, "n": 5})) != key
    data = bytearray((model / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (model / "model.safetensors").write_bytes(bytes(data))
    assert cell_key(cell) != key
    task = tmp_path / "task.json"
    shutil.copy(MODELS_DIR / "planted_marker" / "task.json", task)
    with_task = Cell("bench", {**cell.params, "task": str(task)})
    before = cell_key(with_task)
    task.write_text(task.read_text().replace("}", " }", 1))
    assert cell_key(with_task) != before  # a named input file's content is part of the address


def test_failing_cell_is_recorded_and_the_others_finish(tmp_path):
    broken = tmp_path / "broken_marker"
    shutil.copytree(MODELS_DIR / "planted_marker", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    spec = _spec(["induction_handwired", str(broken)], methods=("eap",))
    result = run_sweep(spec, tmp_path / "sweep")
    table = result.table.set_index("model")
    assert table.loc["induction_handwired", "status"] == "done"
    assert table.loc[str(broken), "status"] == "failed"
    assert table.loc[str(broken), "error"] == (  # the cell's error names the bad file and what to do
        f"ValueError: cannot read the model weights {broken / 'model.safetensors'} (Error while deserializing header: "
        "header too large): the file is truncated or corrupt, e.g. by an interrupted copy or download; copy or save "
        "the model again")
    assert 0 <= table.loc["induction_handwired", "edge_auroc"] <= 1
    saved = pd.read_parquet(tmp_path / "sweep" / "sweep.parquet")
    assert list(saved["status"]) == list(result.table["status"])
    assert "failed" in (tmp_path / "sweep" / "summary.md").read_text()
    record = json.loads((tmp_path / "sweep" / "cells" / table.loc[str(broken), "cell"] / "cell.json").read_text())
    assert record["status"] == "failed" and record["traceback"] and record["attempt"] == 1
    # a rerun retries only the failed cell; repairing the weights gives it a new address and it finishes
    again = run_sweep(spec, tmp_path / "sweep")
    assert again.ran == [table.loc[str(broken), "cell"]] and again.reused == [table.loc["induction_handwired", "cell"]]
    shutil.copy(MODELS_DIR / "planted_marker" / "model.safetensors", broken / "model.safetensors")
    fixed = run_sweep(spec, tmp_path / "sweep")
    assert set(fixed.table["status"]) == {"done"} and len(fixed.ran) == 1
    assert len(run_sweep(spec, tmp_path / "sweep", force=True).ran) == 2


def test_skipped_cell_has_its_reason(tmp_path):
    result = run_sweep(_spec(["induction_handwired"], methods=("acdc",), acdc_max_edges=10), tmp_path / "s")
    row = result.table.iloc[0]
    assert row["status"] == "skipped" and "acdc_max_edges=10" in row["reason"]
    assert run_sweep(_spec(["induction_handwired"], methods=("acdc",), acdc_max_edges=10), tmp_path / "s").ran == []


def test_killed_sweep_resumes_only_missing_cells(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text("kind: bench\ngrid:\n  model: [induction_handwired, planted_marker]\n  method: [eap, activation]\n"
                      "options: {n: 4, n_boot: 20}\n")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "stop_at.py"), "cells", "2", "--", "sweep", str(config),
                             "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while len(list((out / "cells").glob("*/cell.json"))) < 2:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "the sweep did not finish two cells in time"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {p.parent.name: json.loads(p.read_text())["finished"] for p in (out / "cells").glob("*/cell.json")}
    assert len(finished) == 2 and not (out / "sweep.parquet").exists()
    result = run_sweep(SweepSpec.load(config), out)
    assert sorted(result.reused) == sorted(finished)
    assert len(result.ran) == 2 and not set(result.ran) & set(finished)
    assert set(result.table["status"]) == {"done"} and len(result.table) == 4
    for name, stamp in finished.items():  # the finished cells were not rewritten
        assert json.loads((out / "cells" / name / "cell.json").read_text())["finished"] == stamp


def test_bench_methods_is_the_committed_sweep_file():
    import argparse

    from circuitlab.reports.bench import add_bench_parser, config_from_args, sweep_spec

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    spec = sweep_spec(config_from_args(parser.parse_args(["bench", "methods"])))
    committed = SweepSpec.load(REPO / "bench" / "methods.yaml")
    assert spec.to_dict() == committed.to_dict()
    cells = committed.cells()
    assert len(cells) == 4 * 3 * 5 + 5
    assert {c.params["n"] for c in cells if c.params["model"] == "smollm2-ioi"} == {8}


def test_cli_run_sweep_cells_are_ordinary_run_folders(tmp_path, capsys):
    from circuitlab.patching.models import boot_native_model, save_model
    from circuitlab.reports.cli import main
    from tests.conftest import TINY_CONFIG

    model = tmp_path / "tiny"
    save_model(boot_native_model(TINY_CONFIG), model)
    config = tmp_path / "sweep.yaml"
    config.write_text(f"grid:\n  model: [{model}]\n  method: [activation]\n  seed: [0, 1]\n"
                      "options: {task: repeated_tokens, n: 6, task_options: {seq_len: 5}, n_boot: 50, "
                      "percents: '1,10,50,100', oracle_edges: 20, roles: false, resid_positions: none}\n")
    assert main(["sweep", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "ran 2, reused 0" in capsys.readouterr().out
    table = pd.read_parquet(tmp_path / "out" / "sweep.parquet")
    assert len(table) == 2 and set(table["status"]) == {"done"} and set(table["seed"]) == {0, 1}
    assert pd.read_csv(tmp_path / "out" / "sweep.csv")["cpr"].tolist() == pytest.approx(table["cpr"].tolist())
    for name in table["cell"]:
        folder = tmp_path / "out" / "cells" / name
        assert {"run.json", "scores.csv", "report.html", "circuit.json", "cell.json"} <= {p.name for p in folder.iterdir()}
        run = json.loads((folder / "run.json").read_text())
        assert run["faithfulness"]["cpr"] == pytest.approx(table.set_index("cell").loc[name, "cpr"])
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| activation |" in summary and "(n=2)" in summary  # mean over the two seeds with its interval
    assert "<table" in (tmp_path / "out" / "summary.html").read_text()
    assert main(["sweep", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "ran 0, reused 2" in capsys.readouterr().out
