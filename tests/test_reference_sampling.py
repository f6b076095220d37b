"""The paper-style reference samplers' behaviour and the reference's independence from the fast path (its imports,
its own noise)."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from polygrad_fast import noise as fast_noise
from polygrad_fast.reference.guided_sampling import ChainNoise, action_conditioned_sample, draw_noise, guided_sample
from polygrad_fast.sampler import FastGuidedSampler
from test_sampler import A, O, make_setup


class Recorder(nn.Module):
    """Wraps a denoiser and records (t, actions) of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []
        self.horizon = inner.horizon

    def forward(self, x, actions, t):
        self.calls.append((t.clone(), actions.clone()))
        return self.inner(x, actions, t)


def test_guided_sample_feeds_scaled_actions_and_imposes_first_obs():
    denoiser, schedule, policy, norm = make_setup(n_steps=12)
    rec = Recorder(denoiser)
    start = torch.randn(4, O)
    noise = draw_noise(12, 4, 10, O + 2, A, generator=torch.Generator().manual_seed(0))
    x, actions, metrics = guided_sample(rec, schedule, policy, norm, start, horizon=10, guidance_type="none",
                                        clip_std=None, noise=noise)
    assert [int(c[0][0]) for c in rec.calls] == list(range(11, -1, -1))
    sqrt_abar = schedule.step_table()[:, 0]
    for t, a in rec.calls:
        torch.testing.assert_close(a, sqrt_abar[t[0]] * noise.a_T)  # the denoiser sees sqrt(abar_t)·a, no noise
    assert torch.equal(actions, noise.a_T)  # 'none' without clip: actions stay the initial noise
    torch.testing.assert_close(x[:, 0, :O], start)
    assert metrics["max_change"] <= 0.25 + 1e-6


def test_last_step_adds_no_noise_and_clips_actions_only():
    denoiser, schedule, policy, norm = make_setup(n_steps=6)
    start = torch.randn(5, O)
    noise = draw_noise(6, 5, 10, O + 2, A, generator=torch.Generator().manual_seed(1))
    other = ChainNoise(noise.x_T, noise.a_T, noise.state.clone(), noise.action.clone())
    other.state[0].normal_()
    other.action[0].normal_()
    x1, a1, _ = guided_sample(denoiser, schedule, policy, norm, start, horizon=10, noise=noise, guidance_scale=0.1)
    x2, a2, _ = guided_sample(denoiser, schedule, policy, norm, start, horizon=10, noise=other, guidance_scale=0.1)
    assert torch.equal(x1, x2) and torch.equal(a1, a2)
    # 'none' with clip_std: the initial actions, clamped at t = 0 to the policy mean ± clip_std·std of the
    # recon guide states of that step (the denoiser's x0 at t = 0 with the first observation imposed)
    captured = {}
    handle = denoiser.register_forward_hook(
        lambda mod, args, out: captured.update(x0=out.clone()) if int(args[2][0]) == 0 else None)
    _, a, _ = guided_sample(denoiser, schedule, policy, norm, start, horizon=10, noise=noise, guidance_type="none",
                            clip_std=0.5)
    handle.remove()
    x0 = captured["x0"]
    x0[:, 0, :O] = start
    with torch.no_grad():
        mean, std = policy(norm.unnormalize(x0[..., :O], "observations"))
    raw_a, raw_init = norm.unnormalize(a, "actions"), norm.unnormalize(noise.a_T, "actions")
    torch.testing.assert_close(raw_a, torch.clamp(raw_init, mean - 0.5 * std, mean + 0.5 * std))
    assert not torch.equal(a, noise.a_T)


def test_action_conditioned_sample():
    denoiser, schedule, _, _ = make_setup(n_steps=8)
    rec = Recorder(denoiser)
    start, actions = torch.randn(3, O), torch.randn(3, 10, A)
    noise = draw_noise(8, 3, 10, O + 2, A, generator=torch.Generator().manual_seed(2))
    x = action_conditioned_sample(rec, schedule, start, actions, noise=noise)
    table = schedule.step_table()
    for t, a in rec.calls:
        torch.testing.assert_close(a, table[t[0], 0] * actions)  # given actions, scaled, every step
    # manual chain: posterior mean of the raw x0 (not re-conditioned, not clipped), noise except at t = 0
    xm = noise.x_T.clone()
    xm[:, 0, :O] = start
    for t in reversed(range(8)):
        x0 = denoiser(xm, table[t, 0] * actions, torch.full((3,), t))
        xm = table[t, 1] * x0 + table[t, 2] * xm + (table[t, 3] * noise.state[t] if t > 0 else 0)
        xm[:, 0, :O] = start
    torch.testing.assert_close(x, xm)
    # generator path: reproducible for a seed, and the noise comes from the generator (another seed differs)
    run = lambda seed: action_conditioned_sample(denoiser, schedule, start, actions,  # noqa: E731
                                                 generator=torch.Generator().manual_seed(seed))
    first = run(9)
    assert torch.equal(first, run(9))
    assert (first - run(10)).abs().max() > 0.1


def test_reference_imports_only_torch_numpy_and_data_definitions():
    """A fresh interpreter importing the reference samplers loads no fast-path, native, policy or step-op module."""
    code = ("import sys, polygrad_fast.reference.guided_sampling, polygrad_fast.reference.step_ops, "
            "polygrad_fast.reference.noise; print(sorted(m for m in sys.modules if m.startswith('polygrad_fast')))")
    loaded = set(eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout))
    allowed = {"polygrad_fast", "polygrad_fast.reference", "polygrad_fast.reference.guided_sampling",
               "polygrad_fast.reference.step_ops", "polygrad_fast.reference.noise", "polygrad_fast.schedule",
               "polygrad_fast.normalizer"}
    assert loaded <= allowed, sorted(loaded - allowed)
    assert "polygrad_fast.reference.guided_sampling" in loaded  # the probe itself worked


@pytest.mark.skipif(not fast_noise.native_available(), reason="polygrad_fast._cpu_ops not built")
def test_reference_draws_the_fast_paths_noise_for_a_seed():
    """The reference's numpy Philox twin and the native generator give the same noise for one generator seed
    (to a few fp32 ulps: the native kernel's fp32 ln/sin/cos), so the two samplers agree without explicit noise."""
    ref = draw_noise(5, 3, 4, O + 2, A, generator=torch.Generator().manual_seed(7))
    fast = fast_noise.SamplerNoise.draw(5, 3, 4, O + 2, A, generator=torch.Generator().manual_seed(7))
    for name in ("x_T", "a_T", "state", "action"):
        torch.testing.assert_close(getattr(ref, name), getattr(fast, name), atol=1e-6, rtol=1e-6)
    setup = make_setup(n_steps=6)
    start = torch.randn(4, O)
    _, schedule, policy, norm = setup
    x, a, _ = guided_sample(setup[0], schedule, policy, norm, norm.normalize(start, "observations"), horizon=10,
                            guidance_scale=0.1, generator=torch.Generator().manual_seed(3))
    out = FastGuidedSampler(*setup, backend="torch", denoiser_dtype="float32", guidance_scale=0.1).sample(
        start, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.observations_normalized, x[..., :O], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.actions_normalized, a, atol=1e-5, rtol=1e-5)
    other = guided_sample(setup[0], schedule, policy, norm, norm.normalize(start, "observations"), horizon=10,
                          guidance_scale=0.1, generator=torch.Generator().manual_seed(4))[1]
    assert (other - a).abs().max() > 0.1  # another seed gives other trajectories: the match above is the noise's
