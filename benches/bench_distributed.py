"""Data-parallel scaling on this machine: 1 rank vs 2 ranks (torchrun, gloo), the agent's own loop phases.

Each launch builds the agent of a preset on every rank (prefill included) and times, on rank 0, one diffusion
training step (``Agent.diffusion_updates``: window sampling, the DDP forward/backward on the rank's shard, the
gradient all-reduce, Adam, EMA) and one sharded imagination (``Agent.imagine(..., sharded=True)``: the rank's
share of ``agent_batch_size`` start states through T guided steps, then the all-gather). The worker reports the
min over ``ROUNDS`` calls after a warm-up (the host is shared and noisy); the pytest-benchmark time itself is the
whole launch (process start, imports, prefill) and means little. The machine's cores are split evenly: with 2
cores, 1 rank runs 2 torch threads, 2 ranks 1 thread each, so the comparison is at equal hardware.
``test_speedup`` (last) gives the 2-rank / 1-rank throughput ratios per phase.

    pytest benches/bench_distributed.py --benchmark-columns=min,rounds     # then read extra_info
    pytest benches/bench_distributed.py --benchmark-disable                # smoke: every launch once

The A2C update is replicated on every rank (the same update on the gathered batch), so it does not scale and is
not timed here (``benches/bench_agent.py`` times it).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TORCHRUN = Path(sys.executable).with_name("torchrun")
REPO = Path(__file__).resolve().parents[1]
PRESETS = ("pendulum-cpu", "hopper-cpu")
WORLD_SIZES = (1, 2)
ROUNDS = 5
_RESULTS: dict[tuple[str, int], dict] = {}

WORKER = """
    import dataclasses, json, sys, time
    import torch
    from polygrad_fast.agent import Agent
    from polygrad_fast.agent_config import get_agent_preset
    from polygrad_fast.distributed import process_group

    preset, logdir, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = dataclasses.replace(get_agent_preset(preset), n_env_steps=2000, n_prefill_steps=2000,
                              checkpoint_interval=None, torch_threads=None)
    with process_group(cfg.device) as ctx:
        agent = Agent(cfg, logdir, progress=False, dist=ctx)
        agent.start()

        def best(fn):
            fn()  # warm-up
            times = []
            for _ in range(rounds):
                ctx.barrier("the bench's round start")
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        per_period = cfg.diffusion_steps_per_period
        diffusion = best(agent.diffusion_updates) / per_period
        imagine = best(lambda: agent.imagine(cfg.agent_batch_size, 1, agent.generators["imagine"], sharded=True))
        agent.close()
        if ctx.is_main:
            print("BENCH " + json.dumps({"world_size": ctx.world_size, "threads": torch.get_num_threads(),
                                         "diffusion_step_s": diffusion, "imagination_s": imagine,
                                         "windows_per_s": cfg.trainer.batch_size / diffusion,
                                         "trajectories_per_s": cfg.agent_batch_size / imagine}), flush=True)
"""


def _launch(tmp: Path, preset: str, world_size: int) -> dict:
    script = tmp / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    threads = max(1, (os.cpu_count() or 1) // world_size)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={world_size}", str(script), preset, str(tmp / "run"),
           str(ROUNDS)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: no orphan keeps the cores busy
        proc.communicate()
        pytest.fail(f"{world_size}-rank launch of {preset} still running after 1800 s (killed)")
    assert proc.returncode == 0, out[-4000:]
    line = next(s for s in out.splitlines() if s.startswith("BENCH "))
    return json.loads(line[len("BENCH "):])


@pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_gloo_available(),
                    reason="needs torchrun and gloo")
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("preset", PRESETS)
def test_phases(benchmark, tmp_path, preset, world_size):
    """One launch: the diffusion step's and the sharded imagination's min time on rank 0."""
    result = benchmark.pedantic(lambda: _launch(tmp_path, preset, world_size), rounds=1, iterations=1)
    _RESULTS[(preset, world_size)] = result
    benchmark.extra_info.update(result)
    print(f"\n{preset}, {world_size} rank(s): {result}")
    assert result["diffusion_step_s"] > 0 and result["imagination_s"] > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_speedup(benchmark, preset):
    """2-rank / 1-rank throughput per phase (from the launches above)."""
    missing = [w for w in WORLD_SIZES if (preset, w) not in _RESULTS]
    if missing:
        pytest.skip(f"run the whole file: world sizes {missing} of {preset} were not launched")
    one, two = _RESULTS[(preset, 1)], _RESULTS[(preset, 2)]
    benchmark.extra_info.update({"diffusion_step_speedup": one["diffusion_step_s"] / two["diffusion_step_s"],
                                 "imagination_speedup": one["imagination_s"] / two["imagination_s"]})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures are in extra_info
