"""End-to-end tests of the `circuitlab` command line on a tiny native model (fast) and SmolLM2 (slow)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import networkx as nx
import pandas as pd
import pytest
import torch

from circuitlab.patching.components import parse_node
from circuitlab.patching.models import load_model
from circuitlab.reports.cli import main
from circuitlab.reports.plots import plotly_js
from circuitlab.tasks.causal import causal_model

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
STOP_AT = Path(__file__).with_name("stop_at.py")  # runs the CLI and freezes it at a chosen point
FAST = ["--task", "repeated_tokens", "--n", "6", "--task-option", "seq_len=5", "--n-boot", "50",
        "--percents", "1,10,50,100", "--oracle-edges", "40"]
PAIR_KEYS = {"clean_text", "corrupt_text", "clean_ids", "corrupt_ids", "answer_ids", "wrong_ids", "positions"}
SCORE_KEYS = {"component", "layer", "head", "position", "role", "edge", "method", "metric", "effect"}


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "rt"
    assert main(["run", "--model", tiny_dir, "--out", str(out), "--quiet", *FAST]) == 0
    return out


def _cli(*args, check=True, **kwargs):
    proc = subprocess.run([sys.executable, "-m", "circuitlab.reports.cli", *args], capture_output=True, text=True, env=ENV,
                          **kwargs)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_run_writes_the_output_contract(tiny_run):
    out = tiny_run
    for name in ("pairs.jsonl", "scores.csv", "circuit.graphml", "circuit.json", "run.json", "report.html",
                 "report.md"):
        assert (out / name).is_file(), name
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 6 and PAIR_KEYS <= set(pairs[0])
    assert isinstance(pairs[0]["positions"], dict) and pairs[0]["positions"]["END"] == len(pairs[0]["clean_ids"]) - 1

    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert SCORE_KEYS <= set(scores.columns)
    exact = scores[scores["method"] == "activation"]
    heads = exact[exact["component"] == "z"]
    assert len(heads[["layer", "head"]].drop_duplicates()) == 3 * 4  # every head, exactly patched
    assert sorted(exact[exact["component"] == "mlp_out"]["layer"].unique()) == [0, 1, 2]
    node_rows = scores[(scores["method"] == "eap-ig") & scores["component"].isin(["z", "mlp_out"])]
    assert len(node_rows) == 12 + 3
    edges = scores[scores["component"] == "edge"]
    assert len(edges) > 100 and edges["edge"].str.contains("->").all()
    assert (pd.to_numeric(scores[scores["component"] == "resid_pre"]["position"]) >= 0).all()
    assert (scores[scores["component"] == "edge"]["position"] == "").all()  # no position: empty, never -1

    record = json.loads((out / "run.json").read_text())
    assert record["seed"] == 0 and record["config"]["method"] == "eap-ig"
    assert len(record["model"]["weight_hash"]) == 16 and "torch" in record["versions"]
    assert record["metrics"]["clean"] != record["metrics"]["corrupt"]
    assert set(record["timings"]) >= {"pairs", "baseline", "scores", "exact", "oracle", "faithfulness"}
    assert record["command"].startswith("circuitlab run --task repeated_tokens")

    data = json.loads((out / "circuit.json").read_text())
    graph = nx.node_link_graph(data, edges="edges")
    assert "input" in graph and "logits" in graph
    for node, attrs in graph.nodes(data=True):
        parse_node(node)  # a valid node name
        assert "role" in attrs and "score" in attrs
    graphml = nx.read_graphml(out / "circuit.graphml")
    assert set(graphml.nodes) == set(graph.nodes)


def test_report_rerenders_from_saved_files(tiny_run):
    html = (tiny_run / "report.html").read_text()
    assert html.count('data-figure="') >= 6 and 'id="explorer-data"' in html  # interactive figures, explorer
    for heading in ("Does the model do the task?", "The circuit", "Roles with evidence", "Faithfulness",
                    "Exact vs approximate", "Reproduce"):
        assert heading in html
    page = html.replace(plotly_js(), "")  # the inlined plotly.js names URLs (maps, docs) it never fetches here
    assert "http://" not in page and "https://" not in page  # self-contained
    (tiny_run / "report.html").unlink()
    (tiny_run / "report.md").unlink()
    proc = _cli("report", str(tiny_run))
    assert "report.html" in proc.stdout
    assert (tiny_run / "report.html").read_text() == html
    md = (tiny_run / "report.md").read_text()
    assert "](figures/heads.png)" in md and (tiny_run / "figures" / "heads.png").is_file()


@pytest.mark.parametrize("method", ["eap", "acdc", "activation", "attribution"])
def test_other_methods(tiny_dir, tmp_path, method):
    out = tmp_path / method
    args = ["run", "--model", tiny_dir, "--out", str(out), "--method", method, "--quiet", "--no-roles",
            "--resid-positions", "none", *FAST]
    if method == "acdc":
        args += ["--acdc-threshold", "0.001"]
    assert main(args) == 0
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    exact = scores[scores["method"] == "activation"]
    assert len(exact[exact["component"] == "z"]) == 12 and len(exact[exact["component"] == "mlp_out"]) == 3
    has_edges = (scores["component"] == "edge").any()
    assert has_edges == (method in ("eap", "acdc"))
    record = json.loads((out / "run.json").read_text())
    cpr = record["faithfulness"]["cpr"]
    assert isinstance(cpr, float) and math.isfinite(cpr), cpr  # NaN is saved as null
    assert (out / "report.html").is_file()


def test_acdc_refuses_large_graphs_unless_forced(tiny_dir, tmp_path, monkeypatch, capsys):
    import dataclasses

    from circuitlab.patching.methods import METHODS

    monkeypatch.setitem(METHODS, "acdc", dataclasses.replace(METHODS["acdc"], max_edges=10))
    args = ["run", "--model", tiny_dir, "--out", str(tmp_path / "a"), "--method", "acdc", "--quiet", *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ACDC" in err[0] and "--force" in err[0]


def test_run_positions_roles_and_selection(tiny_dir, tmp_path):
    out = tmp_path / "roles"
    assert main(["run", "--model", tiny_dir, "--out", str(out), "--quiet", "--positions", "second_start,END",
                 "--resid-positions", "roles", "--top-fraction", "0.5", "--no-roles", *FAST]) == 0
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    heads = scores[(scores["method"] == "activation") & (scores["component"] == "z")]
    assert set(heads["role"]) == {"second_start", "END"} and len(heads) == 24
    assert set(scores[scores["component"] == "resid_pre"]["role"]) <= {"first_start", "first_end", "second_start",
                                                                      "second_end", "END"}


def test_config_file_and_cli_override(tiny_dir, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(f"task: repeated_tokens\nmodel: {tiny_dir}\nn: 6\nn-boot: 50\npercents: '1,10,100'\n"
                      "oracle_edges: 20\nresid_positions: none\nroles: false\ntask_options: {seq_len: 5}\n"
                      f"runs:\n  - out: {tmp_path / 'a'}\n    method: eap\n  - out: {tmp_path / 'b'}\n    method: activation\n")
    assert main(["run", "--config", str(config), "--quiet", "--seed", "3"]) == 0
    for sub, method in (("a", "eap"), ("b", "activation")):
        record = json.loads((tmp_path / sub / "run.json").read_text())
        assert record["config"]["method"] == method and record["seed"] == 3
        assert record["config"]["task_options"] == {"seq_len": 5}
    json_config = tmp_path / "exp.json"
    json_config.write_text(json.dumps({"task": "repeated_tokens", "model": tiny_dir, "n": 4, "n_boot": 20,
                                       "percents": "10,100", "roles": False, "resid_positions": "none",
                                       "method": "activation", "out": str(tmp_path / "c"),
                                       "task_options": {"seq_len": 4}}))
    assert main(["run", "--config", str(json_config), "--quiet"]) == 0
    assert len((tmp_path / "c" / "pairs.jsonl").read_text().splitlines()) == 4


def test_patch_and_path_subcommands(tiny_dir, tmp_path):
    out = tmp_path / "patch"
    _cli("patch", "--task", "repeated_tokens", "--model", tiny_dir, "--component", "resid", "--positions",
         "each", "--n", "4", "--out", str(out), "--quiet")
    frame = pd.read_csv(out / "scores.csv")
    assert set(frame["component"]) == {"resid_pre"} and len(frame) == 3 * 40  # 3 layers x (2 * 20) positions
    assert (out / "pairs.jsonl").is_file() and (out / "heatmap.png").is_file() and (out / "run.json").is_file()
    for component in ("head", "attn", "mlp", "q", "k", "v", "pattern"):  # in-process: no interpreter start-up
        assert main(["patch", "--task", "repeated_tokens", "--model", tiny_dir, "--component", component, "--n", "3",
                     "--positions", "END", "--out", str(tmp_path / component), "--quiet"]) == 0

    out = tmp_path / "path"
    _cli("path", "--task", "repeated_tokens", "--model", tiny_dir, "--senders", "a0.h1,a0.h2+a0.h3",
         "--receivers", "a2.h0,a2.h1", "--channel", "k", "--n", "4", "--out", str(out), "--quiet")
    frame = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert list(frame["sender"]) == ["a0.h1", "a0.h2+a0.h3"] and set(frame["channel"]) == {"k"}
    assert main(["path", "--task", "repeated_tokens", "--model", tiny_dir, "--senders", "all", "--channel",
                 "logits", "--n", "3", "--out", str(tmp_path / "logits"), "--quiet"]) == 0
    assert len(pd.read_csv(tmp_path / "logits" / "scores.csv")) == 3 * 4 + 3


def test_tasks_and_models_list(capsys):
    assert main(["tasks"]) == 0
    tasks = capsys.readouterr().out
    for name in ("ioi", "capitals", "repeated_tokens", "greater_than"):
        assert name in tasks
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["run", "--task", "nope"], "unknown task 'nope'"),
    (["run", "--method", "magic"], "unknown method 'magic'"),
    (["run", "--task", "ioi", "--positions", "S3"], "bad position 'S3'"),
    (["run", "--task", "ioi", "--top-k", "5", "--threshold", "0.1"], "at most one of"),
    (["run", "--n", "0"], "--n must be"),
    (["patch", "--component", "neuron"], "unknown component 'neuron'"),
    (["patch", "--positions", "NOWHERE"], "bad position 'NOWHERE'"),
    (["path", "--channel", "z"], "--channel must be"),
    (["path", "--senders", "a1.x"], "unknown node name 'a1.x'"),
    (["run", "--bogus-flag"], "unrecognized arguments"),
    (["frobnicate"], "invalid choice"),
    (["run", "--config", "/nonexistent/exp.yaml"], "does not exist"),
    (["report", "/nonexistent/run"], "does not exist"),
])
def test_bad_arguments_give_one_line_and_nonzero_exit(args, needle, capsys):
    assert main(args) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("circuitlab: error:") and needle in lines[0], lines


def test_console_exit_status_on_bad_arguments():
    proc = _cli("run", "--method", "magic", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "circuitlab: error: unknown method 'magic': use one of acdc, activation, attribution, eap, eap-ig, eap-ig-act, ifr, "
            "random, greedy, node-pruning, edge-pruning, single-effect")


def test_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: ioi\nstepz: 3\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "unknown option 'stepz'" in capsys.readouterr().err


def test_unknown_model_and_unwritable_output(tiny_dir, tmp_path):
    proc = _cli("run", "--task", "repeated_tokens", "--model", str(tmp_path / "no-such-model"), "--out",
                str(tmp_path / "o"), "--quiet", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "no-such-model" in lines[0]
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = _cli("run", "--model", tiny_dir, "--out", str(blocker / "out"), *FAST, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "cannot write to output directory" in lines[0]


def _outputs(out: Path) -> dict:
    record = json.loads((out / "run.json").read_text())
    return {"pairs": (out / "pairs.jsonl").read_text(), "scores": (out / "scores.csv").read_text(),
            "circuit": (out / "circuit.json").read_text(), "graphml": (out / "circuit.graphml").read_text(),
            "faithfulness": (out / "faithfulness.csv").read_text(), "oracle": (out / "oracle.csv").read_text(),
            "metrics": record["metrics"], "faith": record["faithfulness"], "key": record["config_key"]}


def test_killed_run_resumes_with_identical_results(tiny_dir, tmp_path):
    args = ["run", "--model", tiny_dir, *FAST]
    _cli(*args, "--out", str(tmp_path / "whole"), "--quiet")

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(STOP_AT), "stage", "scores", "--", *args, "--out", str(out), "--quiet"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".killed.staging/.partial/*/scores.done")):  # work happens in the staging folder
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the run never finished its scores stage"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # killed before the end: no result published

    rerun = _cli(*args, "--out", str(out))
    assert "[pairs] resumed" in rerun.stdout and "[scores] resumed" in rerun.stdout
    assert "[exact] resumed" not in rerun.stdout
    record = json.loads((out / "run.json").read_text())
    assert record["resumed_stages"] == ["pairs", "baseline", "scores"]
    assert _outputs(out) == _outputs(tmp_path / "whole")

    # other result-changing options start over in a fresh cache
    changed = _cli(*args, "--out", str(out), "--seed", "1")
    assert "resumed" not in changed.stdout.split("report:")[0]


@pytest.mark.slow
def test_smollm2_ioi_run(tmp_path):
    """A small IOI discovery on SmolLM2-135M: the model does the task and the report has IOI roles."""
    out = tmp_path / "ioi"
    assert main(["run", "--task", "ioi", "--model", "smollm2-135m", "--out", str(out), "--n", "4", "--steps", "2",
                 "--positions", "END", "--resid-positions", "roles", "--resid-layers", "4", "--oracle-edges", "16",
                 "--n-boot", "100", "--percents", "1,10,100", "--quiet"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["metrics"]["clean"] > record["metrics"]["corrupt"] + 1.0
    assert record["model"]["n_layers"] == 30 and record["model"]["n_key_value_heads"] == 3
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert len(scores[(scores["method"] == "activation") & (scores["component"] == "z")]) == 270
    assert len(scores[scores["component"] == "edge"]) == 123211  # per-query-head keys/values (patching.edges)
    roles = pd.read_csv(out / "roles.csv", keep_default_na=False)
    assert {"name_mover", "induction"} & set(roles["role"])
    html = (out / "report.html").read_text()
    assert html.count('data-figure="') >= 6 and "Roles with evidence" in html


def test_run_variables_store_each_heads_iia(tiny_dir, tmp_path, capsys):
    """--variables: a head's stored full-vector IIA equals a plain-hook interchange of its z at END on the same
    held-out pairs (0 on this random model: tests/test_variables.py checks non-trivial values); DAS k=1 is stored
    k=1..4, the no-intervention baseline and the carried variable are stored beside it; an unknown variable is refused naming the known ones, before anything is written."""
    out = tmp_path / "v"
    assert main(["run", "--model", tiny_dir, "--out", str(out), "--quiet", "--no-roles", *FAST, "--top-k", "30",
                 "--positions", "none", "--resid-positions", "none", "--variables", "next"]) == 0
    graph = nx.read_graphml(out / "circuit.graphml")
    heads = [(name, data) for name, data in graph.nodes(data=True) if parse_node(name).kind == "head"]
    assert heads and all({"iia_next", "carries"} | {f"iia_next_das{k}" for k in (1, 2, 3, 4)} <= set(d) for _, d in heads)
    assert "iia_next_none" in graph.graph
    assert "iia_next_das1" in (out / "circuit.json").read_text() and "iia_next" in (out / "report.html").read_text()
    model = load_model(tiny_dir)
    cf = causal_model("repeated_tokens").counterfactuals(model, "next", 12, seed=0).with_split(0.5, seed=0).part("test")
    for name, data in heads:
        node = parse_node(name)
        hook_name = f"blocks.{node.layer}.attn.hook_z"
        hits = []
        for i in range(len(cf)):
            nb = int(cf.base_mask[i].sum()) if cf.base_mask is not None else cf.base_tokens.shape[1]
            ns = int(cf.source_mask[i].sum()) if cf.source_mask is not None else cf.source_tokens.shape[1]
            base, source = cf.base_tokens[i:i + 1, :nb], cf.source_tokens[i:i + 1, :ns]
            _, cache = model.run_with_cache(source, names_filter=lambda n: n == hook_name)
            z_source = cache[hook_name][0, ns - 1, node.head].clone()

            def swap(z, hook, z_source=z_source, at=nb - 1):
                z = z.clone()
                z[0, at, node.head] = z_source
                return z

            with torch.no_grad():
                top = int(model.run_with_hooks(base, fwd_hooks=[(hook_name, swap)])[0, nb - 1].argmax())
            hits.append(top in [t for t in cf.expected_ids[i].tolist() if t >= 0])
        assert data["iia_next"] == pytest.approx(sum(hits) / len(hits)), name
    assert main(["run", "--model", tiny_dir, "--out", str(tmp_path / "bad"), "--quiet", *FAST, "--variables", "io"]) == 2
    err = capsys.readouterr().err
    assert "no variable 'io'" in err and "next" in err
    assert main(["run", "--model", tiny_dir, "--out", str(tmp_path / "bad"), "--quiet", *FAST, "--variables", "next",
                 "--variables-heads", "name_mover,m1"]) == 2
    assert "--variables-heads: 'm1' is neither" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
