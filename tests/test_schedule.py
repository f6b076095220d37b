"""NoiseSchedule: the float64 tables against an independent numpy computation and spot values, the precision
option (float32 tables as the paper's code computes them, their distance from the float64 tables, how far that
moves a sampled trajectory), and the constructor's input checks.
"""
import numpy as np
import pytest
import torch

from polygrad_fast.denoisers import MLPDenoiserConfig, ResidualMLPDenoiser
from polygrad_fast.normalizer import Normalizer
from polygrad_fast.policy import Actor
from polygrad_fast.sampler import FastGuidedSampler
from polygrad_fast.schedule import STEP_TABLE_COLUMNS, NoiseSchedule

F32_ULP = 2.0 ** -24  # relative spacing of float32 near 1 is 2^-23; round-to-nearest is off by at most half of it


def numpy_tables(T, tau):
    """The cosine schedule with exponent tau and the posterior q(x_{t-1} | x_t, x_0), float64, written from the
    formulas (no polygrad_fast code)."""
    s = np.linspace(0.0, 1.0, T + 1)
    f = np.cos(s * np.pi / 2) ** (2 * tau)
    v_start, v_end = 1.0, np.cos(np.pi / 2) ** (2 * tau)
    out = (v_end - f) / (v_end - v_start)
    betas = np.clip(1 - out[1:] / out[:-1], 0, 0.999)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    var = betas * (1 - abar_prev) / (1 - abar)
    logvar = np.log(np.maximum(var, 1e-20))
    return {
        "betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar), "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - abar),
        "posterior_variance": var, "posterior_log_variance_clipped": logvar,
        "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1 - abar),
        "posterior_mean_coef2": (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar),
        "posterior_std": np.exp(0.5 * logvar),
    }


@pytest.mark.parametrize("T,tau", [(128, 1.0), (128, 0.1), (17, 0.5), (1, 1.0)])
def test_schedule_tables_match_numpy_float64(T, tau):
    schedule = NoiseSchedule(T, tau)
    for name, want in numpy_tables(T, tau).items():
        got = getattr(schedule, name)
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15, err_msg=name)
    table = schedule.step_table()
    assert table.shape == (T, 6) and table.dtype == torch.float32
    for i, name in enumerate(STEP_TABLE_COLUMNS[:-2]):
        np.testing.assert_allclose(table[:, i].numpy(), numpy_tables(T, tau)[name], rtol=1e-6, atol=1e-12)
    # each row spans its own trained step: one of them, with its own posterior std
    assert STEP_TABLE_COLUMNS[-2:] == ("trained_steps", "spanned_posterior_std")
    assert torch.equal(table[:, -2], torch.ones(T)) and torch.equal(table[:, -1], table[:, -3])


@pytest.mark.parametrize("tau,expected", [(1.0, [0.9999, 0.919, 0.698, 0.371, 0.0004]),
                                          (0.1, [1.0, 0.992, 0.965, 0.906, 0.020])])
def test_schedule_spot_values(tau, expected):
    """sqrt(abar_t) at t = 0, 32, 64, 96, 127 for T = 128, as the paper's schedule gives them (3-4 digits)."""
    got = numpy_tables(128, tau)["sqrt_alphas_cumprod"][[0, 32, 64, 96, 127]]
    np.testing.assert_allclose(got, expected, atol=6e-4)
    np.testing.assert_allclose(NoiseSchedule(128, tau).sqrt_alphas_cumprod[[0, 32, 64, 96, 127]].numpy(), got)
    assert NoiseSchedule(128, tau).betas[-1] == pytest.approx(0.999)


def paper_float32_tables(T, tau):
    """The paper's schedule written out in numpy, independently of polygrad_fast.

    The betas are computed in float64 (``np.linspace`` is float64) and rounded to float32 (``torch.tensor(betas,
    dtype=float32)``); everything after that is float32 arithmetic, one numpy operation per torch operation of the
    paper's code. One exception, on purpose: torch's float32 ``cumprod`` on the CPU (where the paper builds its
    buffers) accumulates in float64 and rounds each partial product to float32, so abar is computed that way.
    """
    x = np.linspace(0.0, 1.0, T + 1)
    f = np.cos(x * np.pi / 2) ** (2 * tau)
    v_start, v_end = np.cos(0.0) ** (2 * tau), np.cos(np.pi / 2) ** (2 * tau)
    out = (v_end - f) / (v_end - v_start)
    betas = np.clip(1 - out[1:] / out[:-1], 0, 0.999).astype(np.float32)

    one = np.float32(1.0)
    alphas = one - betas
    abar = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    abar_prev = np.concatenate([np.ones(1, np.float32), abar[:-1]])
    var = betas * (one - abar_prev) / (one - abar)
    logvar = np.log(np.maximum(var, np.float32(1e-20)))
    tables = {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(one - abar),
        "sqrt_recip_alphas_cumprod": np.sqrt(one / abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(one / abar - one),
        "posterior_variance": var,
        "posterior_log_variance_clipped": logvar,
        "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (one - abar),
        "posterior_mean_coef2": (one - abar_prev) * np.sqrt(alphas) / (one - abar),
        "posterior_std": np.exp(np.float32(0.5) * logvar),
    }
    assert all(v.dtype == np.float32 for v in tables.values())
    return tables


# +, -, *, / are correctly rounded in both libraries, so the tables built from them alone must agree bit for bit.
# torch's float32 sqrt, log and exp on the CPU are vectorised routines that can be one ulp off the correctly
# rounded result (sqrt(0.99900001) is, at T = 1), so each table that goes through them may differ by an ulp or
# two (one in the routine, one more where the result is then multiplied or divided). A float64 computation
# rounded to float32 differs from these by hundreds of ulps (alphas_cumprod: 1.3e-5 relative at T = 128).
MAX_ULP = {
    "betas": 0, "alphas_cumprod": 0, "alphas_cumprod_prev": 0, "posterior_variance": 0,
    "sqrt_alphas_cumprod": 1, "sqrt_one_minus_alphas_cumprod": 1, "sqrt_recip_alphas_cumprod": 1,
    "sqrt_recipm1_alphas_cumprod": 1, "posterior_log_variance_clipped": 2,
    "posterior_mean_coef1": 2, "posterior_mean_coef2": 2,
}


def assert_posterior_std_close(got, expected, logvar):
    """sigma_t = exp(logvar_t / 2): one ulp of logvar_t (up to 3.8e-6 at logvar_0 = log 1e-20 = -46) moves sigma_t
    by half of it, relative: 16 float32 ulps at t = 0. The tolerance is that plus two ulps of the exp itself."""
    rtol = 0.5 * MAX_ULP["posterior_log_variance_clipped"] * np.spacing(np.abs(logvar)) + 2 * 2.0 ** -23
    bad = np.abs(got.astype(np.float64) - expected) > rtol * np.abs(expected)
    assert not bad.any(), f"posterior_std differs at t = {np.flatnonzero(bad)}: {got[bad]} vs {expected[bad]}"

CASES = [(128, 0.1), (128, 1.0), (17, 0.5), (1, 1.0)]


@pytest.mark.parametrize("T,tau", CASES)
def test_float32_tables_match_independent_numpy_float32(T, tau):
    schedule = NoiseSchedule(T, tau, precision="float32")
    want = paper_float32_tables(T, tau)
    assert set(want) == set(schedule.tables)
    for name, expected in want.items():
        stored = getattr(schedule, name)
        assert stored.dtype == torch.float64, name  # same storage as the float64 tables: consumers are unchanged
        got = stored.numpy().astype(np.float32)
        assert np.array_equal(got.astype(np.float64), stored.numpy()), f"{name}: stored values are not float32 values"
        if name == "posterior_std":
            assert_posterior_std_close(got, expected, want["posterior_log_variance_clipped"])
        elif MAX_ULP[name] == 0:
            np.testing.assert_array_equal(got, expected, err_msg=name)
        else:
            np.testing.assert_array_max_ulp(got, expected, maxulp=MAX_ULP[name])
    # what a reverse step reads is the float32 table itself, bit for bit
    table = schedule.step_table()
    for i, name in enumerate(STEP_TABLE_COLUMNS[:-2]):
        assert torch.equal(table[:, i], getattr(schedule, name).float()), name


def relative_differences(T, tau):
    """Max |float32 - float64| / |float64| per table; entries where the float64 value is 0 must match exactly."""
    exact, paper = NoiseSchedule(T, tau), NoiseSchedule(T, tau, precision="float32")
    out = {}
    for name in exact.tables:
        a, b = exact.tables[name], paper.tables[name]
        zero = a == 0
        assert torch.equal(b[zero], a[zero]), name
        out[name] = float(((b - a).abs()[~zero] / a.abs()[~zero]).max())
    return exact, out


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_float32_tables_differ_from_float64_by_a_bounded_amount(tau):
    """Measured at T = 128 (max relative difference over t):

    ============================== ========= =========
    table                          tau = 0.1 tau = 1.0
    ============================== ========= =========
    betas                          5.4e-08   5.7e-08
    alphas_cumprod                 1.3e-05   1.3e-05
    alphas_cumprod_prev            2.6e-07   4.5e-07
    sqrt_alphas_cumprod            6.3e-06   6.6e-06
    sqrt_one_minus_alphas_cumprod  3.7e-04   9.7e-05
    sqrt_recip_alphas_cumprod      6.3e-06   6.6e-06
    sqrt_recipm1_alphas_cumprod    2.3e-03   1.7e-04
    posterior_variance             1.0e-03   1.5e-04
    posterior_log_variance_clipped 9.1e-05   8.6e-05
    posterior_mean_coef1           7.5e-04   1.9e-04
    posterior_mean_coef2           1.0e-03   1.5e-04
    posterior_std                  5.2e-04   7.5e-05
    ============================== ========= =========

    Bound: the betas are float64 values rounded once (<= 2^-24 relative). Everything else inherits the rounding of
    1 - beta_t and of the products near 1 (<= 2^-24 absolute each, a few of them), which a division by
    1 - abar_t >= beta_0 magnifies by up to 1 / beta_0: the largest error sits at t = 0, and the bound is
    2 * 2^-24 / beta_0 (4.0e-3 relative at tau = 0.1 where beta_0 = 1.5e-5, 4.3e-4 at tau = 1).
    """
    exact, rel = relative_differences(128, tau)
    assert rel["betas"] <= F32_ULP
    bound = 2 * F32_ULP / float(exact.betas[0])
    for name, r in rel.items():
        assert r <= bound, f"{name}: relative difference {r:.3g} > {bound:.3g}"
    # the option is not a no-op: the derived tables carry float32 rounding well above one ulp
    assert rel["alphas_cumprod"] > 10 * F32_ULP and rel["posterior_mean_coef1"] > 100 * F32_ULP


def test_precision_moves_sampled_trajectories_by_about_1e_3(one_torch_thread):
    """Same denoiser, policy and noise (one generator seed), T = 128 (tau = 0.1 as for Hopper): only the schedule's precision differs.

    Measured (B = 8, H = 10, O = 11, A = 3, random 64x2 residual-MLP denoiser whose x0 is O(0.4), grad guidance
    0.1, clip_std 3, clip_state_change 0.25): final normalised states (and rewards, terminals) move by at most
    9.4e-4 (mean 2.0e-4), mostly through the t = 0 posterior-mean coefficient (coef1_0 = 0.99925 in float32 vs
    1); actions by at most 1.3e-5. (At B = 64: 1.0e-3 at tau = 0.1, 2.5e-4 at tau = 1.) The bounds below are 3x the measurement, and a floor at 10x below it
    shows the precision actually reached the sampler.
    """
    O, A, H, T, B = 11, 3, 10, 128, 8
    torch.manual_seed(0)
    denoiser = ResidualMLPDenoiser(H, O + 2, A, MLPDenoiserConfig(hidden_dim=64, num_layers=2)).eval()
    policy, normalizer = Actor(O, A), Normalizer.identity(O, A)
    start = torch.randn(B, O, generator=torch.Generator().manual_seed(2))
    batches = {
        p: FastGuidedSampler(denoiser, NoiseSchedule(T, 0.1, precision=p), policy, normalizer, backend="reference",
                             guidance_type="grad", guidance_scale=0.1, clip_std=3.0,
                             clip_state_change=0.25).sample(start, generator=torch.Generator().manual_seed(1))
        for p in ("float64", "float32")
    }
    states = (batches["float32"].observations_normalized - batches["float64"].observations_normalized).abs().max()
    actions = (batches["float32"].actions_normalized - batches["float64"].actions_normalized).abs().max()
    assert 1e-4 < float(states) < 3e-3, float(states)
    assert float(actions) < 6e-5, float(actions)


@pytest.mark.parametrize("precision", ["float16", "fp32", "Float64", None, 32])
def test_invalid_precision_lists_the_allowed_values(precision):
    with pytest.raises(ValueError, match=r"precision must be one of \('float64', 'float32'\)"):
        NoiseSchedule(8, precision=precision)


@pytest.mark.parametrize("n_steps", [0, -3, 2.0, True, "8"])
def test_invalid_n_steps(n_steps):
    with pytest.raises(ValueError, match="n_steps must be a positive int"):
        NoiseSchedule(n_steps)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_invalid_tau(tau):
    with pytest.raises(ValueError, match="tau must be a finite positive number"):
        NoiseSchedule(8, tau)


def test_precision_is_part_of_the_schedule_identity():
    assert NoiseSchedule(8, 0.5) == NoiseSchedule(8, 0.5, "float64")
    assert NoiseSchedule(8, 0.5) != NoiseSchedule(8, 0.5, "float32")
    assert "precision='float32'" in repr(NoiseSchedule(8, 0.5, "float32"))
