"""The GPU fast path of ``FastGuidedSampler``: the whole T-step guided loop captured once in a CUDA graph.

Per (batch, horizon) one graph holds the initial noise, and for every chain step i (trained timestep t_i; all T
steps, or the K of a respaced chain) the denoiser forward (the sampler's
bf16/fp16 copy), kernel A, the policy forward and kernel B, with all noise drawn inside the kernels from
(seed, t, element). A call copies the start observations, the guidance scale and a fresh seed into the graph's
static input tensors (device-side copies: no host sync) and replays.

Noise convention: the noise of chain step i < K is the kernels' Philox noise of step i; the initial x_T, a_T
are that of step K, drawn by ``kernels.q_sample`` with sqrt(abar) = 0 and sqrt(1 - abar) = 1 (so it returns the
noise itself, with the start observation imposed). Everything here imports the kernels lazily: importing this
module never decorates them (the kernel tests choose the Triton interpreter first).
"""
from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Callable, Hashable

import torch
from torch import nn

from ._native import warn_once
from .backend import triton_usable
from .guided_step import GuidedStep, change_metrics
from .noise import SEED_HIGH


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
    """Static tensors and the loop body for one (batch, horizon); device agnostic.

    ``run()`` executes the K steps eagerly (what the graph captures; on CPU it runs under the Triton interpreter,
    which is how the body is tested without a GPU): one ``step`` call per chain step i, its noise drawn inside the
    kernels, so ``step.ops`` must be the fused kernels' (``guided_step.triton_ops()``). step_table [K, 6] on the
    device; timesteps: the chain's trained timesteps [K] (``NoiseSchedule.respaced``), None for all K = T.
    Inputs: ``start`` [B,O] normalised, ``seed`` [] int64, ``guidance_scale`` [] fp32. ``run`` returns
    (x [B,H,D], actions [B,H,A], posterior mean - x at t = 0 [B,H,D], the policy's smallest std []).
    """

    def __init__(self, step: GuidedStep, step_table: torch.Tensor, batch: int, horizon: int,
                 timesteps: torch.Tensor | None = None):
        dev, T = step_table.device, step_table.shape[0]
        O, A = step.normalizer.obs_dim, step.normalizer.act_dim
        self.step, self.step_table, self.batch, self.horizon = step, step_table, batch, horizon
        self.timesteps = torch.arange(T, device=dev) if timesteps is None else timesteps.to(dev)
        if self.timesteps.shape != (T,):
            raise ValueError(f"timesteps: expected [{T}] (one per step-table row), got {list(self.timesteps.shape)}")
        self._clamps = step.clip_state_changes(self.timesteps, step_table)
        self.start = torch.zeros(batch, O, device=dev)
        self.seed = torch.zeros((), dtype=torch.int64, device=dev)
        self.guidance_scale = torch.zeros((), device=dev)
        self._x_start = torch.zeros(batch, horizon, O + 2, device=dev)  # x0 of the initial draw: [:, 0, :O] is read
        self._a_zero = torch.zeros(batch, horizon, A, device=dev)
        self._init_step = torch.full((batch,), T, dtype=torch.int64, device=dev)
        self._unit_tables = torch.zeros(T + 1, device=dev), torch.ones(T + 1, device=dev)

    def run(self):
        from .kernels import q_sample

        step, O, dev = self.step, self.start.shape[-1], self.seed.device
        T = self.step_table.shape[0]
        self._x_start[:, 0, :O].copy_(self.start)
        x, a = q_sample(self._x_start, self._a_zero, self._init_step, *self._unit_tables, None,
                        action_noise_scale=1.0, obs_dim=O, seed=self.seed)
        step_inputs = step.step_inputs(self.timesteps, self.batch, dev)  # inside the graph: follows the weights
        std_min = torch.full((), math.inf, device=dev)
        for i in reversed(range(T)):
            last = i == 0
            x, a, change, std_min = step(x, a, step_inputs[i], self.start, self.step_table[i], self.guidance_scale,
                                         self._clamps[i], None, None, last, std_min,
                                         seed=None if last else self.seed, step=i)  # the last step: no noise
        return x, a, change, std_min


def _fingerprint(step: GuidedStep, step_table: torch.Tensor) -> tuple:
    """What a captured graph has baked in besides its static inputs: the options and the addresses of every
    tensor it reads (a refitted normaliser, a re-cast module or a new step table means capturing again)."""
    tensors = [step_table]
    for field in step.normalizer.fields.values():
        tensors += [field.mean, field.std]
    for module in (step.denoiser, step.policy):
        if isinstance(module, nn.Module):
            tensors += list(module.parameters()) + list(module.buffers())
    return dataclasses.astuple(step.config), tuple(t.data_ptr() for t in tensors)


class CudaGraphSampler:
    """Replays a captured ``GuidedLoop`` per (batch, horizon); built by ``graph_runner_for``.

    ``sample(start, horizon, guidance_scale, generator=None, seed=None)`` returns (x [B,H,D], actions [B,H,A],
    change metrics, the policy's smallest std []), as ``fallback(start, horizon, guidance_scale, generator, None)`` (the
    eager loop) does. If a capture fails (e.g. a policy that syncs with the host), one warning is given,
    ``enabled`` turns False and the call, like every later one, runs the fallback.
    """

    def __init__(self, step: GuidedStep, step_table: torch.Tensor, fallback: Callable, max_graphs: int = 4,
                 timesteps: torch.Tensor | None = None):
        self.step, self.step_table, self.fallback, self.timesteps = step, step_table, fallback, timesteps
        self.enabled = True
        self._graphs = ShapeKeyedCache(max_graphs)
        self._fingerprint = None

    def sample(self, start: torch.Tensor, horizon: int, guidance_scale: torch.Tensor,
               generator: torch.Generator | None = None, seed: int | None = None):
        fingerprint = _fingerprint(self.step, self.step_table)
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
            return self.fallback(start, horizon, guidance_scale, generator, None)
        loop.start.copy_(start)
        loop.guidance_scale.copy_(guidance_scale)
        if seed is not None:
            loop.seed.fill_(seed)
        else:  # drawn on the generator's device: for a CUDA generator (or None) no host sync
            device = generator.device if generator is not None else loop.seed.device
            loop.seed.copy_(torch.randint(SEED_HIGH, (), generator=generator, device=device))
        graph.replay()
        x, a, change, std_min = outputs
        return x.clone(), a.clone(), change_metrics(change), std_min.clone()

    def _capture(self, batch: int, horizon: int):
        """(loop, graph, outputs): one eager warm-up on a side stream (Triton JIT, cuBLAS, allocator), then capture."""
        device = self.step_table.device
        loop = GuidedLoop(self.step, self.step_table, batch, horizon, self.timesteps)
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side), torch.inference_mode():
            loop.run()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            outputs = loop.run()
        return loop, graph, outputs


def graph_runner_for(step: GuidedStep, step_table: torch.Tensor, fallback: Callable,
                     timesteps: torch.Tensor | None = None) -> CudaGraphSampler | None:
    """A ``CudaGraphSampler`` for ``step`` (kernel ops) on step_table's device (the chain's table [K, 6] and trained
    timesteps [K], None: all T), or None (with one warning) where
    the graph path cannot run: no CUDA device with a working Triton, ``update_states`` (autograd through the
    policy) or state guidance (autograd through the critic)."""
    if not triton_usable(step_table.device):
        reason = f"needs a CUDA device with a working Triton, the sampler is on {step_table.device}"
    elif step.config.update_states:
        reason = "update_states differentiates through the policy, which a captured graph cannot"
    elif step.config.state_guidance != "none":
        reason = "state guidance differentiates through the critic (autograd), which the graph path does not capture"
    else:
        return CudaGraphSampler(step, step_table, fallback, timesteps=timesteps)
    warn_once(f"CUDA-graph guided sampling unavailable ({reason}); using the sampler's eager fast path")
    return None
