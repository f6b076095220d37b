"""The GPU fast path of ``FastGuidedSampler``: the whole T-step guided loop captured once in a CUDA graph.

Per (batch, horizon) one graph holds the initial noise, and for every step t the denoiser forward (the sampler's
bf16/fp16 copy), kernel A, the policy forward and kernel B, with all noise drawn inside the kernels from
(seed, t, element). A call copies the start observations, the guidance scale and a fresh seed into the graph's
static input tensors (device-side copies: no host sync) and replays.

Noise convention: the noise of reverse step t < T is the kernels' Philox noise of step t; the initial x_T, a_T
are that of step T, drawn by ``kernels.q_sample`` with sqrt(abar) = 0 and sqrt(1 - abar) = 1 (so it returns the
noise itself, with the start observation imposed). Everything here imports the kernels lazily: importing this
module never decorates them (the kernel tests choose the Triton interpreter first).
"""
from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from typing import Callable, Hashable

import torch
from torch import nn

from .backend import triton_usable
from .reference.guided_sampling import change_metrics
from .reference.step_ops import _SQRT_ABAR, CLIP_STATE_CHANGE_MAX_T

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """One RuntimeWarning per distinct message per process: a fallback is announced, not repeated every call."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class ShapeKeyedCache:
    """The ``capacity`` most recently used entries by key (a shape); the least recently used one is dropped.

    Each entry of the graph runner pins a graph and its private memory pool, so their number stays bounded.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, object] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], object]) -> object:
        """The entry for ``key``, built by ``build()`` on a miss."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        entry = build()
        self._entries[key] = entry
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._entries.clear()

    def keys(self) -> list:
        """Keys, least recently used first."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class GuidedLoop:
    """Static tensors and the loop body for one (batch, horizon) of a sampler; device agnostic.

    ``run()`` executes the T steps eagerly (what the graph captures; on CPU it runs under the Triton interpreter,
    which is how the body is tested without a GPU). Inputs: ``start`` [B,O] normalised, ``seed`` [] int64,
    ``guidance_scale`` [] fp32. ``run`` returns (x [B,H,D], actions [B,H,A], posterior mean - x at t = 0).
    The step is the sampler's (same denoiser and policy copies, same order of ops), except that its noise is drawn
    inside the kernels; tests compare the two paths fed the same noise.
    """

    def __init__(self, sampler, batch: int, horizon: int):
        s, dev = sampler, sampler.device
        T, O, D, A = s.schedule.n_steps, s.obs_dim, s.transition_dim, s.act_dim
        self.sampler, self.batch, self.horizon = sampler, batch, horizon
        self.start = torch.zeros(batch, O, device=dev)
        self.seed = torch.zeros((), dtype=torch.int64, device=dev)
        self.guidance_scale = torch.zeros((), device=dev)
        self._x_start = torch.zeros(batch, horizon, D, device=dev)  # x0 for the initial draw: only [:, 0, :O] is read
        self._a_zero = torch.zeros(batch, horizon, A, device=dev)
        self._init_step = torch.full((batch,), T, dtype=torch.int64, device=dev)
        self._unit_tables = torch.zeros(T + 1, device=dev), torch.ones(T + 1, device=dev)
        self._steps = torch.arange(T, device=dev)[:, None].expand(T, batch).contiguous()

    def run(self):
        from .kernels import action_update_at, q_sample, state_update_at

        s, c = self.sampler, self.sampler.config
        obs, act = s.normalizer["observations"], s.normalizer["actions"]
        self._x_start[:, 0, : s.obs_dim].copy_(self.start)
        x, a = q_sample(self._x_start, self._a_zero, self._init_step, *self._unit_tables, None,
                        action_noise_scale=1.0, obs_dim=s.obs_dim, seed=self.seed)
        for t in reversed(range(s.schedule.n_steps)):
            coef, last = s.step_table[t], t == 0
            seed = None if last else self.seed  # the last step adds no noise
            x0 = s._denoiser_fast(x, coef[_SQRT_ABAR] * a, self._steps[t])
            clip = c.clip_state_change if t <= CLIP_STATE_CHANGE_MAX_T else None
            x_next, mean, guide = state_update_at(x, x0, self.start, coef, obs.mean, obs.scale, clip, None,
                                                  c.states_for_guidance, seed=seed, step=t)
            # skipped where the action update is the identity, as in the sampler
            if not (last and c.clip_std is None or not last and c.guidance_type == "none"):
                p_mean, p_std = s._policy_fast(guide)
                a = action_update_at(a, p_mean, p_std, act.mean, act.scale, coef, self.guidance_scale, c.clip_std,
                                     None, c.action_noise_scale, c.guidance_type, last, seed=seed, step=t)
            x_prev, x = x, x_next
        return x, a, mean - x_prev


def _fingerprint(sampler) -> tuple:
    """What a captured graph has baked in besides its static inputs: options and the addresses of every tensor
    it reads (a refitted normaliser, a re-cast module or a new step table means capturing again)."""
    tensors = [sampler.step_table]
    for field in sampler.normalizer.fields.values():
        tensors += [field.mean, field.std]
    policy = sampler.policy if sampler._policy_copy is None else sampler._policy_copy
    for module in (sampler._denoiser_fast, policy):
        if isinstance(module, nn.Module):
            tensors += list(module.parameters()) + list(module.buffers())
    return (dataclasses.astuple(sampler.config), dataclasses.astuple(sampler.execution),
            tuple(t.data_ptr() for t in tensors))


class CudaGraphSampler:
    """Replays a captured ``GuidedLoop`` per (batch, horizon); built by ``graph_runner_for``.

    ``sample(start, horizon, guidance_scale, generator=None, seed=None)`` has the contract of
    ``FastGuidedSampler._sample_fast`` without explicit noise: returns (x [B,H,D], actions [B,H,A], metrics).
    If a capture fails (e.g. a policy that syncs with the host), one warning is given, ``enabled`` turns False
    and the call, like every later one, runs the sampler's eager loop.
    """

    def __init__(self, sampler, max_graphs: int = 4):
        self.sampler = sampler
        self.enabled = True
        self._graphs = ShapeKeyedCache(max_graphs)
        self._fingerprint = None

    def sample(self, start: torch.Tensor, horizon: int, guidance_scale: torch.Tensor,
               generator: torch.Generator | None = None, seed: int | None = None):
        fingerprint = _fingerprint(self.sampler)
        if fingerprint != self._fingerprint:
            self._graphs.clear()
            self._fingerprint = fingerprint
        try:
            loop, graph, outputs = self._graphs.get((start.shape[0], horizon),
                                                    lambda: self._capture(start.shape[0], horizon))
        except Exception as exc:  # capture is best effort: the eager loop computes the same thing
            self.enabled = False
            self._graphs.clear()
            warn_once(f"CUDA graph capture of the guided sampler failed ({type(exc).__name__}: {exc}); "
                      "falling back to the eager loop")
            return self.sampler._sample_fast(start, horizon, guidance_scale, generator, None)
        loop.start.copy_(start)
        loop.guidance_scale.copy_(guidance_scale)
        if seed is not None:
            loop.seed.fill_(seed)
        else:  # drawn on the generator's device: for a CUDA generator (or None) no host sync
            device = generator.device if generator is not None else loop.seed.device
            loop.seed.copy_(torch.randint(2**62, (), generator=generator, device=device))
        graph.replay()
        x, a, change = outputs
        return x.clone(), a.clone(), change_metrics(change)

    def _capture(self, batch: int, horizon: int):
        """(loop, graph, outputs): one eager warm-up on a side stream (Triton JIT, cuBLAS, allocator), then capture."""
        loop = GuidedLoop(self.sampler, batch, horizon)
        current = torch.cuda.current_stream(self.sampler.device)
        side = torch.cuda.Stream(self.sampler.device)
        side.wait_stream(current)
        with torch.cuda.stream(side), torch.inference_mode():
            loop.run()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            outputs = loop.run()
        return loop, graph, outputs


def graph_runner_for(sampler) -> CudaGraphSampler | None:
    """A ``CudaGraphSampler`` for ``sampler``, or None (with one warning) where the graph path cannot run:
    no CUDA device with a working Triton, or ``update_states`` (autograd through the policy)."""
    if not triton_usable(sampler.device):
        reason = f"needs a CUDA device with a working Triton, sampler is on {sampler.device}"
    elif sampler.config.update_states:
        reason = "update_states differentiates through the policy, which a captured graph cannot"
    else:
        return CudaGraphSampler(sampler)
    warn_once(f"CUDA-graph guided sampling unavailable ({reason}); using the sampler's eager fast path")
    return None
