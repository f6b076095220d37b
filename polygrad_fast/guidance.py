"""Automatic tuning of the guidance scale (the paper's guidance-scale adaptation).

The scale is log-parameterised and moved by plain SGD on ``-(log_g * (act_std - target))``, i.e.
``log_g <- log_g + lr * (act_std - target)``: imagined actions too spread out around the policy (standardised
std > 1) get stronger guidance, too concentrated ones weaker. Everything stays on the device (no host sync), so
the sampler can read ``tuner.scale`` as a tensor.
"""
from __future__ import annotations

import math

import torch

from .exclusive import ExclusiveUse, exclusive


def _check(name: str, value, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (value > 0 if positive else value >= 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


class GuidanceScaleTuner:
    """Log-scale SGD on the guidance scale; ``scale`` is a 0-dim device tensor.

    An ``act_std`` that is NaN, inf or negative (a broken imagination batch), or a step that would overflow the
    scale, is skipped, not applied: the scale keeps its value and ``skipped_updates`` (a 0-dim int64 device tensor) counts it. Skipping instead of raising
    keeps ``update`` free of host syncs; read ``skipped_updates`` when logging. Not safe to share across
    threads: an ``update``/``load_state_dict`` made while another thread is inside one raises RuntimeError.
    """

    def __init__(self, initial: float = 0.005, lr: float = 3e-3, target_std: float = 1.0, device=None):
        self._exclusive = ExclusiveUse("GuidanceScaleTuner")
        initial = _check("initial guidance scale", initial, positive=True)
        f32 = torch.finfo(torch.float32)
        if not f32.tiny <= initial <= f32.max:  # the scale is a float32 tensor
            raise ValueError(f"initial guidance scale must be in float32's normal range [{f32.tiny:.3g}, "
                             f"{f32.max:.3g}], got {initial!r}")
        self.lr = _check("lr", lr, positive=False)
        self.target_std = _check("target_std", target_std, positive=True)
        self.log_scale = torch.tensor(math.log(initial), dtype=torch.float32, device=device)
        self.skipped_updates = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def scale(self) -> torch.Tensor:
        """exp(log_scale): 0-dim tensor on the tuner's device."""
        return self.log_scale.exp()

    @exclusive
    def update(self, act_std: torch.Tensor | float) -> torch.Tensor:
        """One SGD step from the standardised-action std of the last batch (one-element tensor or float);
        returns scale. A non-finite or negative act_std (or an overflowing step) leaves the scale unchanged and is
        counted."""
        if isinstance(act_std, bool) or not isinstance(act_std, (torch.Tensor, int, float)):
            raise TypeError(f"act_std must be a one-element tensor or a number, got {type(act_std).__name__}")
        if isinstance(act_std, torch.Tensor) and act_std.numel() != 1:
            raise ValueError(f"act_std must have one element, got shape {list(act_std.shape)}")
        a = torch.as_tensor(act_std, dtype=torch.float32, device=self.log_scale.device).reshape(())
        new = self.log_scale + self.lr * (a - self.target_std)
        valid = torch.isfinite(a) & (a >= 0) & torch.isfinite(new.exp())  # also: a step that overflows the scale
        self.log_scale.copy_(torch.where(valid, new, self.log_scale))
        self.skipped_updates.add_((~valid).long())
        return self.scale

    def to(self, device) -> "GuidanceScaleTuner":
        self.log_scale = self.log_scale.to(device)
        self.skipped_updates = self.skipped_updates.to(device)
        return self

    def state_dict(self) -> dict:
        return {"log_scale": self.log_scale.detach().clone(), "lr": self.lr, "target_std": self.target_std,
                "skipped_updates": self.skipped_updates.clone()}

    @exclusive
    def load_state_dict(self, state: dict) -> None:
        """Load a ``state_dict()``; a non-finite log scale or invalid lr / target_std is refused (nothing loaded)."""
        missing = [k for k in ("log_scale", "lr", "target_std") if k not in state]
        if missing:
            raise ValueError(f"guidance tuner state dict lacks {missing}")
        log_scale = state["log_scale"]
        if not isinstance(log_scale, torch.Tensor) or log_scale.numel() != 1:
            raise ValueError(f"log_scale must be a one-element tensor, got {log_scale!r}")
        if not math.isfinite(float(log_scale)):
            raise ValueError(f"log_scale in the state dict is {float(log_scale)} (not finite)")
        lr = _check("lr", state["lr"], positive=False)
        target_std = _check("target_std", state["target_std"], positive=True)
        skipped = state.get("skipped_updates", 0)  # absent in states saved before skipping existed
        self.log_scale = log_scale.detach().clone().reshape(()).to(self.log_scale.device, torch.float32)
        self.skipped_updates = torch.as_tensor(skipped, dtype=torch.int64).clone().to(self.log_scale.device)
        self.lr, self.target_std = lr, target_std
