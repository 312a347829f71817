"""Position-aware edges (`topology.PositionalGraph`, `edges.with_positions`): exact edge patching at
(sender, segment) -> (receiver, segment) granularity equals a plain-hook reference written here on the bridge's own
hooks, on a right-padded batch; position-aware EAP equals finite differences of the exact masked metric."""

import json
import math
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from circuitlab.graphs.discovery import discover, evaluate
from circuitlab.patching.models import load_model
from circuitlab.reports.cli import main
from circuitlab.reports.save import load_result
from circuitlab.tasks import get_task

from circuitlab.patching.attribution import eap_ig_scores, eap_scores, exact_edge_scores
from circuitlab.patching.edge_masks import edge_masked_metric
from circuitlab.patching.edges import evaluate_edge_masks, prepare_edges, with_positions
from circuitlab.patching.faithfulness import faithfulness_curve
from circuitlab.patching.acdc import acdc
from circuitlab.patching.models import boot_native_model
from circuitlab.patching.topology import PositionalGraph, PositionSplit, position_split
from tests.test_cli import FAST
from tests.toy import ToyPairs, ToyTask, toy_pairs


class PaddedToyTask(ToyTask):
    """ToyTask read at each prompt's own last token (right padding)."""

    def read_positions(self, pairs):
        return (pairs.attention_mask.sum(1) - 1).long().unsqueeze(1)

    def metric(self, logits, pairs):
        return self.metric_at(logits[torch.arange(logits.shape[0])[:, None], self.read_positions(pairs)], pairs)


class SizedPairs(ToyPairs):
    def __len__(self):
        return int(self.clean_tokens.shape[0])


def padded_pairs(vocab, seed=0):
    """Four prompts of lengths 10, 8, 10, 7, right-padded with token 0; role X at 3 or 4, END last."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([10, 8, 10, 7])
    clean = torch.randint(1, vocab, (4, 10), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2:5] = torch.randint(1, vocab, (4, 3), generator=g)
    mask = (torch.arange(10)[None] < lengths[:, None]).long()
    clean, corrupt = clean * mask, corrupt * mask
    answer = torch.randint(0, vocab, (4, 1), generator=g)
    wrong = (answer + 1 + torch.randint(0, vocab - 1, (4, 1), generator=g)) % vocab
    roles = {"X": torch.tensor([3, 4, 3, 4]), "END": lengths - 1}
    return SizedPairs(clean, corrupt, answer, wrong, roles, mask)


@dataclass
class Cached:
    senders: list  # [b, p, d] per sender, graph order
    pre: list
    mid: list
    final: torch.Tensor


def _cache(model, tokens):
    n = model.cfg.n_layers
    names = {f"blocks.{l}.{h}" for l in range(n) for h in ("hook_resid_pre", "hook_resid_mid", "attn.hook_z",
                                                            "hook_mlp_out")} | {f"blocks.{n - 1}.hook_resid_post"}
    _, c = model.run_with_cache(tokens, names_filter=lambda x: x in names)
    senders = [c["blocks.0.hook_resid_pre"]]
    for l in range(n):
        senders += [c[f"blocks.{l}.attn.hook_z"][:, :, h] @ model.W_O[l, h] for h in range(model.cfg.n_heads)]
        senders.append(c[f"blocks.{l}.hook_mlp_out"])
    return Cached(senders, [c[f"blocks.{l}.hook_resid_pre"] for l in range(n)],
                  [c[f"blocks.{l}.hook_resid_mid"] for l in range(n)], c[f"blocks.{n - 1}.hook_resid_post"])


def reference_metric(model, task, pairs, split, masks):
    """Per-prompt metric of a position-aware circuit, from the bridge's own hooks only: each receiver's input is
    the corrupted run's stream plus, at every position, the kept senders' (circuit - corrupted) outputs under
    that position's segment mask (masks [S, n_senders, n_receivers]); each q/k/v and MLP output is taken from a
    forward whose stream is replaced by that input, then put into the layer."""
    n, heads = model.cfg.n_layers, model.cfg.n_heads
    tokens = pairs.clean_tokens
    clean, corrupt = _cache(model, tokens), _cache(model, pairs.corrupt_tokens)
    seg = torch.nn.functional.one_hot(split.index, len(split.names)).float()  # [b, p, S]
    circuit = [clean.senders[0]]
    recv = 0

    def receiver_input(base, receiver):
        x = base.clone()
        for u, out in enumerate(circuit):
            weight = seg @ masks[:, u, receiver]  # [b, p]: this edge's mask at each position
            x = x + weight[..., None] * (out - corrupt.senders[u])
        return x

    def capture(hook_name, replace_name, value):
        got = {}
        model.run_with_hooks(tokens, fwd_hooks=[(replace_name, lambda a, hook: value),
                                                (hook_name, lambda a, hook: got.setdefault("v", a.clone()))])
        return got["v"]

    for l in range(n):
        qkv = {}
        for c, channel in enumerate("qkv"):
            for h in range(heads):
                x = receiver_input(corrupt.pre[l], recv + c * heads + h)
                qkv[(channel, h)] = capture(f"blocks.{l}.attn.hook_{channel}", f"blocks.{l}.hook_resid_pre", x)[:, :, h]
        recv += 3 * heads

        def put(channel):
            def hook(a, hook):
                a = a.clone()
                for h in range(heads):
                    a[:, :, h] = qkv[(channel, h)]
                return a
            return (f"blocks.{l}.attn.hook_{channel}", hook)

        got = {}
        model.run_with_hooks(tokens, fwd_hooks=[put("q"), put("k"), put("v"), (
            f"blocks.{l}.attn.hook_z", lambda a, hook: got.setdefault("z", a.clone()))])
        circuit += [got["z"][:, :, h] @ model.W_O[l, h] for h in range(heads)]
        x = receiver_input(corrupt.mid[l], recv)
        circuit.append(capture(f"blocks.{l}.hook_mlp_out", f"blocks.{l}.hook_resid_mid", x))
        recv += 1
    x = receiver_input(corrupt.final, recv)
    logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{n - 1}.hook_resid_post", lambda a, hook: x)])
    return task.metric(logits, pairs)


@pytest.fixture(scope="module")
def setup(tiny_model):
    task, pairs = PaddedToyTask(), padded_pairs(tiny_model.cfg.d_vocab, seed=7)
    ctx = prepare_edges(tiny_model, task, pairs, positions="roles")
    return tiny_model, task, pairs, ctx


def test_role_split_segments():
    split = position_split("roles", {"X": torch.tensor([3, 4]), "END": torch.tensor([9, 6])}, 10)
    assert split.names == ("start", "X", "X..", "END", "END..")
    assert split.index[0].tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 3]
    assert split.index[1].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 4, 4]  # padding after END
    with pytest.raises(ValueError, match="unknown"):
        position_split("tokens", {"X": torch.tensor([3])}, 10)


def test_positional_edge_patching_equals_plain_hooks_on_padded_batch(setup):
    model, task, pairs, ctx = setup
    g = ctx.graph
    assert isinstance(g, PositionalGraph) and g.n_edges == 5 * g.base.n_edges
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, g.n_edges, generator=gen) > 0.5).float()
    masks[2] = 0.0
    masks[2, g.edge_index("a0.h1->logits@END")] = 1.0  # one edge at one segment
    masks[2, g.edge_index("input->a0.h1<v>@X")] = 1.0  # a path through positions
    got = evaluate_edge_masks(ctx, masks)
    with torch.no_grad():
        for i in range(3):
            want = reference_metric(model, task, pairs, ctx.split, g.mask(masks[i]))
            assert float((got[i] - want).abs().max()) < 1e-5
    assert float((got[0] - got[1]).abs().max()) > 1e-2  # the circuits differ, so the comparison means something
    assert float((got[2] - ctx.corrupt_values).abs().max()) > 1e-3


def test_segment_constant_masks_equal_plain_edges(setup):
    model, task, pairs, ctx = setup
    plain = prepare_edges(model, task, pairs)
    base = (torch.rand(2, plain.graph.n_edges, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    spread = base.repeat(1, len(ctx.split.names))
    assert torch.allclose(evaluate_edge_masks(ctx, spread), evaluate_edge_masks(plain, base), atol=1e-5)
    eap, eap_plain = eap_scores(ctx), eap_scores(plain)
    assert torch.allclose(ctx.graph.pooled(eap), eap_plain, atol=1e-5)  # segments partition the positions
    assert torch.allclose(ctx.graph.pooled(eap_ig_scores(ctx, steps=2)), eap_ig_scores(plain, steps=2), atol=1e-5)


def test_positional_eap_equals_finite_differences(setup):
    _, _, _, ctx = setup
    scores = eap_scores(ctx)
    picks = torch.argsort(scores.abs(), descending=True)[:4].tolist()
    eps = 1e-3
    masks = torch.ones(2 * len(picks), ctx.graph.n_edges)
    for i, e in enumerate(picks):
        masks[2 * i, e], masks[2 * i + 1, e] = 1 + eps, 1 - eps
    values = evaluate_edge_masks(ctx, masks).double().mean(1)
    for i, e in enumerate(picks):
        derivative = float(values[2 * i] - values[2 * i + 1]) / (2 * eps)
        assert math.isclose(float(scores[e]), derivative, rel_tol=2e-2, abs_tol=2e-3), ctx.graph.edge_names[e]
    exact = exact_edge_scores(ctx, picks[:2])
    off = torch.ones(2, ctx.graph.n_edges)
    off[0, picks[0]] = off[1, picks[1]] = 0.0
    assert torch.allclose(exact, ctx.clean_metric - evaluate_edge_masks(ctx, off).mean(1), atol=1e-5)
    result = faithfulness_curve(ctx, scores, percents=(1.0, 10.0, 100.0), n_boot=10)
    assert abs(float(result.curve.query("percent == 100.0")["faithfulness"].iloc[0]) - 1.0) < 1e-4


def test_discover_with_edge_positions(setup):
    model, task, pairs, ctx = setup
    found = discover(model, task, pairs, "eap", edge_positions="roles")
    assert found.edge_scores.graph.n_edges == ctx.graph.n_edges
    assert torch.allclose(found.edge_scores.scores.float(), eap_scores(ctx), atol=1e-5)
    circuit = found.edge_scores.top_k(20)
    assert all("@" in name for name in circuit.edge_names())
    value = evaluate(found.context, circuit).circuit
    want = evaluate_edge_masks(ctx, circuit.edges.float().unsqueeze(0))[0]
    assert torch.allclose(torch.as_tensor(value, dtype=torch.float32), want, atol=1e-5)
    with pytest.raises(ValueError, match="scores nodes"):
        discover(model, task, pairs, "activation", edge_positions="roles")


def test_run_with_edge_positions(tiny_dir, tmp_path):
    """`circuitlab run --edge-positions roles`: the saved edge scores are the library's position-aware EAP-IG on the
    run's own pairs, the faithfulness curve reaches 1 with every edge, and the edge circuit is chosen and reported."""
    out = tmp_path / "roles"
    assert main(["run", "--model", tiny_dir, "--out", str(out), "--quiet", "--no-roles", "--resid-positions", "none",
                 "--positions", "none", "--heldout-n", "4", "--edge-positions", "roles", "--steps", "2",
                 "--circuit-method", "ranking-edges", *FAST]) == 0
    record = json.loads((out / "run.json").read_text())
    edges = pd.read_parquet(out / "tables" / "edges.parquet")
    result = load_result(out)
    model = load_model(tiny_dir)
    found = discover(model, get_task("repeated_tokens"), result.pairs, "eap-ig", steps=2, edge_positions="roles")
    assert list(edges["edge"]) == found.edge_scores.graph.edge_names and "@" in edges["edge"].iloc[0]
    assert torch.allclose(torch.tensor(edges["score"].to_numpy()), found.edge_scores.scores, atol=1e-5)
    curve = pd.read_csv(out / "faithfulness.csv")
    assert abs(float(curve.query("percent == 100")["faithfulness"].iloc[0]) - 1.0) < 1e-4
    summary = record["circuit_faithfulness"]
    assert summary["level"] == "edge" and all("@" in item for item in summary["items"])
    assert main(["run", "--model", tiny_dir, "--out", str(tmp_path / "x"), "--method", "activation",
                 "--edge-positions", "roles", *FAST]) == 2



def test_differentiable_positional_masks_equal_engine_and_finite_differences(setup):
    """The autograd path (`edge_masks`, what position-aware edge pruning learns through) equals exact edge patching,
    and its gradient equals finite differences of it."""
    _, _, _, ctx = setup
    soft = torch.rand(2, ctx.graph.n_edges, generator=torch.Generator().manual_seed(4))
    soft.requires_grad_(True)
    values = edge_masked_metric(ctx, soft)
    assert torch.allclose(values.detach(), evaluate_edge_masks(ctx, soft.detach()), atol=1e-5)
    grad = torch.autograd.grad(values[0].mean(), soft)[0][0]
    picks, eps = torch.argsort(grad.abs(), descending=True)[:3].tolist(), 1e-2
    for e in picks:
        plus, minus = soft.detach()[:1].clone(), soft.detach()[:1].clone()
        plus[0, e] += eps
        minus[0, e] -= eps
        fd = float(evaluate_edge_masks(ctx, plus).double().mean() - evaluate_edge_masks(ctx, minus).double().mean()) / (2 * eps)
        assert math.isclose(float(grad[e]), fd, rel_tol=2e-2, abs_tol=2e-3), ctx.graph.edge_names[e]



def test_acdc_over_one_segment_equals_plain_acdc():
    """ACDC reads position-aware contexts too: with a single segment holding every position, it keeps exactly the
    edges plain ACDC keeps (31-edge attention-only model)."""
    model = boot_native_model(dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_vocab=64, n_ctx=32, attn_only=True,
                                   normalization_type="RMS", positional_embedding_type="rotary", seed=3))
    task, pairs = ToyTask(), toy_pairs(64, seed=3)
    plain = prepare_edges(model, task, pairs)
    one = with_positions(plain, PositionSplit(("all",), torch.zeros(pairs.clean_tokens.shape, dtype=torch.long)))
    a, b = acdc(plain, 0.02, objective="metric"), acdc(one, 0.02, objective="metric")
    assert torch.equal(a.kept, b.kept) and 0 < int(a.kept.sum()) < plain.graph.n_edges
