import numpy as np
import pytest

from polygrad_fast.envs import SimStateEnv, run_episode
from polygrad_fast.evaluation import reported_steps, trajectory_errors


@pytest.fixture(scope="module")
def hopper_episode():
    env = SimStateEnv("Hopper-v5", seed=5)
    rng = np.random.default_rng(5)
    ep = run_episode(env, lambda _o: rng.uniform(-1, 1, 3).astype(np.float32))
    return env, ep


def test_reported_steps():
    assert reported_steps(10) == list(range(1, 10))
    assert reported_steps(31) == list(range(1, 21)) + [25, 30]
    assert reported_steps(28) == list(range(1, 21)) + [25, 27]


def test_perfect_model_has_zero_error(hopper_episode):
    env, ep = hopper_episode
    h = 8
    m = trajectory_errors(env, ep.sim_states[None, 0], ep.actions[None, :h], ep.observations[None, :h],
                          ep.rewards[None, :h])
    assert set(m) >= {"errors/reward_mse", "errors/dynamics_mse_0007_step"}
    assert all(v == 0.0 for v in m.values())


def test_error_equals_hand_computation(hopper_episode):
    env, ep = hopper_episode
    h = 6
    pred = ep.observations[None, :h].copy()
    pred[0, 3] += 0.5  # off by 0.5 in every obs dim at step 3 -> MSE 0.25 there, 0 elsewhere
    rew = ep.rewards[None, :h].copy()
    rew[0, 0] += 2.0
    m = trajectory_errors(env, ep.sim_states[None, 0], ep.actions[None, :h], pred, rew)
    assert m["errors/dynamics_mse_0003_step"] == pytest.approx(0.25, rel=1e-6)
    assert m["errors/dynamics_mse_0002_step"] == 0.0
    assert m["errors/reward_mse"] == pytest.approx(4.0, rel=1e-5)


def test_shape_errors(hopper_episode):
    env, ep = hopper_episode
    with pytest.raises(ValueError, match="actions: expected shape"):
        trajectory_errors(env, ep.sim_states[None, 0], ep.actions[None, :4, :2], ep.observations[None, :4],
                          ep.rewards[None, :4])
