"""The PolyGRAD agent: online reinforcement learning in trajectories imagined by policy-guided diffusion.

    python -m polygrad_fast.agent --preset pendulum-cpu                 # InvertedPendulum on a 2-core CPU
    python -m polygrad_fast.agent --preset hopper --device cuda         # the paper's Hopper run
    python -m polygrad_fast.agent --preset debug --logdir /tmp/run --a2c.lr_actor 1e-3 --seed 2
    python -m polygrad_fast.agent --help                                # every config field, typed

``run(config, logdir)`` is the entry point. ``Agent.train`` is the paper's Algorithm 1, step by step:

1. an exploration env and a separate evaluation env (actions clipped to the action space); random prefill of
   whole episodes until at least ``n_prefill_steps`` transitions; the normaliser fitted on it;
2. each env step: a ~ N(tanh(mu(s)), exp(logstd) + min_std) from the current actor (in [-1, 1] units, scaled to
   the env's action range: ``action_scale``); the buffer gets s, the unclipped a, r, terminated/truncated and the
   simulator state before the step;
3. at an episode's end (terminated, truncated or ``max_path_length``): the episode enters the buffer, the env is
   reset and the normaliser refitted on the whole buffer (refreshed in place: the sampler sees it at once; the
   diffusion trainer's windows are normalised by the buffer with the same statistics). An open episode is
   neither in the statistics nor sampled;
4. every ``1 / train_agent_ratio`` env steps, once ``pretrain_diffusion`` diffusion steps are done: imagine
   ``agent_batch_size`` trajectories from the first states of buffer windows with the EMA denoiser and policy
   guidance, one A2C update on them, one guidance-scale update (standardised action std towards 1);
5. then ``train_diffusion_ratio / train_agent_ratio`` diffusion steps;
6. every ``eval_interval`` env steps (and at step 0 and the end): mean-action episodes on the evaluation env and
   the error of imagined trajectories replayed in the simulator from their exact start states.

Checkpoints (every ``checkpoint_interval`` env steps, atomic, last ``keep_checkpoints`` kept) hold everything
the loop reads, including RNG states and the exploration env's exact mid-episode simulator state, so a killed
run rerun into the same directory continues as if it had never stopped.

Under ``torchrun`` (``polygrad_fast.distributed``, ``docs/distributed.md``) every rank runs this same loop on the
same env stream, so buffers, envs and networks are replicas; step 4 imagines ``agent_batch_size / world_size``
trajectories per rank and gathers them before the (replicated) A2C update, step 5 trains the denoiser on equal
shards of each batch under DistributedDataParallel, and rank 0 alone evaluates (step 6), logs and writes the
checkpoints, which also hold every rank's own RNG states (resume needs the same world size).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from .a2c import A2CTrainer
from .agent_config import AGENT_PRESETS, AgentConfig
from .buffer import TrajectoryBuffer
from .checkpoint import CheckpointManager, capture_rng_states, restore_rng_states
from .config import to_dict
from .denoisers import build_denoiser
from .diffusion_trainer import DiffusionTrainer, NonFiniteUpdateError
from .distributed import SINGLE, DistContext, context_from_env, gather_imagined, process_group, row_shard
from .envs import SimStateEnv, random_episodes, run_episode
from .evaluation import trajectory_errors
from .guidance import GuidanceScaleTuner
from .normalizer import FIELDS, Normalizer
from .policy import Actor, Critic
from .run_dir import prepare_run_dir
from .run_logging import NullLogger, RunLogger
from .sampler import FastGuidedSampler
from .schedule import NoiseSchedule
from .train_world_model import seed_everything, window_seed

CHECKPOINT_FORMAT = 1
# buffer-window seed purposes (train_world_model.window_seed): one stream each, reproducible per step
_TRAIN_WINDOWS, _AGENT_WINDOWS, _ERROR_WINDOWS = 0, 1, 2
PHASES = ("env", "imagine", "a2c", "diffusion", "eval", "checkpoint")


class NonFiniteError(FloatingPointError):
    """A NaN or inf appeared; the message names where and which env step, and the last good checkpoint."""


# ---------------------------------------------------------------------------------------------- envs
def action_scale(env: SimStateEnv) -> np.ndarray:
    """Per-dim factor from the agent's action space [-1, 1] (the range of the actor's tanh mean) to the env's.

    The paper's tasks act in [-1, 1] (factor 1: nothing changes); InvertedPendulum's [-3, 3] would otherwise put
    two thirds of the force range beyond the actor's mean. The buffer, the world model and the actor all work in
    the agent's space; only env steps and simulator replays are scaled. float32 [A].
    """
    low, high = env.action_space.low, env.action_space.high
    if not (np.all(np.isfinite(high)) and np.array_equal(low, -high) and np.all(high > 0)):
        raise ValueError(f"{env.name}: expected a bounded action space symmetric about 0, got low={low}, high={high}")
    return high.astype(np.float32)


def _time_limit(env: SimStateEnv) -> gym.wrappers.TimeLimit | None:
    w = env.env
    while isinstance(w, gym.Wrapper):
        if isinstance(w, gym.wrappers.TimeLimit):
            return w
        w = w.env
    return None


def env_state(env: SimStateEnv) -> dict[str, Any]:
    """What an exact env resume needs: the exact simulator state, its reset RNG, the time-limit counter."""
    limit = _time_limit(env)
    return {"sim_state": torch.from_numpy(env.get_sim_state()),
            "np_random": env.env.unwrapped.np_random.bit_generator.state,
            "first_reset_seed": env._seed, "elapsed_steps": None if limit is None else limit._elapsed_steps}


def restore_env_state(env: SimStateEnv, state: dict[str, Any]) -> np.ndarray:
    """Put ``env`` back into ``env_state`` output mid-episode; returns the observation there."""
    env.reset()  # gymnasium's wrappers refuse step() before a reset; its RNG draws are overwritten below
    obs = env.set_sim_state(np.asarray(state["sim_state"], dtype=np.float64))
    env.env.unwrapped.np_random.bit_generator.state = state["np_random"]
    env._seed = state["first_reset_seed"]
    limit = _time_limit(env)
    if limit is not None and state["elapsed_steps"] is not None:
        limit._elapsed_steps = state["elapsed_steps"]
    return obs


# ---------------------------------------------------------------------------------------------- helpers
def refresh_normalizer(normalizer: Normalizer, stats: dict) -> None:
    """Copy new statistics into ``normalizer``'s tensors in place (whoever holds it sees them; nothing rebuilt)."""
    fresh = Normalizer(stats, device=normalizer.device)  # validates (NaN, shapes)
    for name in FIELDS:
        normalizer[name].mean.copy_(fresh[name].mean)
        normalizer[name].std.copy_(fresh[name].std)


def _non_finite(values: dict[str, float]) -> list[str]:
    return [k for k, v in values.items() if not math.isfinite(v)]


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------- checkpoint state
def _tensors(arrays) -> torch.Tensor:
    """A list of equally shaped numpy arrays [L x shape] (or an array) as one tensor [L, *shape]."""
    return torch.from_numpy(np.array(arrays))


# ---------------------------------------------------------------------------------------------- the agent
class Agent:
    """The pieces of one online run, built from an ``AgentConfig``; ``train()`` runs the loop.

    ``dist``: this process's rank in a data-parallel run (``distributed.process_group``); every rank builds the
    same agent and calls the same methods in the same order (they hold collectives).
    """

    def __init__(self, cfg: AgentConfig, logdir: str | Path, progress: bool = True, tensorboard: bool = False,
                 dist: DistContext = SINGLE):
        self.cfg, self.logdir, self.progress, self.dist = cfg, Path(logdir), progress, dist
        dist.shard(cfg.agent_batch_size, "agent_batch_size")  # both batches split evenly over the ranks
        dist.shard(cfg.trainer.batch_size, "trainer.batch_size")
        self.checkpoints = CheckpointManager(self.logdir / "checkpoints", keep_last=cfg.keep_checkpoints)
        if cfg.torch_threads is not None:
            torch.set_num_threads(cfg.torch_threads)
        seed_everything(cfg.seed)
        self.device = dev = dist.device(cfg.device)

        # 1. exploration and evaluation envs (SimStateEnv clips actions; the buffer keeps them unclipped)
        self.expl_env = SimStateEnv(cfg.env, seed=cfg.seed)
        self.eval_env = SimStateEnv(cfg.env, seed=cfg.seed + 10_000)
        O, A, S = self.expl_env.obs_dim, self.expl_env.act_dim, self.expl_env.sim_state_dim
        self.action_scale = action_scale(self.expl_env)
        self.buffer = TrajectoryBuffer(O, A, S, cfg.capacity)

        schedule = NoiseSchedule(cfg.n_diffusion_steps, cfg.noise_tau)
        denoiser = build_denoiser(cfg.denoiser, cfg.horizon, O + 2, A).to(dev)
        self.trainer = DiffusionTrainer(denoiser, schedule, dataclasses.replace(cfg.trainer, seed=cfg.seed), dist)
        p = cfg.policy
        self.actor = Actor(O, A, p.hidden, p.layers, p.init_std, p.min_std, p.learned_std).to(dev)
        self.critic = Critic(O, p.hidden, p.layers).to(dev)
        self.a2c = A2CTrainer(self.actor, self.critic, cfg.a2c)
        self.tuner = GuidanceScaleTuner(cfg.sampler.guidance_scale, lr=cfg.guidance_lr, device=dev)
        self.normalizer = Normalizer.identity(O, A, device=dev)  # fitted on the prefill in start()
        # the critic is read only by advantage-guided sampling (sampler.state_guidance sag / eag)
        self.sampler = FastGuidedSampler(self.trainer.ema_model, schedule, self.actor, self.normalizer,
                                         config=cfg.sampler, execution=cfg.execution, critic=self.critic)
        # "action" is replicated (every rank steps the same env stream), "imagine" is this rank's own stream
        self.generators = {name: torch.Generator(dev).manual_seed(
            dist.rank_seed(cfg.seed * 8 + i) if name == "imagine" else cfg.seed * 8 + i)
            for i, name in enumerate(("action", "imagine", "errors"))}

        # loop state (all of it is in the checkpoint)
        self.env_steps = 0
        self.obs: np.ndarray | None = None
        self.episode: dict[str, list] = {k: [] for k in ("obs", "act", "rew", "sim")}
        self.episode_return = 0.0
        self.recent_returns: deque[float] = deque(maxlen=10)
        self.last_agent: dict[str, float] = {}
        self.last_diffusion: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.timers = dict.fromkeys(PHASES, 0.0)
        self.logger: RunLogger | NullLogger | None = None
        self.tensorboard = tensorboard

    # ------------------------------------------------------------------ start / resume
    def start(self) -> bool:
        """Resume from the newest checkpoint in the run directory (True), else prefill (False). The directory must
        hold this run's config (``run_dir.prepare_run_dir``)."""
        latest = self.checkpoints.latest(map_location="cpu" if self.dist.enabled else None)
        if latest is not None:
            self.load_state_dict(latest[1])
        # records past the checkpoint (all of them without one: the run starts over) are logged again
        self.logger = RunLogger(self.logdir, tensorboard=self.tensorboard,
                                resume_step=self.env_steps if latest is not None else -1) \
            if self.dist.is_main else NullLogger()
        if latest is None:
            self.prefill()
        return latest is not None

    def prefill(self) -> None:
        """Step 1: random whole episodes until at least n_prefill_steps transitions; fit the normaliser."""
        t0 = time.perf_counter()
        for ep in random_episodes(self.expl_env, self.cfg.n_prefill_steps, seed=self.cfg.seed):
            self.buffer.add_episode(ep.observations, ep.actions / self.action_scale, ep.rewards, ep.sim_states,
                                    terminated=ep.terminated, truncated=ep.truncated)
        self.refit_normalizer(self.buffer.stats())
        self.obs, _ = self.expl_env.reset()
        self.logger.log(0, {"dataset/transitions": self.buffer.num_transitions,
                            "dataset/episodes": self.buffer.num_episodes,
                            "perf/prefill_seconds": time.perf_counter() - t0})

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, float]:
        """Algorithm 1 until ``n_env_steps``; returns the final metrics (last evaluation included).

        Step 1 (envs, prefill, normaliser) is ``__init__`` + ``start``; step 7 (a buffer holding the whole run) is
        ``AgentConfig.capacity``.
        """
        cfg = self.cfg
        if self.env_steps == 0 and not self.last_eval:
            self.evaluate_and_log()  # step 6 at env step 0
        bar = tqdm(total=cfg.n_env_steps, initial=self.env_steps, disable=not (self.progress and self.dist.is_main),
                   unit="env step",
                   desc=cfg.env, smoothing=0.05)
        t_log = time.perf_counter()
        try:
            while self.env_steps < cfg.n_env_steps:
                step = self.env_steps  # the paper's counter: the period test uses the step being taken
                self.env_step()  # 2. and 3.
                if step % cfg.agent_period == 0:
                    if self.trainer.step >= cfg.pretrain_diffusion:
                        self.agent_update(step)  # 4.
                    self.diffusion_updates()  # 5.
                self.env_steps += 1
                bar.update(1)
                if self.env_steps % cfg.log_interval == 0:
                    now = time.perf_counter()
                    self.log_progress(cfg.log_interval / (now - t_log))
                    t_log = now
                    if self.recent_returns:
                        bar.set_postfix(ret=f"{np.mean(self.recent_returns):.1f}",
                                        eval=f"{self.last_eval.get('eval/return_mean', float('nan')):.1f}")
                if self.env_steps % cfg.eval_interval == 0 or self.env_steps == cfg.n_env_steps:
                    self.evaluate_and_log()  # 6.
                    t_log = time.perf_counter()
                if cfg.checkpoint_interval and self.env_steps % cfg.checkpoint_interval == 0:
                    self.checkpoint()
        finally:
            bar.close()
        if not (cfg.checkpoint_interval and self.env_steps % cfg.checkpoint_interval == 0):
            self.checkpoint()  # the finished run
        return self.final_metrics()

    def env_step(self) -> None:
        """Steps 2 and 3: one stochastic actor step in the exploration env; an ended episode enters the buffer."""
        t0 = time.perf_counter()
        cfg, env = self.cfg, self.expl_env
        action = self.act(self.obs, deterministic=False)
        next_obs, reward, terminated, truncated, info = env.step(action * self.action_scale)
        if not (np.isfinite(next_obs).all() and math.isfinite(reward)):
            self._fail("the exploration env's observation/reward", f"obs={next_obs}, reward={reward}")
        ep = self.episode
        ep["obs"].append(self.obs)
        ep["act"].append(np.clip(action, -1.0, 1.0) if cfg.store_clipped_actions else action)
        ep["rew"].append(reward)
        ep["sim"].append(info["sim_state"])
        self.episode_return += reward
        self.obs = next_obs
        length = len(ep["rew"])
        if terminated or truncated or length >= cfg.max_path_length:
            self.buffer.add_episode(np.stack(ep["obs"]), np.stack(ep["act"]), np.asarray(ep["rew"], np.float32),
                                    np.stack(ep["sim"]), terminated=terminated, truncated=not terminated)
            self.refit_normalizer(self.buffer.stats())
            self.logger.log(self.env_steps + 1, {"expl/return": self.episode_return, "expl/length": length},
                            echo=False)
            self.recent_returns.append(self.episode_return)
            self.episode = {k: [] for k in ep}
            self.episode_return = 0.0
            self.obs, _ = env.reset()
        self.timers["env"] += time.perf_counter() - t0

    def refit_normalizer(self, stats: dict) -> None:
        """Steps 1 and 3: the normaliser takes ``stats`` (the whole buffer's), in place; the sampler sees them."""
        refresh_normalizer(self.normalizer, stats)

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool) -> np.ndarray:
        """obs [O] raw -> action [A] (float32, unclipped): tanh(mu(s)) or a sample of N(tanh(mu(s)), std)."""
        o = torch.as_tensor(obs, dtype=torch.float32, device=self.device)[None]
        mean, std = self.actor(o)
        if deterministic:
            return mean[0].cpu().numpy()
        noise = torch.randn(mean.shape, generator=self.generators["action"], device=self.device)
        return (mean + std * noise)[0].cpu().numpy()

    def imagine(self, n: int, seed: int, generator: torch.Generator, sim_states: bool = False,
                sharded: bool = False):
        """Imagined trajectories [n, H, ...] from the first states of ``n`` buffer windows (and the windows).

        ``sharded``: this rank imagines its equal share of the ``n`` start states and the shards are gathered, in
        rank order, on every rank (the check below then sees the same batch everywhere)."""
        windows = self.buffer.sample_windows(n, self.cfg.horizon, seed=seed, normalize=False, sim_states=sim_states)
        start_obs = windows.start_obs[self.dist.shard(n, "the imagined batch")] if sharded else windows.start_obs
        self.sampler.set_guidance_scale(self.tuner.scale)
        batch = self.sampler.sample(start_obs.to(self.device), generator=generator)
        if sharded and self.dist.enabled:
            batch = gather_imagined(self.dist, batch)
        bad = [name for name in ("observations", "actions", "rewards")
               if not bool(torch.isfinite(getattr(batch, name)).all())]
        if bad:
            self._fail("imagination (the sampler's output)", f"{bad} of the imagined batch")
        return batch, windows

    def agent_update(self, step: int) -> None:
        """Step 4: imagine a batch with the EMA denoiser, one A2C update, one guidance-scale update."""
        cfg = self.cfg
        t0 = time.perf_counter()
        batch, _ = self.imagine(cfg.agent_batch_size, window_seed(cfg.seed, _AGENT_WINDOWS, step),
                                self.generators["imagine"], sharded=True)
        t1 = time.perf_counter()
        try:
            metrics = self.a2c.update(batch)
        except NonFiniteUpdateError as exc:  # the trainer left itself as it was before the update
            self._fail("the A2C update", str(exc))
        bad = _non_finite(metrics)
        if bad:
            self._fail("the A2C update", f"metrics {bad}")
        if cfg.tune_guidance and cfg.sampler.guidance_type == "grad":
            self.tuner.update(batch.metrics["act_std"])
        scale = float(self.tuner.scale)
        if not math.isfinite(scale):
            self._fail("the guidance-scale update", f"scale={scale}")
        imagined = _floats({k: v for k, v in batch.metrics.items()})
        metrics.update({f"imagine/{k}": v for k, v in imagined.items()})
        metrics["guidance_scale"] = scale
        metrics["action_std_error"] = 1.0 - imagined["act_std"]
        self.last_agent = metrics
        self.timers["imagine"] += t1 - t0
        self.timers["a2c"] += time.perf_counter() - t1

    def diffusion_updates(self) -> None:
        """Step 5: ``diffusion_steps_per_period`` denoiser steps on normalised buffer windows (data-parallel: each
        rank trains on its equal shard of the same windows)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        for _ in range(cfg.diffusion_steps_per_period):
            windows = self.buffer.sample_windows(cfg.trainer.batch_size, cfg.horizon,
                                                 seed=window_seed(cfg.seed, _TRAIN_WINDOWS, self.trainer.step),
                                                 normalize=True, sim_states=False)
            if self.dist.enabled:
                windows = row_shard(windows, self.dist.shard(cfg.trainer.batch_size, "trainer.batch_size"))
            try:
                metrics = self.trainer.train_step(windows)
            except NonFiniteUpdateError as exc:  # the step was not taken
                self._fail("the diffusion training step", f"{exc} (diffusion step {self.trainer.step})")
            bad = _non_finite(metrics)
            if bad:
                self._fail("the diffusion training step", f"metrics {bad} at diffusion step {self.trainer.step}")
        self.last_diffusion = metrics
        self.timers["diffusion"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ evaluation and logging
    def evaluate(self) -> dict[str, float]:
        """Step 6: ``eval_episodes`` mean-action episodes on the evaluation env, and the world-model error of
        ``error_trajectories`` imagined trajectories replayed in the simulator from their exact start states."""
        cfg = self.cfg
        returns, lengths = [], []
        for _ in range(cfg.eval_episodes):
            ep = run_episode(self.eval_env, lambda o: self.act(o, deterministic=True) * self.action_scale,
                             max_steps=cfg.max_path_length)
            returns.append(float(ep.rewards.sum()))
            lengths.append(len(ep.rewards))
        metrics = {}
        if returns:
            metrics.update({"eval/return_mean": float(np.mean(returns)), "eval/return_std": float(np.std(returns)),
                            "eval/return_min": float(np.min(returns)), "eval/return_max": float(np.max(returns)),
                            "eval/length_mean": float(np.mean(lengths))})
        batch, windows = self.imagine(cfg.error_trajectories,
                                      window_seed(cfg.seed, _ERROR_WINDOWS, self.env_steps),
                                      self.generators["errors"], sim_states=True)
        metrics.update(trajectory_errors(self.eval_env, windows.sim_states[:, 0].numpy(),
                                         batch.actions.cpu().numpy() * self.action_scale,
                                         batch.observations.cpu().numpy(),
                                         batch.rewards.cpu().numpy()))
        for name, (mean, std) in self.buffer.stats().items():
            for i, (m, s) in enumerate(zip(np.atleast_1d(mean), np.atleast_1d(std))):
                metrics[f"dataset/{name}_{i}_mean"] = float(m)
                metrics[f"dataset/{name}_{i}_std"] = float(s)
        return metrics

    def evaluate_and_log(self) -> None:
        """Step 6 on rank 0 (the evaluation env and the error generator are only read there)."""
        if not self.dist.is_main:
            return
        t0 = time.perf_counter()
        self.last_eval = self.evaluate()
        self.timers["eval"] += time.perf_counter() - t0
        h = self.cfg.horizon - 1
        self.logger.log(self.env_steps, self.last_eval, echo=[
            "eval/return_mean", "eval/return_std", "errors/dynamics_mse_0001_step",
            f"errors/dynamics_mse_{h:04d}_step", "errors/reward_mse"])

    def log_progress(self, steps_per_s: float) -> None:
        """agent/, imagine/, diffusion/, dataset/ and perf/ records (every ``log_interval`` env steps)."""
        record = {}
        for k, v in self.last_agent.items():
            record[k if k.startswith("imagine/") else f"agent/{k}"] = v
        record.update({f"diffusion/{k}": v for k, v in self.last_diffusion.items()})
        record["diffusion/step"] = self.trainer.step
        record["agent/updates"] = self.a2c.step
        record["dataset/transitions"] = self.buffer.num_transitions
        record["dataset/episodes"] = self.buffer.num_episodes
        if self.recent_returns:
            record["expl/return_recent_mean"] = float(np.mean(self.recent_returns))
        record["perf/env_steps_per_s"] = steps_per_s
        record["perf/process_cpu_seconds"] = time.process_time()  # vs wall time: how much the machine was shared
        done = max(self.env_steps, 1) / 1000
        for phase, seconds in self.timers.items():
            record[f"perf/{phase}_s_per_1k_env_steps"] = seconds / done
        self.logger.log(self.env_steps, record, echo=[
            "expl/return_recent_mean", "agent/loss_actor", "agent/policy_std", "agent/lr_actor",
            "agent/guidance_scale", "imagine/act_std", "diffusion/loss", "perf/env_steps_per_s"])

    def final_metrics(self) -> dict[str, float]:
        out = {"env_steps": float(self.env_steps), "diffusion_steps": float(self.trainer.step),
               "agent_updates": float(self.a2c.step), **self.last_eval}
        out.update({f"agent/{k}": v for k, v in self.last_agent.items() if not k.startswith("imagine/")})
        if self.recent_returns:
            out["expl/return_recent_mean"] = float(np.mean(self.recent_returns))
        return out

    def _fail(self, where: str, detail: str) -> None:
        steps = self.checkpoints.steps()
        kept = f"the last good checkpoint is {self.checkpoints.path(steps[-1])}" if steps else \
            "no checkpoint was written yet"
        raise NonFiniteError(f"non-finite value in {where} at env step {self.env_steps}: {detail}; stopping ({kept})")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> Path:
        """Write the checkpoint of this env step (rank 0; every rank calls it: the replicas are checked and every
        rank's own RNG states go into it)."""
        t0 = time.perf_counter()
        for name, module in (("actor", self.actor), ("critic", self.critic), ("denoiser", self.trainer.model),
                             ("EMA denoiser", self.trainer.ema_model)):
            if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
                self._fail(f"the {name}'s weights (before checkpointing)", "NaN/inf parameters")
        ranks = None
        if self.dist.enabled:
            self.dist.check_replicas(self._replicated(), f"the replicated state at env step {self.env_steps}")
            ranks = self.dist.gather_objects(self._rank_state(), "gathering every rank's RNG states")

        def save() -> Path:
            state = self.state_dict()
            if ranks is not None:
                state["ranks"] = ranks
            return self.checkpoints.save(self.env_steps, state)

        path = self.dist.on_main(save, f"writing the checkpoint of env step {self.env_steps}")
        self.timers["checkpoint"] += time.perf_counter() - t0
        return path

    def _replicated(self) -> dict[str, torch.Tensor]:
        """What must be bit-identical on every rank: networks, EMA, the learned LR and guidance scale, the
        buffer's statistics, the env's observation and the action noise stream."""
        out = {f"{name}.{k}": v for name, module in (("actor", self.actor), ("critic", self.critic),
                                                     ("critic_target", self.a2c.critic_target),
                                                     ("denoiser", self.trainer.model),
                                                     ("ema", self.trainer.ema_model))
               for k, v in module.state_dict().items()}
        out.update({"log_actor_lr": self.a2c.log_actor_lr, "guidance_log_scale": self.tuner.log_scale,
                    "obs": torch.from_numpy(self.obs), "action_generator": self.generators["action"].get_state(),
                    "buffer_transitions": torch.tensor(self.buffer.num_transitions)})
        for name, (mean, std) in self.normalizer.state_dict().items():
            out[f"normalizer.{name}"] = torch.from_numpy(np.stack([mean, std]))
        return out

    def _rank_state(self) -> dict[str, Any]:
        """This rank's own random streams: process RNGs, imagination noise, the diffusion trainer's t / noise."""
        return {"process": capture_rng_states(), "imagine": self.generators["imagine"].get_state().cpu(),
                "trainer_generator": self.trainer.generator.get_state().cpu()}

    def state_dict(self) -> dict[str, Any]:
        """Everything the loop reads: networks, EMA, optimisers and learned actor LR (trainer / A2C states),
        guidance scale, normaliser, buffer, every RNG, counters, the envs' exact states, the open episode."""
        ep = self.episode
        return {
            "format": CHECKPOINT_FORMAT, "config": to_dict(self.cfg), "env_steps": self.env_steps,
            "world_size": self.dist.world_size,
            "trainer": self.trainer.state_dict(), "a2c": self.a2c.state_dict(), "guidance": self.tuner.state_dict(),
            "normalizer": {k: (torch.from_numpy(m), torch.from_numpy(sd)) for k, (m, sd) in
                           self.normalizer.state_dict().items()},
            "buffer": {k: torch.from_numpy(np.asarray(v)) for k, v in self.buffer.state_dict().items()},
            "rng": {"process": capture_rng_states(), **{name: g.get_state() for name, g in self.generators.items()}},
            "expl_env": env_state(self.expl_env), "eval_env": env_state(self.eval_env),
            "obs": torch.from_numpy(self.obs), "episode_length": len(ep["rew"]),
            "episode": {k: _tensors(v) for k, v in ep.items() if v},  # the open episode's steps so far
            "episode_return": self.episode_return, "recent_returns": list(self.recent_returns),
            "last_agent": self.last_agent, "last_diffusion": self.last_diffusion, "last_eval": self.last_eval,
            "timers": dict(self.timers),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:  # a format this code cannot read is refused, not guessed
            raise ValueError(f"checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        saved_world = state.get("world_size", 1)  # checkpoints from before data-parallel runs: one process
        if saved_world != self.dist.world_size or len(state.get("ranks", [None])) != saved_world:
            raise ValueError(f"this checkpoint was written by a run of {saved_world} process(es) but this run has "
                             f"{self.dist.world_size}: resume it with the same world size (torchrun "
                             f"--nproc_per_node {saved_world}{' ...' if saved_world > 1 else ', or without torchrun'})")
        self.trainer.load_state_dict(state["trainer"])  # refuses another config or network shape
        self.a2c.load_state_dict(state["a2c"])
        self.tuner.load_state_dict(state["guidance"])
        self.buffer = TrajectoryBuffer.from_state_dict({k: v.numpy() for k, v in state["buffer"].items()})
        self.refit_normalizer({k: (m.numpy(), sd.numpy()) for k, (m, sd) in state["normalizer"].items()})
        rng = state["rng"]
        restore_rng_states(rng["process"])
        for name, g in self.generators.items():
            g.set_state(rng[name])
        restore_env_state(self.eval_env, state["eval_env"])
        obs = restore_env_state(self.expl_env, state["expl_env"])
        self.obs = state["obs"].numpy()
        if not np.array_equal(obs, self.obs):
            raise ValueError("checkpoint: the restored simulator state does not reproduce the saved observation")
        self.env_steps = int(state["env_steps"])
        self.episode = {k: [] for k in self.episode}
        for k, v in state["episode"].items():  # back to per-step numpy rows (rewards: Python floats)
            self.episode[k] = v.tolist() if k == "rew" else list(v.numpy())
        self.episode_return = float(state["episode_return"])
        self.recent_returns = deque(state["recent_returns"], maxlen=self.recent_returns.maxlen)
        self.last_agent, self.last_diffusion = state["last_agent"], state["last_diffusion"]
        self.last_eval = state["last_eval"]
        self.timers = dict(state["timers"])
        if self.dist.enabled:  # this rank's own streams (rank 0's are also the ones restored above)
            own = state["ranks"][self.dist.rank]
            restore_rng_states(own["process"])
            self.generators["imagine"].set_state(own["imagine"])
            self.trainer.generator.set_state(own["trainer_generator"])

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        self.expl_env.close()
        self.eval_env.close()


# ---------------------------------------------------------------------------------------------- entry points
def run(config: AgentConfig, logdir: str | Path, overwrite: bool = False, progress: bool = True,
        tensorboard: bool = False) -> dict[str, float]:
    """Train an agent with ``config`` in ``logdir`` and return the final metrics: ``eval/return_mean`` (the final
    evaluation return), the final world-model errors, ``env_steps``, ``wall_seconds`` and the last A2C update's
    ``agent/*`` metrics. A directory holding this config resumes from its newest checkpoint; another config is
    refused (``run_dir.RunDirError`` naming the differing fields) unless ``overwrite``. Under torchrun every rank
    calls this; rank 0 prepares the directory and writes ``final_metrics.json``."""
    t0 = time.perf_counter()
    with process_group(config.device) as dist:  # torchrun's ranks; a plain process: one rank, nothing changes
        dist.on_main(lambda: prepare_run_dir(logdir, config, overwrite=overwrite), "preparing the run directory")
        agent = Agent(config, logdir, progress=progress, tensorboard=tensorboard, dist=dist)
        try:
            if agent.start() and dist.is_main:
                print(f"resuming the run in {logdir} at env step {agent.env_steps} of {config.n_env_steps}",
                      file=sys.stderr, flush=True)
            final = agent.train()
        finally:
            agent.close()
    final["wall_seconds"] = time.perf_counter() - t0
    if dist.is_main:
        (Path(logdir) / "final_metrics.json").write_text(json.dumps(final, indent=2, sort_keys=True) + "\n")
    return final


DEFAULT_PRESET = "pendulum-cpu"
DESCRIPTION = ("Online RL in imagination with PolyGRAD: an actor-critic trained on trajectories imagined by "
               "policy-guided diffusion, on a MuJoCo task. --preset picks the defaults; every config field below "
               "can be set. Rerunning into the same --logdir resumes the run from its newest checkpoint.")


def parse_args(argv: list[str] | None, prog: str = "polygrad-fast train"):
    """``(preset name, AgentConfig, cli.RunOptions)`` from a command line."""
    from .cli import parse_run

    return parse_run(argv, prog, DESCRIPTION, AgentConfig, AGENT_PRESETS, DEFAULT_PRESET)


def cli(argv: list[str] | None = None, prog: str = "polygrad-fast train") -> None:
    """The agent's command line (``polygrad_fast.cli`` runs it as a subcommand; ``python -m`` directly)."""
    preset, cfg, opts = parse_args(argv, prog)
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: error: device={cfg.device!r} but no CUDA device is available; use --device cpu",
              file=sys.stderr, flush=True)
        raise SystemExit(2)
    logdir = opts.logdir or Path(f"runs/agent/{cfg.env}/{preset}_seed{cfg.seed}")
    final = run(cfg, logdir, overwrite=opts.overwrite, progress=opts.progress, tensorboard=opts.tensorboard)
    if not context_from_env().is_main:  # under torchrun rank 0 reports
        return
    print(f"done: {int(final['env_steps'])} env steps on {cfg.env}; final evaluation return "
          f"{final.get('eval/return_mean', float('nan')):.1f}; {final['wall_seconds']:.0f} s; run directory {logdir}")


if __name__ == "__main__":
    cli(sys.argv[1:], prog="python -m polygrad_fast.agent")
