"""The guided action step stops at the policy's mean (step_ops.GUIDANCE_STEP_CAP): a += min(w / std^2, 1) (mean - a).

Below the cap the update is the paper's a += w (mean - a) / std^2; above it the paper's step passes the mean (at
w / std^2 = 2 it lands as far on the other side). The fast op and the reference twin (autograd, formulated as
"stop at the mean") are checked on both sides of the cap, and so is the tuner's feedback it restores.
"""
import pytest
import torch
from torch.distributions import Independent, Normal

from polygrad_fast.reference.step_ops import action_step
from polygrad_fast.step_ops import GUIDANCE_STEP_CAP, action_update_at

B, H, A = 5, 3, 3  # odd batch, non-power-of-2 action dim


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, H, A, generator=g, dtype=torch.float64)
    mean = 0.5 * torch.randn(B, H, A, generator=g, dtype=torch.float64)
    std = 0.05 + 0.3 * torch.rand(B, H, A, generator=g, dtype=torch.float64)
    act_mean = 0.1 * torch.randn(A, generator=g, dtype=torch.float64)
    act_scale = 0.5 + torch.rand(A, generator=g, dtype=torch.float64)
    return a, mean, std, act_mean, act_scale


def _fast(a, mean, std, act_mean, act_scale, w, clip_std=None):
    coef = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)  # no noise; one trained step
    return action_update_at(a, mean, std, act_mean, act_scale, coef, w, clip_std, torch.zeros_like(a), 1.0,
                            "grad", last=False)


def _reference(a, mean, std, act_mean, act_scale, w, clip_std=None):
    dist = Independent(Normal(mean, std), 1)
    out, _ = action_step(a, dist, act_mean, act_scale, 1, torch.tensor(0.0, dtype=torch.float64), w, clip_std,
                         torch.zeros_like(a), 1.0, "grad")
    return out


def test_cap_is_one():
    assert GUIDANCE_STEP_CAP == 1.0


@pytest.mark.parametrize("w", [1e-4, 2e-3])  # w / std^2 < 1 everywhere (std >= 0.05)
def test_below_the_cap_the_paper_update(w):
    a, mean, std, am, asc = _inputs()
    assert (w / std**2).max() < 1
    raw = a * asc + am
    paper = (raw + w * (mean - raw) / std**2 - am) / asc
    torch.testing.assert_close(_fast(a, mean, std, am, asc, w), paper, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_reference(a, mean, std, am, asc, w), paper, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("w", [0.02, 5.0, 1e12])
def test_above_the_cap_the_step_stops_at_the_mean(w):
    a, mean, std, am, asc = _inputs(1)
    capped = (w / std**2) >= 1
    assert capped.any() and (w > 1 or not capped.all())  # w = 0.02: both sides of the cap in one batch
    out_fast, out_ref = _fast(a, mean, std, am, asc, w), _reference(a, mean, std, am, asc, w)
    raw_fast = out_fast * asc + am
    # capped entries land on the mean (float64 rounding of a + (mean - a)); none passes it
    torch.testing.assert_close(raw_fast[capped], mean[capped], rtol=0, atol=1e-12)
    raw = a * asc + am
    assert ((raw_fast - raw) * (mean - raw) >= 0).all() and ((raw_fast - mean).abs() <= (raw - mean).abs()).all()
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-12, atol=1e-12)
    # the uncapped paper step would have overshot: the test can tell the two apart
    paper = raw + w * (mean - raw) / std**2
    assert ((paper - mean).abs()[capped] > 1e-6).any()


def test_tensor_guidance_scale_and_clip():
    a, mean, std, am, asc = _inputs(2)
    w = torch.tensor(0.5, dtype=torch.float64)
    out = _fast(a, mean, std, am, asc, w, clip_std=3.0)
    torch.testing.assert_close(out, _reference(a, mean, std, am, asc, w, clip_std=3.0), rtol=1e-12, atol=1e-12)
