"""Training, corpus, phase detection and the `circuitlab phase` command on small settings."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from circuitlab.graphs.phase import detect_phase_change
from circuitlab.patching.models import load_model
from circuitlab.patching.training import FastAttnOnly, TrainConfig, checkpoint_steps, train_attn_only
from circuitlab.tasks.corpus import Corpus, load_corpus, periodic_mix, with_repeats


def test_checkpoint_steps_log_and_linear():
    steps = checkpoint_steps(1000, 8)
    assert steps[0] == 0 and steps[1] == 1 and steps[-1] == 1000
    ratios = [b / a for a, b in zip(steps[1:], steps[2:])]
    assert max(ratios) / min(ratios) < 1.6  # log-spaced
    both = checkpoint_steps(1000, 8, 10)
    assert set(range(100, 1001, 100)) <= set(both) and set(steps) <= set(both)


def test_fast_module_matches_the_bridge_and_loads_back():
    from transformer_lens.model_bridge import TransformerBridge

    for norm, positions in (("LN", "rotary"), (None, "standard"), ("LN", "standard")):
        cfg = TrainConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=12, d_vocab=20, normalization_type=norm,
                          positional_embedding_type=positions)
        bridge = TransformerBridge.boot_native(cfg.model_config(), device="cpu")
        fast = FastAttnOnly(bridge)
        with torch.no_grad():
            for p in fast.parameters():  # move away from the init so every weight matters
                p.add_(0.3 * torch.randn_like(p))
        tokens = torch.randint(0, 20, (3, 12), generator=torch.Generator().manual_seed(0))
        bridge.load_state_dict(fast.to_state_dict(), strict=False)
        with torch.no_grad():
            assert torch.allclose(fast(tokens), bridge(tokens), atol=1e-5)


def _sampler(vocab):
    def sample(n, width, gen):
        base = torch.randint(0, vocab, (n, width), generator=gen)
        return with_repeats(base, 1.0, gen, min_len=3, max_len=5)
    return sample


def test_training_is_seeded_and_resumes_to_the_same_weights(tmp_path):
    cfg = TrainConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=16, d_vocab=24, batch_size=4, steps=12,
                      n_checkpoints=4, n_linear_checkpoints=2)
    full = train_attn_only(cfg, _sampler(24), tmp_path / "a", progress=False)
    assert sorted(full.checkpoints) == checkpoint_steps(12, 4, 2)
    assert list(full.log["step"]) == list(range(1, 13))
    again = train_attn_only(cfg, _sampler(24), tmp_path / "a", progress=False)
    assert again.resumed_from == 12 and sorted(again.checkpoints) == sorted(full.checkpoints)
    other = train_attn_only(cfg, _sampler(24), tmp_path / "b", progress=False)
    a = load_model(str(full.checkpoints[12])).state_dict()
    b = load_model(str(other.checkpoints[12])).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded: a second run gives the same weights
    with pytest.raises(ValueError, match="different config"):
        train_attn_only(TrainConfig(**{**cfg.__dict__, "lr": 1e-2}), _sampler(24), tmp_path / "a", progress=False)


def test_resume_from_a_midway_state_matches_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=16, d_vocab=24, batch_size=4, steps=10,
                      n_checkpoints=3, n_linear_checkpoints=2)
    full = train_attn_only(cfg, _sampler(24), tmp_path / "full", progress=False)
    calls = {"n": 0}

    def dying(n, width, gen):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return _sampler(24)(n, width, gen)

    with pytest.raises(KeyboardInterrupt):
        train_attn_only(cfg, dying, tmp_path / "cut", progress=False)
    assert torch.load(tmp_path / "cut" / "train_state.pt", weights_only=False)["step"] == 5
    resumed = train_attn_only(cfg, _sampler(24), tmp_path / "cut", progress=False)
    assert resumed.resumed_from == 5
    a = load_model(str(full.checkpoints[10])).state_dict()
    b = load_model(str(resumed.checkpoints[10])).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_with_repeats_copies_a_span_forward():
    gen = torch.Generator().manual_seed(0)
    base = torch.arange(64).repeat(5, 1)
    out = with_repeats(base, 1.0, gen, min_len=4, max_len=8)
    for row in out:
        changed = torch.nonzero(row != torch.arange(64)).flatten()
        assert 4 <= len(changed) <= 8
        start = int(changed[0])
        length = len(changed)
        src = int(row[start])
        assert torch.equal(row[start:start + length], torch.arange(src, src + length))
        assert src + length <= start  # the source lies before the copy
    assert torch.equal(with_repeats(base, 0.0, gen), base)


def test_periodic_mix_tiles_one_corpus_segment_after_a_short_lead():
    """Distinct tokens (the stream is 0, 1, 2, …) make every period and every source offset readable."""
    stream = torch.arange(5000)
    corpus = Corpus(stream, stream.clone(), 5000, "arange", 1, "bytes")
    out = periodic_mix(corpus, 64, 40, torch.Generator().manual_seed(3), periodic_prob=1.0, min_period=3,
                       max_period=7, repeat_prob=0.0)
    for row in out.tolist():
        # positions ≥ 14 lie in the tiled part (lead < 7, period ≤ 7): the smallest shift that repeats them
        period = next(p for p in range(1, 20) if all(row[t] == row[t - p] for t in range(14, 40)))
        lead = next(t for t in range(40) if all(row[u] == row[u - period] for u in range(t + period, 40)))
        assert 3 <= period <= 7 and 0 <= lead < period
        segment = row[lead:lead + period]
        assert segment == list(range(segment[0], segment[0] + period))  # one contiguous corpus segment
        assert row[lead:] == (segment * 40)[:40 - lead]
        assert row[:lead] == list(range(row[0], row[0] + lead))  # the lead is real text of the row's window
    mixed = periodic_mix(corpus, 400, 40, torch.Generator().manual_seed(4), periodic_prob=0.5, repeat_prob=0.0,
                         max_period=8)
    periodic = [r != list(range(r[0], r[0] + 40)) for r in mixed.tolist()]  # other rows: untouched windows
    assert 0.4 < sum(periodic) / 400 < 0.6
    again = periodic_mix(corpus, 400, 40, torch.Generator().manual_seed(4), periodic_prob=0.5, repeat_prob=0.0,
                         max_period=8)
    assert torch.equal(mixed, again)
    plain = periodic_mix(corpus, 8, 40, torch.Generator().manual_seed(5), periodic_prob=0.0, repeat_prob=1.0)
    assert torch.equal(plain, with_repeats(corpus.batch(8, 40, g := torch.Generator().manual_seed(5)), 1.0, g))
    with pytest.raises(ValueError, match="max_period"):
        periodic_mix(corpus, 2, 16, torch.Generator(), max_period=16)


def test_corpus_split_is_by_file_and_deterministic(tmp_path):
    for i in range(40):
        (tmp_path / f"m{i}.py").write_text(f"x{i} = {i}\n" * 30)
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "skip.py").write_text("SKIPPED" * 1000)
    a = load_corpus(root=tmp_path, heldout_fraction=0.2)
    b = load_corpus(root=tmp_path, heldout_fraction=0.2)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    assert a.vocab == 256 and a.n_files == 40
    text = bytes(a.train.tolist()) + bytes(a.heldout.tolist())
    assert b"SKIPPED" not in text and b"x39 = 39" in text


def test_detect_phase_change_on_known_curves():
    steps = np.array([0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100])
    ind = np.array([0.02, 0.03, 0.05, 0.1, 0.15, 0.7, 0.8, 0.82, 0.85, 0.85, 0.86])
    icl = np.array([0.0, -0.1, -0.1, -0.12, -0.15, -0.8, -0.85, -0.9, -0.9, -0.9, -0.91])
    table = pd.DataFrame({"step": steps, "top_induction": ind, "icl_score": icl})
    w = detect_phase_change(table)
    assert w.found and (w.start, w.end) == (40, 50)
    assert w.fraction_of_training == pytest.approx(0.1)
    assert w.steepest_icl_drop == (40, 50) and w.steepest_icl_drop_in_window
    assert w.icl_change_in_window == pytest.approx(0.65 / 0.91)
    log = pd.DataFrame({"step": np.arange(1, 101), "loss": np.r_[np.linspace(3, 2.9, 40), np.linspace(2.9, 2.3, 10),
                                                                   np.linspace(2.3, 2.25, 50)]})
    assert detect_phase_change(table, log).loss_slope_ratio > 5
    flat = detect_phase_change(table.assign(top_induction=0.05))
    assert not flat.found and "never reached" in flat.reason


def test_icl_drop_is_compared_on_the_even_grid_not_in_the_early_transient():
    """Log-spaced early checkpoints (1, 3) catch the untrained model starting to use its context: a big fall over
    few steps. On the evenly spaced checkpoints the steepest fall is the window's; both are reported."""
    from circuitlab.graphs.phase import even_grid

    steps = np.array([0, 1, 3, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100])
    ind = np.array([0.02, 0.02, 0.02, 0.03, 0.05, 0.1, 0.15, 0.7, 0.8, 0.82, 0.85, 0.85, 0.86])
    icl = np.array([0.1, 0.05, -0.3, -0.12, -0.1, -0.12, -0.15, -0.4, -0.45, -0.5, -0.5, -0.5, -0.51])
    table = pd.DataFrame({"step": steps, "top_induction": ind, "icl_score": icl})
    assert even_grid(steps) == list(range(10, 101, 10))
    w = detect_phase_change(table)
    assert (w.start, w.end, w.grid_spacing) == (40, 50, 10)
    assert w.steepest_icl_drop == (40, 50) and w.steepest_icl_drop_value == pytest.approx(-0.25)
    assert w.steepest_icl_drop_in_window
    assert w.steepest_icl_drop_any == (1, 3) and w.steepest_icl_drop_any_value == pytest.approx(-0.35)
    assert w.early_icl_change == pytest.approx(-0.22)  # step 0 -> first grid step
    coarse = detect_phase_change(table, grid=[10, 20, 30, 90, 100])  # one grid interval holds the whole window
    assert coarse.steepest_icl_drop == (30, 90) and coarse.steepest_icl_drop_in_window
    later = detect_phase_change(table.assign(icl_score=np.r_[icl[:10], -0.9, -0.9, -0.9]))  # a later, bigger fall
    assert later.steepest_icl_drop == (70, 80) and not later.steepest_icl_drop_in_window


def test_fast_loss_and_ablations_match_the_bridge():
    """`loss_by_position` on the fused forward (with zero/mean ablation hooks on hook_z) equals the bridge's own
    hooked forward; the mean activations equal the bridge's cached hook_z averaged by hand."""
    from transformer_lens.model_bridge import TransformerBridge

    from circuitlab.graphs.ablation import ablation_hooks, head_means
    from circuitlab.patching.loss import loss_by_position

    cfg = TrainConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=20, d_vocab=24)
    bridge = TransformerBridge.boot_native(cfg.model_config(), device="cpu")
    state = {k: v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) if v.is_floating_point()
             and "rotary" not in k else v for k, v in bridge.state_dict().items()}
    bridge.load_state_dict(state, strict=False)
    bridge.eval()
    tokens = torch.randint(0, 24, (10, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    means = head_means(bridge, tokens, batch_size=4)
    for layer in range(2):
        assert torch.allclose(means[layer], cache[f"blocks.{layer}.attn.hook_z"].mean(0), atol=1e-5)
    for hooks in ([], ablation_hooks(bridge, [(0, 1), (1, 0)], "zero"),
                  ablation_hooks(bridge, [(1, 1)], "mean", means=means)):
        fast = loss_by_position(bridge, tokens, batch_size=4, fwd_hooks=hooks)
        slow = loss_by_position(bridge, tokens, batch_size=4, fwd_hooks=hooks, fast=False)
        assert torch.allclose(fast[1:], slow[1:], atol=1e-5)
    assert not torch.allclose(loss_by_position(bridge, tokens, fwd_hooks=ablation_hooks(bridge, [(0, 1)], "zero")),
                              loss_by_position(bridge, tokens), equal_nan=True)  # the hooks do act


def test_offline_published_checkpoints_give_the_usual_error(monkeypatch, tmp_path):
    from circuitlab.reports.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code = main(["phase", "--out", str(tmp_path / "pub"), "--model", "EleutherAI/pythia-14m-nonexistent",
                 "--revisions", "step1000", "--quiet"])
    assert code == 1
    with pytest.raises(ValueError, match="hub models only"):
        load_model("smollm2-135m", revision="step1")


def test_phase_cli_small_end_to_end(tmp_path, capsys):
    """The `make test` setting: both models, every table and the report, then a resume that trains nothing."""
    from circuitlab.reports.cli import main

    out = tmp_path / "phase"
    args = ["phase", "--out", str(out), "--steps", "30", "--batch-size", "8", "--n-ctx", "64", "--d-model", "32",
            "--n-heads", "2", "--n-checkpoints", "4", "--n-linear-checkpoints", "2", "--max-bytes", "400000",
            "--eval-sequences", "4", "--probe-sequences", "4", "--probe-half", "12", "--quiet"]
    assert main(args) == 0
    table = pd.read_csv(out / "checkpoints.csv")
    assert set(table["model"]) == {"1L", "2L"}
    assert list(table[table["model"] == "2L"]["step"]) == checkpoint_steps(30, 4, 2)
    assert (table["late"] == 63).all() and (table["early"] == 6).all()
    heads = pd.read_csv(out / "heads.csv", keep_default_na=False)
    assert len(heads) == len(table[table["model"] == "1L"]) * 2 + len(table[table["model"] == "2L"]) * 4
    final2 = heads[(heads["model"] == "2L") & (heads["step"] == 30)]
    assert final2["patch_effect"].astype(float).notna().all()
    assert final2["delta_icl_zero"].astype(float).notna().all()
    summary = json.loads((out / "summary.json").read_text())
    assert {"1L", "2L"} <= set(summary["windows"]) and "acceptance" in summary
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "Acceptance" in html
    assert (out / "report.md").is_file() and (out / "figures" / "loss_icl.png").is_file()
    assert load_model(str(out / "checkpoints" / "2L" / "step_000030")).cfg.n_layers == 2
    mtime = (out / "checkpoints" / "2L" / "step_000030" / "model.safetensors").stat().st_mtime
    assert main(args) == 0  # resumes: nothing retrained
    assert (out / "checkpoints" / "2L" / "step_000030" / "model.safetensors").stat().st_mtime == mtime
