"""`polygrad-fast render`: imagined observations -> simulator poses (the excluded x reconstructed from the root
velocity), imagined | real side-by-side frames, policy episodes, GIF/MP4 files, and bad input. Rendering runs
offscreen (MUJOCO_GL=egl by default; the tests skip, saying why, only when no backend can render)."""
import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image

from polygrad_fast import train_world_model as twm
from polygrad_fast.cli import main
from polygrad_fast.presets import get_preset
from polygrad_fast.render import Renderer, imagined_vs_real_frames, observation_to_state, write_video

pytestmark = pytest.mark.usefixtures("one_torch_thread")
W = H = 48
LABEL_ROWS = 16  # the text labels differ between the panels; compare below them


@pytest.fixture(scope="module")
def hopper():
    try:
        r = Renderer("Hopper-v5", W, H)
        r.frame()
    except RuntimeError as exc:
        pytest.skip(f"no MuJoCo offscreen backend here (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): {exc}")
    yield r
    r.close()


def real_trajectory(r: Renderer, steps: int, seed: int = 0):
    """(start sim state, observations [steps+1, O], actions [steps+1, A], true qpos [steps+1, nq]) of random
    actions from a reset state."""
    r.env.reset()
    sim0 = r.env.get_sim_state()
    actions = np.random.default_rng(seed).uniform(-1, 1, (steps + 1, r.env.act_dim)).astype(np.float32)
    obs = [r.env.set_sim_state(sim0)]
    qpos = [r.sim.data.qpos.copy()]
    for a in actions[:-1]:
        o, *_ = r.sim.step(a)
        obs.append(o)
        qpos.append(r.sim.data.qpos.copy())
    return sim0, np.array(obs), actions, np.array(qpos)


def test_observations_map_back_to_the_simulator_pose(hopper):
    sim0, obs, _, true_qpos = real_trajectory(hopper, 30)
    qpos, qvel = observation_to_state(hopper, obs, sim0)
    np.testing.assert_allclose(qpos[:, 1:], true_qpos[:, 1:], atol=1e-5)  # observed exactly (float32)
    # x integrated from the observed x-velocity: trapezoid error over 30 control steps (0.24 s) of random motion
    # was 1e-4 here; 2e-3 is 10% of the distance covered, so a wrong dt or sign fails
    assert abs(true_qpos[-1, 0] - true_qpos[0, 0]) > 0.01
    np.testing.assert_allclose(qpos[:, 0], true_qpos[:, 0], atol=2e-3)
    assert np.array_equal(qvel, obs[:, 5:].astype(np.float64))  # Hopper: qpos[1:] (5), then qvel (6)
    with pytest.raises(ValueError, match=r"observations: expected \[H, >= 11\]"):
        observation_to_state(hopper, obs[:, :8], sim0)


def test_side_by_side_frames_match_for_a_perfect_model_and_differ_for_a_wrong_one(hopper):
    sim0, obs, actions, _ = real_trajectory(hopper, 5)
    frames = imagined_vs_real_frames(hopper, sim0, obs, actions)
    assert frames.shape == (6, H, 2 * W + 2, 3) and frames.dtype == np.uint8
    left, right = frames[:, LABEL_ROWS:, :W].astype(int), frames[:, LABEL_ROWS:, W + 2:].astype(int)
    assert np.abs(left - right).mean() < 1.0  # a model that predicts the real observations: the same picture
    assert frames.std() > 10  # not a blank canvas
    wrong = obs.copy()
    wrong[:, 1] += np.linspace(0, 0.8, len(obs))  # the torso tilts more and more
    frames = imagined_vs_real_frames(hopper, sim0, wrong, actions)
    diff = np.abs(frames[:, LABEL_ROWS:, :W].astype(int) - frames[:, LABEL_ROWS:, W + 2:].astype(int)).mean((1, 2, 3))
    assert diff[0] < 1.0 and diff[-1] > 2.0 and np.all(np.diff(diff[1:]) > -0.5)
    with pytest.raises(ValueError, match="same H"):
        imagined_vs_real_frames(hopper, sim0, obs, actions[:-1])


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_write_video(tmp_path, suffix):
    frames = np.random.default_rng(0).integers(0, 255, (4, 31, 33, 3), dtype=np.uint8)  # odd sizes: padded
    path = write_video(frames, tmp_path / f"v{suffix}", fps=10)
    raw = path.read_bytes()
    if suffix == ".gif":
        assert raw[:6] == b"GIF89a"
        with Image.open(path) as img:
            assert img.n_frames == 4 and img.size == (33, 31)
    else:
        pytest.importorskip("imageio_ffmpeg", reason="MP4 needs the render extra (imageio-ffmpeg)")
        assert raw[4:8] == b"ftyp"
        import imageio.v2 as imageio

        with imageio.get_reader(path) as reader:
            assert sum(1 for _ in reader) == 4
    with pytest.raises(ValueError, match="must end in one of"):
        write_video(frames, tmp_path / "v.avi")
    with pytest.raises(ValueError, match="non-empty uint8 array"):
        write_video(frames.astype(np.float32), tmp_path / "v.gif")


def test_render_subcommand_from_a_world_model_run_and_a_policy_checkpoint(tmp_path, hopper, capsys):
    cfg = dataclasses.replace(get_preset("debug"), prefill_steps=200, n_diffusion_steps=4, train_steps=4,
                              eval_interval=4, eval_batch=2, checkpoint_interval=4, guidance_tuning_interval=2,
                              guidance_tuning_batch=2)
    twm.run(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "imagined.gif"
    assert main(["render", "--run", str(tmp_path / "run"), "--out", str(out), "--width", str(W), "--height",
                 str(H)]) == 0
    assert f"wrote {out}: {cfg.horizon} imagined | real frames of Hopper-v5 (checkpoint step 4)" in \
        capsys.readouterr().out
    with Image.open(out) as img:
        assert img.n_frames == cfg.horizon and img.size == (2 * W + 2, H)

    from polygrad_fast.policy import Actor

    torch.manual_seed(0)
    actor = Actor(11, 3, hidden=16, layers=1)
    ckpt = tmp_path / "agent.pt"
    torch.save({"config": {"env": "Hopper-v5"},
                "a2c": {"actor_config": dataclasses.asdict(actor.config), "actor": actor.state_dict()}}, ckpt)
    out = tmp_path / "episode.gif"
    assert main(["render", "--policy_checkpoint", str(ckpt), "--out", str(out), "--max_steps", "5", "--width",
                 str(W), "--height", str(H)]) == 0
    assert "an episode of" in capsys.readouterr().out
    with Image.open(out) as img:
        assert 2 <= img.n_frames <= 6 and img.size == (W, H)


@pytest.mark.parametrize("args,message", [
    (["--run", "{tmp}/nowhere", "--out", "{tmp}/x.gif"], "is not a run directory: config.json is missing"),
    (["--run", "{tmp}", "--out", "{tmp}/x.avi"], "--out must end in .gif or .mp4"),
    (["--policy_checkpoint", "{tmp}/missing.pt", "--out", "{tmp}/x.gif"], "does not exist"),
    (["--out", "{tmp}/x.gif"], "one of the arguments --run --policy_checkpoint is required"),
    (["--run", "{tmp}", "--out", "{tmp}/x.gif", "--fps", "0"], "--fps must be >= 1, got 0"),
])
def test_render_rejects_bad_input(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(["render", *(a.format(tmp=tmp_path) for a in args)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.gif").exists()


@pytest.mark.slow  # the agent's debug run: ~35 s on the loaded 2-core VM
def test_render_an_agent_run(tmp_path, hopper, capsys):
    from polygrad_fast.agent import run
    from polygrad_fast.agent_config import AGENT_PRESETS

    cfg = AGENT_PRESETS["debug"]
    run(cfg, tmp_path / "agent", progress=False)
    out = tmp_path / "agent.gif"
    assert main(["render", "--run", str(tmp_path / "agent"), "--out", str(out), "--width", str(W), "--height",
                 str(H)]) == 0
    assert f"{cfg.horizon} imagined | real frames of {cfg.env}" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.n_frames == cfg.horizon and img.size == (2 * W + 2, H)
