"""Padded batches are exact: every method gives on a right-padded batch of prompts of different lengths the
numbers it gives when each prompt runs alone, unpadded (mean over prompts), to 1e-5."""

import numpy as np
import pytest
import torch

from circuitlab.graphs.role_scores import IOIPrompts, ioi_head_scores
from circuitlab.patching.acdc import _objective, acdc
from circuitlab.patching.activation import activation_patching, prepare
from circuitlab.patching.attribution import eap_ig_scores, eap_scores, exact_edge_scores
from circuitlab.patching.edges import evaluate_edge_masks, prepare_edges
from circuitlab.patching.path import path_patching
from circuitlab.tasks import from_records
from circuitlab.tasks.batching import prompt_batches, trim_padding

LENGTHS = (6, 9, 7, 11, 8)


def _rows(vocab: int, seed: int = 0) -> list[dict]:
    """Token-id rows of lengths 6-11 (corrupt differs at positions 1-3); roles IO, S1, S1+1, S2 (per prompt)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for length in LENGTHS:
        clean = torch.randint(0, vocab, (length,), generator=g).tolist()
        corrupt = list(clean)
        for p in (1, 2, 3):
            corrupt[p] = int(torch.randint(0, vocab, (1,), generator=g))
        answer, wrong = torch.randperm(vocab, generator=g)[:2].tolist()
        rows.append({"clean_ids": clean, "corrupt_ids": corrupt, "answer_ids": [answer], "wrong_ids": [wrong],
                     "positions": {"IO": 1, "S1": 2, "S1+1": 3, "S2": length - 3}})
    return rows


@pytest.fixture(params=["tiny_model", "tiny_gqa_model"])
def setup(request):
    model = request.getfixturevalue(request.param)
    task = from_records(_rows(model.cfg.d_vocab))
    pairs = task.generate(model)
    assert pairs.attention_mask is not None and len(set(pairs.lengths.tolist())) == len(LENGTHS)
    singles = list(prompt_batches(pairs, 1))
    assert all(p.attention_mask is None and p.seq_len == n for p, n in zip(singles, LENGTHS))
    return model, task, pairs, singles


def _close(a, b, tol=1e-5):
    a, b = (torch.as_tensor(np.array(x, dtype=np.float64)) for x in (a, b))
    assert a.shape == b.shape and (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item()), (a, b)


def test_activation_patching(setup):
    model, task, pairs, singles = setup
    for component, positions in (("z", "all"), ("z", ["S2", "END"]), ("resid_pre", ["IO"]), ("v", "all"),
                                 ("pattern", ["END"]), ("mlp_out", "all")):
        padded = activation_patching(model, task, pairs, component, positions=positions)
        alone = [activation_patching(model, task, p, component, positions=positions)["metric"] for p in singles]
        _close(padded["metric"].to_numpy(), torch.tensor([list(a) for a in alone]).mean(0))
    ctx = prepare(model, task, pairs)
    _close(ctx.clean_metric, torch.tensor([prepare(model, task, p).clean_metric for p in singles]).mean())


def test_negative_positions_count_from_each_prompts_end(setup):
    """`positions=[-1, -3]` on a padded batch patches each prompt's own last / third-last token: the numbers of
    running each prompt alone (where -1 is unambiguous), not a padding column of the shorter prompts."""
    model, task, pairs, singles = setup
    for component in ("z", "resid_pre", "pattern"):
        padded = activation_patching(model, task, pairs, component, positions=[-1, -3])
        alone = [activation_patching(model, task, p, component, positions=[-1, -3])["metric"] for p in singles]
        _close(padded["metric"].to_numpy(), torch.tensor([list(a) for a in alone]).mean(0))
        assert set(padded["position"]) == {-1, -3}
    kwargs = dict(senders=["a0.h0", "a0.h3"], receivers=["a1.h1"], channel="q", sender_positions=-2,
                  receiver_positions=-1)
    padded = path_patching(model, task, pairs, **kwargs)
    alone = torch.tensor([list(path_patching(model, task, p, **kwargs)["metric"]) for p in singles]).mean(0)
    _close(padded["metric"].to_numpy(), alone)
    with pytest.raises(ValueError, match="shortest prompt has 6 tokens"):
        activation_patching(model, task, pairs, "z", positions=[-7])


def check_edge_methods(ctx, contexts, *, n_masks: int, seed: int, steps: int, stride: int) -> torch.Tensor:
    """Edge masks, EAP, EAP-IG and exact edge scores of the padded context equal the per-prompt contexts'.

    Returns the random edge masks it checked, for further checks on the same circuits."""
    masks = (torch.rand(n_masks, ctx.graph.n_edges, generator=torch.Generator().manual_seed(seed)) > 0.5).float()
    _close(evaluate_edge_masks(ctx, masks), torch.cat([evaluate_edge_masks(c, masks) for c in contexts], 1))
    _close(eap_scores(ctx), torch.stack([eap_scores(c) for c in contexts]).mean(0))
    _close(eap_ig_scores(ctx, steps=steps), torch.stack([eap_ig_scores(c, steps=steps) for c in contexts]).mean(0))
    edges = list(range(0, ctx.graph.n_edges, stride))
    _close(exact_edge_scores(ctx, edges), torch.stack([exact_edge_scores(c, edges) for c in contexts]).mean(0))
    return masks


def test_path_patching(setup):
    model, task, pairs, singles = setup
    for receivers, channel in ((["a1.h0", "a1.h1"], "q"), (["a1.h2"], "k"), (None, "logits")):
        kwargs = dict(senders=["a0.h0", "a0.h3", ["a0.h1", "a0.h2"]], receivers=receivers, channel=channel,
                      receiver_positions="END" if channel != "logits" else None)
        padded = path_patching(model, task, pairs, **kwargs)
        alone = torch.tensor([list(path_patching(model, task, p, **kwargs)["metric"]) for p in singles]).mean(0)
        _close(padded["metric"].to_numpy(), alone)


def test_edge_patching_eap_eap_ig_and_acdc(setup):
    model, task, pairs, singles = setup
    ctx = prepare_edges(model, task, pairs)
    contexts = [prepare_edges(model, task, p) for p in singles]
    masks = check_edge_methods(ctx, contexts, n_masks=4, seed=0, steps=3, stride=37)
    # ACDC only ever sees the mean objective of a circuit over the prompts: check it, then a whole run.
    for kind in ("kl", "metric"):
        full = ctx.edge_runner.masked(pairs.clean_tokens, ctx.corrupt, ctx.graph.mask(torch.ones(1, ctx.graph.n_edges)))
        from circuitlab.patching.edges import _logits_at

        ref = torch.log_softmax(_logits_at(ctx.edge_runner.runner, full, ctx.read_positions), -1)
        per = []
        for i, c in enumerate(contexts):
            per.append(_objective(c, masks, kind, ref[i:i + 1]))
        _close(_objective(ctx, masks, kind, ref), torch.stack(per).mean(0))
    # A whole ACDC run does not depend on how much padding the batch carries.
    wider = _pad_wider(pairs, 3)
    first, second = acdc(ctx, 0.01), acdc(prepare_edges(model, task, wider), 0.01)
    assert torch.equal(first.kept, second.kept) and first.forwards == second.forwards > 1
    _close(torch.nan_to_num(first.scores), torch.nan_to_num(second.scores))


def _pad_wider(pairs, extra):
    from dataclasses import replace

    pad = torch.full((len(pairs), extra), 0, dtype=torch.long)
    return replace(pairs, clean_tokens=torch.cat([pairs.clean_tokens, pad], 1),
                   corrupt_tokens=torch.cat([pairs.corrupt_tokens, pad + 5], 1),
                   attention_mask=torch.cat([pairs.attention_mask, pad], 1))


def test_ioi_role_scores(setup):
    model, task, pairs, singles = setup
    scores = ioi_head_scores(model, IOIPrompts(pairs.clean_tokens, pairs.positions, pairs.answer_ids, pairs.wrong_ids))
    alone = [ioi_head_scores(model, IOIPrompts(p.clean_tokens, p.positions, p.answer_ids, p.wrong_ids)) for p in singles]
    cols = [c for c in scores.columns if c.startswith(("attn_", "dla_"))]
    _close(scores[cols].to_numpy(), torch.tensor(sum(a[cols].to_numpy() for a in alone) / len(alone)))


def test_trim_and_batches_keep_every_prompt(setup):
    _, _, pairs, _ = setup
    batches = list(prompt_batches(pairs, 2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [b.seq_len for b in batches] == [9, 11, 8]
    again = trim_padding(pairs)
    assert torch.equal(again.clean_tokens, pairs.clean_tokens)


def test_mean_ablation_averages_only_real_tokens(setup):
    model, task, pairs, _ = setup
    from circuitlab.patching.activation import _source_activation, prompt_mean
    from circuitlab.patching.edges import ablated_context

    ctx = prepare(model, task, pairs, collect=[("z", 0)])
    mean = _source_activation(ctx, "resid_pre", 1, "mean")[0]  # [pos, d_model]
    corrupt = ctx.corrupt_run.resid_pre[1]
    lengths = pairs.lengths.tolist()
    for pos in range(pairs.seq_len):
        real = [i for i, n in enumerate(lengths) if pos < n]
        _close(mean[pos], corrupt[real, pos].mean(0))
    z = _source_activation(ctx, "z", 0, "mean")[0]
    _close(z[10], ctx.corrupt_run.acts[("z", 0)][3, 10])  # only the 11-token prompt reaches position 10
    pattern = torch.rand(len(lengths), 2, pairs.seq_len, pairs.seq_len)
    _close(prompt_mean(pattern, pairs.attention_mask, 2)[0, :, 10], pattern[3, :, 10])
    edges = prepare_edges(model, task, pairs)
    ablated = ablated_context(edges, "mean")
    _close(ablated.corrupt.senders[0, 10], edges.corrupt.senders[3, 10])


def test_position_labels_of_mixed_prompts(setup):
    """Heatmap column labels: a token only where every prompt reaching that position has it, else `*`; a role
    only where every such prompt has it (the first prompt's tokens would mislabel the others)."""
    from circuitlab.reports.run import _position_labels

    model, _, pairs, _ = setup
    labels = _position_labels(model, pairs)
    assert len(labels) == pairs.seq_len
    assert labels[1].endswith("[IO]") and labels[2].endswith("[S1]") and labels[3].endswith("[S1+1]")
    assert labels[1].startswith("*")  # random tokens: the prompts differ at position 1
    last = pairs.seq_len - 1  # only the longest prompt reaches it: its token and its END
    assert labels[last] == f"<{int(pairs.clean_tokens[3, last])}> [END]"
    assert not any("[S2]" in label or "[END]" in label for label in labels[:last])
