"""Videos of world-model imagination and of policy episodes, rendered offscreen by MuJoCo (GIF or MP4).

    polygrad-fast render --run runs/Hopper-v5/hopper-cpu_seed0_... --out imagined.gif     # imagined | real
    polygrad-fast render --policy_checkpoint runs/.../checkpoints/step_0000020000.pt --out episode.mp4

Imagined vs real: the EMA denoiser of a world-model or agent run imagines one trajectory with policy guidance
(the run's actor and tuned guidance scale) from a dataset start state; each frame shows the imagined state k
(left) next to the simulator's state after replaying the imagined actions a_0..a_{k-1} open-loop from the exact
stored start state (right). An imagined observation is turned into a simulator pose by
``observation_to_state``: observations hold qpos without the excluded root positions (x on Hopper, Walker2d and
HalfCheetah; x, y on Ant) followed by qvel, so those positions are reconstructed: they start at the start
state's and are integrated from the imagined root velocities,
x_{k+1} = x_k + dt (v_k + v_{k+1}) / 2 (trapezoid rule, dt the env's control step). Hopper and Walker2d clip the
observed qvel to [-10, 10], so a reconstructed x can lag the truth in violent motion.

Headless machines need an offscreen OpenGL backend: MUJOCO_GL defaults to ``egl`` here (set MUJOCO_GL=osmesa
for CPU-only Mesa). MP4 needs the ``imageio-ffmpeg`` package (``pip install -e ".[render]"``); GIF needs Pillow.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch

from .buffer import TrajectoryBuffer
from .checkpoint import CheckpointManager
from .config import from_dict
from .denoisers import build_denoiser
from .envs import SUPPORTED_ENVS, SimStateEnv
from .normalizer import Normalizer
from .policy import Actor, policy_mean_std
from .presets import WorldModelRunConfig
from .run_dir import CONFIG_FILE
from .sampler import FastGuidedSampler
from .schedule import NoiseSchedule
from .train_world_model import BUFFER_FILE, CHECKPOINT_DIR

# Root positions left out of the observation (gymnasium's exclude_current_positions_from_observation).
_EXCLUDED_ROOT_POSITIONS = {"Hopper": 1, "Walker2d": 1, "HalfCheetah": 1, "Ant": 2, "InvertedPendulum": 0}
VIDEO_SUFFIXES = (".gif", ".mp4")


def excluded_positions(env_name: str) -> int:
    """How many leading qpos entries (root x, y) the observation of ``env_name`` leaves out."""
    return _EXCLUDED_ROOT_POSITIONS[env_name.split("-")[0]]


def _load_triton_first() -> None:
    """Import triton (when installed) before any GL context exists: on Mesa's software EGL (llvmpipe), importing
    triton after a context was made crashed the process (two LLVM copies; measured here), and torch imports
    triton lazily (e.g. at the first optimizer or torch.compile)."""
    if importlib.util.find_spec("triton") is not None:
        importlib.import_module("triton")


class Renderer:
    """An env of ``name`` that renders RGB frames [height, width, 3] uint8 of simulator states."""

    def __init__(self, name: str, width: int = 240, height: int = 240):
        for key, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, int) or not 16 <= v <= 4096:
                raise ValueError(f"{key} must be an int in [16, 4096], got {v!r}")
        os.environ.setdefault("MUJOCO_GL", "egl")  # read when the first frame's GL context is made
        _load_triton_first()
        self.env = SimStateEnv(name, render_mode="rgb_array", width=width, height=height)
        self.env.reset()
        self.sim = self.env.env.unwrapped
        self.skip = excluded_positions(name)
        self.nq, self.nv = self.sim.model.nq, self.sim.model.nv

    def frame(self) -> np.ndarray:
        try:
            return np.asarray(self.sim.render(), dtype=np.uint8).copy()
        except Exception as exc:  # no GL backend: say which one was tried and what to set
            raise RuntimeError(f"MuJoCo offscreen rendering failed with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} "
                               f"({type(exc).__name__}: {exc}); on a headless machine use MUJOCO_GL=egl or "
                               "MUJOCO_GL=osmesa") from exc

    def pose_frame(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """The frame of the pose (qpos [nq], qvel [nv])."""
        self.sim.set_state(qpos, qvel)
        return self.frame()

    def close(self) -> None:
        self.env.close()


def observation_to_state(env: Renderer, observations: np.ndarray, start_sim_state: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(qpos [H,nq], qvel [H,nv]) of observations [H,O]; the excluded root positions start at the start state's
    and follow the observed root velocities by the trapezoid rule (module docstring)."""
    obs = np.asarray(observations, dtype=np.float64)
    n_pos = env.nq - env.skip
    if obs.ndim != 2 or obs.shape[1] < n_pos + env.nv:
        raise ValueError(f"observations: expected [H, >= {n_pos + env.nv}] (qpos without {env.skip} root "
                         f"position(s), then qvel), got shape {obs.shape}")
    qvel = obs[:, n_pos:n_pos + env.nv]
    qpos = np.empty((len(obs), env.nq))
    qpos[:, env.skip:] = obs[:, :n_pos]
    if env.skip:
        env.env.set_sim_state(start_sim_state)
        root = env.sim.data.qpos[:env.skip].copy()
        steps = 0.5 * (qvel[1:, :env.skip] + qvel[:-1, :env.skip]) * env.sim.dt
        qpos[:, :env.skip] = root + np.concatenate([np.zeros((1, env.skip)), np.cumsum(steps, axis=0)])
    return qpos, qvel


def replay_states(env: Renderer, start_sim_state: np.ndarray, actions: np.ndarray) -> list[np.ndarray]:
    """Exact simulator states [len(actions) + 1] x [S]: the start and after each action (clipped as the env)."""
    env.env.set_sim_state(start_sim_state)
    low, high = env.env.action_space.low, env.env.action_space.high
    states = [env.env.get_sim_state()]
    for a in np.asarray(actions, dtype=np.float32):
        env.sim.step(np.clip(a, low, high))
        states.append(env.env.get_sim_state())
    return states


def _label(frame: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.fromarray(frame)
    ImageDraw.Draw(img).text((4, 4), text, fill=(255, 255, 255))  # on the dark sky
    return np.asarray(img)


def imagined_vs_real_frames(env: Renderer, start_sim_state: np.ndarray, observations: np.ndarray,
                            actions: np.ndarray) -> np.ndarray:
    """Side-by-side frames [H, height, 2 width + 2, 3] uint8 of one imagined trajectory (observations [H,O],
    actions [H,A], index 0 the start state) | its open-loop replay in the simulator from start_sim_state [S]."""
    observations, actions = np.asarray(observations), np.asarray(actions)
    if len(observations) != len(actions):
        raise ValueError(f"observations [H,O] and actions [H,A] must have the same H, got {observations.shape} and "
                         f"{actions.shape}")
    qpos, qvel = observation_to_state(env, observations, start_sim_state)
    real = replay_states(env, start_sim_state, actions[:-1])
    frames = []
    for k in range(len(observations)):
        left = _label(env.pose_frame(qpos[k], qvel[k]), f"imagined k={k}")
        env.env.set_sim_state(real[k])
        right = _label(env.frame(), f"real k={k}")
        gap = np.full((left.shape[0], 2, 3), 255, dtype=np.uint8)
        frames.append(np.concatenate([left, gap, right], axis=1))
    return np.stack(frames)


def episode_frames(env: Renderer, actor: torch.nn.Module, max_steps: int) -> tuple[np.ndarray, float]:
    """(frames [L+1, height, width, 3], return) of one evaluation episode with the actor's mean action."""
    obs, _ = env.env.reset()
    frames, total = [env.frame()], 0.0
    for _ in range(max_steps):
        with torch.no_grad():
            action = policy_mean_std(actor(torch.as_tensor(obs)[None]))[0][0].numpy()
        obs, reward, terminated, truncated, _ = env.env.step(action)
        frames.append(env.frame())
        total += reward
        if terminated or truncated:
            break
    return np.stack(frames), total


def write_video(frames: np.ndarray, path: str | Path, fps: int = 25) -> Path:
    """Write frames [N, h, w, 3] uint8 as a GIF (Pillow) or an MP4 (imageio-ffmpeg), by ``path``'s suffix."""
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames: expected a non-empty uint8 array [N, h, w, 3], got {frames.dtype} {frames.shape}")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"video file must end in one of {VIDEO_SUFFIXES}, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return path
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (imageio's MP4 writer needs it)
    except ImportError as exc:
        raise RuntimeError(f"writing MP4 needs imageio and imageio-ffmpeg ({exc}); pip install -e \".[render]\", "
                           "or write a .gif") from exc
    # ffmpeg's yuv420p needs even sizes: pad by one row / column where odd
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1) as writer:
        for f in frames:
            writer.append_data(f)
    return path


def imagine_from_run(logdir: str | Path, index: int = 0, seed: int = 0) -> dict:
    """One trajectory imagined at the newest checkpoint of a run directory, a world-model run (``train-wm``) or
    an agent run (``train``): its EMA denoiser, actor, normaliser and tuned guidance scale, from the start state
    of the dataset window drawn with ``seed``. Returns {'env', 'step', 'sim_state' [S], 'observations' [H,O],
    'actions' [H,A]} in raw units; ``index`` picks the trajectory of a batch of index + 1."""
    from .agent_config import AgentConfig
    from .wm_eval import load_policy

    logdir = Path(logdir)
    if not (logdir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{logdir} is not a run directory: {CONFIG_FILE} is missing")
    checkpoints = CheckpointManager(logdir / CHECKPOINT_DIR)
    latest = checkpoints.latest(map_location="cpu")
    if latest is None:
        raise FileNotFoundError(f"{logdir / CHECKPOINT_DIR} holds no checkpoint yet")
    step, state = latest
    saved = json.loads((logdir / CONFIG_FILE).read_text())
    if "a2c" in state:  # an agent run: its buffer, normaliser and actor are in the checkpoint
        cfg = from_dict(AgentConfig, saved)
        buffer = TrajectoryBuffer.from_state_dict({k: v.numpy() for k, v in state["buffer"].items()})
        normalizer = Normalizer({k: (m.numpy(), sd.numpy()) for k, (m, sd) in state["normalizer"].items()})
        actor = load_policy(checkpoints.path(step), cfg.env)
    else:  # a world-model run: the fixed prefill buffer.pgbuf, a default-sized actor
        cfg = from_dict(WorldModelRunConfig, saved)
        buffer = TrajectoryBuffer.load(logdir / BUFFER_FILE)
        normalizer = Normalizer(buffer.stats())
        actor = Actor(buffer.obs_dim, buffer.act_dim)
        actor.load_state_dict(state["actor"])
    denoiser = build_denoiser(cfg.denoiser, cfg.horizon, buffer.obs_dim + 2, buffer.act_dim)
    denoiser.load_state_dict(state["trainer"]["ema"])  # the EMA weights: what the run imagines with
    schedule = NoiseSchedule(cfg.n_diffusion_steps, cfg.noise_tau)
    sampler = FastGuidedSampler(denoiser.eval(), schedule, actor.eval(), normalizer, config=cfg.sampler,
                                execution=cfg.execution)
    windows = buffer.sample_windows(index + 1, cfg.horizon, seed=seed, normalize=False)
    batch = sampler.sample(windows.start_obs, generator=torch.Generator().manual_seed(seed),
                           guidance_scale=state["guidance"]["log_scale"].exp())
    return {"env": cfg.env, "step": step, "sim_state": windows.sim_states[index, 0].numpy(),
            "observations": batch.observations[index].numpy(), "actions": batch.actions[index].numpy()}


def main(argv: list[str] | None = None, prog: str = "python -m polygrad_fast.render") -> Path:
    """``--run LOGDIR | --policy_checkpoint PATH  --out FILE.gif|.mp4 [...]``: the ``polygrad-fast render``
    subcommand. Bad input exits with status 2 and the reason."""
    import argparse

    from .cli import exit_usage

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a world-model or agent run directory: imagined | real")
    source.add_argument("--policy_checkpoint", type=Path, help="an agent checkpoint: one mean-action episode")
    parser.add_argument("--out", type=Path, required=True, help="the video file, .gif or .mp4")
    parser.add_argument("--env", choices=SUPPORTED_ENVS, default=None,
                        help="with --policy_checkpoint: the task (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="dataset window and imagination noise (--run)")
    parser.add_argument("--index", type=int, default=0, help="which imagined trajectory of the batch (--run)")
    parser.add_argument("--max_steps", type=int, default=1000, help="episode length limit (--policy_checkpoint)")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--width", type=int, default=240)
    parser.add_argument("--height", type=int, default=240)
    args = parser.parse_args(argv)
    if args.out.suffix.lower() not in VIDEO_SUFFIXES:
        exit_usage(prog, f"--out must end in .gif or .mp4, got {str(args.out)!r}")
    for key, low in (("seed", 0), ("index", 0), ("max_steps", 1), ("fps", 1)):
        if getattr(args, key) < low:
            exit_usage(prog, f"--{key} must be >= {low}, got {getattr(args, key)}")
    try:
        if args.run is not None:
            traj = imagine_from_run(args.run, args.index, args.seed)
            env = Renderer(traj["env"], args.width, args.height)
            try:
                frames = imagined_vs_real_frames(env, traj["sim_state"], traj["observations"], traj["actions"])
            finally:
                env.close()
            what = f"{len(frames)} imagined | real frames of {traj['env']} (checkpoint step {traj['step']})"
        else:
            from .wm_eval import check_policy, load_policy

            name = args.env or _checkpoint_env(args.policy_checkpoint)
            actor = load_policy(args.policy_checkpoint, name).eval()
            env = Renderer(name, args.width, args.height)
            try:
                check_policy(actor, env.env)
                frames, ret = episode_frames(env, actor, args.max_steps)
            finally:
                env.close()
            what = f"an episode of {len(frames) - 1} steps of {name}, return {ret:.1f}"
    except (FileNotFoundError, ValueError, TypeError, KeyError) as exc:
        exit_usage(prog, str(exc))
    write_video(frames, args.out, args.fps)
    print(f"wrote {args.out}: {what}")
    return args.out


def _checkpoint_env(path: Path) -> str:
    """The task recorded in an agent checkpoint's config."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"policy checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state", state) if isinstance(state, dict) else state
    env = state.get("config", {}).get("env") if isinstance(state, dict) else None
    if env is None:
        raise ValueError(f"{str(path)!r} records no env (config.env): pass --env")
    return env


if __name__ == "__main__":
    main()
