"""Ground truth for DAS: a hand-wired model whose variable X lives in a known, rotated 2-dim subspace.

The model (`graphs.groundtruth.subspace`) is built so that X sits at `resid_pre` layer 0 at the content
position in exactly k = 2 rotated dimensions, with a larger-variance nuisance beside it. DAS must find it
on held-out pairs; the k = 2 neuron subset and the top-2 PCA subspace must not; at sites that carry nothing of
X even the whole-vector swap must stay at the no-intervention baseline.
"""

from __future__ import annotations

import pytest

from circuitlab.graphs.groundtruth.subspace import build_subspace_model
from circuitlab.patching.localize import LocalizeConfig, localize


@pytest.fixture(scope="module")
def result():
    gt = build_subspace_model(seed=0)
    cf = gt.counterfactuals(96, seed=0)
    config = LocalizeConfig(featurizers=("full", "neurons", "pca", "das"), dims=(gt.k,), steps=60, lr=0.05,
                            top_sites=1, n_boot=200, seed=0)
    return gt, localize(gt.model, cf, sites=[gt.true_site] + gt.wrong_sites, config=config)


def _iia(frame, site, featurizer, split="test"):
    rows = frame[(frame.component == site.component) & (frame.layer == site.layer) &
                 (frame.position == str(site.position)) & (frame.featurizer == featurizer) & (frame.split == split)]
    assert len(rows) == 1, (site, featurizer)
    return float(rows.iia.iloc[0])


def test_das_finds_the_true_subspace(result):
    gt, res = result
    frame = res.to_frame()
    baseline = float(frame[(frame.featurizer == "none") & (frame.split == "test")].iia.iloc[0])
    assert baseline == 0.0  # the base run never says the source's answer
    das = _iia(frame, gt.true_site, "das")
    assert das >= 0.95
    assert _iia(frame, gt.true_site, "neurons") <= das - 0.3
    assert _iia(frame, gt.true_site, "pca") <= das - 0.3
    assert _iia(frame, gt.true_site, "random") <= das - 0.3  # the random rotation control, same k
    assert _iia(frame, gt.true_site, "full") == 1.0  # the ceiling
    # The learned subspace is the true one: its rows span the planted 2-dim subspace.
    rows = res.rotations[f"{gt.true_site.label}/das{gt.k}"]
    overlap = (rows @ gt.rotation.T).pow(2).sum() / gt.k
    assert float(overlap) > 0.9


def test_wrong_sites_stay_at_baseline(result):
    gt, res = result
    frame = res.to_frame()
    for site in gt.wrong_sites:
        for split in ("train", "test"):
            assert _iia(frame, site, "full", split) == 0.0, site
