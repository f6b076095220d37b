"""What every denoiser shares: the call signature, input checks, dtype handling and the low-precision copy.

Shapes: B batch, H horizon, D = O + 2 transition dim (normalised obs, reward, terminal), A action dim.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class Denoiser(nn.Module):
    """Base class: ``denoiser(x [B,H,D], actions [B,H,A], t [B] int) -> [B,H,D]``.

    ``forward`` checks the inputs, casts them to the dtype of the weights and casts the output back to ``x.dtype``,
    so a bf16/fp16 copy (``low_precision_copy``) is called with fp32 tensors and returns fp32.
    The step enters only through ``time_embedding(t)`` [B, E], so a sampler can embed all T steps once per call
    and run each step with ``forward_embedded`` (Hopper, B=256 bf16: the time MLP is ~0.2 ms of a ~4.7 ms call).
    Subclasses implement ``time_embedding`` and ``_forward`` (inputs already checked and cast).
    """

    def __init__(self, horizon: int, transition_dim: int, action_dim: int):
        super().__init__()
        for name, value in (("horizon", horizon), ("transition_dim", transition_dim), ("action_dim", action_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if transition_dim < 3:
            raise ValueError(f"transition_dim = obs_dim + 2 must be >= 3, got {transition_dim}")
        self.horizon = horizon
        self.transition_dim = transition_dim
        self.action_dim = action_dim

    def forward(self, x: torch.Tensor, actions: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.check_inputs(x, actions, t)
        return self.forward_embedded(x, actions, self.time_embedding(t))

    def forward_embedded(self, x: torch.Tensor, actions: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        """``forward`` with the step already embedded: time_emb [B, E] or [1, E] (broadcast over the batch), from
        ``time_embedding``. Only the dtype cast is done here; shapes are the caller's responsibility."""
        weight = next(self.parameters())
        return self._forward(x.to(weight.dtype), actions.to(weight.dtype), time_emb).to(x.dtype)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """t [N] int diffusion steps -> [N, E] embedding in the weights' dtype."""
        raise NotImplementedError

    def _forward(self, x: torch.Tensor, actions: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_inputs(self, x: torch.Tensor, actions: torch.Tensor, t: torch.Tensor) -> None:
        """Raise ValueError/TypeError naming the expected and the given shape, dtype or device."""
        H, D, A = self.horizon, self.transition_dim, self.action_dim
        for name, v in (("x", x), ("actions", actions), ("t", t)):
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(v).__name__}")
        if x.dim() != 3 or tuple(x.shape[1:]) != (H, D):
            raise ValueError(f"x: expected [B, {H}, {D}], got {list(x.shape)}")
        B = x.shape[0]
        if tuple(actions.shape) != (B, H, A):
            raise ValueError(f"actions: expected [{B}, {H}, {A}], got {list(actions.shape)}")
        if tuple(t.shape) != (B,):
            raise ValueError(f"t: expected [{B}], got {list(t.shape)}")
        for name, v in (("x", x), ("actions", actions)):
            if not v.dtype.is_floating_point:
                raise TypeError(f"{name}: expected a floating-point tensor, got {v.dtype}")
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"t: expected torch.int64 (or int32) diffusion steps, got {t.dtype}")
        device = next(self.parameters()).device
        for name, v in (("x", x), ("actions", actions), ("t", t)):
            if v.device != device:
                raise ValueError(f"{name}: expected device {device} (the denoiser's), got {v.device}")


def low_precision_copy(denoiser: Denoiser, dtype: torch.dtype = torch.bfloat16) -> Denoiser:
    """Inference-only copy with parameters in ``dtype`` (bf16/fp16); called with fp32 inputs, returns fp32.

    Keeping a cast copy of the weights is what makes bf16 fast on CPU: autocast re-casts fp32 weights on every
    call. Buffers stay fp32 on purpose: the MLP's random Fourier frequencies multiply the raw step t (up to T-1),
    and rounding them to bf16 would shift the phases by radians.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"expected a Denoiser, got {type(denoiser).__name__}")
    out = copy.deepcopy(denoiser).eval().requires_grad_(False)
    for p in out.parameters():
        p.data = p.data.to(dtype)
    return out
