"""World-model run: collect MuJoCo data, train the trajectory diffusion model, imagine with policy guidance and
measure the imagined trajectories' error against the real simulator.

    python -m polygrad_fast.train_world_model                       # preset hopper-cpu (minutes on 2 CPU cores)
    python -m polygrad_fast.train_world_model --preset debug seed=3 trainer.lr=1e-4

The guiding policy is a fixed, randomly initialised actor (the paper's world-model-only runs load a trained
one; online RL in imagination will train it). Every evaluation also scores a "persistence" predictor (the
state never changes) on the same windows, so the learned model's error has a yardstick.
Writes to the run directory: config.json (resolved config), metrics.jsonl, checkpoint.pt, buffer.pgbuf.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .buffer import TrajectoryBuffer
from .config import apply_overrides, save_config, to_dict
from .denoisers import build_denoiser
from .diffusion_trainer import DiffusionTrainer
from .envs import SUPPORTED_ENVS, SimStateEnv, random_episodes
from .evaluation import trajectory_errors
from .guidance import GuidanceScaleTuner
from .normalizer import Normalizer
from .policy import Actor
from .presets import PRESETS, WorldModelRunConfig, get_preset
from .run_logging import RunLogger
from .sampler import FastGuidedSampler
from .schedule import NoiseSchedule


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def window_seed(run_seed: int, purpose: int, step: int) -> int:
    """Distinct, reproducible buffer-sampling seeds per (run seed, purpose, step)."""
    return (run_seed * 4 + purpose) * 2**32 + step


def persistence_errors(env: SimStateEnv, start_sim_states: np.ndarray, actions: np.ndarray,
                       start_obs: np.ndarray, rewards: np.ndarray) -> dict[str, float]:
    """Errors of predicting that the start observation never changes (the yardstick the model must beat)."""
    horizon = actions.shape[1]
    still = np.repeat(start_obs[:, None], horizon, axis=1)
    errs = trajectory_errors(env, start_sim_states, actions, still, rewards)
    return {k.replace("errors/", "errors/persistence_"): v for k, v in errs.items()}


class WorldModelRun:
    """The pieces of a run, built from a ``WorldModelRunConfig``; ``train()`` runs it."""

    def __init__(self, cfg: WorldModelRunConfig, logdir: str | Path, progress: bool = True,
                 tensorboard: bool = False):
        self.cfg, self.logdir, self.progress = cfg, Path(logdir), progress
        self.logdir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.logdir / "config.json")
        self.logger = RunLogger(self.logdir, tensorboard=tensorboard)
        seed_everything(cfg.seed)
        device = torch.device(cfg.device)

        self.env = SimStateEnv(cfg.env, seed=cfg.seed)
        O, A, S = self.env.obs_dim, self.env.act_dim, self.env.sim_state_dim
        self.buffer = TrajectoryBuffer(O, A, S, cfg.buffer_capacity)
        t0 = time.perf_counter()
        for ep in random_episodes(self.env, cfg.prefill_steps, seed=cfg.seed):
            self.buffer.add_episode(ep.observations, ep.actions, ep.rewards, ep.sim_states,
                                    terminated=ep.terminated, truncated=ep.truncated)
        self.logger.log(0, {"dataset/transitions": self.buffer.num_transitions,
                            "dataset/episodes": self.buffer.num_episodes,
                            "perf/prefill_seconds": time.perf_counter() - t0})
        self.normalizer = Normalizer(self.buffer.stats(), device=device)

        self.schedule = NoiseSchedule(cfg.n_diffusion_steps, cfg.noise_tau)
        denoiser = build_denoiser(cfg.denoiser, cfg.horizon, O + 2, A).to(device)
        self.trainer = DiffusionTrainer(denoiser, self.schedule, dataclasses.replace(cfg.trainer, seed=cfg.seed))
        self.actor = Actor(O, A).to(device)
        self.sampler = FastGuidedSampler(self.trainer.ema_model, self.schedule, self.actor, self.normalizer,
                                         config=cfg.sampler)
        self.tuner = GuidanceScaleTuner(cfg.sampler.guidance_scale, lr=cfg.guidance_tuning_lr, device=device)
        self.generator = torch.Generator(device).manual_seed(cfg.seed)

    def evaluate(self, step: int) -> dict[str, float]:
        """Imagine ``eval_batch`` trajectories from real start states and replay their actions in the simulator."""
        cfg = self.cfg
        windows = self.buffer.sample_windows(cfg.eval_batch, cfg.horizon, seed=window_seed(cfg.seed, 1, step),
                                             normalize=False)
        start = windows.start_obs.to(self.sampler.device)
        self.sampler.set_guidance_scale(self.tuner.scale)
        imagined = self.sampler.sample(start, generator=self.generator)
        if self.cfg.sampler.guidance_type == "grad":
            self.tuner.update(imagined.metrics["act_std"])
        sim0 = windows.sim_states[:, 0].numpy()
        actions = imagined.actions.cpu().numpy()
        metrics = trajectory_errors(self.env, sim0, actions, imagined.observations.cpu().numpy(),
                                    imagined.rewards.cpu().numpy())
        metrics.update(persistence_errors(self.env, sim0, actions, windows.start_obs.numpy(),
                                          imagined.rewards.cpu().numpy()))
        for key in ("act_std", "act_mean", "terminal_avg"):
            metrics[f"imagine/{key}"] = float(imagined.metrics[key])
        metrics["imagine/guidance_scale"] = float(self.sampler.guidance_scale)
        metrics["perf/sampler_ms_per_diffusion_step"] = 1e3 * imagined.metrics["sampling_time"] / cfg.n_diffusion_steps
        return metrics

    def train(self) -> dict[str, float]:
        """Run ``train_steps`` gradient steps with periodic logging and evaluation; returns the last evaluation."""
        cfg = self.cfg
        last_eval: dict[str, float] = {}
        t_log, n_since = time.perf_counter(), 0
        bar = tqdm(range(1, cfg.train_steps + 1), disable=not self.progress, desc="world model", unit="step")
        for step in bar:
            batch = self.buffer.sample_windows(cfg.trainer.batch_size, cfg.horizon,
                                               seed=window_seed(cfg.seed, 0, step), normalize=True,
                                               sim_states=False)  # training never reads them
            metrics = self.trainer.train_step(batch)
            n_since += 1
            if not np.isfinite(metrics["loss"]):
                raise FloatingPointError(f"diffusion loss became {metrics['loss']} at step {step}")
            if step % cfg.log_interval == 0 or step == cfg.train_steps:
                now = time.perf_counter()
                record = {f"diffusion/{k}": v for k, v in metrics.items()}
                record["perf/train_steps_per_s"] = n_since / (now - t_log)
                t_log, n_since = now, 0
                self.logger.log(step, record, echo=not self.progress)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if step % cfg.eval_interval == 0 or step == cfg.train_steps:
                last_eval = self.evaluate(step)
                h = cfg.horizon - 1
                self.logger.log(step, last_eval, echo=[
                    "errors/dynamics_mse_0001_step", f"errors/dynamics_mse_{h:04d}_step",
                    f"errors/persistence_dynamics_mse_{h:04d}_step", "errors/reward_mse", "imagine/act_std",
                    "imagine/guidance_scale", "perf/sampler_ms_per_diffusion_step"])
                t_log = time.perf_counter()  # evaluation time is not training throughput
        self.save_checkpoint()
        return last_eval

    def save_checkpoint(self) -> None:
        """checkpoint.pt (models, optimiser, tuner, normaliser, config) and buffer.pgbuf, both written atomically."""
        state = {"config": to_dict(self.cfg), "trainer": self.trainer.state_dict(),
                 "actor": self.actor.state_dict(), "guidance": self.tuner.state_dict(),
                 "normalizer": self.normalizer.state_dict()}
        path = self.logdir / "checkpoint.pt"
        tmp = path.with_suffix(".pt.tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.buffer.save(self.logdir / "buffer.pgbuf")

    def close(self) -> None:
        self.logger.close()
        self.env.close()


def parse_args(argv=None) -> tuple[WorldModelRunConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m polygrad_fast.train_world_model",
        description="Train a PolyGRAD trajectory-diffusion world model on a MuJoCo task and measure its error "
                    "against the simulator. Extra arguments key=value override config fields, e.g. "
                    "trainer.lr=1e-4 sampler.guidance_type=none.")
    parser.add_argument("--preset", default="hopper-cpu", choices=sorted(PRESETS))
    parser.add_argument("--logdir", default=None, help="run directory (default runs/<env>/<preset>_seed<seed>_<time>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar; log lines instead")
    parser.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    pairs = {}
    for item in args.overrides:
        if "=" not in item:
            parser.error(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        pairs[key] = value
    try:
        cfg = apply_overrides(get_preset(args.preset), pairs)
    except (KeyError, ValueError) as exc:
        parser.error(str(exc))
    if cfg.env not in SUPPORTED_ENVS:  # checked before the run directory is created
        parser.error(f"unknown env name {cfg.env!r}; supported: {', '.join(SUPPORTED_ENVS)}")
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"device={cfg.device!r} but no CUDA device is available; use device=cpu")
    if args.logdir is None:
        args.logdir = f"runs/{cfg.env}/{args.preset}_seed{cfg.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg, args


def main(argv=None) -> None:
    cfg, args = parse_args(argv)
    run = WorldModelRun(cfg, args.logdir, progress=not args.no_progress, tensorboard=args.tensorboard)
    try:
        final = run.train()
    finally:
        run.close()
    h = cfg.horizon - 1
    model, still = final[f"errors/dynamics_mse_{h:04d}_step"], final[f"errors/persistence_dynamics_mse_{h:04d}_step"]
    print(f"done: {cfg.train_steps} steps on {cfg.env}; step-{h} dynamics MSE {model:.4g} "
          f"(persistence baseline {still:.4g}); run directory {args.logdir}")


if __name__ == "__main__":
    main()
