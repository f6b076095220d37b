import numpy as np
import pytest

from polygrad_fast.envs import SimStateEnv, random_episodes, run_episode


@pytest.fixture(scope="module")
def hopper():
    env = SimStateEnv("Hopper-v5", seed=0)
    yield env
    env.close()


def test_unknown_env_name_lists_supported():
    with pytest.raises(ValueError, match="unknown env name 'Hopper-v99'.*Hopper-v5"):
        SimStateEnv("Hopper-v99")


def test_dims(hopper):
    assert (hopper.obs_dim, hopper.act_dim, hopper.sim_state_dim) == (11, 3, 58)


def test_restore_is_bit_exact(hopper):
    """Replaying recorded actions from a recorded mid-episode state reproduces the episode exactly."""
    rng = np.random.default_rng(1)
    ep = run_episode(hopper, lambda _o: rng.uniform(-1, 1, 3).astype(np.float32))
    k = len(ep.rewards) // 2
    obs_k = hopper.set_sim_state(ep.sim_states[k])
    np.testing.assert_array_equal(obs_k, ep.observations[k])
    next_obs, rewards = hopper.replay(ep.sim_states[k], ep.actions[k:-1])
    np.testing.assert_array_equal(next_obs, ep.observations[k + 1:])
    np.testing.assert_array_equal(rewards, ep.rewards[k:-1])


def test_bad_sim_state_shape(hopper):
    with pytest.raises(ValueError, match=r"expected shape \(58,\), got \(12,\)"):
        hopper.set_sim_state(np.zeros(12))


def test_seeded_prefill_is_reproducible():
    a = random_episodes(SimStateEnv("Hopper-v5", seed=3), 200, seed=3)
    b = random_episodes(SimStateEnv("Hopper-v5", seed=3), 200, seed=3)
    assert sum(len(e.rewards) for e in a) >= 200
    for ea, eb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ea.observations, eb.observations)
        np.testing.assert_array_equal(ea.sim_states, eb.sim_states)
    # random Hopper episodes end by falling over: terminated, not truncated
    assert all(e.terminated and not e.truncated for e in a)


def test_max_steps_truncates(hopper):
    ep = run_episode(hopper, lambda _o: np.zeros(3, np.float32), max_steps=5)
    assert len(ep.rewards) == 5 and ep.truncated and not ep.terminated
