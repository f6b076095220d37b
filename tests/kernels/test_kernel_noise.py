"""Statistics and reproducibility of the in-kernel Philox noise, drawn through the public ops.

Each check uses N samples and a 5-sigma band of the statistic under the null hypothesis (seeds are fixed, so a
pass is deterministic; the band says how surprising a failure of a correct generator would be: about 6e-7).
"""
import math

import pytest
import torch

from polygrad_fast.kernels import action_update_at, q_sample, state_update_at
from polygrad_fast.schedule import NoiseSchedule
from polygrad_fast.step_ops import SIGMA

T = 16
B, H, W = 32, 32, 64  # 65536 samples per draw; W is the feature width of each op's last dim


@pytest.fixture(scope="module")
def table():
    return NoiseSchedule(T).step_table()


def action_noise(device, table, seed, t):
    """Kernel B's noise: 'sample' guidance with mean 0, std 1 and identity normalisation returns it unchanged."""
    zeros, ones = torch.zeros(B, H, W, device=device), torch.ones(W, device=device)
    return action_update_at(zeros, zeros, ones[None, None], ones * 0, ones, table[t].to(device), 1.0, None, None, 1.0,
                            "sample", False, seed=seed, step=t)


def state_noise(device, table, seed, t):
    """Kernel A's noise: with x = x0 = 0 the next state is sigma_t * noise (the pinned first step is dropped)."""
    zeros = torch.zeros(B, H, W, device=device)
    x_next, _, _ = state_update_at(zeros, zeros, torch.zeros(B, 1, device=device), table[t].to(device),
                                   torch.zeros(1, device=device), torch.ones(1, device=device), None, None,
                                   seed=seed, step=t)
    return x_next[:, 1:] / table[t, SIGMA].item()


def assert_standard_normal(z):
    z = z.double().flatten().cpu()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n)
    for k, p in ((1.0, 0.31731), (2.0, 0.04550), (3.0, 0.00270)):  # two-sided tails of N(0,1)
        assert abs((z.abs() > k).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert_uncorrelated(z[:-1], z[1:])


def assert_uncorrelated(a, b):
    a, b = a.double().flatten().cpu(), b.double().flatten().cpu()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(a.numel())


@pytest.mark.parametrize("draw", [action_noise, state_noise])
def test_noise_is_standard_normal_and_reproducible(draw, device, table):
    z = draw(device, table, seed=7, t=T - 1)
    assert_standard_normal(z)
    torch.testing.assert_close(draw(device, table, seed=7, t=T - 1), z, atol=0, rtol=0)
    # consecutive steps, another seed, and seeds differing only above bit 32 (the 64-bit key is used whole)
    assert_uncorrelated(draw(device, table, seed=7, t=T - 2), z)
    assert_uncorrelated(draw(device, table, seed=8, t=T - 1), z)
    assert_uncorrelated(draw(device, table, seed=7 + 2**40, t=T - 1), z)


def test_seed_tensor_matches_int_seed(device, table):
    seed = torch.tensor(123, device=device)
    from_tensor, from_int = action_noise(device, table, seed, 3), action_noise(device, table, 123, 3)
    torch.testing.assert_close(from_tensor, from_int, atol=0, rtol=0)


def test_state_and_action_streams_are_independent(device, table):
    """Kernels A and B run at the same (seed, t) over the same element indices: their noises must not coincide."""
    za = state_noise(device, table, seed=5, t=4)
    zb = action_noise(device, table, seed=5, t=4)[:, 1:]
    assert_uncorrelated(za, zb)


def test_q_sample_noise(device):
    sched = NoiseSchedule(T)
    sa, s1 = (sched.table(n, device) for n in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"))
    t = torch.arange(B, device=device) % (T - 1) + 1  # per-sample steps, none with sqrt(1 - abar) = 0
    zeros = torch.zeros(B, H, W, device=device)
    x_t, act_t = q_sample(zeros, zeros[..., :8], t, sa, s1, None, action_noise_scale=2.0, seed=11)
    z = x_t / s1[t].view(-1, 1, 1)
    assert_standard_normal(z)
    assert_standard_normal(act_t / (2.0 * s1[t].view(-1, 1, 1)))
    assert_uncorrelated(z[..., :8], act_t)
    x_t2, _ = q_sample(zeros, zeros[..., :8], t, sa, s1, None, action_noise_scale=2.0, seed=11)
    torch.testing.assert_close(x_t2, x_t, atol=0, rtol=0)
    x_t3, _ = q_sample(zeros, zeros[..., :8], t, sa, s1, None, action_noise_scale=2.0, seed=12)
    assert_uncorrelated(x_t3, x_t)
