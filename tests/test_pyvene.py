"""Interchange interventions against pyvene 0.1.8 (an independent implementation, test-only dependency).

pyvene wraps the Hugging Face model itself (not the TransformerLens bridge): a `VanillaIntervention` (whole
vector) and a `RotatedSpaceIntervention` given our rotation (completed to an orthogonal matrix) at the block's
input/output at one position must give the logits circuitlab's runner gives for the same site, to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from circuitlab.patching.engine import make_runner
from circuitlab.patching.featurizers import FullVector, Subspace, random_rotation
from circuitlab.patching.interchange import Site, intervened_logits, prepare_batch
from circuitlab.patching.models import load_model
from circuitlab.tasks.causal import causal_model
from tests.hf_tiny import build_tiny, smollm2_tokenizer

pv = pytest.importorskip("pyvene")  # optional heavy test dependency (`make setup` installs it with --no-deps)


def _orthogonal_completion(rows: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A d×d orthogonal matrix whose first k columns are `rows`ᵀ (pyvene's rotation layer convention)."""
    k, d = rows.shape
    extra = torch.randn(d, d - k, generator=torch.Generator().manual_seed(seed))
    q, _ = torch.linalg.qr(torch.cat([rows.T, extra], 1).double())
    q = q.float()
    q[:, :k] = rows.T
    return q


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_interchange_equals_pyvene(tmp_path, family):
    from transformers import AutoModelForCausalLM

    folder = build_tiny(family, tmp_path / family, tokenizer=smollm2_tokenizer())
    bridge = load_model(str(folder))
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    runner, _, _ = make_runner(bridge)
    cf = causal_model("ioi").counterfactuals(bridge, "order", 2, seed=0)  # roles at other positions per side
    d = runner.d_model
    rows = random_rotation(4, d, generator=torch.Generator().manual_seed(0))
    for site, component in ((Site("resid_post", 0, "IO"), "block_output"), (Site("resid_pre", 1, "S1"), "block_input")):
        for i in range(len(cf)):
            one = cf.subset([i])
            prep = prepare_batch(runner, one, [site.component])
            b, s = int(one.base_positions[site.position][0]), int(one.source_positions[site.position][0])
            end = int(one.base_positions["END"][0])
            locations = {"sources->base": ([[[s]]], [[[b]]])}
            for feat, kind in ((FullVector(d), pv.VanillaIntervention), (Subspace(rows), pv.RotatedSpaceIntervention)):
                config = pv.IntervenableConfig(representations=[{"layer": site.layer, "component": component,
                                                                 "unit": "pos", "max_number_of_units": 1}],
                                               intervention_types=kind)
                wrapped = pv.IntervenableModel(config, hf)
                if kind is pv.RotatedSpaceIntervention:
                    iv = next(iter(wrapped.interventions.values()))
                    iv = iv[0] if isinstance(iv, tuple) else iv
                    with torch.no_grad():
                        iv.rotate_layer.weight = _orthogonal_completion(rows)
                    iv.set_interchange_dim(rows.shape[0])
                with torch.no_grad():
                    _, out = wrapped({"input_ids": one.base_tokens}, [{"input_ids": one.source_tokens}],
                                     unit_locations=locations)
                    ours = intervened_logits(runner, prep, site, feat)
                theirs = out.logits[0, end]
                assert (ours[0] - theirs).abs().max().item() < 1e-5, (family, site.label, feat.name)
                assert (ours - prep.base_logits).abs().max().item() > 1e-4  # the swap changed something
