"""The leaderboard (graphs.leaderboard, reports.leaderboard) and MIB interop (graphs.mib), on tiny models, fast."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from circuitlab.graphs.benchmark import adapt_groundtruth
from circuitlab.graphs.groundtruth import load_groundtruth
from circuitlab.graphs.leaderboard import LeaderboardConfig, leaderboard_cell, top_items
from circuitlab.graphs.mib import read_scores, submission_masks, write_submission
from circuitlab.graphs.stability import jaccard, overlap
from circuitlab.patching.attribution import eap_ig_activation_scores, eap_scores
from circuitlab.patching.edges import evaluate_edge_masks, prepare_edges
from circuitlab.patching.engine import engine_context
from circuitlab.patching.faithfulness import PERCENTS
from circuitlab.patching.hook_backend import HookRunner
from circuitlab.patching.runner import Runner
from circuitlab.patching.work import WorkCounter
from circuitlab.reports.cli import main
from circuitlab.reports.leaderboard import COLUMNS

FAST = LeaderboardConfig(n_boot=20, resamples=2, mask_steps=3)


def _case(name):
    gt = load_groundtruth(name)
    (task, disc), (_, held) = adapt_groundtruth(gt, 8, seed=0), adapt_groundtruth(gt, 8, seed=1)
    return gt, task, disc, held


@pytest.fixture(scope="module")
def induction():
    return _case("induction_handwired")  # one live edge under its task counterfactual: a unique circuit


@pytest.fixture(scope="module")
def planted():
    return _case("planted_marker")  # dense, almost tie-free edge scores


def _brute_force_areas(gt, task, held, scores):
    """CPR and CMD by hand: each top-k circuit enumerated here, measured with the bridge's own forward and hooks
    (`HookRunner`, not the fast engine), normalised and integrated with numpy."""
    slow = engine_context(gt.model, task, held, runner=HookRunner(gt.model), check_gap=False)
    assert slow.backend == "hook"
    n = scores.numel()
    clean, corrupt = float(slow.clean_values.mean()), float(slow.corrupt_values.mean())
    curves = {}
    for name, key in (("signed", scores), ("absolute", scores.abs())):
        order = sorted(range(n), key=lambda i: -float(key[i]))
        f = []
        for pct in PERCENTS:
            k = max(1, int(round(n * pct / 100)))
            assert k == n or float(key[order[k - 1]]) > float(key[order[k]])  # no tie at the cut: one circuit
            mask = torch.zeros(1, n)
            mask[0, order[:k]] = 1.0
            f.append((float(evaluate_edge_masks(slow, mask).mean()) - corrupt) / (clean - corrupt))
        curves[name] = np.array(f)
    x = np.array(PERCENTS) / 100
    return float(np.trapezoid(curves["signed"], x)), float(np.trapezoid(np.abs(1 - curves["absolute"]), x))


def test_cpr_cmd_equal_brute_force_on_a_ground_truth(planted):
    gt, task, disc, held = planted
    ctx, hctx = prepare_edges(gt.model, task, disc), prepare_edges(gt.model, task, held)
    cprs = []
    for method in ("eap", "random"):
        result = leaderboard_cell(ctx, hctx, method, FAST)
        scores = result.edge_scores
        cpr, cmd = _brute_force_areas(gt, task, held, scores)
        assert math.isclose(result.row["cpr"], cpr, abs_tol=1e-4) and math.isclose(result.row["cmd"], cmd, abs_tol=1e-4)
        assert result.row["cpr_low"] <= result.row["cpr"] + 1e-9 <= result.row["cpr_high"] + 2e-9
        cprs.append(cpr)
    assert abs(cprs[0] - cprs[1]) > 0.05  # the two rankings give different circuits: the comparison has teeth


def test_stability_is_one_for_a_unique_circuit_and_not_for_random(induction):
    gt, task, disc, held = induction
    ctx, hctx = prepare_edges(gt.model, task, disc), prepare_edges(gt.model, task, held)
    scores = eap_scores(ctx)
    live = int((scores.abs() > 1e-6).sum())
    assert 0 < live < scores.numel()  # dead heads' edges score exactly 0: the circuit is unique
    cfg = LeaderboardConfig(n_boot=0, resamples=3, stability_percent=100 * live / scores.numel(),
                            stability_heads=100 / 6)  # one of the six heads
    row = leaderboard_cell(ctx, hctx, "eap", cfg).row
    for key in ("stability_boot_edges", "stability_rephrase_edges", "stability_boot_edges_low",
                "stability_boot_heads", "stability_rephrase_heads"):
        assert row[key] == 1.0, key
    assert leaderboard_cell(ctx, hctx, "random", cfg).row["stability_boot_edges"] < 1.0


def test_jaccard_and_overlap_by_hand():
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3) and jaccard(set(), set()) == 1.0
    mean, low, high = overlap({"a", "b"}, [{"a", "b"}, {"a"}])
    assert mean == pytest.approx(0.75) and low == pytest.approx(0.5125) and high == pytest.approx(0.9875)
    assert top_items(["x", "y", "z"], torch.tensor([0.1, -3.0, 2.0]), 67) == {"y", "z"}


def test_eap_ig_activations_one_step_is_eap(induction):
    gt, task, disc, _ = induction
    ctx = prepare_edges(gt.model, task, disc)
    eap = eap_scores(ctx)
    assert float((eap_ig_activation_scores(ctx, steps=1) - eap).abs().max()) < 1e-5 and float(eap.abs().max()) > 1e-2
    assert float((eap_ig_activation_scores(ctx, steps=3) - eap).abs().max()) > 1e-4  # the path matters


def test_mib_export_import_round_trip_gives_the_same_metrics(planted, tmp_path):
    gt, task, disc, held = planted
    ctx, hctx = prepare_edges(gt.model, task, disc), prepare_edges(gt.model, task, held)
    first = leaderboard_cell(ctx, hctx, "eap", FAST)
    files = write_submission(tmp_path, ctx.graph, first.edge_scores, task="induction", model="toy")
    data = json.loads(files[0].read_text())
    assert set(data) == {"cfg", "nodes", "edges"} and len(data["edges"]) == ctx.graph.n_edges
    assert data["cfg"]["n_layers"] == gt.model.cfg.n_layers and data["cfg"]["n_heads"] == gt.model.cfg.n_heads
    assert "a0.h0->a1.h1<k>" in data["edges"] and files[0].parent.name == "induction_toy"
    again = leaderboard_cell(ctx, hctx, "imported", LeaderboardConfig(n_boot=20, import_file=str(files[0])))
    for key in ("cpr", "cpr_low", "cpr_high", "cmd", "heads_at_target", "edges_at_target", "heads_faithfulness"):
        assert again.row[key] == pytest.approx(first.row[key], abs=1e-6), key
    n = ctx.graph.n_edges
    for pct, path in zip((0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50), files[1:]):
        kept = read_scores(path, ctx.graph)  # binary circuit file: 1 = in the circuit
        assert int(kept.sum()) == int(n * pct / 100) <= n * pct / 100
    assert [int(m.sum()) for m in submission_masks(first.edge_scores, (50.0,))] == [n // 2]
    bad = dict(data, cfg=dict(data["cfg"], n_heads=12))
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="n_heads=12"):  # a file for another model is refused
        read_scores(tmp_path / "bad.json", ctx.graph)


def test_leaderboard_cli_on_a_tiny_model(tiny_dir, tmp_path):
    out, sweep = tmp_path / "out", tmp_path / "sweep"
    common = ["bench", "leaderboard", "--models", tiny_dir, "--tasks", "repeated_tokens", "--n", "4",
              "--n-heldout", "4", "--n-boot", "20", "--resamples", "1", "--out", str(out), "--sweep-dir", str(sweep),
              "--quiet"]
    assert main([*common, "--methods", "eap,random,acdc", "--export-mib", str(tmp_path / "mib")]) == 0
    frame = pd.read_csv(out / "leaderboard.csv")
    assert list(frame.columns) == COLUMNS and list(frame["method"]) == ["eap", "random", "acdc"]
    assert (frame["status"] == "done").all() and frame["cpr"].notna().all() and (frame["forwards"] >= 0).all()
    assert frame.loc[frame["method"] == "eap", "backwards"].item() == 1
    assert list(pd.read_parquet(out / "leaderboard.parquet").columns) == COLUMNS
    md, html = (out / "leaderboard.md").read_text(), (out / "leaderboard.html").read_text()
    assert "| CPR [95% CI] |" in md and "circuitlab bench leaderboard" in md and "PARTIAL" not in md
    assert "Held-out faithfulness curves: repeated_tokens" in html and "plotly" in html.lower()
    scores = next((tmp_path / "mib" / "eap" / "importances").glob("*/importances.json"))
    assert main([*common, "--import", str(scores)]) == 0
    imported = pd.read_csv(out / "leaderboard.csv").iloc[0]
    eap = frame[frame["method"] == "eap"].iloc[0]
    assert imported["method"] == "imported" and imported["cpr"] == pytest.approx(eap["cpr"], abs=1e-5)
    assert main([*common, "--methods", "eap,ifr", "--report-only"]) == 0  # ifr never ran: a partial table
    partial = pd.read_csv(out / "leaderboard.csv")
    assert list(partial["status"]) == ["done", "missing"] and "PARTIAL" in (out / "leaderboard.md").read_text()


def test_work_counter_counts_eap_and_restores(induction):
    gt, task, disc, _ = induction
    ctx = prepare_edges(gt.model, task, disc)
    originals = (Runner.attend, torch.autograd.backward, torch.autograd.grad)
    with WorkCounter() as counter:
        eap_scores(ctx)
        eap_ig_activation_scores(ctx, steps=2)
    assert (Runner.attend, torch.autograd.backward, torch.autograd.grad) == originals
    unit = len(disc) * disc.clean_tokens.shape[1] * gt.model.cfg.n_layers
    assert counter.backward_count() == 3 and counter.forwards(unit) == pytest.approx(3.0)  # 1 clean + 2 masked runs
