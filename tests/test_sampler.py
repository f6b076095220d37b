"""FastGuidedSampler: element-by-element agreement with the paper-style reference, batch layout, errors, backends.

The toy pieces here (``ToyDenoiser``, ``make_normalizer``, ``make_setup``) are what a user drops in: any module
with the denoiser call signature, our Actor, a non-trivial normaliser. Dims are deliberately not powers of 2.
"""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from polygrad_fast.backend import ENV_VAR, select_backend
from polygrad_fast.denoisers import MLPDenoiserConfig, ResidualMLPDenoiser
from polygrad_fast.normalizer import Normalizer
from polygrad_fast.policy import Actor
from polygrad_fast.noise import SamplerNoise
from polygrad_fast.backend import (CPU_DTYPE_ENV_VAR, ExecutionOptions, cpu_has_fast_bf16, measured_cpu_dtype,
                                   resolve_dtype)
from polygrad_fast.sampler import FastGuidedSampler, SamplerConfig
from polygrad_fast.schedule import NoiseSchedule

O, A = 5, 3  # D = 7


class ToyDenoiser(nn.Module):
    """x0 = tanh(Linear([x, a, t/T])): nonlinear in x, the actions and t, like a trained x0 predictor."""

    def __init__(self, horizon, transition_dim, action_dim, n_steps=12, seed=0):
        super().__init__()
        self.horizon, self.transition_dim, self.action_dim, self.n_steps = horizon, transition_dim, action_dim, n_steps
        g = torch.Generator().manual_seed(seed)
        d_in = horizon * (transition_dim + action_dim) + 1
        self.lin = nn.Linear(d_in, horizon * transition_dim)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(self.lin.weight.shape, generator=g) / d_in**0.5)
            self.lin.bias.copy_(torch.randn(self.lin.bias.shape, generator=g) * 0.3)

    def forward(self, x, actions, t):
        B = x.shape[0]
        h = torch.cat([x.reshape(B, -1), actions.reshape(B, -1), t[:, None].float() / self.n_steps], dim=-1)
        return 2 * torch.tanh(self.lin(h)).view(B, self.horizon, self.transition_dim)


def make_normalizer(obs_dim=O, act_dim=A, seed=0, act_mean=None, act_std=None):
    rng = np.random.default_rng(seed)
    return Normalizer({
        "observations": (rng.normal(size=obs_dim), rng.uniform(0.5, 2.0, obs_dim)),
        "actions": (rng.normal(size=act_dim) * 0.2 if act_mean is None else act_mean,
                    rng.uniform(0.5, 1.5, act_dim) if act_std is None else act_std),
        "rewards": (0.3, 2.0),
        "terminals": (0.05, 0.2),
    })


def make_setup(horizon=10, n_steps=12, obs_dim=O, act_dim=A, seed=0):
    torch.manual_seed(seed)
    denoiser = ToyDenoiser(horizon, obs_dim + 2, act_dim, n_steps, seed)
    policy = Actor(obs_dim, act_dim, hidden=24, init_std=0.6)
    return denoiser, NoiseSchedule(n_steps), policy, make_normalizer(obs_dim, act_dim, seed)


def assert_batches_close(fast, ref, atol=1e-5, rtol=1e-5):
    for name in ("observations", "actions", "rewards", "terminals", "observations_normalized",
                 "actions_normalized", "rewards_normalized", "terminals_normalized"):
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), atol=atol, rtol=rtol, msg=name)
    for name in ("act_std", "act_mean", "avg_change", "max_change", "min_change", "std_change"):
        torch.testing.assert_close(fast.metrics[name], ref.metrics[name], atol=atol, rtol=rtol, msg=name)


def run_both(setup, batch, noise_seed=1, **options):
    denoiser, schedule, policy, normalizer = setup
    horizon = denoiser.horizon
    start = torch.randn(batch, normalizer.obs_dim, generator=torch.Generator().manual_seed(noise_seed + 100)) * 2
    noise = SamplerNoise.draw(schedule.n_steps, batch, horizon, normalizer.obs_dim + 2, normalizer.act_dim,
                              generator=torch.Generator().manual_seed(noise_seed))
    fast = FastGuidedSampler(*setup, backend="torch", denoiser_dtype="float32", **options)
    ref = FastGuidedSampler(*setup, backend="reference", **options)
    return fast.sample(start, noise=noise), ref.sample(start, noise=noise)


OPTION_GRID = [
    dict(guidance_type=g, clip_std=c, states_for_guidance=s, update_states=u)
    for g, c, s, u in itertools.product(("grad", "sample", "none"), (3.0, None), ("recon", "posterior_mean"),
                                        (False, True))
    if not (u and g != "grad")
]


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_fast_matches_reference_for_every_option(options):
    # a large scale and a small policy std make the guidance and the clamp matter in every step
    fast, ref = run_both(make_setup(), batch=7, guidance_scale=0.2, **options)
    assert_batches_close(fast, ref)


def test_fast_matches_reference_without_state_clip_and_scaled_action_noise():
    fast, ref = run_both(make_setup(), batch=5, guidance_scale=0.1, clip_state_change=None, action_noise_scale=0.5)
    assert_batches_close(fast, ref)
    assert fast.metrics["max_change"] > 0.25  # nothing clamps the last step's change now


@pytest.mark.parametrize("batch,horizon", [(1, 10), (7, 1), (3, 50)])
def test_fast_matches_reference_batch_and_horizon(batch, horizon):
    fast, ref = run_both(make_setup(horizon=horizon), batch=batch, guidance_scale=0.05)
    assert_batches_close(fast, ref)


def test_fast_matches_reference_with_residual_mlp_denoiser():
    torch.manual_seed(3)
    denoiser = ResidualMLPDenoiser(4, 9, 6, MLPDenoiserConfig(hidden_dim=48, num_layers=2)).eval()
    setup = (denoiser, NoiseSchedule(10, tau=0.1), Actor(7, 6, hidden=20), make_normalizer(7, 6, seed=3))
    fast, ref = run_both(setup, batch=5, guidance_scale=0.1)
    assert_batches_close(fast, ref)


def test_generator_reproducible_and_shared_between_paths():
    setup = make_setup()
    start = torch.randn(4, O)
    fast = FastGuidedSampler(*setup, backend="torch", denoiser_dtype="float32")
    ref = FastGuidedSampler(*setup, backend="reference")
    a = fast.sample(start, generator=torch.Generator().manual_seed(5))
    b = fast.sample(start, generator=torch.Generator().manual_seed(5))
    c = ref.sample(start, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.observations, b.observations) and torch.equal(a.actions, b.actions)
    assert_batches_close(a, c)


@pytest.mark.parametrize("guidance_type", ["grad", "none"])
def test_results_do_not_alias_the_reused_buffers(guidance_type):
    """A later call must not overwrite an earlier result ('none' leaves the actions as the step's input tensor)."""
    sampler = FastGuidedSampler(*make_setup(), backend="torch", denoiser_dtype="float32",
                                guidance_type=guidance_type, clip_std=None)
    first = sampler.sample(torch.randn(4, O), generator=torch.Generator().manual_seed(5))
    kept = {k: getattr(first, k).clone() for k in ("observations_normalized", "actions_normalized")}
    sampler.sample(torch.randn(4, O), generator=torch.Generator().manual_seed(6))
    for k, v in kept.items():
        assert torch.equal(getattr(first, k), v), k


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_in_place_normaliser_refit_is_followed(compile):
    """Statistics copied into the normaliser's tensors (how a run refits it) reach the next call, as if the sampler
    had been built with them."""
    denoiser, schedule, policy, _ = make_setup()
    old, new = make_normalizer(seed=0), make_normalizer(seed=5)
    kw = dict(backend="torch", denoiser_dtype="float32", compile=compile)
    sampler = FastGuidedSampler(denoiser, schedule, policy, old, **kw)
    start = torch.randn(4, O)
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    before = sampler.sample(start, generator=gen())
    for name in old.fields:
        old[name].mean.copy_(new[name].mean)
        old[name].std.copy_(new[name].std)
    after = sampler.sample(start, generator=gen())
    fresh = FastGuidedSampler(denoiser, schedule, policy, new, **kw).sample(start, generator=gen())
    assert_batches_close(after, fresh)
    assert (after.actions - before.actions).abs().max() > 0.1  # the refit matters


def test_batch_layout_and_raw_fields():
    denoiser, schedule, policy, normalizer = setup = make_setup()
    start_raw = torch.randn(6, O) * 3 + 1
    out = FastGuidedSampler(*setup, denoiser_dtype="float32").sample(start_raw)
    assert out.observations.shape == (6, 10, O) and out.actions.shape == (6, 10, A)
    assert out.rewards.shape == out.terminals.shape == out.rewards_normalized.shape == (6, 10)
    torch.testing.assert_close(out.observations[:, 0], start_raw)  # first observation is the start state
    torch.testing.assert_close(out.observations, normalizer.unnormalize(out.observations_normalized, "observations"))
    torch.testing.assert_close(out.actions, normalizer.unnormalize(out.actions_normalized, "actions"))
    torch.testing.assert_close(out.rewards, normalizer.unnormalize(out.rewards_normalized, "rewards"))
    raw_term = normalizer.unnormalize(out.terminals_normalized, "terminals")
    assert torch.equal(out.terminals, (raw_term > 0.5).float())
    assert set(out.terminals.unique().tolist()) <= {0.0, 1.0}
    assert out.metrics["max_change"] <= 0.25 + 1e-6  # the t <= 10 clamp holds at the last step
    assert isinstance(out.metrics["sampling_time"], float)
    for key in ("act_std", "act_mean", "avg_change", "terminal_avg"):
        assert out.metrics[key].device == start_raw.device and out.metrics[key].dim() == 0
    # normalised start states give the same trajectories as raw ones
    again = FastGuidedSampler(*setup, denoiser_dtype="float32").sample(
        normalizer.normalize(start_raw, "observations"), normalized=True, generator=torch.Generator().manual_seed(0))
    first = FastGuidedSampler(*setup, denoiser_dtype="float32").sample(
        start_raw, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.actions, first.actions)


def test_guidance_scale_tensor_and_override():
    setup = make_setup()
    start = torch.randn(3, O)
    s = FastGuidedSampler(*setup, denoiser_dtype="float32", guidance_scale=0.01)
    assert s.guidance_scale.dim() == 0
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    s.set_guidance_scale(torch.tensor(0.3))
    set_out = s.sample(start, generator=gen())
    default = FastGuidedSampler(*setup, denoiser_dtype="float32")
    override = default.sample(start, generator=gen(), guidance_scale=torch.tensor(0.3))
    assert torch.equal(set_out.actions, override.actions)
    # both took effect: the default scale (0.005) on the same noise gives other actions (max difference ~2.3)
    at_default = default.sample(start, generator=gen())
    assert (at_default.actions - set_out.actions).abs().max() > 0.5


def test_low_precision_copy_path_runs_and_tracks_weight_updates():
    torch.manual_seed(0)
    denoiser = ResidualMLPDenoiser(4, O + 2, A, MLPDenoiserConfig(hidden_dim=32, num_layers=2)).eval()
    policy = Actor(O, A, hidden=16)
    s = FastGuidedSampler(denoiser, NoiseSchedule(6), policy, make_normalizer(), denoiser_dtype="bfloat16")
    assert s.denoiser_dtype == s.policy_dtype == torch.bfloat16
    out = s.sample(torch.randn(5, O))
    assert torch.isfinite(out.observations).all() and torch.isfinite(out.actions).all()
    with torch.no_grad():
        policy.logstd.add_(0.5)
        denoiser.trunk.output.bias.add_(1.0)
    s.sample(torch.randn(5, O))  # sync_weights: the bf16 copies follow the live modules
    torch.testing.assert_close(s._policy_copy.logstd.float(), policy.logstd, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(s._denoiser_fast.trunk.output.bias.float(), denoiser.trunk.output.bias,
                               atol=2e-2, rtol=1e-2)


def test_dtype_resolution(monkeypatch):
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    # 'auto' on CPU is what was measured on this CPU (POLYGRAD_FAST_CPU_DTYPE unset), never bf16 without fast bf16
    monkeypatch.delenv(CPU_DTYPE_ENV_VAR, raising=False)
    auto = resolve_dtype("auto", torch.device("cpu"))
    assert auto == measured_cpu_dtype() and (auto == torch.float32 or cpu_has_fast_bf16())
    monkeypatch.setenv(CPU_DTYPE_ENV_VAR, "bfloat16")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    # a foreign (non-polygrad_fast) denoiser cannot get a bf16 copy: 'auto' keeps it fp32, explicit bf16 raises
    assert FastGuidedSampler(*make_setup()).denoiser_dtype == torch.float32
    with pytest.raises(TypeError, match="low_precision_copy"):
        FastGuidedSampler(*make_setup(), denoiser_dtype="bfloat16")


@pytest.mark.parametrize("bad,exc,match", [
    (torch.zeros(4, O + 1), ValueError, r"expected \[B, 5\]"),
    (torch.zeros(4, 2, O), ValueError, r"expected \[B, 5\]"),
    (torch.zeros(0, O), ValueError, "batch size 0"),
    (torch.full((2, O), float("nan")), ValueError, "NaN or inf"),
    (torch.zeros(2, O, dtype=torch.float64), TypeError, "float32"),
    (torch.zeros(2, O, device="meta"), ValueError, "is on meta"),
    ([[0.0] * O], TypeError, "torch.Tensor"),
])
def test_bad_start_states(bad, exc, match):
    with pytest.raises(exc, match=match):
        FastGuidedSampler(*make_setup()).sample(bad)


def test_bad_horizon_noise_and_options():
    setup = make_setup()
    s = FastGuidedSampler(*setup)
    with pytest.raises(ValueError, match="denoiser.horizon 10"):
        s.sample(torch.zeros(2, O), horizon=9)
    bad_noise = SamplerNoise.draw(12, 3, 10, O + 2, A)
    with pytest.raises(ValueError, match="noise.x_T has shape"):
        s.sample(torch.zeros(2, O), noise=bad_noise)
    for opts, match in [(dict(guidance_type="grads"), "guidance_type must be one of"),
                        (dict(states_for_guidance="x0"), "states_for_guidance"),
                        (dict(denoiser_dtype="int8"), "denoiser_dtype"),
                        (dict(backend="cuda"), "backend must be one of"),
                        (dict(clip_std=-1.0), "clip_std"),
                        (dict(guidance_type="sample", update_states=True), "update_states")]:
        with pytest.raises(ValueError, match=match):
            FastGuidedSampler(*setup, **opts)
    with pytest.raises(TypeError, match="unknown sampler option"):
        FastGuidedSampler(*setup, guidance_scael=0.1)
    denoiser, schedule, policy, normalizer = setup
    with pytest.raises(ValueError, match="policy.obs_dim"):
        FastGuidedSampler(denoiser, schedule, Actor(O + 1, A), normalizer)
    with pytest.raises(ValueError, match="policy is on meta"):
        FastGuidedSampler(denoiser, schedule, Actor(O, A).to("meta"), normalizer)
    with pytest.raises(ValueError, match="denoiser.transition_dim"):
        FastGuidedSampler(denoiser, schedule, policy, make_normalizer(O + 1))
    assert SamplerConfig().guidance_scale == 0.005


def test_options_split_between_algorithm_and_execution():
    """Keyword options go to the dataclass that has the field; explicit objects are kept; invalid values raise
    listing the allowed ones; both dataclasses are frozen."""
    setup = make_setup()
    s = FastGuidedSampler(*setup, config=SamplerConfig(clip_std=2.0), execution=ExecutionOptions(sync_weights=False),
                          guidance_type="sample", backend="reference")
    assert (s.config.clip_std, s.config.guidance_type) == (2.0, "sample")
    assert (s.execution.sync_weights, s.execution.backend) == (False, "reference")
    assert not hasattr(s.config, "backend") and not hasattr(s.execution, "guidance_type")
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'torch', 'reference', 'triton'\], got 'gpu'"):
        ExecutionOptions(backend="gpu")
    with pytest.raises(TypeError, match="compile must be a bool, got 1"):
        ExecutionOptions(compile=1)
    for bad in (float("nan"), float("inf"), -0.1, "0.1"):
        with pytest.raises(ValueError, match="guidance_scale"):
            SamplerConfig(guidance_scale=bad)
    with pytest.raises(ValueError, match="action_noise_scale"):
        SamplerConfig(action_noise_scale=float("nan"))
    with pytest.raises(TypeError, match="expected a SamplerConfig"):
        FastGuidedSampler(*setup, config=ExecutionOptions())
    with pytest.raises(TypeError, match="ExecutionOptions.*cpu_prepack"):
        FastGuidedSampler(*setup, cpu_prepak=False)
    with pytest.raises(AttributeError):
        SamplerConfig().clip_std = 1.0  # frozen


def test_backend_selection(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert select_backend("cpu") == "torch"
    assert select_backend("cpu", "reference") == "reference"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_backend("cpu", "triton")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        select_backend("cpu", "gpu")
    monkeypatch.setenv(ENV_VAR, "reference")
    assert select_backend("cpu", "torch") == "reference"
    assert FastGuidedSampler(*make_setup()).backend == "reference"
    monkeypatch.setenv(ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=f"environment variable {ENV_VAR}"):
        select_backend("cpu")


@pytest.mark.slow
def test_compiled_fast_path_matches_reference():
    fast, ref = run_both(make_setup(), batch=7, guidance_scale=0.2)
    compiled = FastGuidedSampler(*make_setup(), backend="torch", denoiser_dtype="float32", compile=True)
    start = torch.randn(7, O, generator=torch.Generator().manual_seed(101)) * 2
    noise = SamplerNoise.draw(12, 7, 10, O + 2, A, generator=torch.Generator().manual_seed(1))
    compiled.set_guidance_scale(0.2)
    assert_batches_close(compiled.sample(start, noise=noise), ref)
