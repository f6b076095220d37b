"""Noise schedule of the trajectory diffusion model: the one source of truth for every sampler and kernel.

PolyGRAD's cosine schedule with exponent ``tau`` (arXiv 2301.10972) and the tables derived from it, computed
once on the CPU and cast on request. Index ``t`` runs over ``0 .. T-1``; ``t = 0`` is the last reverse step (no
noise added). ``precision`` picks the arithmetic the tables are derived in: ``"float64"`` (default, the
accurate values) or ``"float32"`` (the paper's code: betas rounded to float32, every derived table computed in
float32 torch ops); see docs/algorithm.md for the measured difference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

Precision = Literal["float64", "float32"]
PRECISIONS: tuple[str, ...] = ("float64", "float32")

# Order of the columns of ``NoiseSchedule.step_table``: the per-t coefficients a fused reverse step reads. The
# last two describe the trained steps a chain step spans (the guided action update compounds over them, see
# ``step_ops.action_update_at``): "trained_steps", their number (1 on the trained chain, the stride of a respaced
# one), and "spanned_posterior_std", the root mean square of their trained posterior stds (posterior_std on the
# trained chain).
STEP_TABLE_COLUMNS = ("sqrt_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_std",
                      "trained_steps", "spanned_posterior_std")

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

    ``s = linspace(0, 1, T+1)``, ``out = (f(1) - f(s)) / (f(1) - f(0))``, ``beta_t = clip(1 - out_{t+1}/out_t,
    0, max_beta)``. The last beta is always ``max_beta`` because ``f(1) = 0``.
    """
    _check_steps_and_tau(n_steps, tau)
    s = torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64)
    f = torch.cos(s * math.pi / 2) ** (2 * tau)
    v_start, v_end = 1.0, math.cos(math.pi / 2) ** (2 * tau)
    out = (v_end - f) / (v_end - v_start)
    return (1.0 - out[1:] / out[:-1]).clamp(0.0, max_beta)


def _check_steps_and_tau(n_steps, tau) -> None:
    # bool is an int subclass: NoiseSchedule(True) must not silently mean T = 1.
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    if isinstance(tau, bool) or not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite positive number, got {tau!r}")


def _derived_tables(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every table [T] from the betas [T], computed in ``betas.dtype`` arithmetic (the order of ``_TABLE_NAMES``).

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with abar_t = prod_{k<=t} (1 - beta_k); the posterior
    q(x_{t-1} | x_t, x_0) has variance beta_t (1 - abar_{t-1}) / (1 - abar_t) and mean coef1_t x_0 + coef2_t x_t.
    """
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    abar_prev = torch.cat([torch.ones(1, dtype=betas.dtype), abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # The posterior variance is 0 at t = 0: the log is clipped so the table stays finite.
    post_logvar = torch.log(post_var.clamp(min=1e-20))
    return {
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


@dataclass(frozen=True)
class NoiseSchedule:
    """Diffusion schedule tables, each a float64 tensor [T] on the CPU.

    Posterior q(x_{t-1} | x_t, x_0) = N(coef1_t * x_0 + coef2_t * x_t, posterior_variance_t);
    ``posterior_std = exp(0.5 * posterior_log_variance_clipped)`` is the sampler's noise scale.

    ``precision`` is the arithmetic the tables are derived in; they are stored as float64 either way, so every
    consumer reads them the same way:

    - ``"float64"`` (default): betas and every derived table computed in float64.
    - ``"float32"``: the paper's code exactly: the betas (computed in float64) rounded to float32, then
      abar_t, abar_{t-1}, the square roots, the posterior variance, its clipped log, coef1, coef2 and
      ``posterior_std`` computed in float32 torch ops on the CPU (whose float32 cumprod accumulates in
      float64). Rounding 1 - beta_t to float32 costs up to 2^-24 / beta_0 relative where a table divides by
      1 - abar_t near t = 0: at T = 128 the tables move by up to 2.3e-3 relative (tau = 0.1; 1.7e-4 at tau = 1,
      the betas only by their float32 rounding), a sampled trajectory by about 1e-3 in normalised units
      (docs/algorithm.md).
    """

    n_steps: int
    tau: float = 1.0
    precision: Precision = "float64"
    tables: dict[str, torch.Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_steps_and_tau(self.n_steps, self.tau)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        dtype = torch.float64 if self.precision == "float64" else torch.float32
        tables = _derived_tables(cosine_betas(self.n_steps, self.tau).to(dtype))
        assert tuple(tables) == _TABLE_NAMES
        object.__setattr__(self, "tables", {name: v.to(torch.float64) for name, v in tables.items()})

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
        """[T, 6] contiguous table with the columns ``STEP_TABLE_COLUMNS``: what one reverse step reads by t."""
        return _step_table(self.tables, torch.arange(self.n_steps), self.tables["posterior_std"], device, dtype)

    def respaced(self, n_sampling_steps: int, device=None,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept trained timesteps [K] int64, step table [K, 6]) of the K-step respaced reverse chain.

        The kept steps are ``strided_timesteps(T, K)`` (0 and T-1 always among them). Respacing as improved
        DDPM (Nichol & Dhariwal 2021): with kept steps S_0 < ... < S_{K-1}, the chain's betas are recomputed from
        the trained abar, beta'_i = 1 - abar_{S_i} / abar_{S_{i-1}} (abar_{S_{-1}} = 1), so abar'_i = abar_{S_i}
        and row i holds sqrt(abar_{S_i}) and the posterior q(x_{S_{i-1}} | x_{S_i}, x0) of that longer step
        (every table derived from beta' as for the trained schedule, in the schedule's ``precision``) and the
        number of trained steps it spans, S_i - S_{i-1} (1 for i = 0), with the root mean square of their trained
        posterior stds. Row i is the chain's step i; the denoiser must still be given the trained timestep S_i.
        K = T returns
        ``(arange(T), step_table())`` exactly (the identity respacing, without the rounding of recomputing it).
        """
        kept = torch.tensor(strided_timesteps(self.n_steps, n_sampling_steps), dtype=torch.int64)
        if n_sampling_steps == self.n_steps:
            return kept.to(device), self.step_table(device=device, dtype=dtype)
        arith = torch.float64 if self.precision == "float64" else torch.float32
        abar = self.tables["alphas_cumprod"][kept].to(arith)
        betas = 1.0 - abar / torch.cat([torch.ones(1, dtype=arith), abar[:-1]])
        return kept.to(device), _step_table(_derived_tables(betas), kept, self.tables["posterior_std"], device,
                                            dtype)


def _step_table(tables: dict[str, torch.Tensor], kept: torch.Tensor, trained_std: torch.Tensor, device,
                dtype) -> torch.Tensor:
    """The step table [K, 6] (``STEP_TABLE_COLUMNS``) of the chain on the kept trained timesteps [K] ascending:
    the chain's tables [K], then per row the trained steps it spans (kept[i-1] + 1 .. kept[i]) and the root mean
    square of their trained posterior stds ``trained_std`` [T]."""
    bounds = torch.cat([torch.tensor([-1]), kept]).tolist()
    spans = [range(lo + 1, hi + 1) for lo, hi in zip(bounds, bounds[1:])]
    var = trained_std.to(torch.float64) ** 2
    spanned_std = torch.stack([var[list(r)].mean().sqrt() if len(r) > 1 else trained_std[r[0]] for r in spans])
    cols = [tables[name].to(torch.float64) for name in STEP_TABLE_COLUMNS[:-2]]
    cols += [torch.tensor([float(len(r)) for r in spans], dtype=torch.float64), spanned_std.to(torch.float64)]
    return torch.stack(cols, dim=1).to(device=device, dtype=dtype).contiguous()


def strided_timesteps(n_steps: int, n_sampling_steps: int) -> list[int]:
    """The K evenly strided trained timesteps of a K-step chain, ascending: t_i = round(i (T-1) / (K-1)), halves
    rounded up, i = 0..K-1 (so t_0 = 0 and t_{K-1} = T-1; distinct since the stride is >= 1).

    K must be an int in 2..T: the chain's last step (t = 0) is never guided, so a guided chain needs at least one
    step t >= 1 before it (with K = 1 the actions would stay unguided noise).
    """
    k = n_sampling_steps
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= n_steps:
        raise ValueError(f"the number of sampling steps must be an int in 2..{n_steps} (the trained T; at least 2: "
                         f"the final step t = 0 is never guided), got {k!r}")
    return [(2 * i * (n_steps - 1) + k - 1) // (2 * (k - 1)) for i in range(k)]
