"""Collect a dataset: N env steps of a random or a checkpointed policy in a MuJoCo task, saved as a .pgbuf file.

    polygrad-fast collect --env Hopper-v5 --steps 5000 --out data/hopper_random.pgbuf
    polygrad-fast collect --env Hopper-v5 --steps 100000 --out data/hopper_agent.pgbuf \
        --policy_checkpoint runs/Hopper-v5/hopper_seed0_.../checkpoints/step_0000100000.pt

Episodes run until termination or the task's time limit; the last one is cut at exactly ``steps`` transitions
(stored as truncated). The random policy draws uniform actions (the paper's prefill); an agent checkpoint's actor
(``polygrad_fast.agent``, read by ``wm_eval.load_policy``) samples a ~ pi(.|s) (``--actions mean``: its mean).
Actions are stored unclipped, the simulator steps with them clipped to the action space (as the agent's buffer).
Next to the buffer file, ``<out>.json`` records the env, the dims, the policy and the seed; ``eval-wm`` reads it
to refuse a dataset of another task.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .buffer import TrajectoryBuffer
from .envs import EnvName, Episode, SimStateEnv, run_episode
from .presets import check_number

METADATA_SUFFIX = ".json"


@dataclass(frozen=True)
class CollectConfig:
    """What ``polygrad-fast collect`` collects and where it writes."""

    out: Path
    """The .pgbuf file to write (its metadata goes to <out>.json)."""
    env: EnvName = "Hopper-v5"
    """MuJoCo task (gymnasium id)."""
    steps: int = 5000
    """Transitions to collect (the last episode is cut there)."""
    seed: int = 0
    """Seeds the env's resets and the policy's action draws."""
    policy_checkpoint: Path | None = None
    """An agent checkpoint whose actor acts; None: uniform random actions."""
    actions: Literal["sample", "mean"] = "sample"
    """With a policy checkpoint: sample a ~ pi(.|s), or act with its mean."""
    overwrite: bool = False
    """Replace an existing --out file (and its metadata)."""

    def __post_init__(self) -> None:
        check_number("CollectConfig.steps", self.steps, 1, integer=True)
        check_number("CollectConfig.seed", self.seed, 0, 2**31 - 1, integer=True)
        if Path(self.out).suffix != ".pgbuf":
            raise ValueError(f"CollectConfig.out must name a .pgbuf file, got {str(self.out)!r}")


def metadata_path(path: str | os.PathLike) -> Path:
    """``<path>.json``: the metadata written next to a collected buffer file."""
    return Path(f"{os.fspath(path)}{METADATA_SUFFIX}")


def read_metadata(path: str | os.PathLike) -> dict | None:
    """The metadata of a collected buffer file, or None when it has none (e.g. a run's buffer.pgbuf)."""
    meta = metadata_path(path)
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"dataset metadata {str(meta)!r} is not JSON ({exc.msg})") from None


def episodes_to_buffer(env: SimStateEnv, episodes: list[Episode]) -> TrajectoryBuffer:
    """A buffer of ``env``'s dims holding exactly ``episodes``."""
    buffer = TrajectoryBuffer(env.obs_dim, env.act_dim, env.sim_state_dim, sum(len(e.rewards) for e in episodes))
    for ep in episodes:
        buffer.add_episode(ep.observations, ep.actions, ep.rewards, ep.sim_states, terminated=ep.terminated,
                           truncated=ep.truncated)
    return buffer


def collect_episodes(env: SimStateEnv, steps: int, seed: int, actor: torch.nn.Module | None = None,
                     mean_actions: bool = False) -> list[Episode]:
    """Episodes of exactly ``steps`` transitions in all: uniform random actions (``actor`` None) or the actor's
    (raw obs [O] -> a ~ pi(.|s) [A], or its mean with ``mean_actions``)."""
    from .baselines import sample_action
    from .policy import policy_mean_std

    if actor is None:
        rng = np.random.default_rng(seed)
        low, high = env.action_space.low, env.action_space.high

        def act(_obs):
            return rng.uniform(low, high).astype(np.float32)
    else:
        generator = torch.Generator().manual_seed(seed)
        actor = actor.to("cpu").eval()

        @torch.no_grad()
        def act(obs):
            s = torch.as_tensor(obs, dtype=torch.float32)[None]
            a = policy_mean_std(actor(s))[0] if mean_actions else sample_action(actor, s, generator)
            return a[0].numpy()

    episodes, total = [], 0
    while total < steps:
        episodes.append(run_episode(env, act, max_steps=steps - total))
        total += len(episodes[-1].rewards)
    return episodes


def collect(cfg: CollectConfig) -> TrajectoryBuffer:
    """Collect ``cfg.steps`` transitions and write ``cfg.out`` and its metadata; every input is checked (env,
    checkpoint and its task and dims, existing output) before the first env step."""
    from .wm_eval import check_policy, load_policy

    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_file():
        raise FileExistsError(f"{out} exists and is not a file")
    env = SimStateEnv(cfg.env, seed=cfg.seed)
    try:
        actor = None
        if cfg.policy_checkpoint is not None:
            actor = load_policy(cfg.policy_checkpoint, cfg.env)
            check_policy(actor, env)
        episodes = collect_episodes(env, cfg.steps, cfg.seed, actor, mean_actions=cfg.actions == "mean")
        buffer = episodes_to_buffer(env, episodes)
        dims = {"obs_dim": env.obs_dim, "act_dim": env.act_dim, "sim_state_dim": env.sim_state_dim}
    finally:
        env.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer.save(out)
    returns = [float(ep.rewards.sum()) for ep in episodes]
    meta = {"env": cfg.env, **dims, "transitions": buffer.num_transitions, "episodes": len(episodes),
            "episode_return_mean": float(np.mean(returns)), "seed": cfg.seed,
            "policy": str(cfg.policy_checkpoint) if cfg.policy_checkpoint else "uniform random",
            "actions": cfg.actions if cfg.policy_checkpoint else "uniform"}
    tmp = metadata_path(out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, metadata_path(out))
    return buffer


def cli(argv: list[str] | None = None, prog: str = "polygrad-fast collect") -> None:
    """The ``collect`` command line (``polygrad_fast.cli`` runs it); bad input exits 2 with the reason."""
    import tyro

    from .cli import exit_usage

    try:
        cfg = tyro.cli(CollectConfig, args=argv, prog=prog, use_underscores=True, description=__doc__.split("\n\n")[0])
    except (ValueError, TypeError) as exc:
        exit_usage(prog, str(exc))
    try:
        buffer = collect(cfg)
    except (FileExistsError, FileNotFoundError, ValueError, TypeError) as exc:
        exit_usage(prog, str(exc))
    meta = read_metadata(cfg.out)
    print(f"wrote {cfg.out}: {buffer.num_transitions} transitions in {buffer.num_episodes} episodes of {cfg.env} "
          f"(policy: {meta['policy']}, mean episode return {meta['episode_return_mean']:.1f})")

