"""The online PolyGRAD agent: config validation, in-place normaliser refresh, exact env restore, the debug run
end to end (every phase, metric groups, counts), exact resume from a checkpoint (in process, and after SIGKILL in
a subprocess), NaN stops, and the learning-curve plot."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from polygrad_fast.a2c import A2CConfig
from polygrad_fast.agent import (Agent, NonFiniteError, action_scale, env_state, parse_args,
                                 refresh_normalizer, restore_env_state, run)
from polygrad_fast.agent_config import AGENT_PRESETS, AgentConfig, get_agent_preset
from polygrad_fast.checkpoint import CheckpointManager
from polygrad_fast.config import from_dict, to_dict
from polygrad_fast.envs import SimStateEnv
from polygrad_fast.run_dir import RunDirError
from polygrad_fast.sampler import FastGuidedSampler
from polygrad_fast.normalizer import Normalizer
from polygrad_fast.plotting import exploration_curve, plot_runs

GROUPS = ("expl/", "eval/", "agent/", "diffusion/", "imagine/", "errors/", "dataset/", "perf/")


def _records(logdir: Path) -> list[dict]:
    return [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]


def _deterministic(records: list[dict]) -> list[dict]:
    """Records without wall-clock fields (time, perf/*), which legitimately differ between runs."""
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/") and k != "imagine/sampling_time"}
            for r in records]


def _final_without_timing(final: dict) -> dict:
    return {k: v for k, v in final.items() if k not in ("wall_seconds", "imagine/sampling_time")}


# ---------------------------------------------------------------------------------------------- config
def test_paper_presets_keep_the_papers_values():
    hopper, walker, cheetah = (get_agent_preset(n) for n in ("hopper", "walker", "cheetah"))
    assert (hopper.noise_tau, walker.noise_tau, cheetah.noise_tau) == (0.1, 1.0, 1.0)
    assert (hopper.n_env_steps, walker.n_env_steps, cheetah.n_env_steps) == (1_000_000, 1_500_000, 1_500_000)
    for cfg in (hopper, walker, cheetah):
        assert (cfg.horizon, cfg.n_diffusion_steps, cfg.agent_batch_size, cfg.n_prefill_steps) == (10, 128, 1024, 5000)
        assert (cfg.denoiser.hidden_dim, cfg.denoiser.num_layers, cfg.trainer.batch_size) == (1024, 6, 256)
        assert (cfg.agent_period, cfg.diffusion_steps_per_period, cfg.pretrain_diffusion) == (4, 4, 1000)
        assert (cfg.a2c.lr_actor, cfg.a2c.lr_critic, cfg.a2c.gamma, cfg.a2c.lambda_gae) == (3e-5, 3e-4, 0.99, 0.9)
        assert (cfg.sampler.guidance_scale, cfg.guidance_lr, cfg.sampler.clip_std) == (0.005, 3e-3, 3.0)
        assert cfg.capacity >= cfg.n_env_steps + cfg.n_prefill_steps  # the whole run, never evicted
    assert set(AGENT_PRESETS) >= {"hopper", "walker", "cheetah", "pendulum-cpu", "hopper-cpu", "debug"}


def test_config_validation_messages_and_round_trip():
    cfg = get_agent_preset("debug")
    assert from_dict(AgentConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    with pytest.raises(ValueError, match="1 / train_agent_ratio must be a whole number"):
        dataclasses.replace(cfg, train_agent_ratio=0.3)
    with pytest.raises(ValueError, match="train_diffusion_ratio / train_agent_ratio must be a whole number"):
        dataclasses.replace(cfg, train_diffusion_ratio=0.3)
    with pytest.raises(ValueError, match="buffer_capacity 100 cannot hold the whole run: need >= .* = 500"):
        dataclasses.replace(cfg, buffer_capacity=100)
    with pytest.raises(ValueError, match="unknown env name 'Pendulum-v9'"):
        dataclasses.replace(cfg, env="Pendulum-v9")
    with pytest.raises(ValueError, match="horizon must be an int >= 2, got 1"):
        dataclasses.replace(cfg, horizon=1)
    with pytest.raises(TypeError, match="a2c must be a A2CConfig, got dict"):
        dataclasses.replace(cfg, a2c={"lr_actor": 1e-3})
    with pytest.raises(KeyError, match="unknown agent preset 'hoper'"):
        get_agent_preset("hoper")


def test_cli_parses_preset_and_overrides(capsys):
    preset, cfg, opts = parse_args(["--preset", "debug", "--seed", "3", "--a2c.lr_actor", "1e-3", "--logdir", "/tmp/x"])
    assert (preset, cfg.seed, cfg.a2c.lr_actor, str(opts.logdir)) == ("debug", 3, 1e-3, "/tmp/x")
    assert cfg.horizon == get_agent_preset("debug").horizon  # the preset's values are the defaults
    with pytest.raises(SystemExit):
        parse_args(["--preset", "debug", "--a2c.lr_actr", "1"])
    assert "lr_actr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--preset", "debug", "--train_agent_ratio", "0.3"])  # AgentConfig's own validation
    assert "1 / train_agent_ratio must be a whole number" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- pieces
def test_refresh_normalizer_is_in_place():
    n = Normalizer.identity(3, 2)
    obs_mean = n["observations"].mean
    stats = {"observations": (np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0])),
             "actions": (np.zeros(2), np.full(2, 0.5)), "rewards": (1.5, 3.0), "terminals": (0.1, 0.3)}
    refresh_normalizer(n, stats)
    assert n["observations"].mean is obs_mean  # the same tensor: whoever holds it (the sampler) sees the update
    assert torch.equal(obs_mean, torch.tensor([1.0, 2.0, 3.0]))
    assert float(n["rewards"].std) == 3.0 and float(n["terminals"].mean) == pytest.approx(0.1)
    bad = dict(stats, rewards=(float("nan"), 1.0))
    with pytest.raises(ValueError, match="NaN"):
        refresh_normalizer(n, bad)


def test_sampler_sees_the_refitted_normaliser(tmp_path):
    agent = Agent(get_agent_preset("debug"), tmp_path, progress=False)
    try:
        agent.start()  # prefill: the normaliser now holds the prefill's statistics, refreshed in place
        stats = agent.buffer.stats()
        stats["observations"] = (stats["observations"][0] + 0.5, stats["observations"][1] * 2.0)
        agent.refit_normalizer(stats)
        start = agent.buffer.sample_windows(8, agent.cfg.horizon, seed=0, normalize=False).start_obs
        got = agent.sampler.sample(start, generator=torch.Generator().manual_seed(3))
        fresh = FastGuidedSampler(agent.trainer.ema_model, agent.sampler.schedule, agent.actor,
                                  Normalizer(stats), config=agent.cfg.sampler, execution=agent.cfg.execution)
        want = fresh.sample(start, generator=torch.Generator().manual_seed(3))
        assert torch.equal(got.observations, want.observations) and torch.equal(got.actions, want.actions)
    finally:
        agent.close()


def test_advantage_guidance_uses_the_agents_critic(tmp_path):
    """--sampler.state_guidance sag: the agent's sampler guides with its own online critic (the same sampler
    given another critic imagines other trajectories; c = 0 imagines the unguided ones)."""
    base = get_agent_preset("debug")
    cfg = dataclasses.replace(base, sampler=dataclasses.replace(base.sampler, state_guidance="sag"))
    agent = Agent(cfg, tmp_path, progress=False)
    try:
        agent.start()
        start = agent.buffer.sample_windows(8, cfg.horizon, seed=0, normalize=False).start_obs

        def imagined(critic, scale):
            sampler = FastGuidedSampler(agent.trainer.ema_model, agent.sampler.schedule, agent.actor,
                                        agent.normalizer, config=dataclasses.replace(cfg.sampler,
                                                                                     state_guidance_scale=scale),
                                        execution=cfg.execution, critic=critic)
            return sampler.sample(start, generator=torch.Generator().manual_seed(3)).observations

        got = agent.sampler.sample(start, generator=torch.Generator().manual_seed(3)).observations
        assert torch.equal(got, imagined(agent.critic, cfg.sampler.state_guidance_scale))
        other = type(agent.critic)(agent.critic.obs_dim, cfg.policy.hidden, cfg.policy.layers)
        assert not torch.allclose(got, imagined(other, cfg.sampler.state_guidance_scale))
        assert not torch.allclose(got, imagined(agent.critic, 0.0))
    finally:
        agent.close()


@pytest.mark.parametrize("clipped", [False, True])
def test_stored_actions_are_the_sampled_ones_unless_clipping_is_asked(tmp_path, clipped):
    cfg = dataclasses.replace(get_agent_preset("debug"), store_clipped_actions=clipped)
    agent = Agent(cfg, tmp_path, progress=False)
    try:
        agent.start()
        before = agent.buffer.num_transitions
        while agent.buffer.num_transitions < before + 30:  # whole episodes of the (initial, std 1) actor
            agent.env_step()
        stored = agent.buffer.state_dict()["actions"][before:]
        assert (np.abs(stored).max() <= 1.0) == clipped  # std 1 around a mean in (-1, 1) leaves [-1, 1] often
    finally:
        agent.close()


def test_env_state_restores_mid_episode_and_the_reset_rng():
    env, twin = SimStateEnv("InvertedPendulum-v5", seed=5), SimStateEnv("InvertedPendulum-v5", seed=99)
    env.reset()
    rng = np.random.default_rng(0)
    for _ in range(3):
        env.step(rng.uniform(-1, 1, 1).astype(np.float32))
    saved = env_state(env)
    actions = rng.uniform(-1, 1, (200, 1)).astype(np.float32)

    def continue_from(e):
        out = []
        for a in actions:
            obs, r, term, trunc, _ = e.step(a)
            out.append(obs)
            if term or trunc:
                out.append(e.reset()[0])  # the reset after the episode draws from the restored RNG
        return np.stack(out)

    expected = continue_from(env)
    restore_env_state(twin, saved)
    assert np.array_equal(continue_from(twin), expected)
    assert len(expected) > len(actions)  # the sequence crossed an episode end, so the reset RNG was exercised


def test_action_scale_maps_the_agents_unit_box_to_the_env():
    assert action_scale(SimStateEnv("Hopper-v5", seed=0)).tolist() == [1.0, 1.0, 1.0]  # the paper's tasks: identity
    assert action_scale(SimStateEnv("InvertedPendulum-v5", seed=0)).tolist() == [3.0]


# ---------------------------------------------------------------------------------------------- the loop
@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("agent") / "debug"
    final = run(get_agent_preset("debug"), logdir, progress=False)
    return logdir, final


def test_debug_run_runs_every_phase(debug_run):
    logdir, final = debug_run
    cfg = get_agent_preset("debug")
    # 50 periods of 4 env steps, 4 diffusion steps each; A2C from the period where 40 diffusion steps are done
    assert final["env_steps"] == 200 and final["diffusion_steps"] == 200 and final["agent_updates"] == 40
    assert np.isfinite(final["eval/return_mean"]) and final["eval/return_mean"] > 0
    records = _records(logdir)
    keys = {k for r in records for k in r}
    for group in GROUPS:
        assert any(k.startswith(group) for k in keys), f"no {group} metrics logged"
    evals = [r["step"] for r in records if "eval/return_mean" in r]
    assert evals == [0, 100, 200]
    errors = [r for r in records if "errors/dynamics_mse_0003_step" in r]
    assert len(errors) == 3 and all(r["errors/dynamics_mse_0003_step"] >= 0 for r in errors)
    # guidance was tuned: the scale moved away from its initial value
    scales = [r["agent/guidance_scale"] for r in records if "agent/guidance_scale" in r]
    assert scales and scales[-1] != pytest.approx(cfg.sampler.guidance_scale, rel=1e-6)
    # exploration episodes: each one logged once, and all in the buffer with the prefill
    lengths = [r["expl/length"] for r in records if "expl/length" in r]
    ckpts = CheckpointManager(logdir / "checkpoints")
    assert ckpts.steps() == [100, 200]  # every 100 env steps, keep_checkpoints=2
    state = ckpts.latest()[1]
    open_len = state["episode_length"]
    assert sum(lengths) + open_len == 200
    buffered = int(np.asarray(state["buffer"]["episode_lengths"]).sum())
    prefill = next(r["dataset/transitions"] for r in records if r["step"] == 0 and "dataset/transitions" in r)
    assert buffered == prefill + sum(lengths)  # the open episode is not in the buffer
    actions, prefill = state["buffer"]["actions"], int(prefill)
    assert actions.abs().max() > 0.9 and actions[:prefill].abs().max() <= 1.0  # uniform [-3, 3] prefill / 3
    assert json.loads((logdir / "final_metrics.json").read_text())["env_steps"] == 200


def test_resume_from_checkpoint_matches_uninterrupted(debug_run, tmp_path):
    logdir, final = debug_run
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    # the run as it was at step 100: its config, its checkpoint, its log up to there (plus later lines to drop)
    for name in ("config.json", "metrics.jsonl"):
        (resumed_dir / name).write_bytes((logdir / name).read_bytes())
    (resumed_dir / "checkpoints").mkdir()
    name = CheckpointManager(logdir / "checkpoints").path(100).name
    (resumed_dir / "checkpoints" / name).write_bytes((logdir / "checkpoints" / name).read_bytes())
    again = run(get_agent_preset("debug"), resumed_dir, progress=False)
    assert _final_without_timing(again) == _final_without_timing(final)
    assert _deterministic(_records(resumed_dir)) == _deterministic(_records(logdir))


def test_checkpoint_records_its_world_size_and_another_one_is_refused(debug_run, tmp_path):
    logdir, _ = debug_run
    state = CheckpointManager(logdir / "checkpoints").latest()[1]
    assert state["world_size"] == 1 and "ranks" not in state  # a single process: no per-rank states
    agent = Agent(get_agent_preset("debug"), tmp_path, progress=False)
    try:
        with pytest.raises(ValueError, match=r"written by a run of 2 process\(es\) but this run has 1: resume it "
                                             r"with the same world size \(torchrun --nproc_per_node 2 \.\.\.\)"):
            agent.load_state_dict({**state, "world_size": 2, "ranks": [{}, {}]})
        assert agent.env_steps == 0  # refused before anything was loaded
        agent.load_state_dict({k: v for k, v in state.items() if k != "world_size"})  # written before the field
        assert agent.env_steps == 200
    finally:
        agent.close()


def test_rerun_with_another_config_is_refused(debug_run, tmp_path):
    logdir, _ = debug_run
    target = tmp_path / "other"
    target.mkdir()
    (target / "config.json").write_bytes((logdir / "config.json").read_bytes())
    other = dataclasses.replace(get_agent_preset("debug"), a2c=A2CConfig(lr_actor=1e-4))
    with pytest.raises(RunDirError, match=r"different config(.|\n)*a2c.lr_actor: 0.001 \(saved\) -> 0.0001"):
        run(other, target, progress=False)
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]  # nothing was touched


def test_nan_stops_the_run_naming_where_and_keeps_the_last_good_checkpoint(tmp_path):
    agent = Agent(get_agent_preset("debug"), tmp_path, progress=False)
    real_step = agent.trainer.train_step

    def poisoned(batch):  # the world-model loss turns NaN after the step-100 checkpoint
        metrics = real_step(batch)
        return {**metrics, "loss": float("nan")} if agent.env_steps >= 120 else metrics

    agent.trainer.train_step = poisoned
    try:
        agent.start()
        with pytest.raises(NonFiniteError, match=r"the diffusion training step at env step 120: metrics \['loss'\].*"
                                                 r"last good checkpoint is .*step_0000000100\.pt"):
            agent.train()
    finally:
        agent.close()
    ckpts = CheckpointManager(tmp_path / "checkpoints")
    assert ckpts.steps() == [100] and ckpts.latest()[1]["env_steps"] == 100


@pytest.mark.slow
def test_sigkill_and_rerun_ends_like_an_uninterrupted_run(tmp_path):
    args = ["--preset", "debug", "--no_progress", "--n_env_steps", "400", "--checkpoint_interval", "40"]
    cmd = [sys.executable, "-m", "polygrad_fast.agent", *args]
    env = dict(os.environ, PYTHONHASHSEED="0")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([*cmd, "--logdir", str(whole)], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cmd, "--logdir", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.name >= "step_0000000120.pt"  # complete ones only (no temp files)
                                             for p in (killed / "checkpoints").glob("step_*.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final_metrics.json").exists(), "the run finished before it could be killed"
    subprocess.run([*cmd, "--logdir", str(killed)], check=True, env=env, capture_output=True)
    a = json.loads((whole / "final_metrics.json").read_text())
    b = json.loads((killed / "final_metrics.json").read_text())
    assert _final_without_timing(a) == _final_without_timing(b)
    assert _deterministic(_records(whole)) == _deterministic(_records(killed))


# ---------------------------------------------------------------------------------------------- plotting
def _fake_run(logdir: Path, returns: list[float], errors: list[float]) -> None:
    logdir.mkdir(parents=True)
    lines = [{"step": 0, "time": 0.0, "dataset/transitions": 10}]
    for i, ret in enumerate(returns):
        lines.append({"step": 100 * i, "time": 1.0, "eval/return_mean": ret,
                      **{f"errors/dynamics_mse_{k:04d}_step": e * (i + 1) for k, e in enumerate(errors, 1)}})
    (logdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_plot_runs_writes_the_curves(tmp_path):
    _fake_run(tmp_path / "s0", [5.0, 50.0, 500.0], [0.1, 0.2, 0.4])
    _fake_run(tmp_path / "s1", [7.0, 150.0], [0.3, 0.4, 0.8])  # a shorter run: only steps 0 and 100 are common
    out = tmp_path / "plots" / "curve.png"
    data = plot_runs([tmp_path / "s0", tmp_path / "s1"], out, reference_lines={"random": 6.0})
    assert data["steps"].tolist() == [0, 100]
    assert data["return_mean"].tolist() == [6.0, 100.0]
    assert data["return_min"].tolist() == [5.0, 50.0] and data["return_max"].tolist() == [7.0, 150.0]
    assert data["error_steps"].tolist() == [1, 2, 3]
    # last evaluations: s0 at i=2 (x3), s1 at i=1 (x2)
    assert np.allclose(data["error_mean"], [(0.3 + 0.6) / 2, (0.6 + 0.8) / 2, (1.2 + 1.6) / 2])
    raw = out.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.shape[:2] == (400, 1100)  # figsize 11 x 4 at 100 dpi
    assert img[..., :3].std() > 0.05  # not a blank canvas
    steps, smooth = exploration_curve([{"step": 5, "expl/return": 2.0}, {"step": 9, "expl/return": 4.0},
                                       {"step": 20, "expl/return": 9.0}], window=2)
    assert steps.tolist() == [5, 9, 20] and smooth.tolist() == [2.0, 3.0, 6.5]
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl in run directory"):
        plot_runs([tmp_path / "missing"], tmp_path / "x.png")
