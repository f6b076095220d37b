"""Exponential moving average of a model's weights, on the paper's schedule (hard copies early, then averaging)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """A frozen copy of ``model`` updated by ``update(model, step)``.

    Only when ``step % update_every == 0``: while ``step < start_step`` the copy is reset to the model (early
    weights move too fast to average), afterwards ema = decay * ema + (1 - decay) * model on the parameters.
    Buffers are always copied (they are fixed tables, not learned).
    """

    def __init__(self, model: nn.Module, decay: float = 0.99, start_step: int = 2000, update_every: int = 10):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
        for name, value, low in (("start_step", start_step, 0), ("update_every", update_every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.decay = decay
        self.start_step = start_step
        self.update_every = update_every
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if step % self.update_every:
            return
        if step < self.start_step:
            self.model.load_state_dict(model.state_dict())
            return
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.lerp_(p, 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
