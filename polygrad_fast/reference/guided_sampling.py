"""Reference samplers written the way the paper's code does it (polygrad-reference.md §5 G10, §6).

fp32 denoiser, autograd guidance (``a.requires_grad``, ``log_prob(a).sum().backward()``), one reverse step at a
time. Every fast sampler is checked element by element against ``guided_sample`` with the same explicit noise
(``SamplerNoise``). Shapes: B batch, H horizon, O obs dim, D = O + 2, A action dim, T diffusion steps.
States inside the sampler are normalised; the policy is called on RAW states and returns a distribution over RAW
actions (anything ``polygrad_fast.policy.policy_distribution`` accepts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..noise import fill_standard_normal
from ..normalizer import Normalizer
from ..policy import policy_distribution
from ..schedule import NoiseSchedule
from .step_ops import (_COEF1, _COEF2, _SIGMA, _SQRT_ABAR, GUIDANCE_TYPES, STATES_FOR_GUIDANCE,
                       guided_state_update, impose_start_obs)


@dataclass
class SamplerNoise:
    """All the Gaussian noise of one sampling call, so two samplers can consume exactly the same numbers.

    x_T [B,H,D], a_T [B,H,A]: initial trajectory / actions; state [T,B,H,D], action [T,B,H,A]: the noise of
    reverse step t is ``state[t]`` / ``action[t]`` (``[0]`` is unused: the last step adds no noise).
    """

    x_T: torch.Tensor
    a_T: torch.Tensor
    state: torch.Tensor
    action: torch.Tensor

    @classmethod
    def draw(cls, n_steps: int, batch: int, horizon: int, transition_dim: int, action_dim: int,
             generator: torch.Generator | None = None, device=None) -> "SamplerNoise":
        """One draw for the whole chain: [T+1, B, H, D+A] (see ``from_buffer``), from
        ``polygrad_fast.noise.fill_standard_normal``, the samplers' one noise source, so a generator seed gives
        the reference and the fast sampler the same noise."""
        buf = torch.empty(n_steps + 1, batch, horizon, transition_dim + action_dim, device=device)
        return cls.from_buffer(fill_standard_normal(buf, generator), transition_dim)

    @classmethod
    def from_buffer(cls, buf: torch.Tensor, transition_dim: int) -> "SamplerNoise":
        """Views of buf [T+1, B, H, D+A]: index T holds (x_T, a_T), index t < T the noise of step t."""
        T, D = buf.shape[0] - 1, transition_dim
        return cls(x_T=buf[T, ..., :D], a_T=buf[T, ..., D:], state=buf[:T, ..., :D], action=buf[:T, ..., D:])

    def check(self, n_steps: int, batch: int, horizon: int, transition_dim: int, action_dim: int) -> None:
        expected = {"x_T": (batch, horizon, transition_dim), "a_T": (batch, horizon, action_dim),
                    "state": (n_steps, batch, horizon, transition_dim),
                    "action": (n_steps, batch, horizon, action_dim)}
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"noise.{name} has shape {got}, expected {shape}")


def change_metrics(change: torch.Tensor) -> dict[str, torch.Tensor]:
    """avg/max/min/std of |posterior mean - x| at the last step (§8 A5 ``sampling/*_change``)."""
    c = change.abs()
    return {"avg_change": c.mean(), "max_change": c.max(), "min_change": c.min(), "std_change": c.std()}


def reference_action_step(
    actions: torch.Tensor,
    guide_states_raw: torch.Tensor,
    policy,
    normalizer: Normalizer,
    t: int,
    sigma_t: torch.Tensor,
    guidance_scale: float | torch.Tensor,
    clip_std: float | None,
    noise: torch.Tensor | None,
    action_noise_scale: float = 1.0,
    guidance_type: str = "grad",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Action half of the paper's step (S5, S6, S8–S10), autograd guidance.

    actions, noise [B,H,A] normalised; guide_states_raw [B,H,O]. Returns (new normalised actions [B,H,A],
    the guided raw actions before noise [B,H,A] for S7 or None when there is no gradient step).
    """
    if t == 0 and clip_std is None:
        return actions, None  # S5: the last step only clips
    a = normalizer.unnormalize(actions, "actions")
    if t == 0 or guidance_type == "grad":
        with torch.no_grad():
            dist = policy_distribution(policy(guide_states_raw))
        if clip_std is not None:
            lo = dist.mean - clip_std * dist.stddev
            hi = dist.mean + clip_std * dist.stddev
            a = torch.clamp(a, lo, hi)
        if t == 0:
            return normalizer.normalize(a, "actions"), None
        a = a.detach().requires_grad_(True)
        with torch.enable_grad():
            dist.log_prob(a).sum().backward()
        a = (a + guidance_scale * a.grad).detach()
        return normalizer.normalize(a, "actions") + action_noise_scale * sigma_t * noise, a
    if guidance_type == "sample":
        with torch.no_grad():
            dist = policy_distribution(policy(guide_states_raw))
        return normalizer.normalize(dist.mean + dist.stddev * noise, "actions"), None
    return actions, None


def guided_step(
    denoiser,
    x: torch.Tensor,
    actions: torch.Tensor,
    start_obs: torch.Tensor,
    t: int,
    step_table: torch.Tensor,
    policy,
    normalizer: Normalizer,
    guidance_scale: float | torch.Tensor,
    guidance_type: str,
    clip_std: float | None,
    clip_state_change: float | None,
    states_for_guidance: str,
    update_states: bool,
    action_noise_scale: float,
    state_noise: torch.Tensor | None,
    action_noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One reverse step S0–S11 (plus re-conditioning). Returns (x_next [B,H,D], actions [B,H,A], mean - x)."""
    obs_dim = start_obs.shape[-1]
    coef = step_table[t]
    timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    with torch.no_grad():  # S1
        x_recon = denoiser(x, coef[_SQRT_ABAR] * actions, timesteps)
        x_recon = impose_start_obs(x_recon, start_obs)
    obs = normalizer["observations"]
    # S2-S4 (and S11's state half): exactly the reference twin of kernel A.
    x_next, mean, guide_raw = guided_state_update(
        x, x_recon, start_obs, t, step_table, obs.mean, obs.scale, clip_state_change, state_noise,
        states_for_guidance)
    new_actions, a_guided = reference_action_step(
        actions, guide_raw, policy, normalizer, t, coef[_SIGMA], guidance_scale, clip_std, action_noise,
        action_noise_scale, guidance_type)
    if update_states and a_guided is not None:
        x_next, mean = update_guide_states(x, x_recon, mean, a_guided, start_obs, coef, policy, normalizer,
                                           guidance_scale, states_for_guidance, state_noise)
    return x_next, new_actions, mean - x


def update_guide_states(
    x: torch.Tensor,
    x_recon: torch.Tensor,
    mean: torch.Tensor,
    a_guided: torch.Tensor,
    start_obs: torch.Tensor,
    coef: torch.Tensor,
    policy,
    normalizer: Normalizer,
    guidance_scale: float | torch.Tensor,
    states_for_guidance: str,
    state_noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S7 (ablation ``update_states``): guide states += w·∇_s log π(a_guided|s) (autograd, normalised s).

    x, x_recon (first obs imposed), mean [B,H,D]; a_guided [B,H,A] raw; coef = step_table[t] [4] (t > 0).
    The updated states replace x0's
    observation columns, and the posterior mean is recomputed WITHOUT the t <= 10 clip (paper behaviour).
    Returns (x_next [B,H,D] with the first observation imposed, new posterior mean [B,H,D]).
    """
    obs_dim = start_obs.shape[-1]
    guide = (x_recon if states_for_guidance == "recon" else mean)[..., :obs_dim].detach().clone()
    guide.requires_grad_(True)
    with torch.enable_grad():
        dist = policy_distribution(policy(normalizer.unnormalize(guide, "observations")))
        dist.log_prob(a_guided).sum().backward()
    x_recon = x_recon.clone()
    x_recon[..., :obs_dim] = (guide + guidance_scale * guide.grad).detach()
    x_recon = impose_start_obs(x_recon, start_obs)
    mean = coef[_COEF1] * x_recon + coef[_COEF2] * x
    return impose_start_obs(mean + coef[_SIGMA] * state_noise, start_obs), mean


def guided_sample(
    denoiser,
    schedule: NoiseSchedule,
    policy,
    normalizer: Normalizer,
    start_obs: torch.Tensor,
    *,
    horizon: int,
    guidance_type: str = "grad",
    guidance_scale: float | torch.Tensor = 0.005,
    clip_std: float | None = 3.0,
    clip_state_change: float | None = 0.25,
    states_for_guidance: str = "recon",
    update_states: bool = False,
    action_noise_scale: float = 1.0,
    noise: SamplerNoise | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The paper's policy-guided sampler (p_sample_loop with policy_guided_sample_fn).

    start_obs [B,O] normalised. Returns (x [B,H,D] normalised trajectory, actions [B,H,A] normalised,
    change metrics of the last step). Noise comes from ``noise`` or, if None, ``SamplerNoise.draw(generator)``.
    """
    if guidance_type not in GUIDANCE_TYPES:
        raise ValueError(f"guidance_type must be one of {GUIDANCE_TYPES}, got {guidance_type!r}")
    if states_for_guidance not in STATES_FOR_GUIDANCE:
        raise ValueError(f"states_for_guidance must be one of {STATES_FOR_GUIDANCE}, got {states_for_guidance!r}")
    B, O = start_obs.shape
    D, A, T = O + 2, normalizer.act_dim, schedule.n_steps
    if noise is None:
        noise = SamplerNoise.draw(T, B, horizon, D, A, generator=generator, device=start_obs.device)
    noise.check(T, B, horizon, D, A)
    step_table = schedule.step_table(device=start_obs.device)
    x = impose_start_obs(noise.x_T, start_obs)
    actions = noise.a_T.clone()
    for t in reversed(range(T)):
        x, actions, change = guided_step(
            denoiser, x, actions, start_obs, t, step_table, policy, normalizer, guidance_scale, guidance_type,
            clip_std, clip_state_change, states_for_guidance, update_states, action_noise_scale,
            noise.state[t], noise.action[t])
    return x, actions, change_metrics(change)


@torch.no_grad()
def action_conditioned_sample(
    denoiser,
    schedule: NoiseSchedule,
    start_obs: torch.Tensor,
    actions: torch.Tensor,
    *,
    noise: SamplerNoise | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The paper's plain ancestral sampler given actions (§6b default_sample_fn; autoregressive baseline).

    start_obs [B,O] normalised, actions [B,H,A] normalised (fed as sqrt(abar_t)*a). No guidance, no clipping,
    x0 not re-conditioned before the posterior, no noise at t=0; the first observation is re-imposed after
    every step. Returns x [B,H,D] normalised. Uses ``noise.x_T`` and ``noise.state`` only.
    """
    B, H, A = actions.shape
    O = start_obs.shape[-1]
    T = schedule.n_steps
    if noise is None:
        noise = SamplerNoise.draw(T, B, H, O + 2, A, generator=generator, device=start_obs.device)
    noise.check(T, B, H, O + 2, A)
    step_table = schedule.step_table(device=start_obs.device)
    x = impose_start_obs(noise.x_T, start_obs)
    for t in reversed(range(T)):
        coef = step_table[t]
        timesteps = torch.full((B,), t, dtype=torch.long, device=x.device)
        x0 = denoiser(x, coef[_SQRT_ABAR] * actions, timesteps)
        mean = coef[_COEF1] * x0 + coef[_COEF2] * x
        x = impose_start_obs(mean if t == 0 else mean + coef[_SIGMA] * noise.state[t], start_obs)
    return x
