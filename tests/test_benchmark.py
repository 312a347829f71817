"""The methods benchmark (graphs.benchmark, reports.bench) on the hand-wired induction model, fast."""

import json
import math
import os
import shutil
import time

import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from circuitlab.graphs.benchmark import (METHODS, BenchCase, BenchConfig, Reference, adapt_groundtruth,  # noqa: E402
                              benchmark_case, edge_auroc, edge_scores_from_nodes, node_auroc,
                              groundtruth_cases, node_scores_from_edges, own_case, results_markdown, run_method,
                              visible_edges)
from circuitlab.graphs.groundtruth import load_groundtruth  # noqa: E402
from circuitlab.patching.edges import evaluate_edge_masks, prepare_edges  # noqa: E402

FAST = BenchConfig(n_boot=20)


@pytest.fixture(scope="module")
def induction():
    return load_groundtruth("induction_handwired")


def test_adapter_metric_matches_groundtruth_and_accepts_leading_dims(induction):
    task, pairs = adapt_groundtruth(induction, 8, seed=1)
    batch = induction.make_pairs(8, seed=1)
    with torch.no_grad():
        logits = induction.model(pairs.clean_tokens)
    per_prompt = task.metric(logits, pairs)
    assert per_prompt.shape == (8,)
    assert math.isclose(float(per_prompt.mean()), float(induction.metric(logits, batch)), abs_tol=1e-5)
    at = logits[:, pairs.read_pos, :]
    stacked = task.metric_at(torch.stack([at, at * 2, at]), pairs)
    assert stacked.shape == (3, 8)
    assert torch.allclose(stacked[1], 2 * per_prompt)
    ctx = prepare_edges(induction.model, task, pairs)
    values = evaluate_edge_masks(ctx, torch.stack([torch.ones(ctx.graph.n_edges), torch.zeros(ctx.graph.n_edges)]))
    assert torch.allclose(values[0], ctx.clean_values, atol=1e-4)
    assert torch.allclose(values[1], ctx.corrupt_values, atol=1e-4)


def test_resample_counterfactual_uses_other_inputs(induction):
    _, task_pairs = adapt_groundtruth(induction, 8, seed=0)
    _, pairs = adapt_groundtruth(induction, 8, seed=0, counterfactual="resample")
    assert torch.equal(pairs.clean_tokens, task_pairs.clean_tokens)
    assert not torch.equal(pairs.corrupt_tokens, task_pairs.corrupt_tokens)
    with pytest.raises(ValueError, match="counterfactual 'swap'"):
        adapt_groundtruth(induction, 8, counterfactual="swap")


def test_zero_ablation_counterfactual_sees_every_true_edge(induction):
    """Zero ablation exposes the positional edges that no pair of same-length inputs can differ in."""
    case = groundtruth_cases(["induction_handwired"], 16, counterfactuals=("zero",))[0]
    row = benchmark_case(case, ("acdc", "random"), BenchConfig(n_boot=20)).set_index("method")
    assert row.loc["acdc", "n_visible_true_edges"] == row.loc["acdc", "n_true_edges"]
    assert row.loc["acdc", "edge_auroc"] >= 0.95


def test_groundtruth_edges_map_into_the_engine_graph(induction):
    task, pairs = adapt_groundtruth(induction, 4)
    ctx = prepare_edges(induction.model, task, pairs)
    ref = Reference.from_groundtruth(induction).checked(ctx.graph)
    assert ref.edges == induction.true_edges
    with pytest.raises(ValueError, match="a5.h0"):
        Reference(frozenset(), frozenset({"a5.h0->logits"})).checked(ctx.graph)


def test_oracle_scores_give_auroc_one_and_random_is_near_chance(induction):
    task, pairs = adapt_groundtruth(induction, 4)
    ctx = prepare_edges(induction.model, task, pairs)
    g, ref = ctx.graph, Reference.from_groundtruth(induction)
    oracle = g.edges_vector(sorted(induction.true_edges))
    assert edge_auroc(g, oracle, ref) == 1.0
    assert node_auroc(node_scores_from_edges(g, oracle), ref) == 1.0
    aurocs = []
    for seed in range(30):
        scores, _, _ = run_method("random", induction.model, task, pairs, ctx=ctx, config=BenchConfig(seed=seed))
        aurocs.append(edge_auroc(g, scores, ref))
    assert 0.4 <= sum(aurocs) / len(aurocs) <= 0.6
    first, _, _ = run_method("random", induction.model, task, pairs, ctx=ctx, config=BenchConfig(seed=3))
    again, _, _ = run_method("random", induction.model, task, pairs, ctx=ctx, config=BenchConfig(seed=3))
    assert torch.equal(first, again)


def test_edge_scores_from_nodes_induce_node_circuits(induction):
    task, pairs = adapt_groundtruth(induction, 4)
    ctx = prepare_edges(induction.model, task, pairs)
    g = ctx.graph
    nodes = pd.DataFrame({"node": [n for n in g.sender_names if n != "input"]})
    nodes["score"] = [1.0 if n in ("a0.h0", "a1.h0") else 0.0 for n in nodes["node"]]
    edges = edge_scores_from_nodes(g, nodes)
    kept = {g.edge_names[i] for i in torch.nonzero(edges >= 1.0).flatten().tolist()}
    assert induction.true_edges <= kept  # the node circuit's induced edges include every true edge
    assert all(not ("a0.h1" in e or "a1.h2" in e) for e in kept)


def test_visible_edges_under_the_task_counterfactual(induction):
    task, pairs = adapt_groundtruth(induction, 8)
    ctx = prepare_edges(induction.model, task, pairs)
    seen = visible_edges(ctx, sorted(induction.true_edges))
    # the corruption changes only the last token: the previous-token head's output is the same in both runs
    assert not seen["a0.h0->a1.h0<k>"] and not seen["input->a0.h0<q>"]
    assert seen["a1.h0->logits"] and seen["input->a1.h0<q>"]


def test_whole_pipeline_on_induction(induction):
    task, pairs = adapt_groundtruth(induction, 8, seed=0, counterfactual="resample")
    case = BenchCase("induction_handwired", induction.model, task, pairs, Reference.from_groundtruth(induction),
                     "resample")
    started = time.perf_counter()
    frame = benchmark_case(case, METHODS, FAST)
    elapsed = time.perf_counter() - started
    assert list(frame["method"]) == list(METHODS)
    # edge AUROC recomputed by brute force over every (true, other) pair of edges, ties counting 1/2
    ctx = prepare_edges(induction.model, task, pairs)
    scores, _, _ = run_method("eap-ig", induction.model, task, pairs, ctx=ctx, config=FAST)
    values = scores.abs().tolist()
    true = [v for v, e in zip(values, ctx.graph.edge_names) if e in induction.true_edges]
    other = [v for v, e in zip(values, ctx.graph.edge_names) if e not in induction.true_edges]
    brute = sum((t > o) + 0.5 * (t == o) for t in true for o in other) / (len(true) * len(other))
    assert frame.set_index("method").loc["eap-ig", "edge_auroc"] == pytest.approx(brute)
    assert frame["cmd"].notna().all() and (frame["cpr_low"] <= frame["cpr_high"]).all()
    by = frame.set_index("method")
    assert by.loc["eap-ig", "edge_auroc_visible"] >= 0.95  # every visible true edge ranked first
    assert by.loc["eap-ig", "node_auroc"] == 1.0
    assert by.loc["eap-ig", "cpr"] > by.loc["random", "cpr"]
    assert 0 < frame["seconds"].sum() < elapsed  # each method's own time, within the whole call
    text = results_markdown(frame)
    assert text.count("\n") == len(frame) + 1 and "induction_handwired" in text


def test_skips_are_reported_not_dropped(induction):
    task, pairs = adapt_groundtruth(induction, 4)
    case = BenchCase("induction_handwired", induction.model, task, pairs, Reference.from_groundtruth(induction))
    frame = benchmark_case(case, ("acdc", "random"), BenchConfig(n_boot=10, acdc_max_edges=10))
    acdc_row = frame.set_index("method").loc["acdc"]
    assert acdc_row["note"].startswith("skipped") and "forwards" in acdc_row["note"]
    assert math.isnan(acdc_row["edge_auroc"])
    with pytest.raises(ValueError, match="unknown methods"):
        benchmark_case(case, ("mask-learning",), FAST)


def test_own_model_path(induction, tmp_path):
    from circuitlab.graphs.io import write_mib
    from circuitlab.patching.models import save_model
    from circuitlab.reports.bench import main

    model_dir = tmp_path / "my_model"
    save_model(induction.model, model_dir)
    shutil.copy(induction.directory / "task.json", tmp_path / "task.json")
    circuit = tmp_path / "circuit.json"
    circuit.write_text(json.dumps({"format": "circuitlab-circuit", "version": 1, "model": "mine",
                                   "nodes": sorted(induction.true_nodes), "edges": sorted(induction.true_edges)}))
    case = own_case(model_dir, circuit, tmp_path / "task.json", n=8, counterfactual="resample")
    mine = benchmark_case(case, ("eap", "random"), FAST)
    task, pairs = adapt_groundtruth(induction, 8, counterfactual="resample")
    ref_case = BenchCase("x", induction.model, task, pairs, Reference.from_groundtruth(induction), "resample")
    theirs = benchmark_case(ref_case, ("eap", "random"), FAST)
    assert mine["edge_auroc"].tolist() == pytest.approx(theirs["edge_auroc"].tolist())
    # the same circuit as an EAP-IG/MIB file
    write_mib(induction.circuit_graph(), tmp_path / "circuit_mib.json")
    assert Reference.load(tmp_path / "circuit_mib.json").edges == induction.true_edges
    # the command-line path writes the table, CSV and plot
    out = tmp_path / "results"
    code = main(["--own-model", str(model_dir), "--own-circuit", str(circuit), "--own-task",
                 str(tmp_path / "task.json"), "--methods", "eap,random", "--n", "8", "--n-boot", "10",
                 "--counterfactuals", "resample", "--threads", "1", "--out", str(out), "--quiet"])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"methods.md", "methods.csv", "methods.png"}
    assert "my_model" in (out / "methods.md").read_text()
    with pytest.raises(FileNotFoundError, match="nope"):
        own_case(tmp_path / "nope", circuit, tmp_path / "task.json", n=4)


def test_cli_arguments_are_validated():
    import argparse

    from circuitlab.reports.bench import add_bench_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "methods", "--models", "induction_handwired", "--methods", "eap,bogus"])
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        config_from_args(args)
    args = parser.parse_args(["bench", "methods", "--models", "gpt9"])
    with pytest.raises(ValueError, match="gpt9"):
        config_from_args(args)
    args = parser.parse_args(["bench", "methods", "--own-model", "x"])
    with pytest.raises(ValueError, match="go together"):
        config_from_args(args)
    args = parser.parse_args(["bench", "methods"])
    cfg = config_from_args(args)
    assert "smollm2-ioi" in cfg.models and args.func.__name__ == "run_bench"
