"""Paper-style twins of one guided reverse step's two halves and of the forward noising.

Written the way the paper's code states them (coefficients extracted by name, ``apply_conditioning``,
``q_posterior``, the policy's log-likelihood gradient by autograd), independently of the production ops in
``polygrad_fast.step_ops`` and of the fused kernels, which are tested element by element against these.

Shapes: B batch, H horizon, D = O + 2 (normalised obs, reward, terminal), O obs dim, A action dim. ``t`` is the
reverse-step index (python int, T-1 .. 0; t = 0 is the last step and adds no noise); ``step_table`` is
``NoiseSchedule.step_table()`` [T, 6] with the columns ``STEP_TABLE_COLUMNS``, or a K-step chain's table [K, 6]
read at ``row`` (the chain's step index) while ``t`` stays the trained timestep (``guided_sampling.respaced_chain``);
its "trained_steps" column n is how many trained steps the row spans (t - n + 1 .. t; 1 on the trained chain),
"spanned_posterior_std" the root mean square of their trained posterior stds.
"""
from __future__ import annotations

import torch
from torch.distributions import Distribution, Normal

from ..schedule import STEP_TABLE_COLUMNS

GUIDANCE_TYPES = ("grad", "sample", "none")
STATES_FOR_GUIDANCE = ("recon", "posterior_mean")


def extract(step_table: torch.Tensor, name: str, t: int) -> torch.Tensor:
    """The schedule coefficient ``name`` (one of ``STEP_TABLE_COLUMNS``) of step t, a 0-dim tensor."""
    return step_table[t, STEP_TABLE_COLUMNS.index(name)]


def apply_conditioning(x: torch.Tensor, start_obs: torch.Tensor) -> torch.Tensor:
    """Copy of x [B,H,D] whose first step's observation is start_obs [B,O]."""
    x = x.clone()
    x[:, 0, : start_obs.shape[-1]] = start_obs
    return x


def guided_state_update(
    x: torch.Tensor,
    x0_pred: torch.Tensor,
    start_obs: torch.Tensor,
    t: int,
    step_table: torch.Tensor,
    obs_mean: torch.Tensor,
    obs_scale: torch.Tensor,
    clip_state_change: float | None,
    noise: torch.Tensor | None,
    states_for_guidance: str = "recon",
    row: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """State half of the paper's reverse step t (coefficients from ``step_table[row]``; row None: t).

    x, x0_pred, noise [B,H,D] normalised; start_obs [B,O] normalised; obs_mean, obs_scale [O]. Returns
    (x_{t-1} [B,H,D], posterior mean [B,H,D], guide states [B,H,O] raw):
      x_recon = apply_conditioning(x0_pred);
      mu = posterior_mean_coef1 * x_recon + posterior_mean_coef2 * x_t        (q_posterior);
      for t <= 10: mu = x_t + clamp(mu - x_t, -clip_state_change, clip_state_change); a row spanning n trained
      steps clamps at k * clip_state_change, k = how many of t - n + 1 .. t are <= 10 (none: no clamp);
      x_{t-1} = apply_conditioning(mu + posterior_std_t * noise), without the noise at t = 0;
      guide = x_recon ('recon') or mu ('posterior_mean'), observation columns, unnormalised.
    """
    if states_for_guidance not in STATES_FOR_GUIDANCE:
        raise ValueError(f"states_for_guidance must be one of {STATES_FOR_GUIDANCE}, got {states_for_guidance!r}")
    obs_dim = start_obs.shape[-1]
    row = t if row is None else row
    x_recon = apply_conditioning(x0_pred, start_obs)
    mu = (extract(step_table, "posterior_mean_coef1", row) * x_recon
          + extract(step_table, "posterior_mean_coef2", row) * x)
    spanned = int(extract(step_table, "trained_steps", row))
    clamped_steps = sum(1 for s in range(t - spanned + 1, t + 1) if s <= 10)
    if clamped_steps and clip_state_change is not None:
        limit = clamped_steps * clip_state_change
        mu = x + torch.clamp(mu - x, -limit, limit)
    x_prev = mu if t == 0 else mu + extract(step_table, "posterior_std", row) * noise
    guide = (x_recon if states_for_guidance == "recon" else mu)[..., :obs_dim]
    return apply_conditioning(x_prev, start_obs), mu, guide * obs_scale + obs_mean


def action_step(
    actions: torch.Tensor,
    dist: Distribution,
    act_mean: torch.Tensor,
    act_scale: torch.Tensor,
    t: int,
    sigma_t: torch.Tensor,
    guidance_scale: float | torch.Tensor,
    clip_std: float | None,
    noise: torch.Tensor | None,
    action_noise_scale: float = 1.0,
    guidance_type: str = "grad",
    trained_steps: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Action half of the paper's reverse step t given the policy's distribution over raw actions ``dist``.

    actions, noise [B,H,A] normalised; act_mean, act_scale [A]; sigma_t the posterior std of step t (of a
    respaced row: the root mean square of the trained posterior stds it spans). Returns (new
    normalised actions [B,H,A], the guided raw actions before the noise [B,H,A], or None without a gradient step):
      t = 0: clamp a to dist.mean +- clip_std * dist.stddev, nothing else (no clip_std: unchanged);
      'grad': clamp, then a <- a + w * grad_a log pi(a|s) (autograd), stopped at the policy's mean where the
              step would pass it, normalise, add action_noise_scale * sigma_t * noise; a respaced row spanning
              n = ``trained_steps`` trained steps takes the step n times and its noise is what n steps of noise
              sigma_t would leave, each shrunk by the later steps' pull: variance sigma_t^2 sum_k q^(2k), with
              q = 1 - min(w / std^2, 1) the fraction of the distance to the mean a step keeps (diagonal Normal);
      'sample': a = dist.mean + dist.stddev * noise, normalised;
      'none': unchanged.
    """
    if guidance_type not in GUIDANCE_TYPES:
        raise ValueError(f"guidance_type must be one of {GUIDANCE_TYPES}, got {guidance_type!r}")
    if t == 0 and clip_std is None or t > 0 and guidance_type == "none":
        return actions, None
    a = actions * act_scale + act_mean
    if t > 0 and guidance_type == "sample":
        return (dist.mean + dist.stddev * noise - act_mean) / act_scale, None
    if clip_std is not None:
        a = torch.clamp(a, dist.mean - clip_std * dist.stddev, dist.mean + clip_std * dist.stddev)
    if t == 0:
        return (a - act_mean) / act_scale, None
    kept = torch.clamp(1 - guidance_scale / dist.stddev**2, min=0)
    noise_var = torch.zeros_like(a)  # in units of sigma_t^2
    for _ in range(trained_steps):
        a = a.detach().requires_grad_(True)
        with torch.enable_grad():
            dist.log_prob(a).sum().backward()
        step = guidance_scale * a.grad
        # a step longer than the distance to the policy's mean would pass it: it stops at the mean instead
        a = torch.where(step.abs() > (dist.mean - a).abs(), dist.mean, a + step).detach()
        noise_var = noise_var * kept**2 + 1
    return (a - act_mean) / act_scale + action_noise_scale * sigma_t * noise_var.sqrt() * noise, a


def guided_action_update(
    actions: torch.Tensor,
    policy_mean: torch.Tensor,
    policy_std: torch.Tensor,
    act_mean: torch.Tensor,
    act_scale: torch.Tensor,
    t: int,
    step_table: torch.Tensor,
    guidance_scale: float | torch.Tensor,
    clip_std: float | None,
    noise: torch.Tensor | None,
    action_noise_scale: float = 1.0,
    guidance_type: str = "grad",
) -> torch.Tensor:
    """``action_step`` for the policy Normal(policy_mean, policy_std) [B,H,A] (or broadcastable), raw units:
    the new normalised actions [B,H,A]."""
    dist = Normal(policy_mean.detach(), policy_std.detach())
    new, _ = action_step(actions, dist, act_mean, act_scale, t, extract(step_table, "spanned_posterior_std", t),
                         guidance_scale, clip_std, noise, action_noise_scale, guidance_type,
                         int(extract(step_table, "trained_steps", t)))
    return new


def q_sample(
    x0: torch.Tensor,
    actions: torch.Tensor,
    t: torch.Tensor,
    step_table_sqrt_abar: torch.Tensor,
    step_table_sqrt_one_minus_abar: torch.Tensor,
    noise: torch.Tensor,
    action_noise: torch.Tensor | None = None,
    action_noise_scale: float = 0.0,
    obs_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's forward noising x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, per sample's t [B].

    x0, noise [B,H,D]; actions, action_noise [B,H,A]; the two tables [T]. Returns (x_t, with x0's first
    observation kept when obs_dim is given, act_t = sqrt(abar_t) a + sqrt(1 - abar_t) * action_noise_scale * eps_a).
    """
    def per_sample(table):
        return table[t][:, None, None]

    x_t = per_sample(step_table_sqrt_abar) * x0 + per_sample(step_table_sqrt_one_minus_abar) * noise
    if obs_dim is not None:
        x_t = apply_conditioning(x_t, x0[:, 0, :obs_dim])
    act_t = per_sample(step_table_sqrt_abar) * actions
    if action_noise is not None and action_noise_scale != 0.0:
        act_t = act_t + per_sample(step_table_sqrt_one_minus_abar) * action_noise_scale * action_noise
    return x_t, act_t
