"""Guidance-scale tuning (log-scale SGD on the standardised action std) and the statistical effect of guidance on the imagined actions."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from polygrad_fast.guidance import GuidanceScaleTuner
from polygrad_fast.normalizer import Normalizer
from polygrad_fast.policy import Actor
from polygrad_fast.sampler import FastGuidedSampler
from polygrad_fast.schedule import NoiseSchedule


def test_tuner_is_log_scale_sgd():
    tuner = GuidanceScaleTuner(initial=0.005, lr=3e-3, target_std=1.0)
    assert tuner.scale.dim() == 0 and tuner.scale.item() == pytest.approx(0.005)
    tuner.update(torch.tensor(1.5))  # too spread out -> stronger guidance
    assert tuner.log_scale.item() == pytest.approx(math.log(0.005) + 3e-3 * 0.5, abs=1e-6)
    tuner.update(0.2)  # too concentrated -> weaker guidance
    assert tuner.log_scale.item() == pytest.approx(math.log(0.005) + 3e-3 * (0.5 - 0.8), abs=1e-6)
    state = tuner.state_dict()
    other = GuidanceScaleTuner(initial=1.0)
    other.load_state_dict(state)
    assert other.scale.item() == pytest.approx(tuner.scale.item()) and other.lr == 3e-3
    with pytest.raises(ValueError, match="initial guidance scale"):
        GuidanceScaleTuner(initial=0.0)


O, A, H, T = 4, 2, 6, 32


class AffineDenoiser(nn.Module):
    """A fixed toy x0 predictor: x0 = 0.5·x + c, deterministic in x (c a fixed per-element pattern)."""

    horizon, transition_dim, action_dim = H, O + 2, A

    def __init__(self):
        super().__init__()
        self.register_buffer("c", torch.linspace(-1, 1, H * (O + 2)).view(H, O + 2))

    def forward(self, x, actions, t):
        return 0.5 * x + self.c


def test_tuned_grad_guidance_makes_actions_on_policy_and_none_does_not():
    """Standardised actions z = (a − μπ(s))/σπ(s) after tuning the scale: mean ≈ 0, std ≈ 1.

    The final check uses 512 trajectories × (H−1) = 5 steps × 2 action dims. Counting only the 512 trajectories as
    independent (steps of one trajectory share states), the standard error of the mean of z is ≤ 1/√512 ≈ 0.044
    and of its std ≤ 1/√(2·512) ≈ 0.031, so the bounds 0.15 are > 3.4 standard errors (plus the tuner's own
    residual, ≈ 0.03 at the end of tuning). 'none' keeps the initial noise: raw actions ~ N(1, 2²) against a
    policy with std 0.5, i.e. z has std ≈ 4 before the ±3σ clamp and a mean ≈ 2·(1 − E μ): far outside.
    """
    torch.manual_seed(0)
    policy = Actor(O, A, hidden=32, init_std=0.5)
    norm = Normalizer({"observations": (np.zeros(O), np.ones(O)), "actions": (np.full(A, 1.0), np.full(A, 2.0)),
                       "rewards": (0.0, 1.0), "terminals": (0.0, 1.0)})
    gen = torch.Generator().manual_seed(0)
    sampler = FastGuidedSampler(AffineDenoiser(), NoiseSchedule(T), policy, norm)
    tuner = GuidanceScaleTuner(initial=0.005, lr=0.3)  # the paper's lr 3e-3 needs thousands of updates
    for _ in range(40):
        out = sampler.sample(torch.randn(64, O, generator=gen), generator=gen, guidance_scale=tuner.scale)
        tuner.update(out.metrics["act_std"])
    assert tuner.scale.item() > 0.005 * 3  # the initial scale was far too weak for this policy std
    guided = sampler.sample(torch.randn(512, O, generator=gen), generator=gen, guidance_scale=tuner.scale)
    assert abs(guided.metrics["act_mean"].item()) < 0.15
    assert abs(guided.metrics["act_std"].item() - 1.0) < 0.15
    unguided = FastGuidedSampler(AffineDenoiser(), NoiseSchedule(T), policy, norm, guidance_type="none").sample(
        torch.randn(512, O, generator=gen), generator=gen)
    assert unguided.metrics["act_std"].item() > 1.5
    assert abs(unguided.metrics["act_mean"].item()) > 0.5
