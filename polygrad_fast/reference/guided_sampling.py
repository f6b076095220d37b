"""Reference samplers written the way the paper's code does it (``p_sample_loop`` with the policy-guided sample
function, and the plain ancestral sampler given actions).

fp32 denoiser, autograd guidance (``a.requires_grad``, ``log_prob(a).sum().backward()``), one reverse step at a
time, the state update written out as the paper's equations (``reference.step_ops``). Every fast sampler is checked
against ``guided_sample`` with the same explicit noise (anything with the fields of ``polygrad_fast.noise.
SamplerNoise``). Without explicit noise it draws its own from the numpy twin of the counter-based generator
(``reference.noise``), the stream the fast path draws on CPU for the same generator seed.
Shapes: B batch, H horizon, O obs dim, D = O + 2, A action dim, T diffusion steps. States inside the sampler are
normalised; the policy is called on RAW states and returns a distribution over RAW actions: a
``torch.distributions.Distribution`` or a (mean, std) pair (a diagonal Normal).
"""
from __future__ import annotations

from typing import NamedTuple

import math

import torch
import torch.nn.functional as F
from torch.distributions import Distribution, Independent, Normal

from ..normalizer import Normalizer
from ..schedule import NoiseSchedule
from .noise import standard_normal
from .step_ops import (GUIDANCE_TYPES, STATES_FOR_GUIDANCE, action_step, apply_conditioning, extract,
                       guided_state_update)

STATE_GUIDANCE_TYPES = ("none", "sag", "eag")


class ChainNoise(NamedTuple):
    """All the noise of one call: x_T [B,H,D], a_T [B,H,A]; state [K,B,H,D], action [K,B,H,A] for chain step i."""

    x_T: torch.Tensor
    a_T: torch.Tensor
    state: torch.Tensor
    action: torch.Tensor


def draw_noise(n_steps: int, batch: int, horizon: int, transition_dim: int, action_dim: int,
               generator: torch.Generator | None = None, device=None) -> ChainNoise:
    """One draw of the stream (seed, 0) laid out as [T+1, B, H, D+A] (index T: x_T, a_T; t < T: step t), with
    the seed drawn from ``generator`` as one integer in [0, 2^63 - 1) (torch's global generator when None)."""
    seed_device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator, device=seed_device))
    shape = (n_steps + 1, batch, horizon, transition_dim + action_dim)
    z = torch.from_numpy(standard_normal(int(torch.Size(shape).numel()), seed)).float().view(shape).to(device)
    T, D = n_steps, transition_dim
    return ChainNoise(z[T, ..., :D], z[T, ..., D:], z[:T, ..., :D], z[:T, ..., D:])


def respaced_chain(schedule: NoiseSchedule, sampling_steps: int | None,
                   device=None) -> tuple[list[int], torch.Tensor]:
    """(trained timesteps t_i, i = 0..K-1, ascending; step table [K, 6] fp32) of the K-step chain.

    None (or K = T): all T steps and ``schedule.step_table()``. Otherwise t_i = round(i (T-1) / (K-1)) (halves up)
    and row i is the DDPM posterior q(x_s | x_t, x0) between t = t_i and the next kept step s = t_{i-1}, written
    from the trained abar (float64; abar_s = 1 for i = 0):
      mean = sqrt(abar_s) (1 - abar_t / abar_s) / (1 - abar_t) x0 + sqrt(abar_t / abar_s) (1 - abar_s) / (1 - abar_t) x_t,
      var  = (1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s),  std = exp(log(max(var, 1e-20)) / 2),
    and the trained steps it spans, t_{i-1} + 1 .. t_i (t_{-1} = -1): their number and the root mean square of
    their trained posterior stds.
    """
    T = schedule.n_steps
    if sampling_steps is None or sampling_steps == T:
        return list(range(T)), schedule.step_table(device=device)
    K = sampling_steps
    if isinstance(K, bool) or not isinstance(K, int) or not 2 <= K <= T:
        raise ValueError(f"sampling_steps must be None or an int in 2..{T}, got {K!r}")
    kept = [int(i * (T - 1) / (K - 1) + 0.5) for i in range(K)]
    abar = schedule.alphas_cumprod.tolist()
    rows = []
    trained_std = schedule.posterior_std.tolist()
    for i, t in enumerate(kept):
        spanned = range(kept[i - 1] + 1 if i > 0 else 0, t + 1)
        a_t, a_s = abar[t], (abar[kept[i - 1]] if i > 0 else 1.0)
        var = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        rows.append([math.sqrt(a_t), math.sqrt(a_s) * (1 - a_t / a_s) / (1 - a_t),
                     math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t), math.exp(0.5 * math.log(max(var, 1e-20))),
                     len(spanned), math.sqrt(sum(trained_std[s] ** 2 for s in spanned) / len(spanned))])
    return kept, torch.tensor(rows, dtype=torch.float64).to(device=device, dtype=torch.float32)


def _check_noise(noise, n_steps: int, batch: int, horizon: int, transition_dim: int, action_dim: int) -> None:
    expected = {"x_T": (batch, horizon, transition_dim), "a_T": (batch, horizon, action_dim),
                "state": (n_steps, batch, horizon, transition_dim), "action": (n_steps, batch, horizon, action_dim)}
    for name, shape in expected.items():
        got = tuple(getattr(noise, name).shape)
        if got != shape:
            raise ValueError(f"noise.{name} has shape {got}, expected {shape}")


def as_distribution(out) -> Distribution:
    """The policy's output as a distribution: a Distribution as is, a (mean, std) pair as a diagonal Normal."""
    if isinstance(out, Distribution):
        return out
    if isinstance(out, (tuple, list)) and len(out) == 2:
        mean, std = out
        return Independent(Normal(mean, std.expand_as(mean)), 1)
    raise TypeError(f"policy must return a torch Distribution or (mean, std); got {type(out).__name__}")


def change_metrics(change: torch.Tensor) -> dict[str, torch.Tensor]:
    """avg/max/min/std of |posterior mean - x| at the last step."""
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
    trained_steps: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Action half of the paper's step: the policy on the guide states, then ``step_ops.action_step``.

    actions, noise [B,H,A] normalised; guide_states_raw [B,H,O]; trained_steps: the trained steps the chain
    step spans (its guidance step is taken that many times). Returns (new normalised actions [B,H,A],
    the guided raw actions before noise [B,H,A] for the state update of the ablation, or None).
    """
    if t == 0 and clip_std is None or t > 0 and guidance_type == "none":
        return actions, None  # no policy call: nothing reads it
    with torch.no_grad():
        dist = as_distribution(policy(guide_states_raw))
    if dist.mean.shape != actions.shape:
        raise ValueError(f"the policy's distribution has mean shape {list(dist.mean.shape)} for guide states "
                         f"{list(guide_states_raw.shape)}; expected the actions' shape {list(actions.shape)}")
    act = normalizer["actions"]
    return action_step(actions, dist, act.mean, act.scale, t, sigma_t, guidance_scale, clip_std, noise,
                       action_noise_scale, guidance_type, trained_steps)


def advantage_guided_prediction(
    x_recon: torch.Tensor,
    critic,
    normalizer: Normalizer,
    state_guidance: str,
    scale: float,
    gamma: float,
    sigma_t: torch.Tensor,
) -> torch.Tensor:
    """Advantage-guided diffusion on the x0 prediction x_recon [B,H,D] (normalised, first observation imposed).

    With raw s_k = unnormalize(x_recon states), raw rewards r_k and terminals d_k = [raw terminal > 0.5] (both
    detached), A_k = r_k + gamma (1 - d_k) V(s_{k+1}) - V(s_k) for k = 0..H-2 and
    log w = sum_k log sigmoid(A_k) ('sag') or sum_k A_k ('eag'); returns x_recon with its NORMALISED state columns
    moved by scale * sigma_t^4 * grad log w (autograd), the gradient's last-state row set to zero.
    """
    O = normalizer.obs_dim
    s = x_recon[..., :O].detach().clone().requires_grad_(True)
    r = normalizer.unnormalize(x_recon[..., O], "rewards").detach()
    d = (normalizer.unnormalize(x_recon[..., O + 1], "terminals") > 0.5).float()
    with torch.enable_grad():
        v = critic(normalizer.unnormalize(s, "observations"))
        adv = r[:, :-1] + gamma * (1 - d[:, :-1]) * v[:, 1:] - v[:, :-1]
        log_w = F.logsigmoid(adv).sum() if state_guidance == "sag" else adv.sum()
        (grad,) = torch.autograd.grad(log_w, s, allow_unused=True, materialize_grads=True)
    grad[:, -1] = 0.0
    shifted = x_recon.clone()
    shifted[..., :O] = s.detach() + scale * sigma_t**4 * grad
    return shifted


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
    row: int | None = None,
    critic=None,
    state_guidance: str = "none",
    state_guidance_scale: float = 3.0,
    state_guidance_gamma: float = 0.99,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One reverse step of the paper's policy-guided sampler. Returns (x_{t-1} [B,H,D], actions [B,H,A], mu - x_t).

    The denoiser predicts x0 from (x_t, sqrt(abar_t) a, t); the state half and the policy's guidance follow
    (``guided_state_update``, ``reference_action_step``); with ``update_states`` the guide states move too.
    t is the trained timestep (denoiser input, the t <= 10 clamp); the coefficients are ``step_table[row]`` (row
    None: t; a K-step chain's step index otherwise). With ``state_guidance`` ('sag'/'eag') and t >= 1, after the
    action half the prediction is advantage-guided (``advantage_guided_prediction``, sigma_t^2 the posterior
    variance of this step) and the state half re-run on it (start re-imposed, posterior mean recomputed).
    """
    row = t if row is None else row
    timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    with torch.no_grad():
        x_recon = denoiser(x, extract(step_table, "sqrt_alphas_cumprod", row) * actions, timesteps)
    obs = normalizer["observations"]
    x_next, mean, guide_raw = guided_state_update(
        x, x_recon, start_obs, t, step_table, obs.mean, obs.scale, clip_state_change, state_noise,
        states_for_guidance, row=row)
    new_actions, a_guided = reference_action_step(
        actions, guide_raw, policy, normalizer, t, extract(step_table, "spanned_posterior_std", row),
        guidance_scale, clip_std, action_noise, action_noise_scale, guidance_type,
        int(extract(step_table, "trained_steps", row)))
    if update_states and a_guided is not None:
        x_next, mean = update_guide_states(x, apply_conditioning(x_recon, start_obs), mean, a_guided, start_obs, row,
                                           step_table, policy, normalizer, guidance_scale, states_for_guidance,
                                           state_noise)
    if state_guidance != "none" and t > 0:
        shifted = advantage_guided_prediction(
            apply_conditioning(x_recon, start_obs), critic, normalizer, state_guidance, state_guidance_scale,
            state_guidance_gamma, extract(step_table, "posterior_std", row))
        x_next, mean, _ = guided_state_update(x, shifted, start_obs, t, step_table, obs.mean, obs.scale,
                                              clip_state_change, state_noise, states_for_guidance, row=row)
    return x_next, new_actions, mean - x


def update_guide_states(
    x: torch.Tensor,
    x_recon: torch.Tensor,
    mean: torch.Tensor,
    a_guided: torch.Tensor,
    start_obs: torch.Tensor,
    t: int,
    step_table: torch.Tensor,
    policy,
    normalizer: Normalizer,
    guidance_scale: float | torch.Tensor,
    states_for_guidance: str,
    state_noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ablation ``update_states``: guide states s += w * grad_s log pi(a_guided | s) (autograd, normalised s).

    x, x_recon (first obs imposed), mean [B,H,D]; a_guided [B,H,A] raw; t > 0 the step-table row. The updated states replace
    x_recon's observation columns and the posterior mean is recomputed WITHOUT the t <= 10 clamp (as the paper's
    code). Returns (x_{t-1} [B,H,D] with the first observation imposed, new posterior mean [B,H,D]).
    """
    obs_dim = start_obs.shape[-1]
    guide = (x_recon if states_for_guidance == "recon" else mean)[..., :obs_dim].detach().clone()
    guide.requires_grad_(True)
    with torch.enable_grad():
        dist = as_distribution(policy(normalizer.unnormalize(guide, "observations")))
        dist.log_prob(a_guided).sum().backward()
    x_recon = x_recon.clone()
    x_recon[..., :obs_dim] = (guide + guidance_scale * guide.grad).detach()
    x_recon = apply_conditioning(x_recon, start_obs)
    mu = extract(step_table, "posterior_mean_coef1", t) * x_recon + extract(step_table, "posterior_mean_coef2", t) * x
    return apply_conditioning(mu + extract(step_table, "posterior_std", t) * state_noise, start_obs), mu


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
    sampling_steps: int | None = None,
    critic=None,
    state_guidance: str = "none",
    state_guidance_scale: float = 3.0,
    state_guidance_gamma: float = 0.99,
    noise=None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The paper's policy-guided sampler (p_sample_loop with the policy-guided sample function).

    start_obs [B,O] normalised. Returns (x [B,H,D] normalised trajectory, actions [B,H,A] normalised,
    change metrics of the last step). Noise comes from ``noise`` or, if None, ``draw_noise(generator)``, for the K
    steps of the chain (``respaced_chain``: K = sampling_steps, None: all T). state_guidance 'sag'/'eag' needs
    ``critic`` (raw states [..., O] -> V [...]).
    """
    if guidance_type not in GUIDANCE_TYPES:
        raise ValueError(f"guidance_type must be one of {GUIDANCE_TYPES}, got {guidance_type!r}")
    if states_for_guidance not in STATES_FOR_GUIDANCE:
        raise ValueError(f"states_for_guidance must be one of {STATES_FOR_GUIDANCE}, got {states_for_guidance!r}")
    if state_guidance not in STATE_GUIDANCE_TYPES:
        raise ValueError(f"state_guidance must be one of {STATE_GUIDANCE_TYPES}, got {state_guidance!r}")
    if state_guidance != "none" and critic is None:
        raise ValueError(f"state_guidance={state_guidance!r} needs a critic (raw states [..., O] -> V [...])")
    B, O = start_obs.shape
    D, A = O + 2, normalizer.act_dim
    kept, step_table = respaced_chain(schedule, sampling_steps, device=start_obs.device)
    K = len(kept)
    if noise is None:
        noise = draw_noise(K, B, horizon, D, A, generator=generator, device=start_obs.device)
    _check_noise(noise, K, B, horizon, D, A)
    x = apply_conditioning(noise.x_T, start_obs)
    actions = noise.a_T.clone()
    for i in reversed(range(K)):
        x, actions, change = guided_step(
            denoiser, x, actions, start_obs, kept[i], step_table, policy, normalizer, guidance_scale, guidance_type,
            clip_std, clip_state_change, states_for_guidance, update_states, action_noise_scale,
            noise.state[i], noise.action[i], row=i, critic=critic, state_guidance=state_guidance,
            state_guidance_scale=state_guidance_scale, state_guidance_gamma=state_guidance_gamma)
    return x, actions, change_metrics(change)


@torch.no_grad()
def action_conditioned_sample(
    denoiser,
    schedule: NoiseSchedule,
    start_obs: torch.Tensor,
    actions: torch.Tensor,
    *,
    sampling_steps: int | None = None,
    noise=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The paper's plain ancestral sampler given actions (its default sample function; autoregressive baseline).

    start_obs [B,O] normalised, actions [B,H,A] normalised (fed as sqrt(abar_t)*a). No guidance, no clipping,
    x0 not re-conditioned before the posterior, no noise at t=0; the first observation is re-imposed after
    every step. The chain is ``respaced_chain(schedule, sampling_steps)``. Returns x [B,H,D] normalised. Uses
    ``noise.x_T`` and ``noise.state`` only.
    """
    B, H, A = actions.shape
    O = start_obs.shape[-1]
    kept, step_table = respaced_chain(schedule, sampling_steps, device=start_obs.device)
    K = len(kept)
    if noise is None:
        noise = draw_noise(K, B, H, O + 2, A, generator=generator, device=start_obs.device)
    _check_noise(noise, K, B, H, O + 2, A)
    x = apply_conditioning(noise.x_T, start_obs)
    for i in reversed(range(K)):
        timesteps = torch.full((B,), kept[i], dtype=torch.long, device=x.device)
        x0 = denoiser(x, extract(step_table, "sqrt_alphas_cumprod", i) * actions, timesteps)
        mu = extract(step_table, "posterior_mean_coef1", i) * x0 + extract(step_table, "posterior_mean_coef2", i) * x
        x = apply_conditioning(mu if i == 0 else mu + extract(step_table, "posterior_std", i) * noise.state[i],
                               start_obs)
    return x
