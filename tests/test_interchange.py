"""Interchange interventions against a plain-hook reference written here with raw TransformerLens hooks.

The reference runs the bridge itself (`run_with_cache` on the source, `run_with_hooks` on the base) and edits
the hook's tensor at each prompt's own position, padded prompt by padded prompt; circuitlab runs the engine's
windowed runner from the site's layer. Also: DAS with k = d equals the full-vector swap; bad sites are refused.
"""

from __future__ import annotations

import pytest
import torch

from circuitlab.patching.components import hook_name
from circuitlab.patching.engine import make_runner
from circuitlab.patching.featurizers import DAS, FullVector, Subspace, random_rotation
from circuitlab.patching.interchange import Site, check_site, intervened_logits, positions_of, prepare_batch
from circuitlab.patching.models import load_model
from circuitlab.tasks.causal import causal_model
from tests.hf_tiny import build_tiny, smollm2_tokenizer

_MODELS: dict[str, object] = {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    def get(family: str):
        if family not in _MODELS:
            folder = build_tiny(family, tmp_path_factory.mktemp(family), tokenizer=smollm2_tokenizer())
            _MODELS[family] = load_model(str(folder))
        return _MODELS[family]
    return get


def reference_logits(model, cf, site: Site, swap) -> torch.Tensor:
    """Plain hooks, one prompt at a time (no padding at all): the base's END logits after the swap.

    resid_mid is edited through attention's output (resid_mid = resid_pre + attn_out): on HF-backed bridges an
    edit at `hook_resid_mid` reaches the MLP's input but not the skip connection."""
    name = hook_name(site.component, site.layer)
    if site.component == "resid_mid":
        out = []
        for i in range(len(cf)):
            one = cf.subset([i])
            b_pos = int(positions_of(one, site.position, "base")[0])
            s_pos = int(positions_of(one, site.position, "source")[0])
            _, src_cache = model.run_with_cache(one.source_tokens, names_filter=lambda n: n == name)
            _, base_cache = model.run_with_cache(one.base_tokens, names_filter=lambda n: n == name)
            mid_b, mid_s = base_cache[name][0, b_pos], src_cache[name][0, s_pos]
            delta = swap(mid_b[None], mid_s[None])[0] - mid_b

            def add(act, hook, b_pos=b_pos, delta=delta):
                act = act.clone()
                act[0, b_pos] += delta
                return act

            with torch.no_grad():
                logits = model.run_with_hooks(one.base_tokens, fwd_hooks=[(hook_name("attn_out", site.layer), add)])
            out.append(logits[0, int(one.base_positions["END"][0])])
        return torch.stack(out)
    out = []
    for i in range(len(cf)):
        one = cf.subset([i])
        b_pos = int(positions_of(one, site.position, "base")[0])
        s_pos = int(positions_of(one, site.position, "source")[0])
        _, cache = model.run_with_cache(one.source_tokens, names_filter=lambda n: n == name)
        src = cache[name][0, s_pos]
        src = src[site.head] if site.head is not None else src

        def edit(act, hook):
            act = act.clone()
            if site.head is not None:
                act[0, b_pos, site.head] = swap(act[0, b_pos, site.head][None], src[None])[0]
            else:
                act[0, b_pos] = swap(act[0, b_pos][None], src[None])[0]
            return act

        with torch.no_grad():
            logits = model.run_with_hooks(one.base_tokens, fwd_hooks=[(name, edit)])
        out.append(logits[0, int(one.base_positions["END"][0])])
    return torch.stack(out)


SITES = [Site("resid_pre", 1, "IO"), Site("resid_mid", 0, "S2"), Site("resid_post", 0, "S1+1"),
         Site("resid_post", 1, "last"), Site("attn_out", 0, "IO"), Site("mlp_out", 0, "S2"), Site("z", 0, "S2", 2),
         Site("resid_pre", 0, -3)]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_interchange_equals_plain_hooks(tiny, family):
    model = tiny(family)
    runner, _, _ = make_runner(model)
    cf = causal_model("ioi").counterfactuals(model, "order", 2, seed=1)  # base/source roles at other positions
    prep = prepare_batch(runner, cf, [s.component for s in SITES])
    gen = torch.Generator().manual_seed(0)
    for site in SITES:
        if family == "gpt_neox" and site.component == "resid_mid":
            continue  # parallel blocks have no resid_mid
        check_site(runner, site, cf)
        d = runner.d_head if site.head is not None else runner.d_model
        for feat in (FullVector(d), Subspace(random_rotation(3, d, generator=gen))):
            with torch.no_grad():
                ours = intervened_logits(runner, prep, site, feat)
            ref = reference_logits(model, cf, site, feat)
            err = (ours - ref).abs().max().item()
            assert err < 1e-5 * max(1.0, ref.abs().max().item()), (family, site.label, feat.name, err)
            # The intervention does something: the base logits differ from the intervened ones.
            assert (ours - prep.base_logits).abs().max().item() > 1e-3, (family, site.label)


def test_das_full_rank_equals_full_vector(tiny):
    """DAS with k = d swaps the whole vector: at the residual stream (k = d_model) and per head (k = d_head)."""
    model = tiny("llama")
    runner, _, _ = make_runner(model)
    cf = causal_model("ioi").counterfactuals(model, "io", 4, seed=0)
    prep = prepare_batch(runner, cf, ["resid_pre", "z"])
    for site, d, seed in ((Site("resid_pre", 1, "IO"), runner.d_model, 3), (Site("z", 1, "last", 2), runner.d_head, 4)):
        das = DAS(d, d, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            a = intervened_logits(runner, prep, site, das)
            b = intervened_logits(runner, prep, site, FullVector(d))
        assert (a - b).abs().max().item() < 1e-4, site.label
        assert (b - prep.base_logits).abs().max().item() > 1e-3, site.label


def test_bad_sites_are_refused(tiny):
    model = tiny("gpt2")
    runner, _, _ = make_runner(model)
    cf = causal_model("ioi").counterfactuals(model, "io", 2, seed=0)
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        check_site(runner, Site("resid_pre", 7, "IO"), cf)
    with pytest.raises(ValueError, match="unknown position 'XX'"):
        check_site(runner, Site("resid_pre", 0, "XX"), cf)
    with pytest.raises(ValueError, match="needs a head"):
        Site("z", 0, "IO")


@pytest.mark.slow
def test_interchange_equals_plain_hooks_on_smollm2(smollm2):
    """The same check on the real model (GQA, RMSNorm, RoPE): two sites, whole vector and a fixed rotation."""
    runner, _, _ = make_runner(smollm2)
    cf = causal_model("ioi").counterfactuals(smollm2, "order", 2, seed=3)
    sites = [Site("resid_pre", 10, "IO"), Site("z", 20, "last", 3)]
    prep = prepare_batch(runner, cf, [s.component for s in sites])
    gen = torch.Generator().manual_seed(0)
    for site in sites:
        d = runner.d_head if site.head is not None else runner.d_model
        for feat in (FullVector(d), Subspace(random_rotation(8, d, generator=gen))):
            with torch.no_grad():
                ours = intervened_logits(runner, prep, site, feat)
            ref = reference_logits(smollm2, cf, site, feat)
            err = (ours - ref).abs().max().item()
            assert err < 1e-5 * max(1.0, ref.abs().max().item()), (site.label, feat.name, err)
            assert (ours - prep.base_logits).abs().max().item() > 1e-3, site.label
