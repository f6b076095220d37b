"""Advantage-guided diffusion (``SamplerConfig.state_guidance`` 'sag' / 'eag'): the fast path (closed-form
d log w / dA, one vector-Jacobian product through the critic) against the reference (log w built and
differentiated by autograd), its effect on the critic's advantages, and its bad input."""
import numpy as np
import pytest
import torch
from torch import nn

from polygrad_fast.noise import SamplerNoise
from polygrad_fast.normalizer import Normalizer
from polygrad_fast.policy import Actor, Critic
from polygrad_fast.reference.guided_sampling import advantage_guided_prediction, guided_sample
from polygrad_fast.sampler import FastGuidedSampler, SamplerConfig
from polygrad_fast.schedule import NoiseSchedule
from polygrad_fast.state_guidance import advantage_log_weight_grad
from test_sampler import ToyDenoiser, assert_batches_close

O, A = 5, 3
GAMMA = 0.99
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # autograd on tiny tensors: 2 threads on a loaded host are ~10x slower


def make_normalizer(seed=0, obs_dim=O, act_dim=A):
    """Non-trivial statistics; terminals (0.4, 0.5): raw > 0.5 for normalised > 0.2, so the predicted terminals
    d_k are a mix of 0 and 1 and the (1 - d_k) factor matters."""
    rng = np.random.default_rng(seed)
    return Normalizer({"observations": (rng.normal(size=obs_dim), rng.uniform(0.5, 2.0, obs_dim)),
                       "actions": (rng.normal(size=act_dim) * 0.2, rng.uniform(0.5, 1.5, act_dim)),
                       "rewards": (0.3, 2.0), "terminals": (0.4, 0.5)})


def make_setup(horizon=10, n_steps=12, tau=1.0, seed=0, denoiser=None):
    torch.manual_seed(seed)
    denoiser = ToyDenoiser(horizon, O + 2, A, n_steps, seed) if denoiser is None else denoiser
    policy = Actor(O, A, hidden=24, init_std=0.6)
    critic = Critic(O, hidden=32)
    return (denoiser, NoiseSchedule(n_steps, tau=tau), policy, make_normalizer(seed)), critic


def run_both(setup, critic, batch, noise_seed=1, **options):
    """(fast fp32, reference) batches on the same explicit noise."""
    denoiser, schedule, _, normalizer = setup
    steps = options.get("sampling_steps") or schedule.n_steps
    start = torch.randn(batch, O, generator=torch.Generator().manual_seed(noise_seed + 100)) * 2
    noise = SamplerNoise.draw(steps, batch, denoiser.horizon, O + 2, A, generator=torch.Generator().manual_seed(noise_seed))
    fast = FastGuidedSampler(*setup, backend="torch", denoiser_dtype="float32", critic=critic, **options)
    ref = FastGuidedSampler(*setup, backend="reference", critic=critic, **options)
    return fast.sample(start, noise=noise), ref.sample(start, noise=noise)


def mean_advantage(batch, critic, gamma=GAMMA) -> torch.Tensor:
    """Per trajectory, mean_k A_k = r_k + gamma (1 - d_k) V(s_{k+1}) - V(s_k) of the imagined batch [B]."""
    with torch.no_grad():
        v = critic(batch.observations)
    adv = batch.rewards[:, :-1] + gamma * (1 - batch.terminals[:, :-1]) * v[:, 1:] - v[:, :-1]
    return adv.mean(dim=1)


@pytest.mark.parametrize("kind", ["sag", "eag"])
@pytest.mark.parametrize("batch,horizon,options", [
    (7, 10, dict()),
    (3, 1, dict()),
    (2, 2, dict(guidance_type="sample")),
    (5, 50, dict(states_for_guidance="posterior_mean", clip_std=None)),
    (6, 10, dict(guidance_type="none", state_guidance_gamma=0.9, state_guidance_scale=2.0)),
])
def test_fast_matches_reference(kind, batch, horizon, options):
    setup, critic = make_setup(horizon=horizon)
    fast, ref = run_both(setup, critic, batch, guidance_scale=0.2, state_guidance=kind, **options)
    # fp32 both ways, the closed-form d log sigmoid vs autograd: a few ulps, as the T-step comparisons
    assert_batches_close(fast, ref)
    assert all(p.grad is None for p in critic.parameters())  # the critic's own gradients are never touched


@pytest.mark.parametrize("kind", ["sag", "eag"])
def test_fast_matches_reference_at_fewer_steps_and_the_guidance_matters(kind):
    setup, critic = make_setup(n_steps=24)
    fast, ref = run_both(setup, critic, 9, guidance_scale=0.1, state_guidance=kind, sampling_steps=6)
    assert_batches_close(fast, ref)
    plain, _ = run_both(setup, critic, 9, guidance_scale=0.1, sampling_steps=6)
    assert (fast.observations_normalized - plain.observations_normalized).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["sag", "eag"])
def test_gradient_matches_the_reference_autograd(kind):
    """The fast gradient [B,H,O] (rows 1..H-2; row 0 is re-imposed, the last row zero by definition) against the
    reference's shift at unit scale, on one random prediction."""
    _, critic = make_setup()
    normalizer = make_normalizer()
    x0 = torch.randn(6, 9, O + 2, generator=torch.Generator().manual_seed(3)) * 1.5
    grad = advantage_log_weight_grad(x0, critic, normalizer, kind, GAMMA)
    ref_grad = (advantage_guided_prediction(x0, critic, normalizer, kind, 1.0, GAMMA, torch.tensor(1.0)) - x0)[..., :O]
    assert grad.shape == (6, 9, O) and torch.equal(grad[:, 0], torch.zeros_like(grad[:, 0]))
    assert torch.equal(ref_grad[:, -1], torch.zeros_like(ref_grad[:, -1]))
    torch.testing.assert_close(grad[:, 1:], ref_grad[:, 1:], atol=1e-6, rtol=1e-5)
    assert grad[:, 1:-1].abs().min() > 0  # every middle state moves


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_zero_scale_is_unguided_exactly(backend):
    setup, critic = make_setup()
    start = torch.randn(4, O)
    noise = SamplerNoise.draw(12, 4, 10, O + 2, A, generator=torch.Generator().manual_seed(2))
    kw = dict(backend=backend, denoiser_dtype="float32", guidance_scale=0.1)
    plain = FastGuidedSampler(*setup, **kw).sample(start, noise=noise)
    zero = FastGuidedSampler(*setup, critic=critic, state_guidance="sag", state_guidance_scale=0.0,
                             **kw).sample(start, noise=noise)
    for name in ("observations_normalized", "actions_normalized", "rewards_normalized"):
        assert torch.equal(getattr(plain, name), getattr(zero, name)), name


class TrustingDenoiser(nn.Module):
    """x0 = x_t: a denoiser that trusts its input, so a shift of the prediction persists through the chain (a
    random network would overwrite it at the next step and the test would measure the network, not the guidance)."""

    def __init__(self, horizon):
        super().__init__()
        self.horizon, self.transition_dim, self.action_dim = horizon, O + 2, A

    def forward(self, x, actions, t):
        return x.clone()


@pytest.mark.parametrize("kind", ["sag", "eag"])
def test_guidance_raises_the_critics_advantage(kind):
    """Same start states and noise, c = 3 vs c = 0: the per-trajectory mean advantage rises. The threshold is
    5 standard errors of the paired per-trajectory differences (B = 256), so a guidance with no effect, or the
    gradient's sign flipped, fails."""
    setup, critic = make_setup(n_steps=16, denoiser=TrustingDenoiser(10))
    start = torch.randn(256, O, generator=torch.Generator().manual_seed(5))
    noise = SamplerNoise.draw(16, 256, 10, O + 2, A, generator=torch.Generator().manual_seed(6))
    out = {c: FastGuidedSampler(*setup, critic=critic, denoiser_dtype="float32", state_guidance=kind,
                                state_guidance_scale=c).sample(start, noise=noise) for c in (0.0, 3.0)}
    diff = mean_advantage(out[3.0], critic) - mean_advantage(out[0.0], critic)
    assert diff.mean() > 5 * diff.std() / diff.numel() ** 0.5, (float(diff.mean()), float(diff.std()))


def test_bad_state_guidance_options_and_critic():
    setup, critic = make_setup()
    with pytest.raises(ValueError, match=r"state_guidance='sag' needs the critic: pass FastGuidedSampler\(\.\.\., critic"):
        FastGuidedSampler(*setup, state_guidance="sag")
    with pytest.raises(ValueError, match=r"state_guidance='eag' needs the critic"):
        FastGuidedSampler(*setup, state_guidance="eag", backend="reference")
    with pytest.raises(ValueError, match=r"state_guidance='sag' needs a critic"):
        guided_sample(*setup, torch.zeros(2, O), horizon=10, state_guidance="sag")
    with pytest.raises(ValueError, match=r"state_guidance must be one of \('none', 'sag', 'eag'\), got 'SAG'"):
        guided_sample(*setup, torch.zeros(2, O), horizon=10, state_guidance="SAG", critic=critic)
    with pytest.raises(ValueError, match=r"state_guidance must be one of \['none', 'sag', 'eag'\], got 'adv'"):
        SamplerConfig(state_guidance="adv")
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="state_guidance_scale"):
            SamplerConfig(state_guidance_scale=bad)
    with pytest.raises(ValueError, match=r"state_guidance_gamma must be in \[0, 1\], got 1.5"):
        SamplerConfig(state_guidance_gamma=1.5)
    with pytest.raises(ValueError, match="update_states=True and state_guidance='sag'"):
        SamplerConfig(state_guidance="sag", update_states=True)
    with pytest.raises(ValueError, match="critic.obs_dim = 6 but the normaliser implies 5"):
        FastGuidedSampler(*setup, critic=Critic(O + 1), state_guidance="sag")
    with pytest.raises(ValueError, match="critic is on meta"):
        FastGuidedSampler(*setup, critic=Critic(O).to("meta"), state_guidance="sag")
    with pytest.raises(TypeError, match="critic must be callable"):
        FastGuidedSampler(*setup, critic="V", state_guidance="sag")
    wrong_shape = FastGuidedSampler(*setup, backend="torch", critic=lambda s: s.sum(-1, keepdim=True),
                                    state_guidance="sag")
    with pytest.raises(ValueError, match=r"the critic must map raw states \[2, 8, 5\] to values \[2, 8\]"):
        wrong_shape.sample(torch.randn(2, O))


def test_compile_option_runs_the_guided_step_eagerly():
    """compile=True with state guidance: the step is not compiled (autograd through the critic), same result."""
    setup, critic = make_setup()
    start = torch.randn(3, O)
    kw = dict(critic=critic, denoiser_dtype="float32", state_guidance="eag")
    compiled = FastGuidedSampler(*setup, compile=True, **kw)
    assert compiled._step == compiled.guided_step
    eager = FastGuidedSampler(*setup, **kw)
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    assert torch.equal(compiled.sample(start, generator=gen()).observations,
                       eager.sample(start, generator=gen()).observations)
