"""Run configurations and their named presets.

``WorldModelRunConfig`` describes a world-model run (collect data in a MuJoCo task, train the trajectory
diffusion model, imagine with policy guidance, measure the error against the simulator). Presets:

- ``hopper`` / ``walker`` / ``cheetah``: the paper's world-model sizes (H=10, residual MLP 1024x6, T=128;
  Hopper uses the schedule exponent tau=0.1), on the modern v5 tasks;
- ``hopper-cpu``: the default: a real Hopper run sized to finish in minutes on a 2-core CPU (2 min 20 s on the
  2-core Sapphire Rapids VM; the step-9 error ended at a third of the persistence yardstick's);
- ``debug``: seconds, for smoke tests.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .denoisers import MLPDenoiserConfig
from .diffusion_trainer import DiffusionTrainerConfig
from .sampler import SamplerConfig


@dataclass(frozen=True)
class WorldModelRunConfig:
    """Everything a world-model run reads; saved as ``config.json`` in the run directory."""

    env: str = "Hopper-v5"
    seed: int = 0
    device: str = "cpu"
    prefill_steps: int = 5000  # random-action transitions collected before training (the paper's prefill)
    buffer_capacity: int = 1_000_000
    horizon: int = 10
    n_diffusion_steps: int = 128
    noise_tau: float = 1.0
    train_steps: int = 10_000
    log_interval: int = 100
    eval_interval: int = 1000
    eval_batch: int = 64  # imagined trajectories replayed in the simulator per evaluation
    guidance_tuning_lr: float = 3e-3
    denoiser: MLPDenoiserConfig = field(default_factory=MLPDenoiserConfig)
    trainer: DiffusionTrainerConfig = field(default_factory=DiffusionTrainerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


def _paper(env: str, tau: float) -> WorldModelRunConfig:
    return WorldModelRunConfig(env=env, noise_tau=tau, train_steps=1_000_000, eval_interval=10_000,
                               eval_batch=500)


PRESETS: dict[str, WorldModelRunConfig] = {
    "hopper": _paper("Hopper-v5", 0.1),
    "walker": _paper("Walker2d-v5", 1.0),
    "cheetah": _paper("HalfCheetah-v5", 1.0),
    "hopper-cpu": WorldModelRunConfig(
        env="Hopper-v5", noise_tau=0.1, n_diffusion_steps=64, train_steps=10_000, log_interval=100,
        eval_interval=2000, eval_batch=64,
        denoiser=MLPDenoiserConfig(hidden_dim=512, num_layers=4),
        trainer=DiffusionTrainerConfig(step_start_ema=500),
    ),
    "debug": WorldModelRunConfig(
        env="Hopper-v5", noise_tau=0.1, prefill_steps=500, buffer_capacity=10_000, n_diffusion_steps=16,
        train_steps=40, log_interval=10, eval_interval=20, eval_batch=8,
        denoiser=MLPDenoiserConfig(hidden_dim=64, num_layers=2),
        trainer=DiffusionTrainerConfig(batch_size=32, step_start_ema=10),
    ),
}


def get_preset(name: str) -> WorldModelRunConfig:
    """The preset called ``name``; unknown names raise ``KeyError`` listing the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
