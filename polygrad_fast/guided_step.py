"""One guided reverse step of PolyGRAD's sampler, the one definition every fast loop runs.

Step t (the paper's policy-guided sampling algorithm): the denoiser predicts x0 from (x_t, sqrt(abar_t) a_t, t);
the state half moves x_t to the posterior mean mu (its change clamped for t <= 10) plus sigma_t noise; the policy
is evaluated on the guide states (x0 or mu); the action half takes one guidance step a += w (mu_pi - a) / sigma_pi^2
(the gradient of log pi(a|s) for a diagonal Normal policy) plus noise; with advantage guidance
(``SamplerConfig.state_guidance``) the x0 prediction's states are then shifted by c sigma_t^4 grad_s log w
(``polygrad_fast.state_guidance``) and the state half re-run on the shifted prediction. ``GuidedStep`` holds the callables, the
normaliser, the config and the two row-level ops (``StepOps``: torch's ``polygrad_fast.step_ops`` or the fused
kernels); ``FastGuidedSampler``'s loop (eager or compiled) and the CUDA-graph loop (``gpu_sampling``) both call it.

Shapes: B batch, H horizon, O obs dim, D = O + 2, A action dim, T diffusion steps.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .denoisers import Denoiser
from .normalizer import Normalizer
from .policy import policy_distribution
from .state_guidance import advantage_log_weight_grad
from .step_ops import (CLIP_STATE_CHANGE_MAX_T, COEF1, COEF2, SIGMA, SQRT_ABAR, TRAINED_STEPS, action_update_at,
                       impose_start_obs, state_update_at)


class StepOps(NamedTuple):
    """The two row-level ops of a step, with the signatures of ``step_ops.state_update_at`` and
    ``step_ops.action_update_at``; a backend swaps them as a pair (the fused kernels also take ``seed``, ``step``)."""

    state_update: Callable
    action_update: Callable


TORCH_OPS = StepOps(state_update_at, action_update_at)


def triton_ops() -> StepOps:
    """The fused Triton kernels' row-level ops (imports ``polygrad_fast.kernels``, which decorates them)."""
    from . import kernels

    return StepOps(kernels.state_update_at, kernels.action_update_at)


def check_policy_output(mean, std, states: torch.Tensor, act_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of a policy on ``states`` [..., O], checked to be floating tensors on the states' device with
    mean [..., A] and std broadcastable to it (Python checks only: no host sync). Raises TypeError/ValueError
    saying what was expected and what was given."""
    for name, v in (("mean", mean), ("std", std)):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            got = f"a {v.dtype} tensor" if isinstance(v, torch.Tensor) else type(v).__name__
            raise TypeError(f"the policy's {name} must be a floating-point torch.Tensor, got {got}")
        if v.device != states.device:
            raise ValueError(f"the policy's {name} is on {v.device} but the states are on {states.device}")
    want = states.shape[:-1] + (act_dim,)
    broadcasts = std.dim() <= len(want) and all(s in (1, w) for s, w in zip(reversed(std.shape), reversed(want)))
    if mean.shape != want or not broadcasts:
        raise ValueError(f"the policy returned mean {list(mean.shape)} and std {list(std.shape)} for states "
                         f"{list(states.shape)}; expected mean {list(want)} (action dim {act_dim}) and a std "
                         "broadcastable to it")
    return mean, std


def change_metrics(change: torch.Tensor) -> dict[str, torch.Tensor]:
    """avg/max/min/std of |posterior mean - x| at the last step, 0-dim device tensors."""
    c = change.abs()
    return {"avg_change": c.mean(), "max_change": c.max(), "min_change": c.min(), "std_change": c.std()}


class GuidedStep:
    """One reverse step: ``step(x, a, step_input, start, coef, g, clip, state_noise, action_noise, last, std_min)``.

    denoiser: ``denoiser(x [B,H,D], a [B,H,A], step_input)`` -> x0 [B,H,D]; a polygrad_fast ``Denoiser`` runs
    ``forward_embedded`` on its precomputed time-embedding row, anything else gets the step vector t [B]
    (``step_inputs``). policy: raw guide states [B,H,O] -> fp32 (mean, std) over raw actions. grad_policy: the
    live policy, differentiated for the ``update_states`` ablation. critic: raw states [..., O] -> V [...], the
    value function of advantage guidance (``config.state_guidance`` 'sag'/'eag'). config: a ``SamplerConfig``.
    """

    def __init__(self, denoiser: Callable, policy: Callable, normalizer: Normalizer, config, ops: StepOps = TORCH_OPS,
                 grad_policy: Callable | None = None, critic: Callable | None = None):
        self.denoiser, self.policy, self.normalizer, self.config, self.ops = denoiser, policy, normalizer, config, ops
        self.grad_policy, self.critic = grad_policy, critic
        self.embeds_time = isinstance(denoiser, Denoiser)
        self.denoise = denoiser.forward_embedded if self.embeds_time else denoiser  # (x, a, step_input) -> x0
        self.act_dim = normalizer.act_dim

    def step_inputs(self, timesteps: int | torch.Tensor, batch: int, device: torch.device) -> list[torch.Tensor]:
        """What the denoiser gets at each chain step i (list index i): time_embedding(t_i) [1, E], or t_i [B].

        timesteps: the chain's trained timesteps t_i [K] (``NoiseSchedule.respaced``), or T for all of 0..T-1.
        """
        steps = (torch.arange(timesteps) if isinstance(timesteps, int) else timesteps).to(device)
        if self.embeds_time:
            return list(self.denoiser.time_embedding(steps)[:, None].unbind(0))
        return list(steps[:, None].expand(len(steps), batch).contiguous().unbind(0))

    def clip_state_changes(self, timesteps: torch.Tensor, step_table: torch.Tensor) -> list[float | None]:
        """The state-change clamp of each chain step i (list index i): the config's value times the number of
        trained steps t <= 10 among the ones step i spans (t_i - n_i + 1 .. t_i, n_i = its "trained_steps"
        column), None where there are none. timesteps [K] the chain's trained timesteps; step_table [K, 6].

        The clamp guards the low-noise end of the schedule (small sigma_t, where one denoiser error would jump a
        state), a property of abar_t, so it follows the trained timesteps: on the trained chain it applies at
        t <= 10 with the config's value; a respaced step spanning k of those trained steps may move as far as
        they could together, k times the value (K = 16 of T = 128: 2.0 at t = 8, 0.5 at t = 17, 0.25 at t = 0).
        """
        c = self.config.clip_state_change
        spans = step_table[:, TRAINED_STEPS].tolist()
        clamps = []
        for t, n in zip(timesteps.tolist(), spans):
            k = min(t, CLIP_STATE_CHANGE_MAX_T) - (t - int(n))
            clamps.append(None if c is None or k <= 0 else c * k)
        return clamps

    def __call__(self, x, a, step_input, start, coef, g, clip_state_change, state_noise, action_noise, last: bool,
                 std_min, seed=None, step: int | None = None):
        """x [B,H,D], a [B,H,A] at step t; start [B,O] normalised; coef = step_table[t] [6]; g the guidance scale
        (0-dim tensor); clip_state_change the chain step's ``clip_state_changes(...)`` entry; state/action noise
        [B,H,D]/[B,H,A] (state None at t = 0), or None with ``seed`` and ``step`` for the kernels' in-kernel noise;
        last = (t == 0);
        std_min: 0-dim fp32 tensor, the running minimum of the policy's std (NaN propagates), checked by the caller
        after the loop (one reduction per step, no host sync).

        Returns (x_{t-1} [B,H,D], a_{t-1} [B,H,A], mu - x_t at the last step else None, std_min).
        """
        c = self.config
        # the normaliser's statistics are read at every call: an in-place refit is followed (also by a CUDA graph)
        obs, act = self.normalizer["observations"], self.normalizer["actions"]
        kernel_noise = {} if seed is None else {"seed": seed, "step": step}
        x0 = self.denoise(x, coef[SQRT_ABAR] * a, step_input)
        x_next, mean, guide = self.ops.state_update(x, x0, start, coef, obs.mean, obs.scale, clip_state_change,
                                                    state_noise, c.states_for_guidance, **kernel_noise)
        change = mean - x if last else None
        if last and c.clip_std is None or not last and c.guidance_type == "none":
            a_next = a  # the action update is the identity: skip the policy forward
        else:
            p_mean, p_std = check_policy_output(*self.policy(guide), guide, self.act_dim)
            std_min = torch.minimum(std_min, p_std.amin())
            a_next = self.ops.action_update(a, p_mean, p_std, act.mean, act.scale, coef, g, c.clip_std, action_noise,
                                            c.action_noise_scale, c.guidance_type, last, **kernel_noise)
        if c.update_states and not last:  # (guidance_type 'grad' only, so a_next is the guided one)
            # the guided raw action before its noise (the same update with the noise scaled by 0), at which the
            # ablation differentiates log pi
            a_guided = self.normalizer.unnormalize(self.ops.action_update(
                a, p_mean, p_std, act.mean, act.scale, coef, g, c.clip_std, action_noise, 0.0, c.guidance_type, last),
                "actions")
            x_next = self._update_guide_states(x, impose_start_obs(x0, start), mean, a_guided, start, coef, g,
                                               state_noise)
        if c.state_guidance != "none" and not last:
            x_next = self._advantage_guided_states(x, x0, start, coef, clip_state_change, state_noise, kernel_noise)
        return x_next, a_next, change, std_min

    def _advantage_guided_states(self, x, x0, start, coef, clip_state_change, state_noise, kernel_noise):
        """Advantage guidance: x0's states += c sigma_t^4 grad_s log w (normalised s; sigma_t^2 the posterior variance
        of this step), then the state half again on the shifted prediction: the start state re-imposed, the posterior
        mean recomputed (with the t <= 10 clamp, which guards the low-noise steps against jumps from any source),
        the same noise. x, x0 [B,H,D]. Returns x_{t-1} [B,H,D]."""
        c, obs = self.config, self.normalizer["observations"]
        x0 = impose_start_obs(x0, start)
        grad = advantage_log_weight_grad(x0, self.critic, self.normalizer, c.state_guidance, c.state_guidance_gamma)
        shifted = torch.cat([x0[..., : start.shape[-1]] + c.state_guidance_scale * coef[SIGMA] ** 4 * grad,
                             x0[..., start.shape[-1]:]], dim=-1)
        x_next, _, _ = self.ops.state_update(x, shifted, start, coef, obs.mean, obs.scale, clip_state_change,
                                             state_noise, c.states_for_guidance, **kernel_noise)
        return x_next

    def _update_guide_states(self, x, x_recon, mean, a_guided, start, coef, g, state_noise) -> torch.Tensor:
        """The ``update_states`` ablation: guide states s += w grad_s log pi(a_guided | s) (autograd on the live
        policy, normalised s) replace x_recon's observation columns; the posterior mean is recomputed without the
        t <= 10 clamp (as the paper's code). x, x_recon, mean [B,H,D]; a_guided [B,H,A] raw. Returns x_{t-1}."""
        obs_dim = start.shape[-1]
        guide = (x_recon if self.config.states_for_guidance == "recon" else mean)[..., :obs_dim].detach().clone()
        guide.requires_grad_(True)
        with torch.enable_grad():
            dist = policy_distribution(self.grad_policy(self.normalizer.unnormalize(guide, "observations")))
            dist.log_prob(a_guided).sum().backward()
        x_recon = x_recon.clone()
        x_recon[..., :obs_dim] = (guide + g * guide.grad).detach()
        x_recon = impose_start_obs(x_recon, start)
        return impose_start_obs(coef[COEF1] * x_recon + coef[COEF2] * x + coef[SIGMA] * state_noise, start)
