"""``FastGuidedSampler``: PolyGRAD's policy-guided trajectory sampler, fast, with the reference one switch away.

One reverse step t is ``guided_step.GuidedStep``: denoiser forward -> state update -> policy forward on the guide
states -> action update with closed-form guidance a += w (mu_pi - a) / sigma_pi^2. The two elementwise updates are
the step's ``StepOps`` (torch's ``polygrad_fast.step_ops``, or the fused Triton kernels on CUDA); the
paper-style sampler (``polygrad_fast.reference``) is ``backend="reference"``.

The loop is written to be CUDA-graph capturable: buffers are preallocated per batch size, all noise is drawn
in one draw before the loop, the guidance scale is a device tensor, and control flow depends only on the
Python step index t, never on tensor values.

Shapes: B batch, H horizon, O obs dim, D = O + 2, A action dim, T diffusion steps.
"""
from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import torch
from torch import nn

from . import cpu_actor, cpu_layer_norm, cpu_packed, cpu_residual_mlp
from .backend import ExecutionOptions, check_fields, resolve_dtype, select_backend
from .denoisers import Denoiser, ResidualMLPDenoiser, low_precision_copy
from .guided_step import TORCH_OPS, GuidedStep, change_metrics, check_policy_output, triton_ops
from .noise import SamplerNoise, fill_standard_normal
from .normalizer import Normalizer
from .policy import policy_mean_std, standardized_action_moments
from .reference.guided_sampling import guided_sample
from .schedule import NoiseSchedule
from .state_guidance import StateGuidance
from .step_ops import GuidanceType, StatesForGuidance

RECOMPILE_LIMIT = 64  # compiled entries of the step function before dynamo falls back to eager


@dataclass(frozen=True)
class SamplerConfig:
    """The guided sampler's algorithm: the paper's options, with its config keys' names and defaults.

    guidance_type: 'grad' (a += w * grad_a log pi(a|s), the paper's policy guidance), 'sample' (actions drawn
    from the policy), 'none'. guidance_scale: w, the initial value (kept as a device tensor; see
    ``GuidanceScaleTuner``). clip_std: clamp the actions to the policy's mean +- clip_std * std (None disables).
    clip_state_change: clamp |posterior mean - x| in the last reverse steps t <= 10 (None disables).
    states_for_guidance: the policy sees the x0 prediction ('recon') or the posterior mean ('posterior_mean').
    update_states: ablation, also move the guide states along grad_s log pi (autograd; 'grad' only).
    action_noise_scale: multiplies the noise added to the actions at each reverse step.
    sampling_steps: None runs all T trained steps; K in 2..T runs the K-step chain on the evenly strided trained
    timesteps (``NoiseSchedule.respaced``: posterior coefficients recomputed for the longer steps, the denoiser
    given the trained t). A step spanning n trained steps guides as those n would: the guidance step (w per
    trained step, so one tuned w serves every K) compounded n times with the action noise they would have added
    between them, and the state clamp of the spanned t <= 10 added up (docs/algorithm.md, "Few-step sampling").
    state_guidance: advantage-guided diffusion after the action update of every step t >= 1: 'none', 'sag'
    (w = prod_k sigmoid(A_k)) or 'eag' (w = exp(sum_k A_k)), A_k = r_k + gamma (1 - d_k) V(s_{k+1}) - V(s_k) on
    the x0 prediction with the sampler's ``critic``; x0's states move by state_guidance_scale * sigma_t^4 *
    grad_s log w (``polygrad_fast.state_guidance``); state_guidance_gamma is gamma. Runs the step eagerly (as
    ``update_states`` does: autograd through the critic), not compiled and not as a CUDA graph.
    How it runs (dtypes, compile, backend, CPU kernels) is ``backend.ExecutionOptions``.
    """

    guidance_type: GuidanceType = "grad"
    guidance_scale: float = 0.005
    clip_std: float | None = 3.0
    clip_state_change: float | None = 0.25
    states_for_guidance: StatesForGuidance = "recon"
    update_states: bool = False
    action_noise_scale: float = 1.0
    # w is per trained step: at K < T each step compounds the n trained steps it spans (step_ops.action_update_at).
    # Measured (HalfCheetah eval-wm model, T = 128, tau = 0.1, H = 10, B = 256, random actor std 1, w = 0.005):
    # act_std 0.535 at K = 128, 0.535 at K = 32 and 0.547 at K = 8 (with w applied once per step: 0.756 and 0.741).
    sampling_steps: int | None = None
    state_guidance: StateGuidance = "none"
    state_guidance_scale: float = 3.0
    state_guidance_gamma: float = 0.99

    def __post_init__(self) -> None:
        check_fields(self)
        k = self.sampling_steps
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 2):
            raise ValueError("SamplerConfig.sampling_steps must be None (all trained steps) or an int in 2..T (at "
                             f"least 2: the final step t = 0 is never guided), got {k!r}")
        for name in ("clip_std", "clip_state_change"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"SamplerConfig.{name} must be None or a positive number, got {v!r}")
        for name in ("guidance_scale", "action_noise_scale", "state_guidance_scale"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"SamplerConfig.{name} must be a number >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.state_guidance_gamma <= 1:
            raise ValueError(f"SamplerConfig.state_guidance_gamma must be in [0, 1], got {self.state_guidance_gamma!r}")
        if self.update_states and self.state_guidance != "none":
            raise ValueError("SamplerConfig.update_states=True and state_guidance="
                             f"{self.state_guidance!r} both move the guide states; choose one")
        if self.update_states and self.guidance_type != "grad":
            raise ValueError("SamplerConfig.update_states=True needs guidance_type='grad' (the paper applies it "
                             f"only there), got guidance_type={self.guidance_type!r}")


@dataclass
class ImaginedBatch:
    """Imagined trajectories: raw fields (what the actor-critic update consumes) and their normalised twins.

    observations [B,H,O], actions [B,H,A], rewards [B,H] raw; terminals [B,H] float 0/1 (raw terminal > 0.5);
    *_normalized: the sampler's own (normalised) values; metrics: 0-dim device tensors (act_std, act_mean,
    avg/max/min/std_change, terminal_avg) and sampling_time (seconds, float).
    """

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    terminals: torch.Tensor
    observations_normalized: torch.Tensor
    actions_normalized: torch.Tensor
    rewards_normalized: torch.Tensor
    terminals_normalized: torch.Tensor
    metrics: dict = field(default_factory=dict)


class _PolicyCall(nn.Module):
    """Calls a policy, or its low-precision copy in ``dtype``, on fp32 raw states; returns (mean, std) as fp32
    (floating outputs only: anything else is left for ``check_policy_output`` to reject)."""

    def __init__(self, policy: Callable, dtype: torch.dtype | None = None):
        super().__init__()
        self.policy, self.dtype = policy, dtype

    def forward(self, states: torch.Tensor):
        mean, std = policy_mean_std(self.policy(states if self.dtype is None else states.to(self.dtype)))
        return tuple(v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in (mean, std))


def _inference_copy(module: nn.Module) -> nn.Module:
    """A deep copy for inference only (eval mode, no gradients), refreshed from its source by ``_copy_weights``."""
    return copy.deepcopy(module).eval().requires_grad_(False)


def _copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """In-place refresh of a (cast) deep copy from its source, matching state-dict tensors by name (the copy's
    non-persistent buffers, e.g. ``PackedLinear.slot``, are its own)."""
    src_tensors = src.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, d in dst.state_dict(keep_vars=True).items():
            d.copy_(src_tensors[name])


def _split_options(config: SamplerConfig | None, execution: ExecutionOptions | None,
                   options: dict) -> tuple[SamplerConfig, ExecutionOptions]:
    """(config, execution) with each keyword option applied to the dataclass that has a field of its name."""
    names = {cls: {f.name for f in fields(cls)} for cls in (SamplerConfig, ExecutionOptions)}
    unknown = sorted(set(options) - names[SamplerConfig] - names[ExecutionOptions])
    if unknown:
        raise TypeError(f"unknown sampler option(s) {unknown}; known: SamplerConfig {sorted(names[SamplerConfig])}, "
                        f"ExecutionOptions {sorted(names[ExecutionOptions])}")
    for given, cls in ((config, SamplerConfig), (execution, ExecutionOptions)):
        if given is not None and not isinstance(given, cls):
            raise TypeError(f"expected a {cls.__name__} or None, got {type(given).__name__}")
    return tuple(replace(given or cls(), **{k: v for k, v in options.items() if k in names[cls]})
                 for given, cls in ((config, SamplerConfig), (execution, ExecutionOptions)))


class FastGuidedSampler:
    """Policy-guided sampling of imagined trajectories from a start-observation batch.

    ``denoiser(x [B,H,D], actions [B,H,A], t [B]) -> x0 [B,H,D]`` (x0 prediction, normalised space);
    ``policy(raw_states [...,O])`` returns (mean, std), a Normal or an Independent(Normal) over RAW actions
    (closed-form guidance assumes exactly that; the repository's ``Actor`` qualifies). Options: the algorithm
    (``SamplerConfig``, ``config=``) and how it runs (``ExecutionOptions``, ``execution=``); a keyword option
    naming a field of either replaces that field. ``critic(raw_states [..., O]) -> V [...]``: the value function of
    advantage guidance (``SamplerConfig.state_guidance``), required for 'sag'/'eag' and read live at every call
    (pass the agent's online critic); ignored otherwise.
    """

    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule, policy: Callable, normalizer: Normalizer,
                 config: SamplerConfig | None = None, execution: ExecutionOptions | None = None, *,
                 critic: Callable | None = None, **options):
        self.config, self.execution = cfg, ex = _split_options(config, execution, options)
        for name, value, kind in (("denoiser", denoiser, nn.Module), ("schedule", schedule, NoiseSchedule),
                                  ("normalizer", normalizer, Normalizer)):
            if not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
        if not callable(policy):
            raise TypeError(f"policy must be callable (raw states -> (mean, std) or a Normal), "
                            f"got {type(policy).__name__}")
        params = list(denoiser.parameters())
        self.device = params[0].device if params else normalizer.device
        if normalizer.device != self.device:
            raise ValueError(f"normalizer is on {normalizer.device} but the denoiser on {self.device}")
        self.denoiser, self.schedule, self.policy, self.normalizer = denoiser, schedule, policy, normalizer
        self.obs_dim, self.act_dim = normalizer.obs_dim, normalizer.act_dim
        self.transition_dim = self.obs_dim + 2
        for attr, want in (("transition_dim", self.transition_dim), ("action_dim", self.act_dim)):
            got = getattr(denoiser, attr, want)
            if got != want:
                raise ValueError(f"denoiser.{attr} = {got} but the normaliser implies {want}")
        for attr, want in (("obs_dim", self.obs_dim), ("act_dim", self.act_dim)):
            got = getattr(policy, attr, want)
            if got != want:
                raise ValueError(f"policy.{attr} = {got} but the normaliser implies {want}")
        policy_params = list(policy.parameters()) if isinstance(policy, nn.Module) else []
        if policy_params and policy_params[0].device != self.device:
            raise ValueError(f"policy is on {policy_params[0].device} but the denoiser on {self.device}")
        self.critic = _check_critic(critic, cfg.state_guidance, self.obs_dim, self.device)
        self.backend = select_backend(self.device, ex.backend)
        self.guidance_scale = torch.tensor(float(cfg.guidance_scale), device=self.device)
        self._lock = threading.Lock()  # see sample(): one call at a time
        if cfg.sampling_steps is not None and cfg.sampling_steps > schedule.n_steps:
            raise ValueError(f"SamplerConfig.sampling_steps = {cfg.sampling_steps} but the schedule has T = "
                             f"{schedule.n_steps} trained steps; expected None or an int in 2..{schedule.n_steps}")
        # the chain: K trained timesteps t_i and the step table [K, 6] of the respaced posterior (K = T: unchanged)
        self.n_chain_steps = cfg.sampling_steps or schedule.n_steps
        self.timesteps, self.step_table = schedule.respaced(self.n_chain_steps, device=self.device)
        if self.backend != "reference":
            self._setup_fast()

    # ---------------------------------------------------------------- fast-path setup
    def _setup_fast(self) -> None:
        cfg, ex = self.config, self.execution
        self.denoiser_dtype = resolve_dtype(ex.denoiser_dtype, self.device)
        if self.denoiser_dtype != torch.float32 and not isinstance(self.denoiser, Denoiser):
            if ex.denoiser_dtype != "auto":
                raise TypeError(f"denoiser_dtype={ex.denoiser_dtype!r} needs a polygrad_fast Denoiser "
                                f"(low_precision_copy); got {type(self.denoiser).__name__}")
            self.denoiser_dtype = torch.float32  # a foreign module runs as given
        cpu = self.device.type == "cpu"
        compiled = ex.compile and self.backend == "torch" and not cfg.update_states and cfg.state_guidance == "none"
        fuse = ex.cpu_fuse_norm_act and cpu and cpu_layer_norm.available()
        self.policy_dtype = (self.denoiser_dtype if ex.policy_dtype == "auto"
                             else resolve_dtype(ex.policy_dtype, self.device))
        if not isinstance(self.policy, nn.Module):
            self.policy_dtype = torch.float32
        # Our own inference copies (the user's modules are never changed): always in low precision; in fp32 on CPU
        # too, for the kernels below (prepacked fp32 GEMMs with bias and residual in the epilogue instead of MKL
        # addmm's broadcast-bias copy and a separate add, fused LayerNorm + activation): together 1.34x (B=256) /
        # 1.38x (B=1024) faster fp32 steps on AVX2 Zen 3 (docs/cpu_paths.md). An fp32 copy that none of them
        # changed is dropped again below.
        fp32_cpu = cpu and self.denoiser_dtype == torch.float32
        self._denoiser_fast = (
            low_precision_copy(self.denoiser, self.denoiser_dtype) if self.denoiser_dtype != torch.float32
            else _inference_copy(self.denoiser) if (fp32_cpu and isinstance(self.denoiser, Denoiser)
                                                    and (ex.cpu_prepack or (fuse and not compiled)))
            else self.denoiser)
        self._policy_copy = (_inference_copy(self.policy).to(self.policy_dtype) if isinstance(self.policy, nn.Module)
                             and (self.policy_dtype != torch.float32 or fuse) else None)
        denoiser_copy = self._denoiser_fast is not self.denoiser
        # The bf16 MLP denoiser copy's residual trunk in one native pass, AMX or AVX-512 BF16 (its Linears then stay
        # unpacked).
        self._fused_trunk = None
        if (ex.cpu_fuse_trunk and denoiser_copy and self.denoiser_dtype == torch.bfloat16
                and isinstance(self._denoiser_fast, ResidualMLPDenoiser)
                and cpu_residual_mlp.fused_trunk_pays_off(self._denoiser_fast.trunk)):
            self._fused_trunk = cpu_residual_mlp.FusedResidualMLP.from_trunk(self._denoiser_fast.trunk)
            self._denoiser_fast.trunk = self._fused_trunk
        self._packed = []  # copies whose Linears run prepacked (cpu_packed)
        # The denoiser copy only: packing the policy's 256x256 Linear too (B·H rows) made sample() 2-3% slower at
        # B=1024 in an interleaved run (neutral at B=256) while the denoiser alone was 4% faster.
        if (ex.cpu_prepack and cpu and denoiser_copy and cpu_packed.available(self.denoiser_dtype)
                and cpu_packed.prepack_linears(self._denoiser_fast, batch_hint=256,
                                               skip=() if self._fused_trunk is None else (self._fused_trunk,))):
            self._packed.append(self._denoiser_fast)
        fused_denoiser = fused_policy = 0
        if fuse:
            # Hopper B=256, sample() min of 5-8 interleaved rounds (s): compiled: nothing fused 0.575, policy 0.547,
            # policy + denoiser 0.551, denoiser 0.596 (in a compiled graph the op's dispatch cost and the lost
            # fusion of the residual add outweigh the faster 256x1024 kernel); eager: nothing 0.811, policy 0.695,
            # both 0.627.
            if denoiser_copy and not compiled:
                fused_denoiser = cpu_layer_norm.fuse_layer_norm_acts(self._denoiser_fast)
            if self._policy_copy is not None:
                fused_policy = cpu_layer_norm.fuse_layer_norm_acts(self._policy_copy)
        if self.denoiser_dtype == torch.float32 and not (self._packed or fused_denoiser):
            self._denoiser_fast = self.denoiser
        if self.policy_dtype == torch.float32 and not fused_policy:
            self._policy_copy = None
        # an fp32 copy takes the fp32 states as they are (no per-step cast)
        self._policy_fast = (_PolicyCall(self.policy) if self._policy_copy is None else _PolicyCall(
            self._policy_copy, None if self.policy_dtype == torch.float32 else self.policy_dtype))
        # The Actor copy's mean in one native pass: AMX for the bf16 copy, AVX-512 / AVX2 FMA for the fp32 one.
        self._fused_actor = None
        if (ex.cpu_fuse_actor and self._policy_copy is not None
                and cpu_actor.fused_actor_pays_off(self._policy_copy)):
            self._fused_actor = self._policy_fast = cpu_actor.FusedActor(self._policy_copy)
        self.guided_step = GuidedStep(self._denoiser_fast, self._policy_fast, self.normalizer, cfg,
                                      triton_ops() if self.backend == "triton" else TORCH_OPS, grad_policy=self.policy,
                                      critic=self.critic)
        self._step = self.guided_step
        self._clamps = self.guided_step.clip_state_changes(self.timesteps, self.step_table)
        if compiled:
            # One graph for the whole step (denoiser, state op, policy, action op): t enters as tensors and Python
            # switches, so the T steps share 3 graphs (clip off, clip on, last) instead of one per t (a respaced
            # chain adds one per distinct clamp value: 6 at K = 8 of T = 16) (measured
            # faster than the denoiser and the rest compiled as two graphs). The compiled entries of the step are
            # shared by all samplers (same options and structure: same graphs, no recompile); each other option
            # set adds its 3 graphs, so dynamo's default limit of 8 would send a third differently configured
            # sampler to eager mode.
            self._step = torch.compile(self.guided_step.__call__, recompile_limit=RECOMPILE_LIMIT)
        self._rows = list(self.step_table.unbind(0))  # coef rows [6], views made once
        self._buffers: dict | None = None
        # backend 'triton': calls without explicit noise replay the whole loop as a CUDA graph
        self._graph_runner = None
        if self.backend == "triton":
            from .gpu_sampling import graph_runner_for
            self._graph_runner = graph_runner_for(self.guided_step, self.step_table, self._sample_loop, self.timesteps)

    def _get_buffers(self, batch: int, horizon: int) -> dict:
        """Preallocated per-call tensors, kept for the last (batch, horizon)."""
        if self._buffers is None or self._buffers["key"] != (batch, horizon):
            T, D, A, dev = self.n_chain_steps, self.transition_dim, self.act_dim, self.device
            self._buffers = {
                "key": (batch, horizon),
                "noise": torch.empty(T + 1, batch, horizon, D + A, device=dev),
                "x": torch.empty(batch, horizon, D, device=dev),
                "a": torch.empty(batch, horizon, self.act_dim, device=dev),
            }
        return self._buffers

    # ---------------------------------------------------------------- public API
    def set_guidance_scale(self, value: float | torch.Tensor) -> None:
        """Copy a new scale w >= 0 into the device tensor. A Python number is checked here; a one-element tensor
        is copied without a host sync and checked by the next ``sample()`` call (with its other checks)."""
        self.guidance_scale.copy_(_guidance_scale_tensor(value, self.device))

    def sample(self, start_obs: torch.Tensor, *, normalized: bool = False, horizon: int | None = None,
               generator: torch.Generator | None = None, noise: SamplerNoise | None = None,
               guidance_scale: torch.Tensor | float | None = None) -> ImaginedBatch:
        """Imagine trajectories from start_obs [B,O] (RAW observations unless ``normalized=True``).

        horizon defaults to (and must equal) ``denoiser.horizon``; noise (``SamplerNoise``) overrides the
        generator-drawn noise (tests); guidance_scale (w >= 0, finite) overrides ``self.guidance_scale`` for this
        call. The input checks cost one host sync before the loop (start_obs finite, w finite and >= 0), none
        inside it; a policy that returns a std <= 0 or NaN, or a non-finite mean, raises ValueError after the
        loop. The fast path keeps all noise of a call in one buffer [K+1, B, H, D+A] fp32 (K the chain's steps:
        84 MB at the paper's B=1024, K=T=128).

        Threads: calls are serialised by a lock (the fast path reuses preallocated buffers), so a sampler shared
        by several threads gives every call the result it would give alone; for parallel sampling build one
        sampler per thread.
        """
        with self._lock:
            horizon = self._check_inputs(start_obs, horizon, noise)
            g = self.guidance_scale if guidance_scale is None else _guidance_scale_tensor(guidance_scale,
                                                                                          self.device)
            if not bool(torch.isfinite(start_obs).all() & torch.isfinite(g) & (g >= 0)):  # the one host sync
                if not bool(torch.isfinite(start_obs).all()):
                    raise ValueError("start_obs contains NaN or inf")
                raise ValueError(f"guidance_scale must be a finite number >= 0, got {float(g)}")
            start = start_obs if normalized else self.normalizer.normalize(start_obs, "observations")
            t0 = time.perf_counter()
            if self.backend == "reference":
                x, a, metrics = self._sample_reference(start, horizon, g, generator, noise)
                std_min = None
            else:
                x, a, metrics, std_min = self._sample_fast(start, horizon, g, generator, noise)
            return self._finish(x, a, metrics, t0, std_min)

    __call__ = sample

    # ---------------------------------------------------------------- internals
    def _check_inputs(self, start_obs, horizon, noise) -> int:
        if not isinstance(start_obs, torch.Tensor):
            raise TypeError(f"start_obs must be a torch.Tensor, got {type(start_obs).__name__}")
        if start_obs.dim() != 2 or start_obs.shape[1] != self.obs_dim:
            raise ValueError(f"start_obs: expected [B, {self.obs_dim}] (B start observations), "
                             f"got {list(start_obs.shape)}")
        if start_obs.shape[0] == 0:
            raise ValueError("start_obs has batch size 0: nothing to sample")
        if start_obs.device != self.device:
            raise ValueError(f"start_obs is on {start_obs.device} but the sampler (denoiser) on {self.device}")
        if start_obs.dtype != torch.float32:
            raise TypeError(f"start_obs must be float32, got {start_obs.dtype}")
        model_h = getattr(self.denoiser, "horizon", None)
        if horizon is None:
            if model_h is None:
                raise ValueError("horizon is required: the denoiser has no .horizon attribute")
            horizon = model_h
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be a positive int, got {horizon!r}")
        if model_h is not None and horizon != model_h:
            raise ValueError(f"horizon {horizon} != denoiser.horizon {model_h} (the denoiser is built for one H)")
        if noise is not None:
            if not isinstance(noise, SamplerNoise):
                raise TypeError(f"noise must be a SamplerNoise, got {type(noise).__name__}")
            noise.check(self.n_chain_steps, start_obs.shape[0], horizon, self.transition_dim, self.act_dim,
                        self.device)
        return horizon

    def _sample_reference(self, start, horizon, g, generator, noise):
        c = self.config
        if noise is None:  # the fast path's noise for the same generator, drawn natively
            noise = SamplerNoise.draw(self.n_chain_steps, start.shape[0], horizon, self.transition_dim,
                                      self.act_dim, generator=generator, device=self.device)
        return guided_sample(
            self.denoiser, self.schedule, self.policy, self.normalizer, start, horizon=horizon,
            guidance_type=c.guidance_type, guidance_scale=g, clip_std=c.clip_std,
            clip_state_change=c.clip_state_change, states_for_guidance=c.states_for_guidance,
            update_states=c.update_states, action_noise_scale=c.action_noise_scale, sampling_steps=c.sampling_steps,
            critic=self.critic, state_guidance=c.state_guidance, state_guidance_scale=c.state_guidance_scale,
            state_guidance_gamma=c.state_guidance_gamma, noise=noise)

    def _sync(self) -> None:
        if not self.execution.sync_weights:
            return
        if self._denoiser_fast is not self.denoiser:
            _copy_weights(self._denoiser_fast, self.denoiser)
        if self._policy_copy is not None:
            _copy_weights(self._policy_copy, self.policy)
        for fused in (self._fused_actor, self._fused_trunk):
            if fused is not None:
                fused.refresh()
        for module in self._packed:
            cpu_packed.refresh(module)

    def _sample_fast(self, start, horizon, g, generator, noise):
        """(x [B,H,D], a [B,H,A], change metrics, the policy's smallest std []): the CUDA graph or the eager loop."""
        self._sync()
        if noise is None and self._graph_runner is not None and self._graph_runner.enabled:
            return self._graph_runner.sample(start, horizon, g, generator)
        return self._sample_loop(start, horizon, g, generator, noise)

    def _sample_loop(self, start, horizon, g, generator, noise):
        """The K reverse steps, one ``GuidedStep`` call each (compiled when ``execution.compile``): chain step i
        reads step-table row i and the noise of step i, the denoiser and the clamp see the trained timestep t_i."""
        c, B, step = self.config, start.shape[0], self.guided_step
        buf = self._get_buffers(B, horizon)
        # update_states and state guidance need autograd on the states, which inference tensors do not allow.
        grad_mode = torch.no_grad() if c.update_states or c.state_guidance != "none" else torch.inference_mode()
        with grad_mode:
            if noise is None:
                fill_standard_normal(buf["noise"], generator)
                noise = SamplerNoise.from_buffer(buf["noise"], self.transition_dim)
            x, a = buf["x"], buf["a"]
            x.copy_(noise.x_T)
            x[:, 0, : self.obs_dim] = start
            a.copy_(noise.a_T)
            step_inputs = step.step_inputs(self.timesteps, B, self.device)
            change, std_min = None, torch.full((), math.inf, device=self.device)
            for i in reversed(range(self.n_chain_steps)):  # rebinding, not copying back: 2 fewer passes per step
                x, a, change, std_min = self._step(x, a, step_inputs[i], start, self._rows[i], g,
                                                   self._clamps[i],
                                                   None if i == 0 else noise.state[i], noise.action[i], i == 0,
                                                   std_min)
            # a step may return its input (an identity action update): never hand out the reused buffers
            return ((x.clone() if x is buf["x"] else x), (a.clone() if a is buf["a"] else a), change_metrics(change),
                    std_min)

    def _finish(self, x, a, metrics, t0, std_min) -> ImaginedBatch:
        n, O = self.normalizer, self.obs_dim
        obs_n, act_n = x[..., :O], a
        obs, act = n.unnormalize(obs_n, "observations"), n.unnormalize(act_n, "actions")
        rew_n, term_n = x[..., O], x[..., O + 1]
        terminals = (n.unnormalize(term_n, "terminals") > 0.5).float()
        with torch.no_grad():
            stats, stats_ok = _standardized_action_stats(self.policy, obs, act)
        metrics.update(stats)
        metrics["terminal_avg"] = terminals.mean()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # one sync per call so the time is the real sampling time
        metrics["sampling_time"] = time.perf_counter() - t0
        # One check of the whole call (after the sync above: no extra wait): a NaN or infinite policy mean, or a
        # non-finite denoiser output, ends in non-finite actions.
        ok = stats_ok & torch.isfinite(a).all() & (True if std_min is None else std_min > 0)
        if not bool(ok):
            raise ValueError("the policy returned a std <= 0 or NaN, or the guided actions are not finite (a NaN or "
                             "infinite policy mean or denoiser output); expected a finite mean and a std > 0 for "
                             "every guide state (a Normal over raw actions)")
        return ImaginedBatch(obs, act, n.unnormalize(rew_n, "rewards"), terminals, obs_n, act_n, rew_n, term_n,
                             metrics)


def _check_critic(critic, state_guidance: str, obs_dim: int, device: torch.device) -> Callable | None:
    """The critic of advantage guidance, checked: required (callable) when state_guidance is not 'none', its
    ``obs_dim`` (if it has one) the normaliser's, its parameters on the sampler's device."""
    if critic is None:
        if state_guidance != "none":
            raise ValueError(f"SamplerConfig.state_guidance={state_guidance!r} needs the critic: pass "
                             "FastGuidedSampler(..., critic=critic), a module raw observations [..., O] -> V [...]")
        return None
    if not callable(critic):
        raise TypeError(f"critic must be callable (raw states [..., O] -> V [...]), got {type(critic).__name__}")
    if getattr(critic, "obs_dim", obs_dim) != obs_dim:
        raise ValueError(f"critic.obs_dim = {critic.obs_dim} but the normaliser implies {obs_dim}")
    params = list(critic.parameters()) if isinstance(critic, nn.Module) else []
    if params and params[0].device != device:
        raise ValueError(f"critic is on {params[0].device} but the denoiser on {device}")
    return critic


def _guidance_scale_tensor(value, device: torch.device) -> torch.Tensor:
    """w as a 0-dim fp32 tensor on ``device``; a Python number must be finite and >= 0 (a tensor's value is
    checked in ``sample()``, where it costs no extra host sync)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"guidance_scale must be a one-element float tensor, got shape {list(value.shape)} "
                             f"dtype {value.dtype}")
        return value.reshape(()).to(device=device, dtype=torch.float32)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"guidance_scale must be a number or a one-element tensor, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {value!r}")
    return torch.tensor(float(value), device=device)


def _standardized_action_stats(policy: Callable, obs: torch.Tensor, actions: torch.Tensor):
    """(act_mean / act_std of z = (a - mu_pi(s)) / sigma_pi(s), the policy's std > 0 and mean finite here []).

    The moments are over (batch, time[:-1]) (all steps when H = 1): obs [B,H,O], actions [B,H,A] raw; act_std is
    the mean over action dims of the per-dim std (the paper's logged standardised action statistics).
    """
    if obs.shape[1] > 1:
        obs, actions = obs[:, :-1], actions[:, :-1]
    mean, std = check_policy_output(*policy_mean_std(policy(obs)), obs, actions.shape[-1])
    return standardized_action_moments((actions - mean) / std), (std.amin() > 0) & torch.isfinite(mean).all()
