"""Run configurations and their named presets.

``WorldModelRunConfig`` describes a world-model run (collect data in a MuJoCo task, train the trajectory
diffusion model, imagine with policy guidance, measure the error against the simulator). Presets:

- ``hopper`` / ``walker`` / ``cheetah``: the paper's world-model sizes (H=10, residual MLP 1024x6, T=128;
  Hopper uses the schedule exponent tau=0.1), on the modern v5 tasks;
- ``hopper-cpu``: the default: a real Hopper run sized to finish in minutes on a 2-core CPU (2 min 20 s on the
  2-core Sapphire Rapids VM before guidance tuning was added; the step-9 error ended at a third of the
  persistence yardstick's); guidance tuned on batches of 256 instead of 1024;
- ``debug``: seconds, for smoke tests.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch

from .backend import ExecutionOptions, check_fields, select_backend
from .denoisers import MLPDenoiserConfig
from .diffusion_trainer import DiffusionTrainerConfig, resolve_precision
from .envs import EnvName, max_episode_steps
from .sampler import SamplerConfig

MAX_SEED = 2**30 - 1  # buffer window seeds are (seed * 4 + purpose) * 2**32 + step: they must fit in 64 bits


@dataclass(frozen=True)
class WorldModelRunConfig:
    """Everything a world-model run reads; saved as ``config.json`` in the run directory.

    Validated on construction (``dataclasses.replace`` re-validates): a bad value fails here, before a run
    directory is created or any data is collected.
    """

    env: EnvName = "Hopper-v5"
    """MuJoCo task (gymnasium id)."""
    seed: int = 0
    """Seeds data, network init, window sampling and imagination (trainer.seed: the diffusion noise)."""
    device: str = "cpu"
    """'cpu', 'cuda' or 'cuda:N' (must be available)."""
    prefill_steps: int = 5000
    """Random-action transitions collected before training (whole episodes: up to one episode more)."""
    buffer_capacity: int = 1_000_000
    """Trajectory-buffer capacity in transitions; must hold the prefill plus one episode."""
    horizon: int = 10
    """H: length of the imagined (and trained) trajectory windows."""
    n_diffusion_steps: int = 128
    """T: diffusion steps of the noise schedule."""
    noise_tau: float = 1.0
    """Exponent tau of the cosine noise schedule."""
    train_steps: int = 10_000
    """Diffusion-model gradient steps (0: evaluate the untrained model only)."""
    log_interval: int = 100
    """Log the training loss every this many steps (and at the last)."""
    eval_interval: int = 1000
    """Evaluate against the simulator every this many steps (and at the last)."""
    eval_batch: int = 64
    """Imagined trajectories replayed in the simulator per evaluation."""
    checkpoint_interval: int = 1000
    """Checkpoint every this many steps (and at the last); a rerun resumes from the newest."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints are kept."""
    tune_guidance: bool = True
    """Tune the guidance scale during training (grad guidance only), as the paper's world-model runs do."""
    guidance_tuning_interval: int = 100
    """One tuning step every this many training steps: imagine a batch with the EMA model, one tuner update."""
    guidance_tuning_batch: int = 1024
    """Imagined trajectories per tuning step (from buffer start states)."""
    guidance_tuning_lr: float = 3e-2
    """Learning rate of the guidance-scale tuner (log-scale SGD towards standardised action std 1); the paper's
    world-model runs use 3e-2 (its agent 3e-3)."""
    denoiser: MLPDenoiserConfig = field(default_factory=MLPDenoiserConfig)
    trainer: DiffusionTrainerConfig = field(default_factory=DiffusionTrainerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_fields(self)  # Literal (env) / bool / float kinds
        sections = {"denoiser": MLPDenoiserConfig, "trainer": DiffusionTrainerConfig, "sampler": SamplerConfig,
                    "execution": ExecutionOptions}
        for key, cls in sections.items():
            if not isinstance(getattr(self, key), cls):
                raise TypeError(f"{name}.{key} must be a {cls.__name__}, got {type(getattr(self, key)).__name__}")
        check_device(self.device, f"{name}.device")
        check_number(f"{name}.seed", self.seed, 0, MAX_SEED, integer=True)
        check_number(f"{name}.horizon", self.horizon, 2, integer=True,
                     why="the model's error is measured from imagined step 1 on")
        check_number(f"{name}.n_diffusion_steps", self.n_diffusion_steps, 1, integer=True)
        check_number(f"{name}.noise_tau", self.noise_tau, 0, low_open=True)
        check_number(f"{name}.train_steps", self.train_steps, 0, integer=True)
        for key in ("log_interval", "eval_interval", "eval_batch", "checkpoint_interval", "keep_checkpoints",
                    "guidance_tuning_interval", "guidance_tuning_batch"):
            check_number(f"{name}.{key}", getattr(self, key), 1, integer=True)
        check_number(f"{name}.guidance_tuning_lr", self.guidance_tuning_lr, 0)
        check_number(f"{name}.prefill_steps", self.prefill_steps, self.horizon, integer=True,
                     why=f"at least one window of horizon {self.horizon}")
        episode = max_episode_steps(self.env)
        check_number(f"{name}.buffer_capacity", self.buffer_capacity, self.prefill_steps + episode, integer=True,
                     why=f"prefill_steps {self.prefill_steps} + one more episode of up to {episode} steps")
        if not self.sampler.guidance_scale > 0:
            raise ValueError(f"{name}.sampler.guidance_scale must be > 0 (the run's tuner adapts its logarithm), "
                             f"got {self.sampler.guidance_scale!r}")
        # Checks that need the device: a request that cannot run on it fails now, not after the prefill.
        try:
            resolve_precision(self.trainer.mixed_precision, torch.device(self.device))
            select_backend(self.device, self.execution.backend)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None


def check_number(where: str, value, low: float, high: float | None = None, *, low_open: bool = False,
                 integer: bool = False, why: str = "") -> None:
    """ValueError unless ``value`` is a finite number (an int, not a bool, if ``integer``) in [low, high]
    (low excluded if ``low_open``); ``why`` is appended to the message in parentheses."""
    kind = "int" if integer else "number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite {kind}, got {value!r}")
    if (value <= low if low_open else value < low) or (high is not None and value > high):
        bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        reason = f" ({why})" if why else ""
        raise ValueError(f"{where} must be {'an int' if integer else 'a number'} {bounds}{reason}, got {value!r}")


def check_device(device, where: str) -> None:
    """ValueError unless ``device`` is 'cpu', 'cuda' or 'cuda:N' and that device exists here."""
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", device) if isinstance(device, str) else None
    if match is None:
        raise ValueError(f"{where} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"{where} is {device!r} but no CUDA device is available here; use 'cpu'")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"{where} is {device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")


def _paper(env: str, tau: float) -> WorldModelRunConfig:
    return WorldModelRunConfig(env=env, noise_tau=tau, train_steps=1_000_000, eval_interval=10_000,
                               eval_batch=500, checkpoint_interval=10_000)


PRESETS: dict[str, WorldModelRunConfig] = {
    "hopper": _paper("Hopper-v5", 0.1),
    "walker": _paper("Walker2d-v5", 1.0),
    "cheetah": _paper("HalfCheetah-v5", 1.0),
    "hopper-cpu": WorldModelRunConfig(
        env="Hopper-v5", noise_tau=0.1, n_diffusion_steps=64, train_steps=10_000, log_interval=100,
        eval_interval=2000, eval_batch=64, checkpoint_interval=2000, guidance_tuning_batch=256,
        denoiser=MLPDenoiserConfig(hidden_dim=512, num_layers=4),
        trainer=DiffusionTrainerConfig(step_start_ema=500),
    ),
    "debug": WorldModelRunConfig(
        env="Hopper-v5", noise_tau=0.1, prefill_steps=500, buffer_capacity=10_000, n_diffusion_steps=16,
        train_steps=40, log_interval=10, eval_interval=20, eval_batch=8, checkpoint_interval=20,
        guidance_tuning_interval=10, guidance_tuning_batch=16, denoiser=MLPDenoiserConfig(hidden_dim=64, num_layers=2),
        trainer=DiffusionTrainerConfig(batch_size=32, step_start_ema=10),
    ),
}
DEFAULT_PRESET = "hopper-cpu"


def get_preset(name: str) -> WorldModelRunConfig:
    """The preset called ``name``; unknown names raise ``KeyError`` listing the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
