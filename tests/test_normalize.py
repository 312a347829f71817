"""The one normalisation (patching.normalize): 0 = corrupt, 1 = clean, and a refusal where the gap is ~0."""

import math

import numpy as np
import pytest
import torch

from circuitlab.graphs.selection import normalized
from circuitlab.patching.faithfulness import curve_from_values
from circuitlab.patching.normalize import is_normalizable, noising_share, normalize, normalize_difference


def test_values_by_hand():
    assert normalize(1.0, 3.0, -1.0) == 0.5
    assert normalize(torch.tensor([3.0, -1.0]), torch.tensor(3.0), torch.tensor(-1.0)).tolist() == [1.0, 0.0]
    assert np.allclose(normalize(np.array([2.0, 0.0]), np.array([2.0, 4.0]), np.array([0.0, 0.0])), [1.0, 0.0])
    assert noising_share(2.0, 3.0, -1.0) == 0.25  # noising removed a quarter of the behaviour
    assert normalize_difference(1.0, 4.0) == 0.25


@pytest.mark.parametrize("clean,corrupt", [
    (2.0, 2.0),
    (1.0 + 1e-12, 1.0),  # a gap of float noise: a ratio of it would be a silently wrong number
    (float("nan"), 0.0),
    (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 1.0])),  # elementwise: one prompt has no gap
])
def test_refuses_a_gap_it_cannot_divide_by(clean, corrupt):
    assert not is_normalizable(clean, corrupt)
    with pytest.raises(ValueError, match="equal"):
        normalize(torch.ones(3) if torch.is_tensor(clean) else 1.0, clean, corrupt)


def test_bootstrap_resamples_may_divide_by_zero_but_the_full_sample_may_not():
    assert math.isinf(normalize(np.float64(1.0), np.float64(2.0), np.float64(2.0), strict=False))
    values = np.array([[1.0, 1.0]])
    with pytest.raises(ValueError):
        normalized(values, torch.tensor([2.0, 2.0]), torch.tensor([2.0, 2.0]), n_boot=10)
    # prompt 0 has no gap, prompt 1 has: resamples drawing only prompt 0 are inf, not an error
    point, lo, hi = normalized(values, torch.tensor([2.0, 3.0]), torch.tensor([2.0, 1.0]), n_boot=50, seed=0)
    assert point[0] == pytest.approx((1.0 - 1.5) / (2.5 - 1.5))


def test_faithfulness_curve_refuses_equal_runs_and_shares_the_bootstrap():
    percents = (50.0, 100.0)
    clean, corrupt = torch.tensor([2.0, 3.0, 4.0]), torch.tensor([0.0, 1.0, 1.0])
    values = torch.tensor([[1.0, 2.0, 2.0], [2.0, 3.0, 4.0], [1.5, 2.0, 3.0], [2.0, 3.0, 4.0]])
    result = curve_from_values(values, clean, corrupt, [1, 2], percents=percents, n_boot=200, seed=3)
    point, lo, hi = normalized(values.numpy().astype(float), clean, corrupt, n_boot=200, seed=3)
    curve = result.curve
    signed = curve[curve["selection"] == "signed"]
    assert np.allclose(signed["faithfulness"], point[:2]) and np.allclose(signed["ci_low"], lo[:2])
    assert np.allclose(signed["ci_high"], hi[:2])
    with pytest.raises(ValueError, match="equal"):
        curve_from_values(values, clean, clean, [1, 2], percents=percents, n_boot=10)
