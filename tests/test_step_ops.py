"""The production row-level step ops (polygrad_fast.step_ops: closed-form guidance, step t resolved by the
caller) against the reference's paper-style step (autograd guidance, coefficients by name) and against a third
statement of the state half written here from the schedule's float64 tables."""
import pytest
import torch

from polygrad_fast.normalizer import Normalizer
from polygrad_fast.policy import Actor
from polygrad_fast.reference.guided_sampling import reference_action_step
from polygrad_fast.reference.step_ops import guided_action_update, guided_state_update
from polygrad_fast.schedule import NoiseSchedule
from polygrad_fast.step_ops import (CLIP_STATE_CHANGE_MAX_T, SIGMA, action_update_at, compact_broadcast,
                                   state_update_at)

B, H, O, A, T = 6, 5, 7, 3, 20


def setup(seed=0):
    torch.manual_seed(seed)
    norm = Normalizer({"observations": (torch.randn(O).numpy(), (torch.rand(O) + 0.5).numpy()),
                       "actions": ((torch.randn(A) * 0.3).numpy(), (torch.rand(A) + 0.5).numpy()),
                       "rewards": (0.1, 2.0), "terminals": (0.02, 0.14)})
    policy = Actor(O, A, hidden=16, init_std=0.4)
    x, x0 = torch.randn(B, H, O + 2), torch.randn(B, H, O + 2) * 2
    start = torch.randn(B, O)
    return norm, policy, x, x0, start, torch.randn(B, H, O + 2), torch.randn(B, H, A)


def paper_state_half(x, x_recon, start, t, schedule, norm, clip_state_change, noise, states_for_guidance):
    """The state half written like the paper's code: extract(table, t) by name from the schedule's float32
    tables (``schedule.table``), apply_conditioning, q_posterior, the std from the clipped log variance."""
    def extract(name):
        return schedule.table(name)[torch.full((x.shape[0],), t)].view(-1, 1, 1)

    x_recon = x_recon.clone()
    x_recon[:, 0, :O] = start
    mean = extract("posterior_mean_coef1") * x_recon + extract("posterior_mean_coef2") * x
    std = torch.exp(0.5 * extract("posterior_log_variance_clipped"))
    if t <= 10:
        mean = x + torch.clamp(mean - x, -clip_state_change, clip_state_change)
    guide = (x_recon if states_for_guidance == "recon" else mean)[..., :O]
    x_next = mean.clone() if t == 0 else mean + std * noise
    x_next[:, 0, :O] = start
    return x_next, mean, norm.unnormalize(guide, "observations")


@pytest.mark.parametrize("t", [0, 1, 10, 11, T - 1])
@pytest.mark.parametrize("sfg", ["recon", "posterior_mean"])
def test_state_update_matches_paper_step(t, sfg):
    norm, _, x, x0, start, noise, _ = setup()
    schedule = NoiseSchedule(T)
    obs = norm["observations"]
    table = schedule.step_table()
    fast = state_update_at(x, x0, start, table[t], obs.mean, obs.scale, 0.25 if t <= CLIP_STATE_CHANGE_MAX_T else None,
                           None if t == 0 else noise, sfg)
    ref = guided_state_update(x, x0, start, t, table, obs.mean, obs.scale, 0.25, noise, sfg)
    want = paper_state_half(x, x0, start, t, schedule, norm, 0.25, noise, sfg)
    for got in (fast, ref):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    assert not torch.equal(x0[:, 0, :O], start)  # inputs untouched


@pytest.mark.parametrize("t", [0, 1, T - 1])
@pytest.mark.parametrize("guidance_type", ["grad", "sample", "none"])
@pytest.mark.parametrize("clip_std", [0.5, None])
def test_action_update_matches_autograd_step(t, guidance_type, clip_std):
    norm, policy, x, _, _, _, a_noise = setup(1)
    actions = torch.randn(B, H, A) * 2
    guide_raw = norm.unnormalize(x[..., :O], "observations")
    table = NoiseSchedule(T).step_table()
    act = norm["actions"]
    with torch.no_grad():
        mean, std = policy(guide_raw)
    got = action_update_at(actions, mean, std, act.mean, act.scale, table[t], 0.3, clip_std, a_noise, 0.7,
                           guidance_type, t == 0)
    # the reference: autograd on Normal(mean, std), and on the policy's own distribution
    torch.testing.assert_close(got, guided_action_update(actions, mean, std, act.mean, act.scale, t, table, 0.3,
                                                         clip_std, a_noise, 0.7, guidance_type), atol=1e-6, rtol=1e-6)
    want, _ = reference_action_step(actions, guide_raw, policy, norm, t, table[t, SIGMA], 0.3, clip_std, a_noise,
                                    0.7, guidance_type)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    if guidance_type == "grad" and t > 0 and clip_std is not None:
        raw = norm.unnormalize(got - 0.7 * table[t, SIGMA] * a_noise, "actions")
        lo, hi = mean - clip_std * std, mean + clip_std * std
        # clamp then one step towards the mean: stays inside the clamp interval for w / std^2 < 1
        assert ((raw >= lo - 1e-5) & (raw <= hi + 1e-5)).all()


@pytest.mark.parametrize("K", [2, 3, 10])
@pytest.mark.parametrize("w", [0.01, 0.3, 2.0])
def test_action_update_of_a_respaced_row_compounds_its_trained_steps(K, w):
    """A row of a K-step chain (T = 20: spans of 19, 9-10 and 2-3 trained steps): the closed forms (pull
    1 - (1 - c)^n, noise variance s^2 p (2 - p) / (c (2 - c))) against the twin's n autograd steps with its noise
    variance accumulated step by step; from a weak pull to the cap (w = 2 passes the mean for every std here)."""
    norm, policy, x, _, _, _, a_noise = setup(3)
    actions = torch.randn(B, H, A) * 2
    _, table = NoiseSchedule(T).respaced(K)
    act = norm["actions"]
    with torch.no_grad():
        mean, std = policy(norm.unnormalize(x[..., :O], "observations"))
    for row in range(1, K):
        got = action_update_at(actions, mean, std, act.mean, act.scale, table[row], w, 3.0, a_noise, 1.0, "grad",
                               False)
        want = guided_action_update(actions, mean, std, act.mean, act.scale, row, table, w, 3.0, a_noise, 1.0,
                                    "grad")
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


def test_compact_broadcast_narrows_only_the_broadcast_dims():
    base = torch.rand(1, 4, A)
    c = compact_broadcast(base.expand(B, 4, A))
    assert c.shape == (1, 4, A) and torch.equal(c.expand(B, 4, A), base.expand(B, 4, A))
    assert compact_broadcast(torch.rand(A).expand(B, H, A)).shape == (1, 1, A)
    full = torch.rand(B, H, A)
    assert compact_broadcast(full) is full
    assert compact_broadcast(torch.rand(B, 1, A)).shape == (B, 1, A)  # size-1 dims are left alone


@pytest.mark.parametrize("K", [1, 3])
def test_action_update_is_the_same_for_an_expanded_and_a_materialised_std(K):
    """The guidance coefficients are computed on the compact std when the std is a broadcast view: the same as for
    the same values as a full [B,H,A] tensor (the per-state std of a general policy), up to the ulp by which a
    scalar and a vectorised log1p / expm1 may differ."""
    norm, policy, x, _, _, _, a_noise = setup(4)
    actions, act = torch.randn(B, H, A), norm["actions"]
    _, table = NoiseSchedule(T).respaced(K) if K > 1 else (None, NoiseSchedule(T).step_table())
    with torch.no_grad():
        mean, std = policy(norm.unnormalize(x[..., :O], "observations"))
    assert 0 in std.stride()
    for row in range(1, K) if K > 1 else (5,):
        got, want = (action_update_at(actions, mean, s, act.mean, act.scale, table[row], 0.3, 3.0, a_noise, 1.0,
                                      "grad", False) for s in (std, std.contiguous()))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_compiled_row_ops_match_the_twins():
    """What the compiled fast path runs: the row-level ops under torch.compile, one graph per branch, against the
    reference's step-t twins."""
    norm, policy, x, x0, start, noise, a_noise = setup(2)
    table = NoiseSchedule(T).step_table()
    obs, act = norm["observations"], norm["actions"]
    state_at, action_at = torch.compile(state_update_at), torch.compile(action_update_at)
    with torch.no_grad():
        mean, std = policy(norm.unnormalize(x[..., :O], "observations"))
    for t in (T - 1, 5, 0):
        for got, want in zip(
                state_at(x, x0, start, table[t], obs.mean, obs.scale, 0.25 if t <= 10 else None,
                         None if t == 0 else noise, "recon"),
                guided_state_update(x, x0, start, t, table, obs.mean, obs.scale, 0.25, noise, "recon")):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(
            action_at(x[..., :A], mean, std, act.mean, act.scale, table[t], torch.tensor(0.2), 3.0, a_noise, 1.0,
                      "grad", t == 0),
            guided_action_update(x[..., :A], mean, std, act.mean, act.scale, t, table, torch.tensor(0.2), 3.0,
                                 a_noise), atol=1e-6, rtol=1e-6)
