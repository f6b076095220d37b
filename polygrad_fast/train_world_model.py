"""World-model run: collect MuJoCo data, train the trajectory diffusion model, imagine with policy guidance and
measure the imagined trajectories' error against the real simulator.

    polygrad-fast train-wm                                  # preset hopper-cpu (minutes on 2 CPU cores)
    polygrad-fast train-wm --preset debug --seed 3 --trainer.lr 1e-4
    python -m polygrad_fast.train_world_model ...           # the same command line

The guiding policy is a fixed, randomly initialised actor (the paper's world-model-only runs load a trained
one; the agent, ``polygrad_fast.agent``, trains it). As in the paper's world-model runs, the guidance scale is
tuned while the model trains: every ``guidance_tuning_interval`` training steps the EMA model imagines
``guidance_tuning_batch`` trajectories from buffer start states and the tuner takes one step,
log w <- log w + lr (act_std - 1), with act_std the std of the standardised actions (a - mu(s)) / sigma(s) (logged
as ``guidance/act_std`` and ``guidance/scale``). Evaluations use the current scale and do not tune. Every
evaluation also scores a "persistence" predictor (the state never changes) on the same windows, so the learned
model's error has a yardstick.

Run directory: config.json (the config that ran), metrics.jsonl, buffer.pgbuf (the prefill, written before
training), checkpoints/step_<N>.pt (every ``checkpoint_interval`` steps and at the end). Rerunning the same
config into it resumes from the newest checkpoint and continues exactly (same final metrics as an uninterrupted
run); a different config is refused unless ``--overwrite``.
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .buffer import TrajectoryBuffer
from .checkpoint import CheckpointManager, capture_rng_states, restore_rng_states
from .cli import UsageError, parse_run
from .denoisers import build_denoiser
from .diffusion_trainer import DiffusionTrainer
from .envs import SimStateEnv, random_episodes
from .evaluation import trajectory_errors
from .guidance import GuidanceScaleTuner
from .normalizer import Normalizer
from .policy import Actor
from .presets import DEFAULT_PRESET, PRESETS, WorldModelRunConfig
from .run_dir import prepare_run_dir
from .run_logging import RunLogger
from .sampler import FastGuidedSampler
from .schedule import NoiseSchedule

BUFFER_FILE = "buffer.pgbuf"
CHECKPOINT_DIR = "checkpoints"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def window_seed(run_seed: int, purpose: int, step: int) -> int:
    """Distinct, reproducible buffer-sampling seeds per (run seed, purpose, step)."""
    return (run_seed * 4 + purpose) * 2**32 + step


def persistence_errors(env: SimStateEnv, start_sim_states: np.ndarray, actions: np.ndarray,
                       start_obs: np.ndarray, mean_reward: float) -> dict[str, float]:
    """Errors of the yardstick the model must beat: the start observation never changes and every reward is the
    dataset's mean reward (its own prediction, not the model's), on the same replayed actions [B,H,A]."""
    horizon = actions.shape[1]
    still = np.repeat(start_obs[:, None], horizon, axis=1)
    rewards = np.full(actions.shape[:2], mean_reward, dtype=np.float32)
    errs = trajectory_errors(env, start_sim_states, actions, still, rewards)
    return {k.replace("errors/", "errors/persistence_"): v for k, v in errs.items()}


class WorldModelRun:
    """The pieces of a run in a prepared run directory (``run_dir.prepare_run_dir``); ``train()`` runs it.

    ``resume``: continue from the newest checkpoint in ``logdir`` if there is one (its buffer.pgbuf is loaded
    instead of collecting again); without a checkpoint the run starts over and earlier records are dropped.
    """

    def __init__(self, cfg: WorldModelRunConfig, logdir: str | Path, progress: bool = True,
                 tensorboard: bool = False, resume: bool = False):
        self.cfg, self.logdir, self.progress = cfg, Path(logdir), progress
        self.checkpoints = CheckpointManager(self.logdir / CHECKPOINT_DIR, cfg.keep_checkpoints)
        latest = self.checkpoints.latest() if resume else None
        self.step = latest[0] if latest else 0
        self.resumed = latest is not None
        self.logger = RunLogger(self.logdir, tensorboard=tensorboard,
                                resume_step=self.step if latest else (-1 if resume else None))
        seed_everything(cfg.seed)
        device = torch.device(cfg.device)

        self.env = SimStateEnv(cfg.env, seed=cfg.seed)
        O, A, S = self.env.obs_dim, self.env.act_dim, self.env.sim_state_dim
        if latest:
            self.buffer = self._load_buffer()
        else:
            self.buffer = TrajectoryBuffer(O, A, S, cfg.buffer_capacity)
            t0 = time.perf_counter()
            for ep in random_episodes(self.env, cfg.prefill_steps, seed=cfg.seed):
                self.buffer.add_episode(ep.observations, ep.actions, ep.rewards, ep.sim_states,
                                        terminated=ep.terminated, truncated=ep.truncated)
            self.buffer.save(self.logdir / BUFFER_FILE)  # before any checkpoint: a resume always finds it
            self.logger.log(0, {"dataset/transitions": self.buffer.num_transitions,
                                "dataset/episodes": self.buffer.num_episodes,
                                "perf/prefill_seconds": time.perf_counter() - t0})
        self.normalizer = Normalizer(self.buffer.stats(), device=device)

        self.schedule = NoiseSchedule(cfg.n_diffusion_steps, cfg.noise_tau)
        denoiser = build_denoiser(cfg.denoiser, cfg.horizon, O + 2, A).to(device)
        self.trainer = DiffusionTrainer(denoiser, self.schedule, cfg.trainer)
        self.actor = Actor(O, A).to(device)
        self.tuner = GuidanceScaleTuner(cfg.sampler.guidance_scale, lr=cfg.guidance_tuning_lr, device=device)
        self.generator = torch.Generator(device).manual_seed(cfg.seed)
        self.last_eval: dict[str, float] = {}
        if latest:
            self.load_state_dict(latest[1])
            record = next((r for r in reversed(self.logger.records) if "errors/reward_mse" in r), {})
            self.last_eval = {k: v for k, v in record.items() if k not in ("step", "time")}
        self.sampler = FastGuidedSampler(self.trainer.ema_model, self.schedule, self.actor, self.normalizer,
                                         config=cfg.sampler, execution=cfg.execution)

    def _load_buffer(self) -> TrajectoryBuffer:
        path = self.logdir / BUFFER_FILE
        if not path.exists():
            raise FileNotFoundError(f"{self.logdir} has checkpoints but no {BUFFER_FILE}: the run directory is "
                                    "incomplete; rerun with --overwrite to start over")
        return TrajectoryBuffer.load(path)

    def evaluate(self, step: int) -> dict[str, float]:
        """Imagine ``eval_batch`` trajectories from real start states and replay their actions in the simulator."""
        cfg = self.cfg
        windows = self.buffer.sample_windows(cfg.eval_batch, cfg.horizon, seed=window_seed(cfg.seed, 1, step),
                                             normalize=False)
        start = windows.start_obs.to(self.sampler.device)
        self.sampler.set_guidance_scale(self.tuner.scale)
        imagined = self.sampler.sample(start, generator=self.generator)
        sim0 = windows.sim_states[:, 0].numpy()
        actions = imagined.actions.cpu().numpy()
        metrics = trajectory_errors(self.env, sim0, actions, imagined.observations.cpu().numpy(),
                                    imagined.rewards.cpu().numpy())
        mean_reward = float(self.buffer.stats()["rewards"][0])
        metrics.update(persistence_errors(self.env, sim0, actions, windows.start_obs.numpy(), mean_reward))
        for key in ("act_std", "act_mean", "terminal_avg"):
            metrics[f"imagine/{key}"] = float(imagined.metrics[key])
        metrics["imagine/guidance_scale"] = float(self.sampler.guidance_scale)
        metrics["perf/sampler_ms_per_diffusion_step"] = 1e3 * imagined.metrics["sampling_time"] / cfg.n_diffusion_steps
        return metrics

    def tune_guidance(self, step: int) -> dict[str, float]:
        """One guidance-tuning step: imagine ``guidance_tuning_batch`` trajectories with the current scale from
        buffer start states, then one tuner update from their act_std; returns the batch's act_std and the scale
        after the update."""
        cfg = self.cfg
        windows = self.buffer.sample_windows(cfg.guidance_tuning_batch, cfg.horizon,
                                             seed=window_seed(cfg.seed, 2, step), normalize=False)
        self.sampler.set_guidance_scale(self.tuner.scale)
        imagined = self.sampler.sample(windows.start_obs.to(self.sampler.device), generator=self.generator)
        scale = self.tuner.update(imagined.metrics["act_std"])
        return {"guidance/act_std": float(imagined.metrics["act_std"]), "guidance/scale": float(scale),
                "guidance/skipped_updates": int(self.tuner.skipped_updates)}

    def _log_eval(self, step: int) -> None:
        self.last_eval = self.evaluate(step)
        h = self.cfg.horizon - 1
        self.logger.log(step, self.last_eval, echo=[
            "errors/dynamics_mse_0001_step", f"errors/dynamics_mse_{h:04d}_step",
            f"errors/persistence_dynamics_mse_{h:04d}_step", "errors/reward_mse", "imagine/act_std",
            "imagine/guidance_scale", "perf/sampler_ms_per_diffusion_step"])

    def train(self) -> dict[str, float]:
        """Run the remaining of ``train_steps`` gradient steps with periodic logging, evaluation and checkpoints;
        returns the last evaluation (with ``train_steps=0``: of the untrained model)."""
        cfg = self.cfg
        if cfg.train_steps == 0 and not self.last_eval:
            self._log_eval(0)
            self.save_checkpoint(0)
        tuning = cfg.tune_guidance and cfg.sampler.guidance_type == "grad"  # the scale acts on grad guidance only
        t_log, n_since = time.perf_counter(), 0
        bar = tqdm(range(self.step + 1, cfg.train_steps + 1), disable=not self.progress, desc="world model",
                   unit="step", initial=self.step, total=cfg.train_steps)
        for step in bar:
            batch = self.buffer.sample_windows(cfg.trainer.batch_size, cfg.horizon,
                                               seed=window_seed(cfg.seed, 0, step), normalize=True,
                                               sim_states=False)  # training never reads them
            metrics = self.trainer.train_step(batch)
            self.step = step
            n_since += 1
            if not np.isfinite(metrics["loss"]):
                raise FloatingPointError(f"diffusion loss became {metrics['loss']} at step {step}")
            last = step == cfg.train_steps
            if tuning and step % cfg.guidance_tuning_interval == 0:
                t0 = time.perf_counter()
                self.logger.log(step, self.tune_guidance(step), echo=False)
                t_log += time.perf_counter() - t0  # tuning time is not training throughput
            if step % cfg.log_interval == 0 or last:
                now = time.perf_counter()
                record = {f"diffusion/{k}": v for k, v in metrics.items()}
                record["perf/train_steps_per_s"] = n_since / (now - t_log)
                t_log, n_since = now, 0
                self.logger.log(step, record, echo=not self.progress)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if step % cfg.eval_interval == 0 or last:
                self._log_eval(step)
                t_log = time.perf_counter()  # evaluation time is not training throughput
            if step % cfg.checkpoint_interval == 0 or last:
                self.save_checkpoint(step)
                t_log = time.perf_counter()
        return self.last_eval

    def state_dict(self) -> dict:
        """Everything an exact continuation needs (the buffer is buffer.pgbuf, fixed after the prefill)."""
        return {"step": self.step, "trainer": self.trainer.state_dict(), "actor": self.actor.state_dict(),
                "guidance": self.tuner.state_dict(), "generator": self.generator.get_state(),
                "rng": capture_rng_states()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.trainer.load_state_dict(state["trainer"])
        self.actor.load_state_dict(state["actor"])
        self.tuner.load_state_dict(state["guidance"])
        self.generator.set_state(state["generator"].cpu())
        restore_rng_states(state["rng"])

    def save_checkpoint(self, step: int) -> Path:
        return self.checkpoints.save(step, self.state_dict())

    def close(self) -> None:
        self.logger.close()
        self.env.close()


def check_buildable(cfg: WorldModelRunConfig) -> None:
    """Build the run's networks and tuner once on the meta device (no memory, no data), so that a value only their
    constructors check fails (``cli.UsageError``) before the run directory is touched."""
    env = SimStateEnv(cfg.env)
    O, A = env.obs_dim, env.act_dim
    env.close()
    try:
        with torch.device("meta"):
            build_denoiser(cfg.denoiser, cfg.horizon, O + 2, A)
            Actor(O, A)
        GuidanceScaleTuner(cfg.sampler.guidance_scale, lr=cfg.guidance_tuning_lr)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{type(cfg).__name__}: {exc}") from exc


def run(cfg: WorldModelRunConfig, logdir: str | Path, overwrite: bool = False, progress: bool = True,
        tensorboard: bool = False) -> dict[str, float]:
    """Run (or resume, or refuse: ``run_dir.prepare_run_dir``) the world-model run of ``cfg`` in ``logdir``;
    returns the last evaluation's metrics."""
    check_buildable(cfg)
    resumed = prepare_run_dir(logdir, cfg, overwrite=overwrite)
    wm = WorldModelRun(cfg, logdir, progress=progress, tensorboard=tensorboard, resume=resumed)
    if wm.resumed:
        print(f"resuming the run in {logdir} at step {wm.step} of {cfg.train_steps}", file=sys.stderr, flush=True)
    elif resumed:
        print(f"{logdir} holds this config but no checkpoint: starting the run over", file=sys.stderr, flush=True)
    try:
        return wm.train()
    finally:
        wm.close()


DESCRIPTION = ("Train a PolyGRAD trajectory-diffusion world model on a MuJoCo task and measure its error against "
               "the simulator (and a persistence yardstick). --preset picks the defaults; every config field "
               "below can be set. Rerunning into the same --logdir resumes the run from its newest checkpoint.")


def cli(argv: list[str] | None = None, prog: str = "polygrad-fast train-wm") -> None:
    """The ``train-wm`` command line (``polygrad_fast.cli`` runs it)."""
    preset, cfg, opts = parse_run(argv, prog, DESCRIPTION, WorldModelRunConfig, PRESETS, DEFAULT_PRESET)
    logdir = opts.logdir or Path(f"runs/{cfg.env}/{preset}_seed{cfg.seed}_{time.strftime('%Y%m%d-%H%M%S')}")
    final = run(cfg, logdir, overwrite=opts.overwrite, progress=opts.progress, tensorboard=opts.tensorboard)
    h = cfg.horizon - 1
    model, still = final[f"errors/dynamics_mse_{h:04d}_step"], final[f"errors/persistence_dynamics_mse_{h:04d}_step"]
    print(f"done: {cfg.train_steps} steps on {cfg.env}; step-{h} dynamics MSE {model:.4g} "
          f"(persistence baseline {still:.4g}); run directory {logdir}")


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["train-wm", *sys.argv[1:]]))
