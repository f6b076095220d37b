"""Baselines of the world-model comparison: training runs, rollouts have the right shapes and act on-policy, the
ensemble keeps its best held-out members, and the transitions it trains on are real ones."""
import dataclasses

import pytest
import torch
from torch import nn

from polygrad_fast.baselines import (AutoregressiveDiffusion, AutoregressiveDiffusionConfig, EnsembleConfig,
                                     ProbabilisticEnsemble, buffer_transitions)
from polygrad_fast.denoisers import MLPDenoiserConfig
from polygrad_fast.diffusion_trainer import DiffusionTrainerConfig
from polygrad_fast.envs import SimStateEnv, random_episodes
from polygrad_fast.normalizer import Normalizer
from polygrad_fast.schedule import NoiseSchedule
from polygrad_fast.wm_eval import collect_dataset

O, A = 11, 3  # Hopper


@pytest.fixture(scope="module")
def hopper():
    env = SimStateEnv("Hopper-v5", seed=0)
    episodes = random_episodes(env, 300, seed=0)
    buffer = collect_dataset(SimStateEnv("Hopper-v5", seed=0), 300, seed=0)  # the same episodes, in a buffer
    yield env, episodes, buffer
    env.close()


class NearlyDeterministicPolicy(nn.Module):
    """pi(a|s) = Normal(tanh(W s), 1e-6): a_k must equal tanh(W s_k) of the rollout's own s_k to ~1e-5."""

    def __init__(self):
        super().__init__()
        self.obs_dim, self.act_dim = O, A
        self.lin = nn.Linear(O, A)

    def forward(self, obs):
        mean = torch.tanh(self.lin(obs))
        return mean, torch.full_like(mean, 1e-6)


def assert_on_policy(policy, rollout, B, H):
    assert rollout.observations.shape == (B, H, O)
    assert rollout.actions.shape == (B, H, A)
    assert rollout.rewards.shape == (B, H)
    assert torch.isfinite(rollout.observations).all() and torch.isfinite(rollout.rewards).all()
    with torch.no_grad():
        expected = policy(rollout.observations)[0]
    torch.testing.assert_close(rollout.actions, expected, atol=1e-4, rtol=0)
    # the states move, so matching actions per step means acting on each predicted state, not on s_0
    assert (rollout.observations[:, -1] - rollout.observations[:, 0]).abs().max() > 1e-3


def test_autoregressive_diffusion_trains_and_rolls_out_on_policy(hopper, one_torch_thread):
    torch.manual_seed(0)
    _, _, buffer = hopper
    cfg = AutoregressiveDiffusionConfig(denoiser=MLPDenoiserConfig(hidden_dim=32, num_layers=1),
                                        trainer=DiffusionTrainerConfig(batch_size=16, step_start_ema=1),
                                        train_steps=3)
    model = AutoregressiveDiffusion(O, A, Normalizer(buffer.stats()), NoiseSchedule(4, 0.1), cfg)
    before = [p.clone() for p in model.trainer.model.parameters()]
    metrics = model.train(buffer, seed=0)
    assert model.trainer.step == 3 and metrics["loss"] > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.trainer.model.parameters()))
    policy = NearlyDeterministicPolicy()
    start = buffer.sample_windows(5, 1, seed=1, normalize=False).start_obs
    rollout = model.rollout(start, policy, 6, generator=torch.Generator().manual_seed(0))
    assert_on_policy(policy, rollout, 5, 6)
    torch.testing.assert_close(rollout.observations[:, 0], start)
    again = model.rollout(start, policy, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.observations, rollout.observations)  # seeded: reproducible


def test_ensemble_rolls_out_on_policy(hopper, one_torch_thread):
    torch.manual_seed(0)
    _, _, buffer = hopper
    model = ProbabilisticEnsemble(O, A, EnsembleConfig(hidden=16, layers=2, train_steps=3, batch_size=16))
    model.fit(buffer_transitions(buffer, seed=0), seed=0)
    policy = NearlyDeterministicPolicy()
    start = buffer.sample_windows(5, 1, seed=1, normalize=False).start_obs
    rollout = model.rollout(start, policy, 7, generator=torch.Generator().manual_seed(0))
    assert_on_policy(policy, rollout, 5, 7)
    torch.testing.assert_close(rollout.observations[:, 0], start)


def test_ensemble_keeps_the_five_best_of_seven_on_held_out_nll(hopper, one_torch_thread):
    torch.manual_seed(0)
    _, _, buffer = hopper
    data = buffer_transitions(buffer, seed=0)
    model = ProbabilisticEnsemble(O, A, EnsembleConfig(hidden=32, layers=2, train_steps=200, batch_size=64))
    assert model.config.members == 7 and model.config.elites == 5
    untrained = ProbabilisticEnsemble(O, A, dataclasses.replace(model.config, train_steps=1))
    fit = model.fit(data, seed=0)
    nll = torch.tensor([fit[f"holdout_nll_{e}"] for e in range(7)])
    elites = model.elite_index.tolist()
    assert len(set(elites)) == 5 and set(elites) <= set(range(7))
    assert set(elites) == set(torch.argsort(nll)[:5].tolist())
    # training lowers the held-out NLL (same split: same seed) well below a 1-step model's
    assert fit["elite_holdout_nll"] < untrained.fit(data, seed=0)["elite_holdout_nll"] - 0.5


def test_buffer_transitions_are_consecutive_real_steps(hopper):
    _, episodes, buffer = hopper
    data = buffer_transitions(buffer, seed=0)
    pairs = {}
    for ep in episodes:
        for k in range(len(ep.rewards) - 1):
            pairs[ep.observations[k].tobytes()] = (ep.observations[k + 1], ep.actions[k], ep.rewards[k])
    terminal_obs = {ep.observations[-1].tobytes() for ep in episodes if ep.terminated}
    assert len(data) >= 0.9 * len(pairs)  # ~98% coverage expected; 90% leaves room for the draw
    for i in range(len(data)):
        key = data.obs[i].numpy().tobytes()
        assert key not in terminal_obs
        nxt, act, rew = pairs[key]
        assert (data.next_obs[i].numpy() == nxt).all() and (data.actions[i].numpy() == act).all()
        assert float(data.rewards[i]) == float(rew)


def test_ensemble_config_and_input_errors():
    with pytest.raises(ValueError, match="elites .8. must be <= members .7."):
        EnsembleConfig(elites=8)
    with pytest.raises(ValueError, match="holdout_fraction"):
        EnsembleConfig(holdout_fraction=1.0)
    model = ProbabilisticEnsemble(O, A, EnsembleConfig(hidden=8, layers=1, train_steps=1))
    with pytest.raises(ValueError, match=r"start_obs: expected \[B, 11\]"):
        model.rollout(torch.zeros(2, 17), NearlyDeterministicPolicy(), 3)
    with pytest.raises(ValueError, match="train_steps"):
        AutoregressiveDiffusionConfig(train_steps=-1)
