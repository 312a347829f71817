"""Every family on tiny random-init HF models (built offline, saved, loaded with `load_model(dir)`): the engine
against naive implementations over the bridge's own hooks."""

import pytest
import torch

from circuitlab.patching.activation import PatchingConfig, activation_patching
from circuitlab.patching.attribution import eap_scores, exact_edge_scores
from circuitlab.patching.components import hook_name, parse_node
from circuitlab.patching.edges import evaluate_edge_masks
from circuitlab.patching.engine import engine_context
from circuitlab.patching.path import path_patching
from circuitlab.patching.hook_backend import DiscardedEditError, HookRunner
from tests.hf_tiny import FAMILIES, build_tiny, hf_pattern_patched_logits, smollm2_tokenizer
from tests.toy import ToyTask, toy_pairs

_BUILT: dict = {}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Builds each family's tiny model once per session, on first use."""
    tok = smollm2_tokenizer()

    def get(family):
        if family not in _BUILT:
            from circuitlab.patching.models import load_model

            _BUILT[family] = load_model(str(build_tiny(family, tmp_path_factory.mktemp(family), tokenizer=tok)))
        return _BUILT[family]
    return get


def _run(model, tokens, hooks):
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=hooks)


# TransformerLens 4.3 fires attn.hook_pattern of these HF-backed families after HF has used the values: their
# pattern reference patches HF's own eager attention instead (tests.hf_tiny.hf_pattern_patched_logits).
POST_HOC_PATTERN = ("gptj", "opt")


def _naive_patch(model, task, pairs, kind, layer, head, pos, clean_cache, family=""):
    """Denoising by hand: the clean activation into the corrupted run at one hook."""
    if kind == "pattern" and family in POST_HOC_PATTERN:
        logits = hf_pattern_patched_logits(model, family, pairs.clean_tokens, pairs.corrupt_tokens, layer, head, pos)
        return task.metric(logits, pairs).mean().item()
    name = hook_name(kind, layer)
    src = clean_cache[name]

    def hook(act, hook):
        act = act.clone()
        if kind == "pattern":
            sel = (slice(None), head) if pos is None else (slice(None), head, pos)
        elif head is None:
            sel = (slice(None),) if pos is None else (slice(None), pos)
        else:
            sel = (slice(None), slice(None), head) if pos is None else (slice(None), pos, head)
        act[sel] = src[sel]
        return act

    return task.metric(_run(model, pairs.corrupt_tokens, [(name, hook)]), pairs).mean().item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_engine_equals_bridge_hooks(family_dirs, family):
    model = family_dirs(family)
    task, pairs = ToyTask(), toy_pairs(model.cfg.d_vocab, batch=3, seq=7, seed=1)
    ctx = engine_context(model, task, pairs)
    assert ctx.backend == "fast", ctx.backend_reason
    names = {hook_name(k, l) for k in ("z", "q", "k", "v", "pattern", "resid_pre", "mlp_out")
             for l in range(model.cfg.n_layers)}
    names = {n for n in names if n in model.hook_dict or "resid_mid" not in n}
    with torch.no_grad():
        _, clean = model.run_with_cache(pairs.clean_tokens, names_filter=lambda n: n in names)
    checks = [("z", "all", None), ("z", [4], 4), ("q", "all", None), ("k", "all", None), ("v", [5], 5),
              ("pattern", [6], 6), ("resid_pre", [3], 3), ("mlp_out", "all", None)]
    for kind, positions, pos in checks:
        frame = activation_patching(model, task, pairs, kind, positions=positions, context=ctx)
        for row in frame.itertuples():
            head = None if row.head < 0 else int(row.head)
            expected = _naive_patch(model, task, pairs, kind, int(row.layer), head, pos, clean, family)
            assert abs(row.metric - expected) <= 1e-4 * max(1.0, abs(expected)), (family, kind, row.layer, row.head)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "opt", "llama"])
def test_hook_backend_pattern_exact_or_refused(family_dirs, family):
    """The hook backend patches attention patterns exactly where the bridge's hook takes effect, and refuses (naming
    the family and `--backend fast`) where it would be discarded; never a silent unpatched number."""
    model = family_dirs(family)
    task, pairs = ToyTask(), toy_pairs(model.cfg.d_vocab, batch=3, seq=7, seed=1)
    ctx = engine_context(model, task, pairs, runner=HookRunner(model))
    if family in POST_HOC_PATTERN:
        with pytest.raises(DiscardedEditError, match=r"(?s)ForCausalLM.*--backend fast"):
            activation_patching(model, task, pairs, "pattern", positions=[6], context=ctx)
        return
    frame = activation_patching(model, task, pairs, "pattern", positions=[6], context=ctx)
    with torch.no_grad():
        _, clean = model.run_with_cache(pairs.clean_tokens, names_filter=lambda n: "hook_pattern" in n)
    for row in frame.itertuples():
        expected = _naive_patch(model, task, pairs, "pattern", int(row.layer), int(row.head), 6, clean, family)
        assert abs(row.metric - expected) <= 1e-4 * max(1.0, abs(expected)), (family, row.layer, row.head)


def _naive_path_q(model, task, pairs, sender, receiver):
    """Path patching sender -> receiver's query over bridge hooks only (denoise: base corrupt, source clean)."""
    s, r = parse_node(sender), parse_node(receiver)
    with torch.no_grad():
        _, clean = model.run_with_cache(pairs.clean_tokens, names_filter=lambda n: n == hook_name("z", s.layer))
    got = {}

    def sender_hook(act, hook):
        act = act.clone()
        act[:, :, s.head] = clean[hook_name("z", s.layer)][:, :, s.head]
        return act

    def grab(act, hook):
        got["resid"] = act.clone()
        return act

    # layer-0 senders, layer-1 receivers: no frozen heads in between; MLP 0 recomputes
    _run(model, pairs.corrupt_tokens, [(hook_name("z", s.layer), sender_hook), (hook_name("resid_pre", r.layer), grab)])

    def put(act, hook):
        return got["resid"]

    def grab_q(act, hook):
        got["q"] = act.clone()
        return act

    _run(model, pairs.corrupt_tokens, [(hook_name("resid_pre", r.layer), put), (hook_name("q", r.layer), grab_q)])

    def set_q(act, hook):
        act = act.clone()
        act[:, :, r.head] = got["q"][:, :, r.head]
        return act

    return task.metric(_run(model, pairs.corrupt_tokens, [(hook_name("q", r.layer), set_q)]), pairs).mean().item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_path_edges_and_eap(family_dirs, family):
    model = family_dirs(family)
    task, pairs = ToyTask(), toy_pairs(model.cfg.d_vocab, batch=3, seq=7, seed=2)
    ctx = engine_context(model, task, pairs)
    frame = path_patching(model, task, pairs, ["a0.h1", "a0.h3"], ["a1.h2"], "q", context=ctx)
    for row in frame.itertuples():
        expected = _naive_path_q(model, task, pairs, row.sender, "a1.h2")
        assert abs(row.metric - expected) <= 1e-4 * max(1.0, abs(expected)), (family, row.sender)
    # edge patching: the full graph is the clean run, the empty graph the corrupted run (bridge forwards)
    g = ctx.graph
    with torch.no_grad():
        clean = task.metric(model(pairs.clean_tokens), pairs)
        corrupt = task.metric(model(pairs.corrupt_tokens), pairs)
    values = evaluate_edge_masks(ctx, torch.stack([torch.ones(g.n_edges), torch.zeros(g.n_edges)]))
    assert torch.allclose(values[0], clean, atol=1e-4) and torch.allclose(values[1], corrupt, atol=1e-4), family
    # exact scores of sampled edges: one-edge-off circuits, and input->logits by bridge hooks
    sample = torch.randperm(g.n_edges, generator=torch.Generator().manual_seed(0))[:12].tolist()
    sample.append(g.edge_index("input->logits"))
    exact = exact_edge_scores(ctx, sample)
    masks = torch.ones(len(sample), g.n_edges)
    for i, e in enumerate(sample):
        masks[i, e] = 0.0
    assert torch.allclose(exact, ctx.clean_metric - evaluate_edge_masks(ctx, masks).mean(1), atol=1e-4), family
    with torch.no_grad():
        _, cc = model.run_with_cache(pairs.clean_tokens, names_filter=lambda n: n == "blocks.0.hook_resid_pre")
        _, cr = model.run_with_cache(pairs.corrupt_tokens, names_filter=lambda n: n == "blocks.0.hook_resid_pre")
    delta = cc["blocks.0.hook_resid_pre"] - cr["blocks.0.hook_resid_pre"]
    off = task.metric(_run(model, pairs.clean_tokens, [("ln_final.hook_in", lambda a, hook: a - delta)]), pairs)
    assert abs(exact[-1].item() - (clean - off).mean().item()) <= 1e-4, family
    # EAP of input->logits: delta . d metric / d final stream, by a gradient through the bridge's own hook
    scores = eap_scores(ctx)
    leaf = {}

    def add_leaf(act, hook):
        leaf["x"] = torch.zeros_like(act, requires_grad=True)
        return act + leaf["x"]

    with torch.enable_grad():
        logits = model.run_with_hooks(pairs.clean_tokens, fwd_hooks=[("ln_final.hook_in", add_leaf)])
        grad, = torch.autograd.grad(task.metric(logits, pairs).mean(), leaf["x"])
    expected = (delta * grad).sum().item()
    got = scores[g.edge_index("input->logits")].item()
    assert abs(got - expected) <= 1e-4 * max(1.0, abs(expected)), (family, got, expected)
