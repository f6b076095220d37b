"""Automatic tuning of the guidance scale (polygrad-reference.md §8 A2, A7).

The scale is log-parameterised and moved by plain SGD on ``-(log_g * (act_std - target))``, i.e.
``log_g <- log_g + lr * (act_std - target)``: imagined actions too spread out around the policy (standardised
std > 1) get stronger guidance, too concentrated ones weaker. Everything stays on the device (no host sync), so
the sampler can read ``tuner.scale`` as a tensor.
"""
from __future__ import annotations

import math

import torch


class GuidanceScaleTuner:
    """Log-scale SGD on the guidance scale; ``scale`` is a 0-dim device tensor."""

    def __init__(self, initial: float = 0.005, lr: float = 3e-3, target_std: float = 1.0, device=None):
        if not (math.isfinite(initial) and initial > 0):
            raise ValueError(f"initial guidance scale must be finite and > 0, got {initial!r}")
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be finite and >= 0, got {lr!r}")
        self.lr = float(lr)
        self.target_std = float(target_std)
        self.log_scale = torch.tensor(math.log(initial), dtype=torch.float32, device=device)

    @property
    def scale(self) -> torch.Tensor:
        """exp(log_scale): 0-dim tensor on the tuner's device."""
        return self.log_scale.exp()

    def update(self, act_std: torch.Tensor | float) -> torch.Tensor:
        """One SGD step from the standardised-action std of the last batch (tensor or float); returns scale."""
        self.log_scale.add_(self.lr * (torch.as_tensor(act_std, dtype=torch.float32,
                                                       device=self.log_scale.device) - self.target_std))
        return self.scale

    def to(self, device) -> "GuidanceScaleTuner":
        self.log_scale = self.log_scale.to(device)
        return self

    def state_dict(self) -> dict:
        return {"log_scale": self.log_scale.detach().clone(), "lr": self.lr, "target_std": self.target_std}

    def load_state_dict(self, state: dict) -> None:
        self.log_scale = state["log_scale"].detach().clone().to(self.log_scale.device, torch.float32)
        self.lr = float(state["lr"])
        self.target_std = float(state["target_std"])
