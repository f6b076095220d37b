"""Noise schedule of the trajectory diffusion model: the one source of truth for every sampler and kernel.

All tables are computed once in float64 (PolyGRAD's cosine schedule with exponent ``tau``, arXiv 2301.10972)
and cast on request. Index ``t`` runs over ``0 .. T-1``; ``t = 0`` is the last reverse step (no noise added).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Order of the columns of ``NoiseSchedule.step_table``: the per-t coefficients a fused reverse step reads.
STEP_TABLE_COLUMNS = ("sqrt_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_std")

_TABLE_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_std",
)


def cosine_betas(n_steps: int, tau: float = 1.0, max_beta: float = 0.999) -> torch.Tensor:
    """Betas [T] (float64) of the cosine schedule ``f(s) = cos(s*pi/2)^(2*tau)`` rescaled to end at 0, clipped.

    The last beta is always ``max_beta`` because ``f(1) = 0``.
    """
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite positive number, got {tau!r}")
    s = torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64)
    f = torch.cos(s * math.pi / 2) ** (2 * tau)
    v_start, v_end = 1.0, math.cos(math.pi / 2) ** (2 * tau)
    out = (v_end - f) / (v_end - v_start)
    return (1.0 - out[1:] / out[:-1]).clamp(0.0, max_beta)


@dataclass(frozen=True)
class NoiseSchedule:
    """Diffusion schedule tables, each a float64 tensor [T] on the CPU.

    Posterior q(x_{t-1} | x_t, x_0) = N(coef1_t * x_0 + coef2_t * x_t, posterior_variance_t);
    ``posterior_std = exp(0.5 * posterior_log_variance_clipped)`` is the sampler's noise scale.
    """

    n_steps: int
    tau: float = 1.0
    tables: dict[str, torch.Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        betas = cosine_betas(self.n_steps, self.tau)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        post_logvar = torch.log(post_var.clamp(min=1e-20))
        tables = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / abar).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / abar - 1.0).sqrt(),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_logvar,
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
            "posterior_std": torch.exp(0.5 * post_logvar),
        }
        assert tuple(tables) == _TABLE_NAMES
        object.__setattr__(self, "tables", tables)

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in _TABLE_NAMES:
            return self.__dict__["tables"][name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def table(self, name: str, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One table [T] cast to ``dtype`` on ``device``."""
        if name not in _TABLE_NAMES:
            raise KeyError(f"unknown schedule table {name!r}; expected one of {_TABLE_NAMES}")
        return self.tables[name].to(device=device, dtype=dtype)

    def step_table(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[T, 4] contiguous table with the columns ``STEP_TABLE_COLUMNS``: what one reverse step reads by t."""
        cols = [self.tables[name] for name in STEP_TABLE_COLUMNS]
        return torch.stack(cols, dim=1).to(device=device, dtype=dtype).contiguous()
