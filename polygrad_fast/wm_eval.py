"""World-model error comparison: PolyGRAD against autoregressive baselines on the same data, policy and evaluation.

    polygrad-fast eval-wm --preset cpu --outdir DIR                  # ~22 min on a 2-core CPU (alias: wm-eval)
    polygrad-fast eval-wm --preset cpu --outdir DIR --sampling_steps 8 16       # + few-step PolyGRAD chains
    polygrad-fast eval-wm --preset paper --outdir DIR --dataset data.pgbuf \
        --policy_checkpoint runs/.../checkpoints/step_000100000.pt --device cuda

The paper's world-model comparison: with a fixed dataset and a fixed policy pi, each method imagines trajectories
of horizon h from the first states of dataset windows; the imagined actions are replayed open-loop in the
simulator from the exact stored simulator state (``evaluation.trajectory_errors``), giving the per-step state
MSE (mean and std over trajectories) and the first-step reward MSE. Methods:

- ``polygrad``: the trajectory denoiser trained at horizon h, sampled with policy guidance (``FastGuidedSampler``);
  each K of ``sampling_steps`` adds ``polygrad_kK``: the same model sampled with the K-step strided chain
  (``SamplerConfig.sampling_steps``);
- ``polygrad_transformer``: the same with the causal-transformer denoiser (the paper's alternative network,
  trained with lr 1e-4 as the paper's transformer runs), one per horizon;
- ``dataset_actions``: the same denoiser given the window's dataset actions (the plain action-conditioned
  sampler), scored against the real states those actions reach: the model's error without the policy's part;
- ``ar_diffusion``: the H=2 diffusion model rolled out one step at a time (``baselines.autoregressive_diffusion``);
- ``mlp_ensemble``: the MBPO-style probabilistic one-step ensemble (``baselines.mlp_ensemble``);
- ``persistence``: predicts that the state never changes and the reward is the dataset's mean reward; its
  actions are the policy's on the held state.

``write_report`` writes errors.csv (one row per method, horizon and reported step), summary.md (error by horizon
and method with the imagination wall time per batch) and errors_vs_step.png.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn

from .backend import ExecutionOptions
from .baselines import (AutoregressiveDiffusion, AutoregressiveDiffusionConfig, EnsembleConfig,
                        ProbabilisticEnsemble, Rollout, buffer_transitions, sample_action)
from .buffer import TrajectoryBuffer
from .cli import exit_usage
from .collect import episodes_to_buffer, read_metadata
from .conditioned_sampling import action_conditioned_sample
from .config import save_config
from .denoisers import DenoiserConfig, MLPDenoiserConfig, TransformerDenoiserConfig, build_denoiser
from .diffusion_trainer import DiffusionTrainer, DiffusionTrainerConfig
from .envs import EnvName, SimStateEnv, random_episodes
from .evaluation import reported_steps, trajectory_errors
from .normalizer import Normalizer
from .policy import Actor
from .presets import check_device, check_number
from .sampler import FastGuidedSampler, SamplerConfig
from .schedule import NoiseSchedule

Method = Literal["polygrad", "polygrad_transformer", "dataset_actions", "ar_diffusion", "mlp_ensemble",
                 "persistence"]
METHODS: tuple[str, ...] = get_args(Method)
LONG_HORIZON = 10  # the paper widens the PolyGRAD denoiser beyond h = 10


@dataclass(frozen=True)
class WMEvalConfig:
    """The whole comparison; presets ``cpu`` (about 22 minutes on a 2-core CPU) and ``paper`` (the paper's sizes)."""

    env: EnvName = "Hopper-v5"
    """MuJoCo task (gymnasium id); a loaded dataset and policy must be of this task."""
    seed: int = 0
    """Seeds data collection, network init, window sampling and imagination."""
    device: str = "cpu"
    """'cpu', 'cuda' or 'cuda:N'."""
    dataset: str | None = None
    """A trajectory-buffer file (.pgbuf: ``polygrad-fast collect``, or a run's buffer.pgbuf); None: collect
    ``dataset_steps`` random-action transitions."""
    dataset_steps: int = 5000
    """Random-action transitions collected when no dataset is given (whole episodes)."""
    policy_checkpoint: str | None = None
    """An agent checkpoint (polygrad_fast.agent) whose actor is the fixed policy; None: a random actor."""
    horizons: tuple[int, ...] = (10, 50, 200)
    """Imagination horizons h (PolyGRAD trains one denoiser per horizon)."""
    methods: tuple[Method, ...] = METHODS
    """Methods to evaluate."""
    eval_batch: int = 1024
    """Imagined trajectories per horizon and method (one imagination batch), all replayed in the simulator."""
    n_diffusion_steps: int = 128
    """T of both diffusion models."""
    noise_tau: float = 0.1
    """Cosine-schedule exponent tau (the paper's Hopper value)."""
    polygrad_hidden: int = 1024
    """PolyGRAD denoiser width at h <= 10."""
    polygrad_hidden_long: int = 2048
    """PolyGRAD denoiser width at h > 10."""
    polygrad_layers: int = 6
    """PolyGRAD denoiser residual blocks."""
    polygrad_train_steps: int = 1_000_000
    """PolyGRAD gradient steps per horizon."""
    trainer: DiffusionTrainerConfig = field(default_factory=DiffusionTrainerConfig)
    """PolyGRAD's diffusion trainer."""
    transformer: TransformerDenoiserConfig = field(default_factory=TransformerDenoiserConfig)
    """polygrad_transformer's denoiser (the paper's sizes by default); trained for polygrad_train_steps."""
    transformer_trainer: DiffusionTrainerConfig = field(default_factory=lambda: DiffusionTrainerConfig(lr=1e-4))
    """polygrad_transformer's diffusion trainer (the paper's transformer runs use lr 1e-4)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """PolyGRAD's guided sampler (fixed guidance scale)."""
    sampling_steps: tuple[int, ...] = ()
    """Also evaluate the PolyGRAD model with each K-step sampling chain here (method polygrad_kK), 2 <= K <= T."""
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)
    ar: AutoregressiveDiffusionConfig = field(default_factory=lambda: AutoregressiveDiffusionConfig(
        train_steps=1_000_000))
    ensemble: EnsembleConfig = field(default_factory=lambda: EnsembleConfig(train_steps=100_000))

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_device(self.device, f"{name}.device")
        check_number(f"{name}.seed", self.seed, 0, 2**30 - 1, integer=True)
        for key in ("dataset_steps", "eval_batch", "n_diffusion_steps", "polygrad_hidden", "polygrad_hidden_long",
                    "polygrad_layers"):
            check_number(f"{name}.{key}", getattr(self, key), 1, integer=True)
        check_number(f"{name}.polygrad_train_steps", self.polygrad_train_steps, 0, integer=True)
        check_number(f"{name}.noise_tau", self.noise_tau, 0, low_open=True)
        if not self.horizons or len(set(self.horizons)) != len(self.horizons):
            raise ValueError(f"{name}.horizons must be distinct and non-empty, got {self.horizons!r}")
        for h in self.horizons:
            check_number(f"{name}.horizons", h, 2, integer=True, why="errors are measured from step 1 on")
        if len(set(self.sampling_steps)) != len(self.sampling_steps):
            raise ValueError(f"{name}.sampling_steps must be distinct, got {self.sampling_steps!r}")
        for k in self.sampling_steps:
            check_number(f"{name}.sampling_steps", k, 2, self.n_diffusion_steps, integer=True,
                         why="a K-step chain on the T = n_diffusion_steps trained steps")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"{name}.methods must be distinct names of {METHODS}, got {self.methods!r}")


def _small_diffusion(steps: int, batch: int, hidden: int) -> tuple[DiffusionTrainerConfig, MLPDenoiserConfig]:
    return (DiffusionTrainerConfig(batch_size=batch, step_start_ema=steps // 4),
            MLPDenoiserConfig(hidden_dim=hidden, num_layers=3))


_CPU_TRAINER, _CPU_DENOISER = _small_diffusion(2000, 128, 256)
PRESETS: dict[str, WMEvalConfig] = {
    "paper": WMEvalConfig(),
    # HalfCheetah, 10k random transitions, h = 10, 50 and 200, small networks: the comparison end to end on a
    # 2-core CPU. HalfCheetah because its episodes never end early (1000 steps): random-action Hopper episodes
    # are 23 steps on average (max 82 of 217 episodes in 5k steps, seed 0), so no h = 200 window and h = 50
    # windows that are mostly padding.
    "cpu": WMEvalConfig(
        env="HalfCheetah-v5", dataset_steps=10_000, horizons=(10, 50, 200), eval_batch=64, n_diffusion_steps=32, polygrad_hidden=256,
        polygrad_hidden_long=256, polygrad_layers=3, polygrad_train_steps=2000, trainer=_CPU_TRAINER,
        # a small transformer at the MLP's lr: 2,000 steps at the paper's 1e-4 leave it far from trained
        transformer=TransformerDenoiserConfig(n_embd=64, n_head=4, num_layers=2), transformer_trainer=_CPU_TRAINER,
        ar=AutoregressiveDiffusionConfig(denoiser=_CPU_DENOISER, trainer=_CPU_TRAINER, train_steps=2000),
        ensemble=EnsembleConfig(hidden=200, train_steps=2000),
    ),
}


@dataclass
class MethodResult:
    """One method at one horizon: per reported step k (``evaluation.reported_steps``) the state MSE's mean and std
    over ``batch`` trajectories, the first-step reward MSE, the imagination wall time of the batch and the
    method's training time (0 for persistence; the dataset-actions check shares PolyGRAD's model)."""

    method: str
    horizon: int
    steps: list[int]
    dynamics_mse: list[float]
    dynamics_mse_std: list[float]
    reward_mse: float
    reward_mse_std: float
    imagine_seconds: float
    train_seconds: float
    batch: int


# ---------------------------------------------------------------------------------------------- inputs
def load_policy(path: str | Path, env_name: str) -> Actor:
    """The actor of an agent checkpoint (``polygrad_fast.agent``: the agent's state, at the top level or under
    ``state`` as ``checkpoint.CheckpointManager`` writes it, holds ``a2c.actor_config`` and ``a2c.actor``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"policy checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and containers only: no code runs
    if isinstance(state, dict) and isinstance(state.get("state"), dict):
        state = state["state"]
    a2c = state.get("a2c") if isinstance(state, dict) else None
    if not isinstance(a2c, dict) or "actor_config" not in a2c or "actor" not in a2c:
        raise ValueError(f"{str(path)!r} is not an agent checkpoint: expected keys a2c.actor_config and a2c.actor")
    saved_env = state.get("config", {}).get("env")
    if saved_env != env_name:
        raise ValueError(f"{str(path)!r} holds a policy for {saved_env!r}, the evaluation is on {env_name!r}")
    actor = Actor(**a2c["actor_config"])
    actor.load_state_dict(a2c["actor"])
    return actor


def check_policy(actor, env: SimStateEnv) -> None:
    """TypeError/ValueError unless ``actor`` is an nn.Module policy for the env's observation and action sizes."""
    if not isinstance(actor, nn.Module) or not hasattr(actor, "obs_dim") or not hasattr(actor, "act_dim"):
        raise TypeError(f"policy must be a polygrad_fast.policy.Actor (an nn.Module with obs_dim/act_dim), "
                        f"got {type(actor).__name__}")
    if (actor.obs_dim, actor.act_dim) != (env.obs_dim, env.act_dim):
        raise ValueError(f"policy maps obs {actor.obs_dim} -> actions {actor.act_dim}, but {env.name} has obs "
                         f"{env.obs_dim} and actions {env.act_dim}")


def collect_dataset(env: SimStateEnv, n_steps: int, seed: int) -> TrajectoryBuffer:
    """Whole random-action episodes until at least ``n_steps`` transitions, in a buffer that holds them all."""
    return episodes_to_buffer(env, random_episodes(env, n_steps, seed=seed))


def load_dataset(path: str | Path, env: SimStateEnv) -> TrajectoryBuffer:
    """A .pgbuf dataset (``polygrad-fast collect`` or a run's buffer.pgbuf) for ``env``: a file whose metadata
    (``collect.read_metadata``) names another task, or whose dims differ from the env's, is refused (ValueError)."""
    meta = read_metadata(path)
    if meta is not None and meta.get("env") != env.name:
        raise ValueError(f"dataset {str(path)!r} was collected in {meta.get('env')!r}, the evaluation is on "
                         f"{env.name!r}")
    return TrajectoryBuffer.load(path, obs_dim=env.obs_dim, act_dim=env.act_dim, sim_state_dim=env.sim_state_dim)


def check_dataset(buffer, env: SimStateEnv, horizons, seed: int) -> None:
    """ValueError unless ``buffer`` holds data of ``env``: the same dims, episodes at least max(horizons) long,
    and stored simulator states that reproduce their stored observations in this env (a dataset of another task
    with the same dims fails here)."""
    if not isinstance(buffer, TrajectoryBuffer):
        raise TypeError(f"dataset must be a TrajectoryBuffer, got {type(buffer).__name__}")
    dims = (buffer.obs_dim, buffer.act_dim, buffer.sim_state_dim)
    if dims != (env.obs_dim, env.act_dim, env.sim_state_dim):
        raise ValueError(f"dataset has (obs, action, sim state) dims {dims}, {env.name} has "
                         f"{(env.obs_dim, env.act_dim, env.sim_state_dim)}: a dataset of another task?")
    if buffer.num_transitions == 0:
        raise ValueError("dataset is empty")
    longest = int(np.max(buffer.episode_lengths()))
    if longest < max(horizons):
        raise ValueError(f"horizon {max(horizons)} exceeds the dataset's longest episode ({longest} steps)")
    w = buffer.sample_windows(8, 1, seed=seed, normalize=False)
    for obs, sim in zip(w.observations[:, 0].numpy(), w.sim_states[:, 0].numpy()):
        if not np.allclose(env.set_sim_state(sim), obs, atol=1e-5):
            raise ValueError(f"the dataset's stored simulator states do not reproduce its observations in "
                             f"{env.name}: it was recorded in another task")


# ---------------------------------------------------------------------------------------------- methods
def _train_polygrad(cfg: WMEvalConfig, horizon: int, buffer: TrajectoryBuffer, schedule: NoiseSchedule,
                    O: int, A: int, transformer: bool = False) -> DiffusionTrainer:
    """The trajectory model of ``polygrad`` (residual MLP, wider beyond h = 10) or of ``polygrad_transformer``,
    trained for ``polygrad_train_steps`` on windows of horizon h."""
    hidden = cfg.polygrad_hidden if horizon <= LONG_HORIZON else cfg.polygrad_hidden_long
    net: DenoiserConfig = cfg.transformer if transformer else \
        MLPDenoiserConfig(hidden_dim=hidden, num_layers=cfg.polygrad_layers)
    denoiser = build_denoiser(net, horizon, O + 2, A).to(cfg.device)
    trainer = DiffusionTrainer(denoiser, schedule, cfg.transformer_trainer if transformer else cfg.trainer)
    for step in range(cfg.polygrad_train_steps):
        trainer.train_step(buffer.sample_windows(cfg.trainer.batch_size, horizon, seed=(cfg.seed << 32) + step,
                                                 normalize=True, sim_states=False))
    return trainer


def persistence_rollout(start_obs: torch.Tensor, policy, horizon: int, mean_reward: float,
                        generator: torch.Generator | None = None) -> Rollout:
    """The yardstick: s_k = s_0 and r_k = the dataset's mean reward for all k; a_k ~ pi(.|s_0) (the policy acting on
    the held state). start_obs [B,O] raw."""
    actions = torch.stack([sample_action(policy, start_obs, generator) for _ in range(horizon)], 1)
    obs = start_obs[:, None].expand(-1, horizon, -1)
    return Rollout(obs, actions, torch.full(actions.shape[:2], mean_reward, device=start_obs.device))


def _result(method: str, horizon: int, errors: dict[str, float], seconds: float, train_seconds: float,
            batch: int) -> MethodResult:
    steps = reported_steps(horizon)
    return MethodResult(method, horizon, steps, [errors[f"errors/dynamics_mse_{k:04d}_step"] for k in steps],
                        [errors[f"errors/dynamics_mse_std_{k:04d}_step"] for k in steps], errors["errors/reward_mse"],
                        errors["errors/reward_mse_std"], seconds, train_seconds, batch)


def prepare_inputs(cfg: WMEvalConfig, buffer: TrajectoryBuffer | None = None, actor: nn.Module | None = None
                   ) -> tuple[SimStateEnv, TrajectoryBuffer, nn.Module]:
    """``(env, dataset, policy)`` of a comparison, all checked (``load_policy``/``check_policy``, ``load_dataset``/
    ``check_dataset``); ``buffer``/``actor`` override ``cfg.dataset``/``cfg.policy_checkpoint``. The caller closes
    the env; on an error it is closed here."""
    torch.manual_seed(cfg.seed)
    env = SimStateEnv(cfg.env, seed=cfg.seed)
    try:
        if actor is None:
            actor = load_policy(cfg.policy_checkpoint, cfg.env) if cfg.policy_checkpoint else \
                Actor(env.obs_dim, env.act_dim)
        check_policy(actor, env)
        if buffer is None and cfg.dataset is not None:
            buffer = load_dataset(cfg.dataset, env)
        elif buffer is None:
            buffer = collect_dataset(env, cfg.dataset_steps, cfg.seed)
        check_dataset(buffer, env, cfg.horizons, cfg.seed)
    except BaseException:
        env.close()
        raise
    return env, buffer, actor.to(cfg.device).eval()


def evaluate(cfg: WMEvalConfig, buffer: TrajectoryBuffer | None = None, actor: nn.Module | None = None,
             log=print) -> list[MethodResult]:
    """Every method of ``cfg`` at every horizon on one dataset and one policy; inputs are checked before any
    training (``prepare_inputs``)."""
    env, buffer, actor = prepare_inputs(cfg, buffer, actor)
    try:
        return _evaluate(cfg, env, buffer, actor, log)
    finally:
        env.close()


def _evaluate(cfg: WMEvalConfig, env: SimStateEnv, buffer: TrajectoryBuffer, actor: nn.Module,
              log) -> list[MethodResult]:
    dev = torch.device(cfg.device)
    O, A = env.obs_dim, env.act_dim
    normalizer = Normalizer(buffer.stats(), device=dev)
    schedule = NoiseSchedule(cfg.n_diffusion_steps, cfg.noise_tau)
    mean_reward = float(buffer.stats()["rewards"][0])
    models, train_s = {}, {}
    for name in ("ar_diffusion", "mlp_ensemble"):
        if name not in cfg.methods:
            continue
        t0 = time.perf_counter()
        if name == "ar_diffusion":
            models[name] = AutoregressiveDiffusion(O, A, normalizer, schedule, cfg.ar, device=dev)
            models[name].train(buffer, cfg.seed)
        else:
            models[name] = ProbabilisticEnsemble(O, A, cfg.ensemble).to(dev)
            fit = models[name].fit(buffer_transitions(buffer, seed=cfg.seed), seed=cfg.seed)
            log(f"mlp_ensemble: elites {models[name].elite_index.tolist()}, "
                f"held-out NLL {fit['elite_holdout_nll']:.3f}")
        train_s[name] = time.perf_counter() - t0
        log(f"{name}: trained in {train_s[name]:.1f} s")

    results = []
    for hi, horizon in enumerate(cfg.horizons):
        # training windows use seeds (seed << 32) + step with step < 2**31: these never collide with them
        windows = buffer.sample_windows(cfg.eval_batch, horizon, seed=(cfg.seed << 32) + 2**31 + hi,
                                        normalize=False)
        start = windows.start_obs.to(dev)
        sim0 = windows.sim_states[:, 0].numpy()
        trainers, few_step = {}, [f"polygrad_k{k}" for k in cfg.sampling_steps]
        if {"polygrad", "dataset_actions"} & set(cfg.methods) or few_step:
            t0 = time.perf_counter()
            trainers["polygrad"] = _train_polygrad(cfg, horizon, buffer, schedule, O, A)
            trained_in = time.perf_counter() - t0
            train_s.update(dict.fromkeys(("polygrad", "dataset_actions", *few_step), trained_in))
            log(f"polygrad h={horizon}: trained in {train_s['polygrad']:.1f} s")
        if "polygrad_transformer" in cfg.methods:
            t0 = time.perf_counter()
            trainers["polygrad_transformer"] = _train_polygrad(cfg, horizon, buffer, schedule, O, A, transformer=True)
            train_s["polygrad_transformer"] = time.perf_counter() - t0
            log(f"polygrad_transformer h={horizon}: trained in {train_s['polygrad_transformer']:.1f} s")
        methods = list(cfg.methods)
        at = methods.index("polygrad") + 1 if "polygrad" in methods else 0
        methods[at:at] = few_step  # reported next to the full chain
        for mi, method in enumerate(methods):
            g = torch.Generator(dev).manual_seed((cfg.seed << 16) + 64 * hi + mi)
            guided = method in ("polygrad", "polygrad_transformer") or method in few_step
            if guided:  # built outside the timed region: imagination time only
                model = trainers["polygrad_transformer" if method == "polygrad_transformer" else "polygrad"]
                k = int(method.removeprefix("polygrad_k")) if method in few_step else None
                sampler = FastGuidedSampler(model.ema_model, schedule, actor, normalizer,
                                            config=dataclasses.replace(cfg.sampler, sampling_steps=k) if k
                                            else cfg.sampler,
                                            execution=cfg.execution)
            t0 = time.perf_counter()
            if guided:
                b = sampler.sample(start, generator=g)
                rollout = Rollout(b.observations, b.actions, b.rewards)
            elif method == "dataset_actions":
                act = windows.actions.to(dev)
                x = action_conditioned_sample(trainers["polygrad"].ema_model, schedule,
                                              normalizer.normalize(start, "observations"),
                                              normalizer.normalize(act, "actions"), generator=g)
                rollout = Rollout(normalizer.unnormalize(x[..., :O], "observations"), act,
                                  normalizer.unnormalize(x[..., O], "rewards"))
            elif method == "persistence":
                rollout = persistence_rollout(start, actor, horizon, mean_reward, g)
            else:
                rollout = models[method].rollout(start, actor, horizon, g)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - t0
            obs, act, rew = (t.detach().cpu().numpy() for t in rollout)
            errors = trajectory_errors(env, sim0, act, obs, rew)
            results.append(_result(method, horizon, errors, seconds, train_s.get(method, 0.0), cfg.eval_batch))
            r = results[-1]
            log(f"h={horizon} {method:>15}: step-1 MSE {r.dynamics_mse[0]:.4g}, step-{r.steps[-1]} "
                f"{r.dynamics_mse[-1]:.4g}, reward MSE {r.reward_mse:.4g}, imagine {seconds:.2f} s")
    return results


# ---------------------------------------------------------------------------------------------- report
CSV_FIELDS = ("method", "horizon", "step", "dynamics_mse", "dynamics_mse_std", "reward_mse", "reward_mse_std",
              "imagine_seconds_per_batch", "train_seconds", "batch")


def _summary_steps(horizon: int) -> list[int]:
    """The steps a summary table shows: 1, 5 (where it exists) and the last."""
    return sorted({k for k in (1, 5, horizon - 1) if k in reported_steps(horizon)})


def markdown_table(results: list[MethodResult]) -> str:
    """Error by horizon and method: state MSE (mean +- std over trajectories) at steps 1, 5 and h-1, first-step
    reward MSE, imagination seconds per batch and training seconds."""
    lines = []
    for horizon in dict.fromkeys(r.horizon for r in results):
        rows = [r for r in results if r.horizon == horizon]
        steps = _summary_steps(horizon)
        lines += [f"### h = {horizon} ({rows[0].batch} trajectories)", "",
                  "| method | " + " | ".join(f"state MSE step {k}" for k in steps)
                  + " | reward MSE step 0 | imagine s / batch | train s |",
                  "| --- |" + " --- |" * (len(steps) + 3)]
        for r in rows:
            cells = [f"{r.dynamics_mse[r.steps.index(k)]:.4g} +- {r.dynamics_mse_std[r.steps.index(k)]:.2g}"
                     for k in steps]
            lines.append(f"| {r.method} | " + " | ".join(cells) + f" | {r.reward_mse:.4g} +- {r.reward_mse_std:.2g}"
                         f" | {r.imagine_seconds:.3g} | {r.train_seconds:.3g} |")
        lines.append("")
    return "\n".join(lines)


def write_report(results: list[MethodResult], outdir: str | Path) -> dict[str, Path]:
    """Write errors.csv, summary.md and errors_vs_step.png (one panel per horizon, log state MSE vs step, one line
    per method with a +-std/sqrt(batch) band) to ``outdir``; returns their paths."""
    if not results:
        raise ValueError("no results to report")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "errors.csv", "markdown": out / "summary.md", "plot": out / "errors_vs_step.png"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in results:
            for k, m, s in zip(r.steps, r.dynamics_mse, r.dynamics_mse_std):
                w.writerow([r.method, r.horizon, k, m, s, r.reward_mse, r.reward_mse_std, r.imagine_seconds,
                            r.train_seconds, r.batch])
    paths["markdown"].write_text("# World-model error vs the simulator\n\n" + markdown_table(results))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    horizons = list(dict.fromkeys(r.horizon for r in results))
    fig, axes = plt.subplots(1, len(horizons), figsize=(5 * len(horizons), 4), squeeze=False)
    for ax, horizon in zip(axes[0], horizons):
        for r in (r for r in results if r.horizon == horizon):
            m, s = np.asarray(r.dynamics_mse), np.asarray(r.dynamics_mse_std) / math.sqrt(r.batch)
            ax.plot(r.steps, m, label=r.method)
            ax.fill_between(r.steps, np.maximum(m - s, 1e-12), m + s, alpha=0.2)
        ax.set(yscale="log", xlabel="imagined step k", ylabel="state MSE", title=f"h = {horizon}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["plot"], dpi=100)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None,
               prog: str = "python -m polygrad_fast.wm_eval") -> tuple[WMEvalConfig, Path]:
    """``(config, outdir)`` from ``--preset NAME --outdir DIR [--field value ...]`` (tyro, dotted fields); bad
    arguments exit 2 before anything runs."""
    import tyro

    pre = argparse.ArgumentParser(prog=prog, add_help=False)
    pre.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    pre.add_argument("--outdir", type=Path)
    known, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = tyro.cli(WMEvalConfig, args=rest, default=PRESETS[known.preset], prog=prog,
                       use_underscores=True,
                       description=__doc__.split("\n\n")[0] + f" --preset {{{','.join(PRESETS)}}} (default cpu) "
                       "picks the defaults and --outdir DIR (required) gets the report; both are read first.")
    except (ValueError, TypeError) as exc:  # the config's own validation, run while tyro builds it
        exit_usage(prog, str(exc))
    if known.outdir is None:  # checked after tyro so that --help works without it
        exit_usage(prog, "--outdir DIR is required")
    return cfg, known.outdir


def main(argv: list[str] | None = None, prog: str = "python -m polygrad_fast.wm_eval") -> list[MethodResult]:
    """``python -m polygrad_fast.wm_eval --preset cpu --outdir DIR [--field value ...]``; called as
    ``main(argv, prog)`` it is also a ``polygrad_fast.cli`` subcommand entry."""
    cfg, outdir = parse_args(argv, prog)
    try:  # a missing or mismatched dataset or policy is a usage error, reported before any training
        env, buffer, actor = prepare_inputs(cfg)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        exit_usage(prog, str(exc))
    try:
        results = _evaluate(cfg, env, buffer, actor, print)
    finally:
        env.close()
    paths = write_report(results, outdir)
    save_config(cfg, outdir / "config.json")
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return results


if __name__ == "__main__":
    main()
