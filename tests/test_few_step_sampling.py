"""Few-step guided sampling: the K-step respaced chain (``SamplerConfig.sampling_steps``) in the schedule, the fast
and reference samplers and the action-conditioned sampler.

Fast vs reference: the fast path's step table comes from ``NoiseSchedule.respaced`` (betas recomputed from the
kept abar, every table derived from them), the reference's from the DDPM posterior q(x_s | x_t, x0) written
directly from the trained abar (``reference.guided_sampling.respaced_chain``); both are rounded to fp32, so they
agree to about an fp32 ulp, and the chains to the 1e-5 of the T-step comparisons in test_sampler.py.
"""
import pytest
import torch

from polygrad_fast.conditioned_sampling import action_conditioned_sample
from polygrad_fast.denoisers import MLPDenoiserConfig, ResidualMLPDenoiser
from polygrad_fast.noise import SamplerNoise
from polygrad_fast.policy import Actor
from polygrad_fast.reference import guided_sampling as ref
from polygrad_fast.sampler import FastGuidedSampler, SamplerConfig
from polygrad_fast.schedule import NoiseSchedule, strided_timesteps
from test_sampler import ToyDenoiser, assert_batches_close, make_normalizer

O, A = 5, 3


def setup_with(horizon=10, n_steps=24, tau=1.0, seed=0, obs_dim=O, act_dim=A):
    torch.manual_seed(seed)
    denoiser = ToyDenoiser(horizon, obs_dim + 2, act_dim, n_steps, seed)
    return denoiser, NoiseSchedule(n_steps, tau=tau), Actor(obs_dim, act_dim, hidden=24, init_std=0.6), \
        make_normalizer(obs_dim, act_dim, seed)


def run_both(setup, batch, sampling_steps, noise_seed=1, **options):
    """(fast fp32, reference) batches of the K-step chain on the same explicit noise (K steps of it)."""
    denoiser, schedule, policy, normalizer = setup
    start = torch.randn(batch, normalizer.obs_dim, generator=torch.Generator().manual_seed(noise_seed + 100)) * 2
    noise = SamplerNoise.draw(sampling_steps, batch, denoiser.horizon, normalizer.obs_dim + 2, normalizer.act_dim,
                              generator=torch.Generator().manual_seed(noise_seed))
    options["sampling_steps"] = sampling_steps
    fast = FastGuidedSampler(*setup, backend="torch", denoiser_dtype="float32", **options)
    reference = FastGuidedSampler(*setup, backend="reference", **options)
    return fast.sample(start, noise=noise), reference.sample(start, noise=noise)


# ---------------------------------------------------------------- the schedule
@pytest.mark.parametrize("T,K", [(128, 16), (128, 2), (128, 127), (24, 5), (7, 3)])
def test_strided_timesteps_span_the_schedule_evenly(T, K):
    kept = strided_timesteps(T, K)
    assert len(kept) == K and kept[0] == 0 and kept[-1] == T - 1
    gaps = [b - a for a, b in zip(kept, kept[1:])]
    assert min(gaps) >= 1 and max(gaps) - min(gaps) <= 1  # strictly increasing, stride (T-1)/(K-1) rounded


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_respaced_posterior_is_the_ddpm_posterior_between_kept_steps(tau):
    """Two identities every posterior q(x_s | x_t, x0) of the forward process satisfies, written from the trained
    abar only: a noise-free x_t = sqrt(abar_t) x0 maps to mean sqrt(abar_s) x0 (c1 + c2 sqrt(abar_t) =
    sqrt(abar_s)), and the marginal variance is kept (c2^2 (1 - abar_t) + sigma^2 = 1 - abar_s)."""
    schedule = NoiseSchedule(128, tau=tau)
    kept, table = schedule.respaced(16, dtype=torch.float64)
    abar = schedule.alphas_cumprod[kept]
    abar_s = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    sqrt_abar, c1, c2, sigma, spans, spanned_std = table.unbind(1)
    assert spans.tolist() == torch.diff(kept, prepend=torch.tensor([-1])).tolist()  # trained steps per row
    trained_var = schedule.posterior_std**2
    torch.testing.assert_close(spanned_std[5]**2, trained_var[kept[4] + 1: kept[5] + 1].mean(), atol=0, rtol=1e-12)
    torch.testing.assert_close(sqrt_abar, abar.sqrt(), atol=0, rtol=1e-12)
    torch.testing.assert_close(c1 + c2 * abar.sqrt(), abar_s.sqrt(), atol=0, rtol=1e-12)
    var = torch.where(kept > 0, sigma**2, torch.zeros_like(sigma))  # sigma_0 is the clipped 1e-10, var_0 = 0
    torch.testing.assert_close(c2**2 * (1 - abar) + var, 1 - abar_s, atol=1e-14, rtol=1e-10)


def test_respaced_matches_the_reference_formula_and_precision():
    for tau in (0.1, 1.0):
        schedule = NoiseSchedule(40, tau=tau)
        kept, table = schedule.respaced(7)
        ref_kept, ref_table = ref.respaced_chain(schedule, 7)
        assert kept.tolist() == ref_kept
        torch.testing.assert_close(table, ref_table, atol=1e-7, rtol=2e-6)  # fp32 rounding of both derivations
    # float32 arithmetic moves the respaced tables by the same order as the trained ones (docs/algorithm.md:
    # up to 2.3e-3 relative at T = 128, tau = 0.1)
    _, t64 = NoiseSchedule(128, tau=0.1).respaced(16, dtype=torch.float64)
    _, t32 = NoiseSchedule(128, tau=0.1, precision="float32").respaced(16, dtype=torch.float64)
    rel = ((t32 - t64).abs() / t64.abs().clamp(min=1e-6)).max()
    assert 0 < rel < 3e-3


def test_respaced_at_k_equal_t_is_the_trained_table_exactly():
    schedule = NoiseSchedule(12, tau=0.3)
    kept, table = schedule.respaced(12)
    assert torch.equal(kept, torch.arange(12)) and torch.equal(table, schedule.step_table())


@pytest.mark.parametrize("bad", [0, 1, 13, -3, True, 16.0, "8", None])
def test_bad_number_of_steps_is_rejected_saying_what_was_expected(bad):
    with pytest.raises(ValueError, match=r"an int in 2\.\.12.*got " + repr(bad).replace(".", r"\.")):
        NoiseSchedule(12).respaced(bad)


@pytest.mark.parametrize("bad", [0, 1, -2, True, 16.0, "16"])
def test_sampler_config_rejects_bad_sampling_steps(bad):
    with pytest.raises(ValueError, match=r"sampling_steps must be None .* 2\.\.T .*got " + repr(bad)):
        SamplerConfig(sampling_steps=bad)


def test_sampler_rejects_more_steps_than_trained():
    with pytest.raises(ValueError, match=r"sampling_steps = 25 but the schedule has T = 24.*2\.\.24"):
        FastGuidedSampler(*setup_with(n_steps=24), sampling_steps=25)


# ---------------------------------------------------------------- the guided sampler
@pytest.mark.parametrize("batch,horizon,T,K,options", [
    (7, 10, 24, 5, dict()),
    (3, 1, 24, 4, dict(guidance_type="sample", states_for_guidance="posterior_mean")),
    (5, 50, 12, 3, dict(clip_std=None)),
    (1, 10, 24, 2, dict()),
    (9, 10, 24, 7, dict(update_states=True)),
    (4, 10, 24, 6, dict(guidance_type="none")),
])
def test_fast_matches_reference_at_fewer_steps(batch, horizon, T, K, options):
    fast, ref_batch = run_both(setup_with(horizon=horizon, n_steps=T), batch=batch, guidance_scale=0.2,
                               sampling_steps=K, **options)
    assert fast.actions.shape == (batch, horizon, A)
    assert_batches_close(fast, ref_batch)


def test_fast_matches_reference_with_time_embedding_denoiser_odd_dims():
    """A polygrad_fast denoiser (time embeddings computed once per call, for the trained t_i) and dims 7/6."""
    torch.manual_seed(3)
    denoiser = ResidualMLPDenoiser(4, 9, 6, MLPDenoiserConfig(hidden_dim=48, num_layers=2)).eval()
    setup = (denoiser, NoiseSchedule(30, tau=0.1), Actor(7, 6, hidden=20), make_normalizer(7, 6, seed=3))
    fast, ref_batch = run_both(setup, batch=5, guidance_scale=0.1, sampling_steps=6)
    assert_batches_close(fast, ref_batch)


def test_state_clamp_follows_the_trained_timesteps_a_step_spans():
    """T = 40, K = 4 keeps t = 0, 13, 26, 39: the step at t = 13 spans trained steps 1..13, ten of them t <= 10,
    so it may change a state by 10 clamps' worth; t = 0 spans itself (one clamp); 26 and 39 none (an index-based
    rule would clamp all four). The fast path agrees with the reference, which counts the spanned steps itself."""
    setup = setup_with(n_steps=40)
    fast, ref_batch = run_both(setup, batch=6, guidance_scale=0.1, sampling_steps=4, clip_state_change=0.05)
    assert_batches_close(fast, ref_batch)
    assert fast.metrics["max_change"] <= 0.05 + 1e-6
    free, _ = run_both(setup, batch=6, guidance_scale=0.1, sampling_steps=4, clip_state_change=None)
    assert free.metrics["max_change"] > 0.1  # the clamp changed the last step
    sampler = FastGuidedSampler(*setup, sampling_steps=4, clip_state_change=0.05)
    assert sampler.timesteps.tolist() == [0, 13, 26, 39]
    step = sampler.guided_step
    assert step.clip_state_changes(sampler.timesteps, sampler.step_table) == pytest.approx([0.05, 0.5, None, None])
    full = FastGuidedSampler(*setup, clip_state_change=0.05)  # the trained chain: the paper's t <= 10 rule
    assert full.guided_step.clip_state_changes(full.timesteps, full.step_table) == [0.05] * 11 + [None] * 29


def test_denoiser_gets_the_trained_timesteps():
    seen = []

    class Recording(ToyDenoiser):
        def forward(self, x, actions, t):
            seen.append(t.tolist())
            return super().forward(x, actions, t)

    torch.manual_seed(0)
    denoiser = Recording(10, O + 2, A, 128)
    setup = (denoiser, NoiseSchedule(128, tau=0.1), Actor(O, A, hidden=8), make_normalizer())
    for backend in ("torch", "reference"):
        seen.clear()
        FastGuidedSampler(*setup, backend=backend, sampling_steps=16).sample(torch.randn(2, O))
        assert seen == [[t, t] for t in reversed(strided_timesteps(128, 16))], backend


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_k_equal_t_reproduces_the_trained_chain_exactly(backend):
    setup = setup_with(n_steps=12)
    start = torch.randn(5, O)
    noise = SamplerNoise.draw(12, 5, 10, O + 2, A, generator=torch.Generator().manual_seed(4))
    full = FastGuidedSampler(*setup, backend=backend, guidance_scale=0.2).sample(start, noise=noise)
    same = FastGuidedSampler(*setup, backend=backend, guidance_scale=0.2, sampling_steps=12).sample(start,
                                                                                                    noise=noise)
    for name in ("observations_normalized", "actions_normalized", "rewards_normalized", "terminals_normalized"):
        assert torch.equal(getattr(full, name), getattr(same, name)), name


def test_noise_has_k_steps_and_a_shared_seed_gives_both_paths_the_same_chain():
    setup = setup_with(n_steps=24)
    start = torch.randn(3, O)
    fast = FastGuidedSampler(*setup, backend="torch", denoiser_dtype="float32", sampling_steps=6)
    with pytest.raises(ValueError, match=r"noise.state has shape \(24, 3, 10, 7\), expected \(6, 3, 10, 7\)"):
        fast.sample(start, noise=SamplerNoise.draw(24, 3, 10, O + 2, A))
    reference = FastGuidedSampler(*setup, backend="reference", sampling_steps=6)
    a = fast.sample(start, generator=torch.Generator().manual_seed(8))
    b = reference.sample(start, generator=torch.Generator().manual_seed(8))
    assert_batches_close(a, b)
    other = fast.sample(start, generator=torch.Generator().manual_seed(9))
    assert (other.actions - a.actions).abs().max() > 0.1


@pytest.mark.slow
def test_compiled_fast_path_matches_reference_at_fewer_steps():
    setup = setup_with(n_steps=24)
    start = torch.randn(7, O, generator=torch.Generator().manual_seed(101)) * 2
    noise = SamplerNoise.draw(5, 7, 10, O + 2, A, generator=torch.Generator().manual_seed(1))
    options = dict(guidance_scale=0.2, sampling_steps=5)
    compiled = FastGuidedSampler(*setup, backend="torch", denoiser_dtype="float32", compile=True, **options)
    reference = FastGuidedSampler(*setup, backend="reference", **options)
    assert_batches_close(compiled.sample(start, noise=noise), reference.sample(start, noise=noise))


# ---------------------------------------------------------------- the action-conditioned sampler
@pytest.mark.parametrize("B,H,O_,A_,T,K", [(1, 1, 3, 1, 8, 2), (7, 2, 11, 3, 24, 5), (5, 50, 5, 6, 12, 4)])
def test_conditioned_sampler_matches_reference_at_fewer_steps(B, H, O_, A_, T, K):
    torch.manual_seed(0)
    model = ResidualMLPDenoiser(H, O_ + 2, A_, MLPDenoiserConfig(hidden_dim=24, num_layers=2)).eval()
    schedule = NoiseSchedule(T, tau=0.5)
    g = torch.Generator().manual_seed(B * 100 + H)
    start, actions = torch.randn(B, O_, generator=g), torch.randn(B, H, A_, generator=g)
    noise = SamplerNoise.draw(K, B, H, O_ + 2, A_, generator=g)
    with torch.no_grad():
        want = ref.action_conditioned_sample(model, schedule, start, actions, sampling_steps=K, noise=noise)
    got = action_conditioned_sample(model, schedule, start, actions, sampling_steps=K, noise=noise)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    full_noise = SamplerNoise.draw(T, B, H, O_ + 2, A_, generator=g)
    assert torch.equal(action_conditioned_sample(model, schedule, start, actions, sampling_steps=T, noise=full_noise),
                       action_conditioned_sample(model, schedule, start, actions, noise=full_noise))
    with pytest.raises(ValueError, match=r"an int in 2\.\." + str(T) + " .*got 1"):
        action_conditioned_sample(model, schedule, start, actions, sampling_steps=1)


@pytest.mark.parametrize("policy_std,w", [(1.0, 0.02), (0.3, 0.005)])
def test_few_step_chain_keeps_the_imagined_actions_spread(policy_std, w):
    """One w serves every K: the imagined actions' standardised spread (act_std, what the guidance tuner targets)
    at K = 8 stays within 15% of the full T = 64 chain's, mean of 3 seeds (random 32x2 denoiser, fixed-std actor,
    B = 512). Measured: +5% (std 1, w = 0.02) and +6% (std 0.3, w = 0.005); with w applied once per respaced step
    and the respaced posterior std as the action noise (no compounding) +58% and +77%."""
    T, H = 64, 6
    spread = {}
    for K in (T, 8):
        values = []
        for seed in range(3):
            torch.manual_seed(seed)
            denoiser = ResidualMLPDenoiser(H, O + 2, A, MLPDenoiserConfig(hidden_dim=32, num_layers=2)).eval()
            policy = Actor(O, A, hidden=16, init_std=policy_std, learned_std=False)
            sampler = FastGuidedSampler(denoiser, NoiseSchedule(T, tau=1.0), policy, make_normalizer(O, A, seed),
                                        guidance_scale=w, sampling_steps=K, compile=False)
            start = torch.randn(512, O, generator=torch.Generator().manual_seed(seed + 7))
            batch = sampler.sample(start, generator=torch.Generator().manual_seed(seed))
            values.append(float(batch.metrics["act_std"]))
        spread[K] = sum(values) / len(values)
    assert spread[8] == pytest.approx(spread[T], rel=0.15), spread
