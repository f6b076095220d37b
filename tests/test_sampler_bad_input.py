"""FastGuidedSampler on bad input: every constructor and sample() argument, foreign policies returning the wrong
thing, and one sampler shared by threads. Each error must say what was expected and what was given; nothing may
run through to a silently wrong result. Property-based (hypothesis) where the input space is a range."""
import math
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polygrad_fast.noise import SamplerNoise
from polygrad_fast.sampler import FastGuidedSampler
from test_sampler import A, O, make_setup

H, T = 3, 3
FAST = dict(backend="torch", denoiser_dtype="float32")
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def setup():
    return make_setup(horizon=H, n_steps=T)


@pytest.fixture(scope="module")
def sampler(setup):
    return FastGuidedSampler(*setup, **FAST)


def _policy(mean_fn, std_fn):
    """A foreign policy (a plain function): raw states [..., O] -> (mean_fn(states), std_fn(states))."""
    return lambda s: (mean_fn(s), std_fn(s))


GOOD_MEAN = lambda s: torch.tanh(s[..., :A])  # noqa: E731
GOOD_STD = lambda s: torch.full(s.shape[:-1] + (A,), 0.5)  # noqa: E731


# ---------------------------------------------------------------- guidance scale
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.1])
def test_bad_guidance_scale_is_rejected(setup, backend, value):
    s = FastGuidedSampler(*setup, backend=backend)
    start = torch.zeros(2, O)
    message = "guidance_scale must be a finite number >= 0, got"
    with pytest.raises(ValueError, match=message):
        s.sample(start, guidance_scale=value)
    with pytest.raises(ValueError, match=message):
        s.set_guidance_scale(value)
    with pytest.raises(ValueError, match=message):  # a tensor is copied without a sync, checked by sample()
        s.sample(start, guidance_scale=torch.tensor(value))
    s.set_guidance_scale(torch.tensor(value))
    with pytest.raises(ValueError, match=message):
        s.sample(start)
    s.set_guidance_scale(0.1)
    assert torch.isfinite(s.sample(start).actions).all()  # a good value makes the sampler usable again


def test_guidance_scale_type_and_shape(sampler):
    with pytest.raises(TypeError, match="number or a one-element tensor, got str"):
        sampler.set_guidance_scale("0.1")
    with pytest.raises(ValueError, match=r"one-element float tensor, got shape \[2\]"):
        sampler.sample(torch.zeros(2, O), guidance_scale=torch.tensor([0.1, 0.2]))


@SETTINGS
@given(value=st.floats(allow_nan=True, allow_infinity=True, width=32))
def test_guidance_scale_accepted_iff_finite_and_non_negative(sampler, value):
    start = torch.zeros(2, O)
    if math.isfinite(value) and value >= 0:
        out = sampler.sample(start, guidance_scale=value, generator=torch.Generator().manual_seed(0))
        assert out.actions.shape == (2, H, A)
    else:
        with pytest.raises(ValueError, match="guidance_scale"):
            sampler.sample(start, guidance_scale=value)


# ---------------------------------------------------------------- foreign policies
@pytest.mark.parametrize("guidance_type,clip_std", [("grad", 3.0), ("sample", 3.0), ("none", None)])
@pytest.mark.parametrize("bad", ["zero std", "negative std", "nan std", "nan mean"])
def test_policy_with_bad_std_or_mean_raises(setup, guidance_type, clip_std, bad):
    """Before: a std < 0 gave finite numbers on the fast path. Now the fast path raises after the loop (the running
    minimum of the std, and the actions' finiteness, checked once: no host sync inside the loop); with 'none' and
    no clip the loop never calls the policy, but the returned standardised-action metrics do. The reference raises
    too (torch.distributions' validation of the std; the same final check for a NaN mean)."""
    mean_fn, std_fn = {
        "zero std": (GOOD_MEAN, lambda s: torch.zeros(s.shape[:-1] + (A,))),
        "negative std": (GOOD_MEAN, lambda s: -GOOD_STD(s)),
        "nan std": (GOOD_MEAN, lambda s: torch.full(s.shape[:-1] + (A,), math.nan)),
        "nan mean": (lambda s: torch.full(s.shape[:-1] + (A,), math.nan), GOOD_STD),
    }[bad]
    denoiser, schedule, _, normalizer = setup
    options = dict(guidance_type=guidance_type, clip_std=clip_std)
    fast = FastGuidedSampler(denoiser, schedule, _policy(mean_fn, std_fn), normalizer, **FAST, **options)
    with pytest.raises(ValueError, match=r"the policy returned a std <= 0 or NaN, or the guided actions are not "):
        fast.sample(torch.zeros(2, O))
    ref = FastGuidedSampler(denoiser, schedule, _policy(mean_fn, std_fn), normalizer, backend="reference", **options)
    with pytest.raises(ValueError):
        ref.sample(torch.zeros(2, O))


@pytest.mark.parametrize("guidance_type", ["grad", "none"])
@pytest.mark.parametrize("policy,exc,match", [
    (_policy(lambda s: torch.zeros(s.shape[:-1] + (A + 1,)), GOOD_STD), ValueError,
     r"returned mean \[2, (\d), 4\] and std \[2, \1, 3\] for states \[2, \1, 5\]; expected mean \[2, \1, 3\] "
     r"\(action dim 3\)"),  # the loop's guide states [2, 3, O]; with 'none' the metrics' states [2, 2, O]
    (_policy(GOOD_MEAN, lambda s: torch.ones(A + 1)), ValueError, r"std \[4\].*broadcastable"),
    (lambda s: torch.zeros(s.shape[:-1] + (A,)), TypeError, "policy must return"),
    (_policy(lambda s: [0.0] * A, GOOD_STD), TypeError, "mean must be a floating-point torch.Tensor, got list"),
    (_policy(lambda s: torch.zeros(s.shape[:-1] + (A,), dtype=torch.int64), GOOD_STD), TypeError,
     "floating-point torch.Tensor, got a torch.int64 tensor"),
    (_policy(GOOD_MEAN, lambda s: torch.ones((), device="meta")), ValueError, "std is on meta but the states"),
])
def test_foreign_policy_with_wrong_output(setup, guidance_type, policy, exc, match):
    """Before: a wrong action size gave a raw size-mismatch error from deep in the step."""
    denoiser, schedule, _, normalizer = setup
    s = FastGuidedSampler(denoiser, schedule, policy, normalizer, **FAST, guidance_type=guidance_type,
                          clip_std=None if guidance_type == "none" else 3.0)
    with pytest.raises(exc, match=match):
        s.sample(torch.zeros(2, O))


def test_reference_backend_names_a_wrong_action_size(setup):
    denoiser, schedule, _, normalizer = setup
    policy = _policy(lambda s: torch.zeros(s.shape[:-1] + (A + 1,)), lambda s: torch.ones(s.shape[:-1] + (A + 1,)))
    s = FastGuidedSampler(denoiser, schedule, policy, normalizer, backend="reference")
    with pytest.raises(ValueError, match=r"mean shape \[2, 3, 4\] for guide states \[2, 3, 5\]; expected the "
                                         r"actions' shape \[2, 3, 3\]"):
        s.sample(torch.zeros(2, O))


def test_policy_std_broadcasting_per_dimension_is_accepted(setup):
    denoiser, schedule, _, normalizer = setup
    s = FastGuidedSampler(denoiser, schedule, _policy(GOOD_MEAN, lambda st: torch.full((A,), 0.5)), normalizer,
                          **FAST)
    assert torch.isfinite(s.sample(torch.zeros(2, O)).actions).all()


# ---------------------------------------------------------------- constructor
def test_constructor_argument_types(setup):
    denoiser, schedule, policy, normalizer = setup
    for args, match in [((lambda x, a, t: x, schedule, policy, normalizer), "denoiser must be a Module, got function"),
                        ((denoiser, 12, policy, normalizer), "schedule must be a NoiseSchedule, got int"),
                        ((denoiser, schedule, policy, {"observations": (0, 1)}), "normalizer must be a Normalizer"),
                        ((denoiser, schedule, 3, normalizer), "policy must be callable"),
                        ((denoiser, schedule, policy, normalizer, "grad"), "expected a SamplerConfig or None, got str")]:
        with pytest.raises(TypeError, match=match):
            FastGuidedSampler(*args)


# ---------------------------------------------------------------- sample() arguments
@SETTINGS
@given(shape=st.lists(st.integers(0, 6), min_size=0, max_size=3))
def test_start_obs_shapes(sampler, shape):
    start = torch.zeros(shape)
    if len(shape) == 2 and shape[1] == O and shape[0] >= 1:
        assert sampler.sample(start).observations.shape == (shape[0], H, O)
    else:
        with pytest.raises(ValueError, match=r"expected \[B, 5\]|batch size 0"):
            sampler.sample(start)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool])
def test_start_obs_dtypes(sampler, dtype):
    with pytest.raises(TypeError, match=f"start_obs must be float32, got {dtype}"):
        sampler.sample(torch.zeros(2, O, dtype=dtype))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_start_obs_not_finite(sampler, value):
    start = torch.zeros(3, O)
    start[1, 2] = value
    with pytest.raises(ValueError, match="start_obs contains NaN or inf"):
        sampler.sample(start)


@pytest.mark.parametrize("horizon", [0, -1, 2.5, "3", True, H + 1])
def test_bad_horizon(sampler, horizon):
    with pytest.raises(ValueError, match="horizon"):
        sampler.sample(torch.zeros(2, O), horizon=horizon)


def test_bad_noise(sampler):
    start = torch.zeros(2, O)
    good = SamplerNoise.draw(T, 2, H, O + 2, A, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(sampler.sample(start, noise=good).observations).all()
    with pytest.raises(TypeError, match="noise must be a SamplerNoise, got tuple"):
        sampler.sample(start, noise=(good.x_T, good.a_T, good.state, good.action))
    with pytest.raises(TypeError, match="noise.state must be float32, got torch.float64"):
        sampler.sample(start, noise=SamplerNoise(good.x_T, good.a_T, good.state.double(), good.action))
    with pytest.raises(TypeError, match="noise.a_T must be a torch.Tensor, got NoneType"):
        sampler.sample(start, noise=SamplerNoise(good.x_T, None, good.state, good.action))
    for field, bad in [("x_T", good.x_T[:1]), ("action", good.action[1:]), ("state", good.state[..., :-1])]:
        fields = dict(dict(x_T=good.x_T, a_T=good.a_T, state=good.state, action=good.action), **{field: bad})
        with pytest.raises(ValueError, match=f"noise.{field} has shape"):
            sampler.sample(start, noise=SamplerNoise(**fields))
    with pytest.raises(ValueError, match="noise.x_T is on meta, expected cpu"):
        sampler.sample(start, noise=SamplerNoise(good.x_T.to("meta"), good.a_T, good.state, good.action))


# ---------------------------------------------------------------- threads
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_shared_sampler_gives_every_thread_its_single_threaded_result(setup, backend):
    """sample() holds a lock: one sampler shared by threads gives each call what it gives alone (without it the
    threads would share the preallocated x/a/noise buffers of the fast path: with the lock replaced by a no-op,
    4 of the 6 calls below differ from their single-threaded results)."""
    s = FastGuidedSampler(*setup, backend=backend, denoiser_dtype="float32", guidance_scale=0.1)
    starts = [torch.randn(4, O, generator=torch.Generator().manual_seed(i)) for i in range(6)]

    def call(i):
        return s.sample(starts[i], generator=torch.Generator().manual_seed(100 + i))

    alone = [call(i) for i in range(6)]
    results, errors = [None] * 6, []

    def worker(indices):
        try:
            for i in indices:
                results[i] = call(i)
        except Exception as exc:  # reported below: an assertion in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(range(k, 6, 3),)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for want, got in zip(alone, results):
        assert torch.equal(want.observations, got.observations) and torch.equal(want.actions, got.actions)
