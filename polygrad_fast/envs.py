"""Gymnasium MuJoCo environments with exact simulator-state capture and restore.

``mujoco.mj_getState/mj_setState`` with ``mjSTATE_INTEGRATION`` (time, qpos, qvel, act, warm-start
accelerations, controls, ...) restores a state bit-exactly; ``set_state(qpos, qvel)`` does not on Hopper
(5.6e-14 drift after one step, because it misses ``qacc_warmstart``, measured). Imagined
trajectories are therefore replayed from these full state vectors (float64 [S], S = 58 on Hopper-v5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import gymnasium as gym
import mujoco
import numpy as np

# Tasks of the paper (run on the modern v5 MuJoCo bindings; the paper used mujoco-py v3 envs, whose numbers
# are not strictly comparable), v4 for users who need it, and InvertedPendulum (a task a 2-core CPU can learn).
EnvName = Literal["Hopper-v5", "Walker2d-v5", "HalfCheetah-v5", "Ant-v5",
                  "Hopper-v4", "Walker2d-v4", "HalfCheetah-v4", "Ant-v4", "InvertedPendulum-v5", "InvertedPendulum-v4"]
SUPPORTED_ENVS: tuple[str, ...] = get_args(EnvName)
_STATE_SPEC = mujoco.mjtState.mjSTATE_INTEGRATION


def max_episode_steps(name: str) -> int:
    """The time limit of the registered task ``name`` (1000 for the supported MuJoCo tasks)."""
    if name not in SUPPORTED_ENVS:
        raise ValueError(f"unknown env name {name!r}; supported: {', '.join(SUPPORTED_ENVS)}")
    return int(gym.spec(name).max_episode_steps)


class SimStateEnv:
    """A gymnasium MuJoCo env that reports and restores its exact simulator state.

    ``step`` returns the gymnasium 5-tuple; ``info["sim_state"]`` is the state *before* the step, the one a
    trajectory buffer stores next to the observation it produced.
    """

    def __init__(self, name: str, seed: int | None = None, **make_kwargs):
        if name not in SUPPORTED_ENVS:
            raise ValueError(f"unknown env name {name!r}; supported: {', '.join(SUPPORTED_ENVS)}")
        self.name = name
        self.env = gym.make(name, **make_kwargs)
        self._mj_model = self.env.unwrapped.model
        self._mj_data = self.env.unwrapped.data
        self.sim_state_dim = mujoco.mj_stateSize(self._mj_model, _STATE_SPEC)
        self.obs_dim = int(np.prod(self.env.observation_space.shape))
        self.act_dim = int(np.prod(self.env.action_space.shape))
        self.max_episode_steps = self.env.spec.max_episode_steps
        self._seed = seed
        if seed is not None:
            self.env.action_space.seed(seed)

    @property
    def action_space(self) -> gym.spaces.Box:
        return self.env.action_space

    def reset(self) -> tuple[np.ndarray, dict]:
        """Reset; the first reset uses the constructor's seed, later ones continue its RNG stream."""
        obs, info = self.env.reset(seed=self._seed)
        self._seed = None
        return obs.astype(np.float32), info

    def step(self, action: np.ndarray):
        """Step with the action clipped to the action space (the buffer keeps the unclipped action)."""
        sim_state = self.get_sim_state()
        action = np.clip(action, self.action_space.low, self.action_space.high)
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["sim_state"] = sim_state
        return obs.astype(np.float32), float(reward), bool(terminated), bool(truncated), info

    def get_sim_state(self) -> np.ndarray:
        """The full integration state, float64 [S]."""
        state = np.empty(self.sim_state_dim, dtype=np.float64)
        mujoco.mj_getState(self._mj_model, self._mj_data, state, _STATE_SPEC)
        return state

    def set_sim_state(self, state: np.ndarray) -> np.ndarray:
        """Restore a state from ``get_sim_state`` exactly; returns the observation there, float32 [O]."""
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (self.sim_state_dim,):
            raise ValueError(f"sim state: expected shape ({self.sim_state_dim},), got {state.shape}")
        mujoco.mj_setState(self._mj_model, self._mj_data, state, _STATE_SPEC)
        mujoco.mj_forward(self._mj_model, self._mj_data)
        return self.env.unwrapped._get_obs().astype(np.float32)

    def replay(self, sim_state: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Open-loop replay of actions [L,A] from an exact state; returns next observations [L,O], rewards [L].

        Steps the unwrapped simulator, so time limits and termination are ignored (the paper's error metric
        replays the whole imagined action sequence).
        """
        self.set_sim_state(sim_state)
        sim = self.env.unwrapped
        low, high = self.action_space.low, self.action_space.high
        obs, rewards = [], []
        for action in np.asarray(actions, dtype=np.float32):
            o, r, *_ = sim.step(np.clip(action, low, high))
            obs.append(o)
            rewards.append(r)
        return np.asarray(obs, dtype=np.float32).reshape(len(obs), self.obs_dim), np.asarray(rewards, np.float32)

    def close(self) -> None:
        self.env.close()


@dataclass
class Episode:
    """One recorded episode: observations [L,O], actions [L,A], rewards [L], sim_states [L,S] (pre-step)."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    sim_states: np.ndarray
    terminated: bool
    truncated: bool


def run_episode(env: SimStateEnv, act_fn, max_steps: int | None = None) -> Episode:
    """Roll out one episode with ``act_fn(obs [O]) -> action [A]``; stops at termination, truncation or max_steps."""
    obs, _ = env.reset()
    rows: list[tuple] = []
    terminated = truncated = False
    limit = max_steps or env.max_episode_steps
    while not (terminated or truncated):
        action = np.asarray(act_fn(obs), dtype=np.float32)
        next_obs, reward, terminated, truncated, info = env.step(action)
        rows.append((obs, action, reward, info["sim_state"]))
        obs = next_obs
        truncated = truncated or (len(rows) >= limit and not terminated)
    o, a, r, s = (np.stack(col) for col in zip(*rows))
    return Episode(o, a, r.astype(np.float32), s, terminated, truncated)


def random_episodes(env: SimStateEnv, n_steps: int, seed: int) -> list[Episode]:
    """Whole episodes of uniform random actions until at least ``n_steps`` transitions (the paper's prefill)."""
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    episodes, total = [], 0
    while total < n_steps:
        episodes.append(run_episode(env, lambda _obs: rng.uniform(low, high).astype(np.float32)))
        total += len(episodes[-1].rewards)
    return episodes
