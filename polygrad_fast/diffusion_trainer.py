"""Training loop step of the diffusion world model: Adam on the denoising loss, EMA copy, mixed precision.

As the paper's world-model trainer: Adam without weight decay or clipping, EMA every 10 steps (hard copy before step
2000), fp16 autocast + GradScaler on CUDA. A step whose loss or gradient is not finite changes nothing and raises
``NonFiniteUpdateError``. Data-parallel (``dist`` of a torchrun launch): each rank takes an equal row shard of the
batch and ``DistributedDataParallel`` averages the gradients, so the step is the whole batch's; the checks shared with the actor-critic trainer (state-dict shapes, configs, batch
magnitudes) live here too.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Protocol, get_args

import torch
from torch import nn

from . import backend
from .diffusion import DiffusionLoss, LossType, make_x0
from .distributed import SINGLE, DistContext
from .ema import ModelEMA
from .exclusive import ExclusiveUse, exclusive
from .schedule import NoiseSchedule

Precision = Literal["auto", "fp32", "fp16", "bf16"]
PRECISIONS = get_args(Precision)


class NonFiniteUpdateError(RuntimeError):
    """An update produced a non-finite loss, gradient or parameter; the trainer was left as it was before it."""


# ---------------------------------------------------------------------------------------------- shared checks
def check_number(name: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite number (an int if ``integer``) within the given bounds."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite {'int' if integer else 'number'}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        if low is not None and high is not None:
            bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            bound = f"{'>' if low_open else '>='} {low:g}"
        else:
            bound = f"{'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def cloned(tree):
    """Copy of a nested dict/list/tuple with every tensor cloned (4x faster than copy.deepcopy on a state dict)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: cloned(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(cloned(v) for v in tree)
    return tree


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def config_differences(config, saved: dict[str, Any]) -> list[str]:
    """'field saved (state dict) vs ours (this trainer)' for every field of dataclass ``config`` that differs
    from, or is missing in, the saved ``asdict`` form; keys the config does not have are listed too."""
    ours = asdict(config)
    diffs = [f"{k} {saved[k]!r} (state dict) vs {v!r} (this trainer)" if k in saved else f"{k} missing in the state dict"
             for k, v in ours.items() if k not in saved or saved[k] != v]
    diffs += [f"{k} {saved[k]!r} is not a field of {type(config).__name__}" for k in saved if k not in ours]
    return diffs


def module_state_problems(name: str, module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Missing / unexpected keys and shape mismatches of ``state`` against ``module.state_dict()`` (checked
    before anything is loaded: ``nn.Module.load_state_dict`` copies the matching entries before it raises)."""
    if not isinstance(state, dict):
        return [f"{name}: expected a state dict, got {type(state).__name__}"]
    ours = module.state_dict()
    problems = [f"{name}: missing {k} {list(v.shape)}" for k, v in ours.items() if k not in state]
    problems += [f"{name}: unexpected {k}" for k in state if k not in ours]
    shapes = [f"{name}.{k}: shape {list(state[k].shape)} in the state dict but {list(v.shape)} here"
              for k, v in ours.items() if k in state and isinstance(state[k], torch.Tensor)
              and state[k].shape != v.shape]
    if len(shapes) > 3:
        shapes = shapes[:3] + [f"{name}: {len(shapes) - 3} more shape mismatches"]
    return problems + shapes


def optimizer_state_problems(name: str, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> list[str]:
    """Group sizes and per-parameter state shapes of an optimiser state dict against ``optimizer``."""
    try:
        groups, per_param = state["param_groups"], state["state"]
    except (TypeError, KeyError):
        return [f"{name}: not an optimiser state dict"]
    ours = optimizer.param_groups
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in ours]:
        return [f"{name}: parameter groups of sizes {[len(g['params']) for g in groups]} in the state dict but "
                f"{[len(g['params']) for g in ours]} here"]
    params = {i: p for g_saved, g in zip(groups, ours) for i, p in zip(g_saved["params"], g["params"])}
    problems = []
    for i, entry in per_param.items():
        for key, value in entry.items():
            if i in params and isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[i].shape:
                problems.append(f"{name}: state {key} of parameter {i} has shape {list(value.shape)} but the "
                                f"parameter {list(params[i].shape)}")
    return problems


def nonfinite_tensors(name: str, state: dict[str, torch.Tensor]) -> list[str]:
    """'name.key contains NaN or inf' for each floating tensor of ``state`` that does (one host sync)."""
    keys = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not keys:
        return []
    ok = torch.stack([torch.isfinite(state[k]).all().cpu() for k in keys]).tolist()
    return [f"{name}.{k} contains NaN or inf" for k, good in zip(keys, ok) if not good]


def step_problems(step) -> list[str]:
    ok = isinstance(step, int) and not isinstance(step, bool) and step >= 0
    return [] if ok else [f"step must be an int >= 0, got {step!r}"]


def raise_if_problems(what: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"cannot load this {what} state dict (nothing was loaded): " + "; ".join(problems))


def batch_magnitude_hint(fields_: dict[str, torch.Tensor]) -> str:
    """Why a finite batch may still overflow: names each field with values above sqrt(float max) (their squares,
    as in the squared-error losses, overflow), else lists the largest magnitudes. Host syncs: error path only."""
    largest = {k: float(v.detach().abs().max()) if v.numel() else 0.0 for k, v in fields_.items()}
    limit = math.sqrt(torch.finfo(next(iter(fields_.values())).dtype).max)
    big = [f"batch.{k} contain values of magnitude {m:.3g}" for k, m in largest.items() if m > limit]
    if big:
        return "; ".join(big) + f" (squares of values above {limit:.3g} overflow)"
    sizes = ", ".join(f"{k} {m:.3g}" for k, m in largest.items())
    return f"the batch is finite and moderate (largest |value|: {sizes}), so the networks themselves diverged"


# ---------------------------------------------------------------------------------------------- trainer
@dataclass(frozen=True)
class DiffusionTrainerConfig:
    """Hyper-parameters; defaults are the paper's. Invalid values raise at construction.

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
    loss_type: LossType = "l2"
    action_condition_noise_scale: float = 0.0
    mixed_precision: Precision = "auto"
    seed: int = 0

    def __post_init__(self):
        check_number("lr", self.lr, 0.0, low_open=True)
        check_number("batch_size", self.batch_size, 1, integer=True)
        check_number("ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        check_number("step_start_ema", self.step_start_ema, 0, integer=True)
        check_number("update_ema_every", self.update_ema_every, 1, integer=True)
        check_choice("loss_type", self.loss_type, get_args(LossType))
        check_number("action_condition_noise_scale", self.action_condition_noise_scale, 0.0)
        check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        check_number("seed", self.seed, 0, integer=True)

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> "DiffusionTrainerConfig":
        """Rebuild a config from its ``asdict`` form. The removed ``predict_epsilon`` option: False is dropped,
        True is refused (the denoiser is an x0 predictor; an epsilon-trained model cannot be sampled here)."""
        saved = dict(saved)
        if saved.pop("predict_epsilon", False):
            raise ValueError("this config was trained with predict_epsilon=True (epsilon prediction); the package "
                             "trains and samples x0-prediction denoisers only, as the paper: retrain with "
                             "predict_epsilon removed")
        unknown = sorted(set(saved) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown DiffusionTrainerConfig fields {unknown}")
        return cls(**saved)


class WindowBatch(Protocol):
    """What ``train_step`` reads: normalised tensors obs [B,H,O], actions [B,H,A], rewards [B,H], terminals [B,H]."""

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    terminals: torch.Tensor


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """'fp32', 'fp16' or 'bf16' for this device; raises where the request cannot run."""
    check_choice("mixed_precision", mixed_precision, PRECISIONS)
    cuda = device.type == "cuda"
    if mixed_precision == "auto":
        return "fp16" if cuda else "fp32"
    if mixed_precision == "fp16" and not cuda:
        raise ValueError(f"mixed_precision 'fp16' needs a CUDA device, got {device}")
    if mixed_precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"mixed_precision 'bf16' is not supported on {torch.cuda.get_device_name(device)}")
    return mixed_precision


BATCH_FIELDS = ("observations", "actions", "rewards", "terminals")


class DiffusionTrainer:
    """Owns the denoiser being trained, its EMA copy, the optimiser, the grad scaler and the step counter.

    ``train_step(batch)`` does one gradient step and returns float metrics (one host sync, which also checks the
    batch, the loss and the gradient for NaN/inf before the optimiser steps). The sampler uses ``ema_model``.
    ``loss_fn.noising_fn`` can be replaced by a fused q_sample. Not safe to share across threads: a call made
    while another thread is inside ``train_step``/``load_state_dict`` raises RuntimeError.

    ``dist`` (an initialised process group's context): every rank calls ``train_step`` on its own shard of
    the batch (equal sizes); the forward runs under ``DistributedDataParallel`` (gradients averaged, parameters
    broadcast from rank 0 at construction), the returned metrics and the finiteness checks are averaged over the
    ranks (so all ranks take or refuse the step together), and the t / noise generator is seeded with
    ``dist.rank_seed(config.seed)``. ``model`` stays the plain module (state dicts are unchanged).
    """

    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule,
                 config: DiffusionTrainerConfig = DiffusionTrainerConfig(), dist: DistContext = SINGLE):
        self._exclusive = ExclusiveUse("DiffusionTrainer")
        if not isinstance(config, DiffusionTrainerConfig):
            raise TypeError(f"config must be a DiffusionTrainerConfig, got {type(config).__name__}")
        params = list(denoiser.parameters())
        if not params:
            raise ValueError("the denoiser has no parameters")
        self.config = config
        self.model = denoiser
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.precision = resolve_precision(config.mixed_precision, self.device)
        self.loss_fn = DiffusionLoss(schedule, config.loss_type, config.action_condition_noise_scale).to(self.device)
        if backend.select_backend(self.device) == "triton":
            # One fused pass for the forward noising on the GPU; the noise still comes from self.generator, so
            # training draws, resume and the reference path stay identical.
            from .kernels import q_sample

            self.loss_fn.noising_fn = q_sample
        self.optimizer = torch.optim.Adam(denoiser.parameters(), lr=config.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.ema = ModelEMA(denoiser, config.ema_decay, config.step_start_ema, config.update_ema_every)
        self.dist = dist
        self._train_model = denoiser  # what the loss calls: the module itself, or its DDP wrapper
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # buffers are not trained and identical on every rank: synced once at construction, not per forward
            # (older torch names the option broadcast_buffers; newer versions deprecate that name)
            no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
                DistributedDataParallel).parameters else "broadcast_buffers"
            self._train_model = DistributedDataParallel(
                denoiser, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **{no_sync: False})
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(dist.rank_seed(config.seed))
        self.step = 0

    @property
    def ema_model(self) -> nn.Module:
        """The EMA denoiser (eval mode, no grad) that imagination samples from."""
        return self.ema.model

    def _check_batch(self, batch: WindowBatch) -> list[torch.Tensor]:
        """Types, shapes and dtypes of the four fields (values are checked in the step's one host sync)."""
        tensors = []
        for name in BATCH_FIELDS:
            t = getattr(batch, name, None)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"batch.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != self.dtype:
                raise TypeError(f"batch.{name} must be {self.dtype} (the denoiser's dtype), got {t.dtype}")
            if t.device.type == "meta":
                raise ValueError(f"batch.{name} is on the meta device (no data)")
            tensors.append(t)
        obs, act, rew, term = tensors
        # A Denoiser declares its sizes; any other module is checked for consistency between the fields only.
        D = getattr(self.model, "transition_dim", None)
        sizes = {"H": getattr(self.model, "horizon", None), "O": None if D is None else D - 2,
                 "A": getattr(self.model, "action_dim", None)}
        if obs.dim() != 3 or any(sizes[k] not in (None, n) for k, n in zip("HO", obs.shape[1:])):
            raise ValueError(f"batch.observations: expected [B, {sizes['H'] or 'H'}, {sizes['O'] or 'O'}], "
                             f"got {list(obs.shape)}")
        B, H = obs.shape[:2]
        if B < 1:
            raise ValueError("batch.observations: the batch is empty (B = 0)")
        A = sizes["A"] if sizes["A"] is not None else (act.shape[-1] if act.dim() else 0)
        expected = {"actions": (act, [B, H, A]), "rewards": (rew, [B, H]), "terminals": (term, [B, H])}
        for name, (t, shape) in expected.items():
            if list(t.shape) != shape:
                raise ValueError(f"batch.{name}: expected {shape} (observations are {list(obs.shape)}), "
                                 f"got {list(t.shape)}")
        return [t.to(self.device, non_blocking=True) for t in tensors]

    @exclusive
    def train_step(self, batch: WindowBatch) -> dict[str, float]:
        """One Adam step on a batch of normalised windows -> {'loss', 'obs_mse', 'reward_mse', 'term_mse'}.

        Raises ValueError (batch field with NaN/inf) or NonFiniteUpdateError (loss or gradient not finite) with
        the trainer unchanged: model, EMA, optimiser, scaler, generator and step are as before the call. With fp16
        the GradScaler's own overflow handling (skip the step, lower the scale) applies to the gradients.
        """
        obs, act, rew, term = self._check_batch(batch)
        generator_state = self.generator.get_state()
        x0 = make_x0(obs, rew, term)
        self.model.train()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.precision != "fp32"):
            loss, metrics = self.loss_fn(self._train_model, x0, act, generator=self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        checks = [torch.isfinite(t).all() for t in (obs, act, rew, term)] + [torch.isfinite(loss)]
        if not self.scaler.is_enabled():
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                checks.append(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        values = torch.cat([torch.stack([loss.detach(), *metrics.values()]).float(),
                            torch.stack(checks).float()])
        # over equal shards: the whole batch's loss and metrics; a check passes only if it passed on every rank
        values = self.dist.reduce(values, "the diffusion step's metrics").tolist()  # the one host sync of the step
        n = 1 + len(metrics)
        ok = [v >= 1.0 for v in values[n:]]
        if not all(ok):
            self.optimizer.zero_grad(set_to_none=True)
            self.generator.set_state(generator_state)
            self._raise_nonfinite(ok, values[0], {"observations": obs, "actions": act, "rewards": rew,
                                                  "terminals": term})
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.model, self.step)
        self.step += 1
        return dict(zip(("loss", *metrics), values[:n]))

    @staticmethod
    def _raise_nonfinite(ok: list[float], loss: float, batch: dict[str, torch.Tensor]) -> None:
        bad = [name for name, good in zip(BATCH_FIELDS, ok) if not good]
        if bad:
            raise ValueError(", ".join(f"batch.{n}" for n in bad) + " contain NaN or inf (nothing was changed)")
        what = f"the diffusion loss is {loss}" if not ok[4] else "the denoiser's gradient norm is not finite"
        raise NonFiniteUpdateError(f"{what}: {batch_magnitude_hint(batch)}. The step was not taken and the trainer "
                                   "(model, EMA, optimiser, scaler, generator, step) is unchanged")

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs: config, model, EMA, optimiser, scaler, generator state, step."""
        return {
            "config": asdict(self.config),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
        }

    @exclusive
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a ``state_dict()``; refused (nothing loaded) if it was made with another config or model shape."""
        missing = [k for k in ("config", "step", "model", "ema", "optimizer", "scaler", "generator")
                   if k not in state]
        raise_if_problems("diffusion trainer", [f"missing key {k!r}" for k in missing])
        saved = DiffusionTrainerConfig.from_saved(state["config"])
        problems = [f"config {d}" for d in config_differences(self.config, asdict(saved))]
        problems += module_state_problems("model", self.model, state["model"])
        problems += module_state_problems("ema", self.ema.model, state["ema"])
        problems += optimizer_state_problems("optimizer", self.optimizer, state["optimizer"])
        problems += step_problems(state["step"])
        try:  # on a scratch generator: a bad state must not fail half-way through the load below
            torch.Generator(self.device).set_state(state["generator"].cpu())
        except (AttributeError, TypeError, RuntimeError) as exc:
            problems.append(f"generator: not a generator state of {self.device} ({exc})")
        if not problems:
            problems += nonfinite_tensors("model", state["model"]) + nonfinite_tensors("ema", state["ema"])
        raise_if_problems("diffusion trainer", problems)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        # torch's optimisers keep the given state tensors (no copy): clone, or two trainers loaded from one state
        # dict would share (and both update) the same Adam moments
        self.optimizer.load_state_dict(cloned(state["optimizer"]))
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"].cpu())  # a map_location may have moved it
        self.step = int(state["step"])
