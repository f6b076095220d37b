"""polygrad_fast: fast policy-guided trajectory diffusion world models (PolyGRAD).

The names users need are importable from here (``from polygrad_fast import FastGuidedSampler``); each is loaded
on first use (PEP 562), so ``import polygrad_fast`` itself imports neither torch nor gymnasium/MuJoCo/Triton.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # imagination
    "FastGuidedSampler": "sampler", "SamplerConfig": "sampler", "ImaginedBatch": "sampler",
    "SamplerNoise": "noise", "ExecutionOptions": "backend", "select_backend": "backend",
    # world model
    "NoiseSchedule": "schedule", "Normalizer": "normalizer",
    "ResidualMLPDenoiser": "denoisers", "MLPDenoiserConfig": "denoisers", "TransformerDenoiser": "denoisers",
    "TransformerDenoiserConfig": "denoisers", "build_denoiser": "denoisers",
    "DiffusionTrainer": "diffusion_trainer", "DiffusionTrainerConfig": "diffusion_trainer",
    # data
    "TrajectoryBuffer": "buffer", "WindowBatch": "buffer",
    # policy and actor-critic
    "Actor": "policy", "Critic": "policy", "A2CTrainer": "a2c", "A2CConfig": "a2c",
    "GuidanceScaleTuner": "guidance",
    # environments and evaluation
    "SimStateEnv": "envs", "SUPPORTED_ENVS": "envs", "trajectory_errors": "evaluation",
    # runs
    "WorldModelRunConfig": "presets", "PRESETS": "presets", "get_preset": "presets",
    "WorldModelRun": "train_world_model", "CheckpointManager": "checkpoint", "prepare_run_dir": "run_dir",
    "RunLogger": "run_logging",
    "Agent": "agent", "AgentConfig": "agent_config", "AGENT_PRESETS": "agent_config",
    "CollectConfig": "collect", "Renderer": "render", "write_video": "render",
    # data parallelism
    "DistContext": "distributed", "process_group": "distributed",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # static analysers and IDEs see the real objects
    from .a2c import A2CConfig, A2CTrainer
    from .backend import ExecutionOptions, select_backend
    from .buffer import TrajectoryBuffer, WindowBatch
    from .checkpoint import CheckpointManager
    from .denoisers import (MLPDenoiserConfig, ResidualMLPDenoiser, TransformerDenoiser,
                            TransformerDenoiserConfig, build_denoiser)
    from .diffusion_trainer import DiffusionTrainer, DiffusionTrainerConfig
    from .envs import SUPPORTED_ENVS, SimStateEnv
    from .evaluation import trajectory_errors
    from .guidance import GuidanceScaleTuner
    from .normalizer import Normalizer
    from .policy import Actor, Critic
    from .presets import PRESETS, WorldModelRunConfig, get_preset
    from .run_dir import prepare_run_dir
    from .run_logging import RunLogger
    from .noise import SamplerNoise
    from .sampler import FastGuidedSampler, ImaginedBatch, SamplerConfig
    from .schedule import NoiseSchedule
    from .train_world_model import WorldModelRun


def _version() -> str:
    """The installed distribution's version (pyproject.toml is its one source)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("polygrad_fast")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value = _version()
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
