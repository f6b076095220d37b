"""Autoregressive diffusion world model: the PolyGRAD denoiser family trained on H=2 windows (s_k, s_{k+1}) and
rolled out one environment step per full reverse chain (the paper's autoregressive-diffusion baseline).

Training: ``DiffusionTrainer`` on normalised H=2 windows of the buffer, conditioned on the dataset actions
(a_k, a_{k+1}). Rollout, per step k: a_k ~ pi(.|s_k), then the plain action-conditioned ancestral sampler on the
window with actions (a_k, 0) (the second action is unknown; 0 is its dataset mean in normalised space), s_k
imposed as the first state; r_k is the window's first reward, s_{k+1} its second state. Never stops on terminal.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..buffer import TrajectoryBuffer
from ..conditioned_sampling import action_conditioned_sample
from ..denoisers import MLPDenoiserConfig, build_denoiser
from ..diffusion_trainer import DiffusionTrainer, DiffusionTrainerConfig
from ..normalizer import Normalizer
from ..schedule import NoiseSchedule
from .rollout import Rollout, sample_action

WINDOW = 2  # (s_k, s_{k+1})


@dataclass(frozen=True)
class AutoregressiveDiffusionConfig:
    """Denoiser sizes, trainer and number of gradient steps of the H=2 model."""

    denoiser: MLPDenoiserConfig = field(default_factory=MLPDenoiserConfig)
    trainer: DiffusionTrainerConfig = field(default_factory=DiffusionTrainerConfig)
    train_steps: int = 2000

    def __post_init__(self) -> None:
        if isinstance(self.train_steps, bool) or not isinstance(self.train_steps, int) or self.train_steps < 0:
            raise ValueError(f"AutoregressiveDiffusionConfig.train_steps must be an int >= 0, got {self.train_steps!r}")


class AutoregressiveDiffusion:
    """An H=2 trajectory-diffusion model over (obs, reward, terminal) with its trainer; ``train`` then ``rollout``."""

    def __init__(self, obs_dim: int, act_dim: int, normalizer: Normalizer, schedule: NoiseSchedule,
                 config: AutoregressiveDiffusionConfig = AutoregressiveDiffusionConfig(), device="cpu"):
        if normalizer.obs_dim != obs_dim or normalizer.act_dim != act_dim:
            raise ValueError(f"normalizer is for obs {normalizer.obs_dim} / actions {normalizer.act_dim}, "
                             f"the model for obs {obs_dim} / actions {act_dim}")
        self.obs_dim, self.act_dim, self.config = obs_dim, act_dim, config
        self.normalizer, self.schedule = normalizer, schedule
        denoiser = build_denoiser(config.denoiser, WINDOW, obs_dim + 2, act_dim).to(device)
        self.trainer = DiffusionTrainer(denoiser, schedule, config.trainer)

    def train(self, buffer: TrajectoryBuffer, seed: int) -> dict[str, float]:
        """``config.train_steps`` gradient steps on H=2 windows (window seeds (seed << 32) + step); last metrics."""
        metrics: dict[str, float] = {}
        for step in range(self.config.train_steps):
            batch = buffer.sample_windows(self.config.trainer.batch_size, WINDOW, seed=(seed << 32) + step,
                                          normalize=True, sim_states=False)
            metrics = self.trainer.train_step(batch)
        return metrics

    @torch.no_grad()
    def rollout(self, start_obs: torch.Tensor, policy, horizon: int,
                generator: torch.Generator | None = None) -> Rollout:
        """On-policy rollout from raw start_obs [B,O]; one reverse chain of T steps per imagined step.
        Returns a ``Rollout`` with H = ``horizon`` steps."""
        if start_obs.dim() != 2 or start_obs.shape[1] != self.obs_dim:
            raise ValueError(f"start_obs: expected [B, {self.obs_dim}], got {list(start_obs.shape)}")
        n, O = self.normalizer, self.obs_dim
        obs, acts, rews = [start_obs], [], []
        for k in range(horizon):
            a = sample_action(policy, obs[-1], generator)
            actions = torch.stack([n.normalize(a, "actions"), torch.zeros_like(a)], dim=1)
            x = action_conditioned_sample(self.trainer.ema_model, self.schedule,
                                          n.normalize(obs[-1], "observations"), actions, generator=generator)
            acts.append(a)
            rews.append(n.unnormalize(x[:, 0, O], "rewards"))
            if k < horizon - 1:
                obs.append(n.unnormalize(x[:, 1, :O], "observations"))
        return Rollout(torch.stack(obs, 1), torch.stack(acts, 1), torch.stack(rews, 1))
