"""Per-field Gaussian normalisation of trajectories: ``(x - mean) / (std + eps)`` with population std.

The trajectory buffer maintains the statistics; this module applies them to torch tensors on any device.
Terminal flags are normalised too (as in the paper's code), so the diffusion model works in that space and the
sampler un-normalises the terminal column before thresholding it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

FIELDS = ("observations", "actions", "rewards", "terminals")
EPS = 1e-6  # added to the std, never to the variance: matches the buffer's normalised sampling


@dataclass
class FieldStats:
    """Mean and population std of one field: tensors [D] (vectors) or [] (scalars), float32."""

    mean: torch.Tensor
    std: torch.Tensor

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + EPS)

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.std + EPS) + self.mean

    @property
    def scale(self) -> torch.Tensor:
        """``std + eps``: the factor between normalised and raw units."""
        return self.std + EPS


class Normalizer:
    """Gaussian normaliser over the fields ``FIELDS``.

    Build it from ``{field: (mean, std)}`` (e.g. ``TrajectoryBuffer.stats()``). Observation and action stats
    are vectors [O] / [A]; reward and terminal stats are scalars.
    """

    def __init__(self, stats: Mapping[str, tuple], device=None, dtype: torch.dtype = torch.float32):
        missing = [f for f in FIELDS if f not in stats]
        if missing:
            raise KeyError(f"normaliser stats lack fields {missing}; expected all of {FIELDS}")
        self.fields: dict[str, FieldStats] = {}
        for name in FIELDS:
            mean, std = (torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in stats[name])
            if mean.shape != std.shape:
                raise ValueError(f"{name}: mean shape {tuple(mean.shape)} != std shape {tuple(std.shape)}")
            if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
                raise ValueError(f"{name}: normaliser statistics contain NaN or inf")
            if (std < 0).any():
                raise ValueError(f"{name}: std must be >= 0")
            self.fields[name] = FieldStats(mean.to(device, dtype), std.to(device, dtype))
        for name in ("rewards", "terminals"):
            if self.fields[name].mean.numel() != 1:
                raise ValueError(f"{name}: expected scalar stats, got shape {tuple(self.fields[name].mean.shape)}")
            self.fields[name] = FieldStats(self.fields[name].mean.reshape(()), self.fields[name].std.reshape(()))

    @classmethod
    def identity(cls, obs_dim: int, act_dim: int, device=None) -> "Normalizer":
        """A normaliser that leaves every field unchanged (up to ``EPS``)."""
        return cls({
            "observations": (np.zeros(obs_dim), np.ones(obs_dim)),
            "actions": (np.zeros(act_dim), np.ones(act_dim)),
            "rewards": (0.0, 1.0),
            "terminals": (0.0, 1.0),
        }, device=device)

    @property
    def obs_dim(self) -> int:
        return self.fields["observations"].mean.numel()

    @property
    def act_dim(self) -> int:
        return self.fields["actions"].mean.numel()

    @property
    def device(self) -> torch.device:
        return self.fields["observations"].mean.device

    def __getitem__(self, name: str) -> FieldStats:
        return self.fields[name]

    def normalize(self, x: torch.Tensor, field: str) -> torch.Tensor:
        return self.fields[field].normalize(x)

    def unnormalize(self, x: torch.Tensor, field: str) -> torch.Tensor:
        return self.fields[field].unnormalize(x)

    def to(self, device=None, dtype: torch.dtype = torch.float32) -> "Normalizer":
        return Normalizer(self.state_dict(), device=device, dtype=dtype)

    def state_dict(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{field: (mean, std)}`` as float64 numpy arrays (what a checkpoint stores)."""
        return {k: (v.mean.double().cpu().numpy(), v.std.double().cpu().numpy()) for k, v in self.fields.items()}
