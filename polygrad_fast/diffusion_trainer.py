"""Training loop step of the diffusion world model: Adam on the denoising loss, EMA copy, mixed precision.

Mirrors the paper's Trainer (polygrad-reference.md §10): Adam without weight decay or clipping, EMA every 10 steps
(hard copy before step 2000), fp16 autocast + GradScaler on CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from . import backend
from .diffusion import DiffusionLoss, make_x0
from .ema import ModelEMA
from .schedule import NoiseSchedule

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class DiffusionTrainerConfig:
    """Hyper-parameters; defaults are the paper's.

    ``batch_size`` is what callers should sample per step (the trainer takes whatever batch it is given).
    ``mixed_precision``: 'auto' = fp16 autocast + GradScaler on CUDA (as the paper), fp32 on CPU (CPU bf16
    training is not what the paper ran and is less tested); 'bf16' = bf16 autocast (CUDA if supported, or CPU);
    'fp16' = fp16 autocast + GradScaler (CUDA only); 'fp32' = no autocast.
    ``seed`` seeds the trainer's generator for t and noise.
    """

    lr: float = 3e-4
    batch_size: int = 256
    ema_decay: float = 0.99
    step_start_ema: int = 2000
    update_ema_every: int = 10
    loss_type: str = "l2"
    predict_epsilon: bool = False
    action_condition_noise_scale: float = 0.0
    mixed_precision: str = "auto"
    seed: int = 0


class WindowBatch(Protocol):
    """What ``train_step`` reads: normalised tensors obs [B,H,O], actions [B,H,A], rewards [B,H], terminals [B,H]."""

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    terminals: torch.Tensor


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """'fp32', 'fp16' or 'bf16' for this device; raises where the request cannot run."""
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {mixed_precision!r}")
    cuda = device.type == "cuda"
    if mixed_precision == "auto":
        return "fp16" if cuda else "fp32"
    if mixed_precision == "fp16" and not cuda:
        raise ValueError(f"mixed_precision 'fp16' needs a CUDA device, got {device}")
    if mixed_precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"mixed_precision 'bf16' is not supported on {torch.cuda.get_device_name(device)}")
    return mixed_precision


class DiffusionTrainer:
    """Owns the denoiser being trained, its EMA copy, the optimiser, the grad scaler and the step counter.

    ``train_step(batch)`` does one gradient step and returns float metrics (one host sync). The sampler uses
    ``ema_model``. ``loss_fn.noising_fn`` can be replaced by a fused q_sample.
    """

    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule,
                 config: DiffusionTrainerConfig = DiffusionTrainerConfig()):
        self.config = config
        self.model = denoiser
        self.device = next(denoiser.parameters()).device
        self.precision = resolve_precision(config.mixed_precision, self.device)
        self.loss_fn = DiffusionLoss(schedule, config.loss_type, config.predict_epsilon,
                                     config.action_condition_noise_scale).to(self.device)
        if backend.select_backend(self.device) == "triton":
            # One fused pass for the forward noising on the GPU; the noise still comes from self.generator, so
            # training draws, resume and the reference path stay identical.
            from .kernels import q_sample

            self.loss_fn.noising_fn = q_sample
        self.optimizer = torch.optim.Adam(denoiser.parameters(), lr=config.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.ema = ModelEMA(denoiser, config.ema_decay, config.step_start_ema, config.update_ema_every)
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(config.seed)
        self.step = 0

    @property
    def ema_model(self) -> nn.Module:
        """The EMA denoiser (eval mode, no grad) that imagination samples from."""
        return self.ema.model

    def train_step(self, batch: WindowBatch) -> dict[str, float]:
        """One Adam step on a batch of normalised windows -> {'loss', 'obs_mse', 'reward_mse', 'term_mse'}."""
        dev = self.device
        x0 = make_x0(batch.observations.to(dev, non_blocking=True), batch.rewards.to(dev, non_blocking=True),
                     batch.terminals.to(dev, non_blocking=True))
        actions = batch.actions.to(dev, non_blocking=True)
        self.model.train()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.autocast(dev.type, dtype=dtype, enabled=self.precision != "fp32"):
            loss, metrics = self.loss_fn(self.model, x0, actions, generator=self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.model, self.step)
        self.step += 1
        values = torch.stack([loss.detach(), *metrics.values()]).tolist()  # the one host sync of the step
        return dict(zip(("loss", *metrics), values))

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs: model, EMA, optimiser, scaler, generator state, step."""
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"].cpu())  # a map_location may have moved it
        self.step = int(state["step"])
