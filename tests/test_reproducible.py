"""Reproducible studies (issue 26): the phase study and mask learning give the same numbers on rerun at the same
seed and thread count, whatever thread count the calling process happens to have."""

import json

import pandas as pd
import pytest
import torch

from circuitlab.patching.mask_learning import MaskConfig, learn_masks
from circuitlab.patching.edges import prepare_edges
from circuitlab.patching.reproducible import pinned_threads
from circuitlab.patching.training import TrainConfig, train_attn_only
from circuitlab.reports.phase import PhaseConfig, run_phase_study
from circuitlab.tasks.corpus import load_corpus, periodic_mix
from tests.toy import ToyTask, toy_pairs

SMALL = dict(layers=(2,), steps=24, batch_size=8, n_ctx=64, d_model=32, n_heads=2, n_checkpoints=3,
             n_linear_checkpoints=2, max_bytes=400_000, eval_sequences=4, probe_sequences=4, probe_half=12,
             progress=False)


def _phase(out, process_threads, **extra):
    torch.set_num_threads(process_threads)
    run_phase_study(PhaseConfig(out=str(out), **SMALL, **extra))
    assert torch.get_num_threads() == process_threads  # the study restores the caller's setting
    summary = json.loads((out / "summary.json").read_text())
    numbers = {name: pd.read_csv(out / name) for name in ("checkpoints.csv", "heads.csv", "ablation.csv")}
    return summary, numbers


def test_phase_study_same_seed_same_numbers_whatever_the_process_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        a_summary, a = _phase(tmp_path / "a", 2)
        b_summary, b = _phase(tmp_path / "b", 1)
    finally:
        torch.set_num_threads(before)
    assert a_summary["reproducibility"] == {"seed": 0, "threads": 1, "deterministic_algorithms": True}
    assert a_summary["torch_threads"] == 1  # the pinned count, not the caller's 2
    for name in a:  # bit-identical tables, NaNs in the same places
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True)
    assert a_summary["windows"] == b_summary["windows"]
    assert a_summary["joint_ablation"] == b_summary["joint_ablation"]
    assert a_summary["acceptance"] == b_summary["acceptance"]
    with pytest.raises(ValueError, match="threads must be an integer ≥ 1"):
        run_phase_study(PhaseConfig(out=str(tmp_path / "bad"), threads=0))
    assert not (tmp_path / "bad").exists()


def test_training_weights_depend_on_threads_only_through_the_pinned_count(tmp_path):
    """Why the count is pinned: at the phase study's model size 1 and 2 threads give different weights (so a run
    that takes its count from the machine is not reproducible); at one count, reruns are bit-identical."""
    corpus = load_corpus(max_bytes=400_000)

    def sample(n, width, gen):
        return periodic_mix(corpus, n, width, gen)

    weights = {}
    for run, threads in (("a", 1), ("b", 1), ("c", 2), ("d", 2)):
        cfg = TrainConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=128, d_vocab=corpus.vocab,
                          batch_size=16, steps=6, lr=1e-2, n_checkpoints=2, n_linear_checkpoints=1, threads=threads)
        result = train_attn_only(cfg, sample, tmp_path / run, progress=False)
        weights[run] = (result.log["loss"].tolist(), torch.load(tmp_path / run / "train_state.pt",
                                                                weights_only=False)["module"])
    for x, y in (("a", "b"), ("c", "d")):
        assert weights[x][0] == weights[y][0]
        assert all(torch.equal(weights[x][1][k], weights[y][1][k]) for k in weights[x][1])
    assert any(not torch.equal(weights["a"][1][k], weights["c"][1][k]) for k in weights["a"][1])


def test_mask_learning_same_seed_same_masks(tiny_model):
    ctx = prepare_edges(tiny_model, ToyTask(), toy_pairs(tiny_model.cfg.d_vocab, seed=3))
    cfg = MaskConfig(level="edge", steps=25, batch_size=4, seed=7)
    with pinned_threads(1):
        first, second = learn_masks(ctx, cfg), learn_masks(ctx, cfg)
    assert torch.equal(first.log_alpha, second.log_alpha)
    assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]
    assert first.history[-1]["loss"] != first.history[0]["loss"]  # it learned something
