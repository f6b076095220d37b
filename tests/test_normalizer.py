import numpy as np
import pytest
import torch

from polygrad_fast.normalizer import EPS, Normalizer


def _stats(o=5, a=2):
    rng = np.random.default_rng(0)
    return {"observations": (rng.normal(size=o), rng.uniform(0.5, 2, o)), "actions": (rng.normal(size=a), rng.uniform(0.5, 2, a)),
            "rewards": (1.5, 0.3), "terminals": (0.01, np.sqrt(0.01 * 0.99))}


def test_round_trip_and_formula():
    n = Normalizer(_stats())
    x = torch.randn(4, 3, 5)
    mean, std = (torch.as_tensor(v, dtype=torch.float32) for v in _stats()["observations"])
    torch.testing.assert_close(n.normalize(x, "observations"), (x - mean) / (std + EPS))
    torch.testing.assert_close(n.unnormalize(n.normalize(x, "observations"), "observations"), x, atol=1e-5, rtol=1e-5)
    assert n.obs_dim == 5 and n.act_dim == 2 and n["rewards"].mean.shape == ()


def test_terminal_one_maps_far_out():
    """Terminal flags are Gaussian-normalised as in the paper: with p = 0.01 a terminal 1 maps to ~(1-p)/sigma."""
    n = Normalizer(_stats())
    p = 0.01
    assert n.normalize(torch.tensor(1.0), "terminals").item() == pytest.approx((1 - p) / np.sqrt(p * (1 - p)), rel=1e-4)


def test_state_dict_round_trip():
    n = Normalizer(_stats())
    m = Normalizer(n.state_dict())
    for f in n.fields:
        torch.testing.assert_close(m[f].mean, n[f].mean)
        torch.testing.assert_close(m[f].std, n[f].std)


@pytest.mark.parametrize("bad,match", [
    ({"rewards": (np.zeros(2), np.ones(2))}, "rewards: expected scalar"),
    ({"observations": (np.zeros(5), np.ones(4))}, "observations: mean shape"),
    ({"actions": (np.array([np.nan, 0.0]), np.ones(2))}, "actions: .*NaN"),
    ({"actions": (np.zeros(2), -np.ones(2))}, "actions: std must be >= 0"),
])
def test_bad_stats(bad, match):
    stats = _stats()
    stats.update(bad)
    with pytest.raises(ValueError, match=match):
        Normalizer(stats)


def test_missing_field():
    stats = _stats()
    del stats["terminals"]
    with pytest.raises(KeyError, match="terminals"):
        Normalizer(stats)
