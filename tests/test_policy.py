"""Actor / Critic (the paper's actor-critic networks), argument validation and the policy-output adapters."""
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal

from polygrad_fast.policy import (LAYER_NORM_EPS, Actor, ActorConfig, Critic,
                                  policy_distribution, policy_mean_std)


def test_actor_architecture_matches_the_paper():
    actor = Actor(11, 3)
    kinds = [type(m) for m in actor.mlp]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.ELU, nn.Linear, nn.LayerNorm, nn.ELU, nn.Linear]
    assert all(m.eps == LAYER_NORM_EPS == 1e-3 for m in actor.mlp if isinstance(m, nn.LayerNorm))
    assert actor.mlp[0].in_features == 11 and actor.mlp[0].out_features == 256 and actor.mlp[-1].out_features == 3
    # 70,659 actor parameters + 3 logstd, 70,145 critic parameters (Linear(11,256), 2 LayerNorms, Linear(256,256), head)
    assert sum(p.numel() for p in actor.mlp.parameters()) == 70_659
    assert actor.logstd.numel() == 3
    assert sum(p.numel() for p in Critic(11).parameters()) == 70_145


@pytest.mark.parametrize("lead", [(), (5,), (4, 7)])
def test_actor_shapes_and_std(lead):
    torch.manual_seed(0)
    actor = Actor(5, 2, hidden=32, init_std=1.0, min_std=0.1)
    obs = torch.randn(*lead, 5) * 10
    mean, std = actor(obs)
    assert mean.shape == std.shape == (*lead, 2)
    assert mean.abs().max() < 1  # tanh-squashed mean
    torch.testing.assert_close(std, torch.ones_like(std))  # exp(log(1.0 - 0.1)) + 0.1
    with torch.no_grad():
        actor.logstd.fill_(-30.0)
    assert torch.allclose(actor(obs)[1], torch.full_like(std, 0.1))  # floor min_std


def test_fixed_std_and_config_round_trip():
    actor = Actor(4, 2, hidden=8, layers=1, init_std=0.5, learned_std=False)
    assert not hasattr(actor, "logstd")
    assert torch.equal(actor(torch.zeros(3, 4))[1], torch.full((3, 2), 0.5))
    again = Actor(**dataclasses.asdict(ActorConfig(4, 2, hidden=8, layers=1, init_std=0.5, learned_std=False)))
    assert again.config == actor.config
    assert len([m for m in again.mlp if isinstance(m, nn.Linear)]) == 2


def test_distribution_is_an_unsquashed_independent_normal():
    torch.manual_seed(0)
    actor = Actor(3, 2, hidden=16, init_std=2.0)
    obs = torch.randn(4000, 3)
    dist = actor.distribution(obs)
    assert isinstance(dist, Independent) and isinstance(dist.base_dist, Normal)
    assert dist.log_prob(torch.zeros(4000, 2)).shape == (4000,)  # summed over action dims
    samples = dist.sample()
    assert (samples.abs() > 1).float().mean() > 0.3  # NOT squashed: std 2 puts most mass outside [-1, 1]
    mean, std = actor(obs)
    a = torch.randn(4000, 2)
    expected = (-0.5 * ((a - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    torch.testing.assert_close(dist.log_prob(a), expected)


def test_critic_shape():
    assert Critic(7, hidden=16)(torch.randn(3, 4, 7)).shape == (3, 4)


def test_policy_output_adapters():
    mean, std = torch.zeros(2, 3), torch.ones(2, 3)
    for out in [(mean, std), Normal(mean, std), Independent(Normal(mean, std), 1)]:
        m, s = policy_mean_std(out)
        assert torch.equal(m, mean) and torch.equal(s, std)
        assert policy_distribution(out).log_prob(mean).shape == (2,)
    with pytest.raises(TypeError, match="policy must return"):
        policy_mean_std(torch.zeros(3))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(init_std=0.1, min_std=0.1), "init_std > min_std"),
    (dict(obs_dim=0), "obs_dim must be an int >= 1, got 0"),
    (dict(act_dim=2.0), "act_dim must be an int >= 1, got 2.0"),
    (dict(hidden=0), "hidden must be an int >= 1"),
    (dict(layers=True), "layers must be an int >= 1, got True"),
    (dict(min_std=-0.1), "min_std must be >= 0"),
    (dict(min_std=float("nan")), "min_std must be a finite number"),
    (dict(init_std=float("inf")), "init_std must be a finite number"),
    (dict(init_std=0.0, learned_std=False), "init_std must be > 0"),
    (dict(learned_std=1), "learned_std must be a bool"),
])
def test_actor_arguments_are_validated(kwargs, pattern):
    args = dict(obs_dim=3, act_dim=2) | kwargs
    with pytest.raises(ValueError, match=pattern):
        Actor(**args)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(obs_dim=0), "obs_dim must be an int >= 1"), (dict(hidden=-1), "hidden must be an int >= 1"),
    (dict(layers=0), "layers must be an int >= 1"),
])
def test_critic_arguments_are_validated(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        Critic(**(dict(obs_dim=3) | kwargs))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"critic expects observations \[..., 3\]"):
        Critic(3)(torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"\[..., 3\]"):
        Actor(3, 2)(torch.zeros(4, 5))
