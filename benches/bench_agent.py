"""Throughput of the online agent's loop, per phase: env step, diffusion training step, imagination, A2C update.

Two shapes: the ``pendulum-cpu`` preset (what a 2-core CPU runs) and the paper's Hopper shapes (``hopper`` preset:
H=10, MLP denoiser 1024x6, T=128, 1024 imagined trajectories, actor/critic 256x2; the run length is cut so the
buffer is small). Each phase's timing is the min over rounds of one call (the host is shared and noisy); its
``extra_info`` gives the call's ms and its cost per 1,000 env steps (calls per 1k env steps from the preset's
ratios: 1000 env steps, 1000 * train_diffusion_ratio diffusion steps, 1000 * train_agent_ratio imagination calls
and A2C updates). ``test_split`` (last) adds them up: seconds per 1,000 env steps and each phase's share.

    pytest benches/bench_agent.py --benchmark-columns=min,median,rounds
    pytest benches/bench_agent.py --benchmark-disable        # smoke: every body once
"""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from polygrad_fast.agent import Agent
from polygrad_fast.agent_config import get_agent_preset

PRESETS = ("pendulum-cpu", "hopper")
PHASES = ("env_step", "diffusion_step", "imagination", "a2c_update")
_MIN: dict[tuple[str, str], float] = {}  # (preset, phase) -> min seconds per call


def _calls_per_1k(cfg, phase: str) -> float:
    return {"env_step": 1000.0, "diffusion_step": 1000.0 * cfg.train_diffusion_ratio,
            "imagination": 1000.0 * cfg.train_agent_ratio, "a2c_update": 1000.0 * cfg.train_agent_ratio}[phase]


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    built = {}
    for name in PRESETS:
        # shapes as the preset, a short run (small buffer); threads as the benchmark process sets them
        cfg = dataclasses.replace(get_agent_preset(name), n_env_steps=5000, n_prefill_steps=3000,
                                  checkpoint_interval=None, torch_threads=None)
        agent = Agent(cfg, tmp_path_factory.mktemp(name.replace("-", "_")), progress=False)
        agent.start()
        built[name] = agent
    yield built
    for agent in built.values():
        agent.close()
    torch.set_num_threads(threads)


def _timed(preset: str, phase: str, fn):
    def call():
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        _MIN[(preset, phase)] = min(dt, _MIN.get((preset, phase), float("inf")))
        return out
    return call


def _record(benchmark, agent, preset: str, phase: str) -> None:
    seconds = _MIN[(preset, phase)]
    benchmark.extra_info.update({"ms_per_call": 1e3 * seconds,
                                 "s_per_1k_env_steps": seconds * _calls_per_1k(agent.cfg, phase)})


@pytest.mark.parametrize("preset", PRESETS)
def test_env_step(benchmark, agents, preset):
    """One exploration step: actor forward, sampled action, simulator step, episode bookkeeping."""
    agent = agents[preset]
    benchmark.pedantic(_timed(preset, "env_step", agent.env_step), rounds=200, iterations=1, warmup_rounds=5)
    _record(benchmark, agent, preset, "env_step")


@pytest.mark.parametrize("preset", PRESETS)
def test_diffusion_step(benchmark, agents, preset):
    """One denoiser training step: window sampling, loss, Adam, EMA."""
    agent = agents[preset]
    cfg = agent.cfg

    def step():
        windows = agent.buffer.sample_windows(cfg.trainer.batch_size, cfg.horizon, seed=agent.trainer.step,
                                              normalize=True, sim_states=False)
        return agent.trainer.train_step(windows)

    benchmark.pedantic(_timed(preset, "diffusion_step", step), rounds=20, iterations=1, warmup_rounds=2)
    _record(benchmark, agent, preset, "diffusion_step")


@pytest.mark.parametrize("preset", PRESETS)
def test_imagination(benchmark, agents, preset):
    """One imagination batch: agent_batch_size guided trajectories of H steps through T reverse steps."""
    agent = agents[preset]
    cfg = agent.cfg
    fn = _timed(preset, "imagination",
                lambda: agent.imagine(cfg.agent_batch_size, seed=1, generator=agent.generators["imagine"]))
    benchmark.pedantic(fn, rounds=3 if preset == "hopper" else 10, iterations=1, warmup_rounds=1)
    _record(benchmark, agent, preset, "imagination")


@pytest.mark.parametrize("preset", PRESETS)
def test_a2c_update(benchmark, agents, preset):
    """One A2C update (with line search and learned LR) on an imagined batch."""
    agent = agents[preset]
    batch, _ = agent.imagine(agent.cfg.agent_batch_size, seed=2, generator=agent.generators["imagine"])
    benchmark.pedantic(_timed(preset, "a2c_update", lambda: agent.a2c.update(batch)), rounds=10, iterations=1,
                       warmup_rounds=1)
    _record(benchmark, agent, preset, "a2c_update")


@pytest.mark.parametrize("preset", PRESETS)
def test_split(benchmark, agents, preset):
    """Seconds per 1,000 env steps and each phase's share (from the phases' min timings above)."""
    cfg = agents[preset].cfg
    missing = [p for p in PHASES if (preset, p) not in _MIN]
    if missing:
        pytest.skip(f"run the whole file: phases {missing} were not timed")
    cost = {p: _MIN[(preset, p)] * _calls_per_1k(cfg, p) for p in PHASES}
    total = sum(cost.values())
    benchmark.extra_info.update({"s_per_1k_env_steps": total, "env_steps_per_s": 1000.0 / total,
                                 **{f"{p}_share": c / total for p, c in cost.items()},
                                 **{f"{p}_s_per_1k": c for p, c in cost.items()}})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures are in extra_info
    shares = ", ".join(f"{p} {c:.2f} s ({100 * c / total:.0f}%)" for p, c in cost.items())
    print(f"\n{preset}: {total:.1f} s per 1,000 env steps ({1000.0 / total:.1f} env steps/s): {shares}")
