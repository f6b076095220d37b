"""World-model error against the real simulator: open-loop replay of imagined actions from exact start states."""
from __future__ import annotations

import numpy as np

from .envs import SimStateEnv


def reported_steps(horizon: int) -> list[int]:
    """Steps k >= 1 whose error is reported: every step up to 20, then every 5th, and the last (as the paper)."""
    return [k for k in range(1, horizon) if k <= 20 or k % 5 == 0 or k == horizon - 1]


def trajectory_errors(
    env: SimStateEnv,
    start_sim_states: np.ndarray,
    actions: np.ndarray,
    predicted_obs: np.ndarray,
    predicted_rewards: np.ndarray,
) -> dict[str, float]:
    """Per-step dynamics MSE of imagined trajectories vs the simulator, all in raw (unnormalised) units.

    start_sim_states [N,S] (exact state at step 0), actions [N,L,A], predicted_obs [N,L,O],
    predicted_rewards [N,L]. Step k's error compares predicted_obs[:, k] with the real observation reached
    after replaying actions[:, :k]; the reward error is for the first step only. Returns
    ``errors/dynamics_mse_{k:04d}_step`` (+ ``_std``) and ``errors/reward_mse`` (+ ``_std``).
    """
    n, horizon = predicted_obs.shape[:2]
    expected = {"start_sim_states": (n, env.sim_state_dim), "actions": (n, horizon, env.act_dim),
                "predicted_obs": (n, horizon, env.obs_dim), "predicted_rewards": (n, horizon)}
    for name, shape in expected.items():
        given = np.shape(locals()[name])
        if given != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {given}")
    if horizon < 2:
        raise ValueError(f"need a horizon of at least 2 to measure dynamics error, got {horizon}")
    dyn = np.empty((n, horizon - 1))
    rew = np.empty(n)
    for i in range(n):
        real_obs, real_rew = env.replay(start_sim_states[i], actions[i, : horizon - 1])
        dyn[i] = np.mean((predicted_obs[i, 1:] - real_obs) ** 2, axis=-1)
        rew[i] = (predicted_rewards[i, 0] - real_rew[0]) ** 2
    metrics = {"errors/reward_mse": float(rew.mean()), "errors/reward_mse_std": float(rew.std())}
    for k in reported_steps(horizon):
        metrics[f"errors/dynamics_mse_{k:04d}_step"] = float(dyn[:, k - 1].mean())
        metrics[f"errors/dynamics_mse_std_{k:04d}_step"] = float(dyn[:, k - 1].std())
    return metrics
