"""The production action-conditioned sampler against its independent reference twin."""
from __future__ import annotations

import pytest
import torch

from polygrad_fast.conditioned_sampling import action_conditioned_sample
from polygrad_fast.denoisers import MLPDenoiserConfig, ResidualMLPDenoiser
from polygrad_fast.noise import SamplerNoise
from polygrad_fast.reference import guided_sampling as ref
from polygrad_fast.schedule import NoiseSchedule


def _model(H: int, O: int, A: int) -> ResidualMLPDenoiser:
    torch.manual_seed(0)
    return ResidualMLPDenoiser(H, O + 2, A, MLPDenoiserConfig(hidden_dim=24, num_layers=2)).eval()


@pytest.mark.parametrize("B,H,O,A,T", [(1, 1, 3, 1, 4), (7, 2, 11, 3, 8), (5, 50, 5, 6, 3)])
def test_matches_reference_on_explicit_noise(B, H, O, A, T):
    model, schedule = _model(H, O, A), NoiseSchedule(T, tau=0.5)
    g = torch.Generator().manual_seed(B * 100 + H)
    start, actions = torch.randn(B, O, generator=g), torch.randn(B, H, A, generator=g)
    noise = SamplerNoise.draw(T, B, H, O + 2, A, generator=g)
    with torch.no_grad():
        want = ref.action_conditioned_sample(model, schedule, start, actions, noise=noise)
    got = action_conditioned_sample(model, schedule, start, actions, noise=noise)
    # same fp32 arithmetic up to operation order: a few ulps of O(1) values
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:, 0, :O], start)
    # the actions condition the result: other actions give another trajectory
    other = action_conditioned_sample(model, schedule, start, actions + 1.0, noise=noise)
    assert (other - got).abs().max() > 1e-3


def test_generator_seed_gives_the_reference_noise():
    B, H, O, A, T = 4, 3, 5, 2, 6
    model, schedule = _model(H, O, A), NoiseSchedule(T)
    start, actions = torch.randn(B, O), torch.randn(B, H, A)
    got = action_conditioned_sample(model, schedule, start, actions, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref.action_conditioned_sample(model, schedule, start, actions, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    again = action_conditioned_sample(model, schedule, start, actions, generator=torch.Generator().manual_seed(4))
    assert (again - got).abs().max() > 1e-3


def test_bad_input_is_refused():
    model, schedule = _model(2, 3, 1), NoiseSchedule(4)
    with pytest.raises(ValueError, match=r"actions \[2, 2, 1\].*expected \[B=3"):
        action_conditioned_sample(model, schedule, torch.zeros(3, 3), torch.zeros(2, 2, 1))
    with pytest.raises(ValueError, match="start_obs: expected a 2-d float32"):
        action_conditioned_sample(model, schedule, torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 2, 1))
    with pytest.raises(TypeError, match="actions must be a torch.Tensor"):
        action_conditioned_sample(model, schedule, torch.zeros(3, 3), [[0.0]])
    with pytest.raises(ValueError, match="noise.state has shape"):
        bad = SamplerNoise.draw(5, 3, 2, 5, 1)
        action_conditioned_sample(model, schedule, torch.zeros(3, 3), torch.zeros(3, 2, 1), noise=bad)
