"""Denoiser networks of the trajectory diffusion model and the factory that builds one from its config.

Every denoiser is called as ``denoiser(x [B,H,D], actions [B,H,A], t [B] int64) -> [B,H,D]``.
"""
from __future__ import annotations

from .base import Denoiser, low_precision_copy
from .mlp import MLPDenoiserConfig, ResidualMLPDenoiser
from .transformer import TransformerDenoiser, TransformerDenoiserConfig

DenoiserConfig = MLPDenoiserConfig | TransformerDenoiserConfig

__all__ = [
    "Denoiser",
    "DenoiserConfig",
    "MLPDenoiserConfig",
    "ResidualMLPDenoiser",
    "TransformerDenoiser",
    "TransformerDenoiserConfig",
    "build_denoiser",
    "low_precision_copy",
]


def build_denoiser(config: DenoiserConfig, horizon: int, transition_dim: int, action_dim: int) -> Denoiser:
    """The denoiser described by ``config`` (its type picks the network) for the given dims."""
    if isinstance(config, MLPDenoiserConfig):
        return ResidualMLPDenoiser(horizon, transition_dim, action_dim, config)
    if isinstance(config, TransformerDenoiserConfig):
        return TransformerDenoiser(horizon, transition_dim, action_dim, config)
    raise TypeError(f"config must be an MLPDenoiserConfig or TransformerDenoiserConfig, got {type(config).__name__}")
