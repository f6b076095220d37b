"""`polygrad-fast collect`: exactly N transitions from a random policy or an agent checkpoint's actor, saved as a
.pgbuf with metadata that eval-wm reads, and bad input (env, checkpoint, existing file) refused before any step."""
import dataclasses
import json

import pytest
import torch

from polygrad_fast import wm_eval
from polygrad_fast.buffer import TrajectoryBuffer
from polygrad_fast.cli import main
from polygrad_fast.collect import CollectConfig, collect, metadata_path, read_metadata
from polygrad_fast.envs import SimStateEnv
from polygrad_fast.policy import Actor


def agent_checkpoint(path, env="Hopper-v5", obs_dim=11, act_dim=3):
    """A file in the agent's checkpoint layout holding only what load_policy reads; returns (path, actor)."""
    torch.manual_seed(0)
    actor = Actor(obs_dim, act_dim, hidden=16, layers=1)
    torch.save({"config": {"env": env},
                "a2c": {"actor_config": dataclasses.asdict(actor.config), "actor": actor.state_dict()}}, path)
    return path, actor


def test_collect_random_exactly_n_steps(tmp_path, capsys):
    out = tmp_path / "data" / "hopper.pgbuf"
    assert main(["collect", "--env", "Hopper-v5", "--steps", "150", "--seed", "3", "--out", str(out)]) == 0
    assert f"wrote {out}: 150 transitions" in capsys.readouterr().out
    buffer = TrajectoryBuffer.load(out, obs_dim=11, act_dim=3, sim_state_dim=58)
    assert buffer.num_transitions == 150 and int(buffer.episode_lengths().sum()) == 150
    meta = read_metadata(out)
    assert meta["env"] == "Hopper-v5" and meta["transitions"] == 150 and meta["policy"] == "uniform random"
    assert meta["episodes"] == buffer.num_episodes
    # the stored simulator states reproduce the stored observations (eval-wm's check) and actions are in [-1, 1]
    env = SimStateEnv("Hopper-v5")
    wm_eval.check_dataset(buffer, env, horizons=(2,), seed=0)
    env.close()
    w = buffer.sample_windows(32, 1, seed=0, normalize=False)
    assert float(w.actions.abs().max()) <= 1.0
    # same seed, same data; another seed, other data
    again = collect(CollectConfig(out=tmp_path / "again.pgbuf", steps=150, seed=3))
    other = collect(CollectConfig(out=tmp_path / "other.pgbuf", steps=150, seed=4))
    first = buffer.sample_windows(8, 1, seed=0, normalize=False).observations
    assert torch.equal(again.sample_windows(8, 1, seed=0, normalize=False).observations, first)
    assert not torch.equal(other.sample_windows(8, 1, seed=0, normalize=False).observations, first)


def test_collect_with_an_agent_policy(tmp_path):
    ckpt, actor = agent_checkpoint(tmp_path / "step_0000000010.pt")
    buffer = collect(CollectConfig(out=tmp_path / "mean.pgbuf", steps=40, policy_checkpoint=ckpt, actions="mean"))
    w = buffer.sample_windows(16, 1, seed=0, normalize=False)
    with torch.no_grad():
        mean = actor(w.observations[:, 0])[0]
    torch.testing.assert_close(w.actions[:, 0], mean, rtol=1e-6, atol=1e-6)  # acted with the actor's mean
    sampled = collect(CollectConfig(out=tmp_path / "sample.pgbuf", steps=40, policy_checkpoint=ckpt))
    w = sampled.sample_windows(64, 1, seed=0, normalize=False)
    with torch.no_grad():
        mean, std = actor(w.observations[:, 0])
    z = (w.actions[:, 0] - mean) / std  # standardised: about N(0, 1) if drawn from pi(.|s)
    assert 0.7 < float(z.std()) < 1.3 and abs(float(z.mean())) < 0.3  # 192 draws: std error ~0.05 / ~0.07
    assert json.loads(metadata_path(tmp_path / "sample.pgbuf").read_text())["policy"] == str(ckpt)


def test_eval_wm_reads_a_collected_file_and_refuses_another_task(tmp_path, monkeypatch):
    out = tmp_path / "pendulum.pgbuf"
    collect(CollectConfig(out=out, env="InvertedPendulum-v5", steps=60))
    cfg = wm_eval.WMEvalConfig(env="InvertedPendulum-v5", dataset=str(out), horizons=(2,))
    env, buffer, _ = wm_eval.prepare_inputs(cfg)
    env.close()
    assert buffer.num_transitions == 60

    monkeypatch.setattr(wm_eval, "_evaluate", lambda *a: pytest.fail("evaluation started on a wrong dataset"))
    hopper = tmp_path / "hopper.pgbuf"
    collect(CollectConfig(out=hopper, env="Hopper-v5", steps=30))
    # refused by the metadata's env before the file is read
    with pytest.raises(ValueError, match="was collected in 'Hopper-v5', the evaluation is on 'Walker2d-v5'"):
        wm_eval.evaluate(dataclasses.replace(cfg, env="Walker2d-v5", dataset=str(hopper)))
    metadata_path(hopper).unlink()  # without metadata: refused by its dims
    with pytest.raises(ValueError, match="obs_dim is 11 in the stored buffer, expected 17"):
        wm_eval.evaluate(dataclasses.replace(cfg, env="Walker2d-v5", dataset=str(hopper)))


@pytest.mark.parametrize("case", ["env", "exists", "other_env_checkpoint", "other_dims_checkpoint",
                                  "missing_checkpoint", "steps", "suffix"])
def test_collect_rejects_bad_input(tmp_path, capsys, case):
    out = tmp_path / "data.pgbuf"
    args = ["collect", "--out", str(out), "--steps", "20"]
    expected = {
        "env": "invalid choice 'Hopper-v9' for argument '--env'",
        "exists": "exists; pass --overwrite to replace it",
        "other_env_checkpoint": "holds a policy for 'Walker2d-v5', the evaluation is on 'Hopper-v5'",
        "other_dims_checkpoint": "policy maps obs 17 -> actions 6, but Hopper-v5 has obs 11 and actions 3",
        "missing_checkpoint": "does not exist",
        "steps": "CollectConfig.steps must be an int >= 1, got 0",
        "suffix": "CollectConfig.out must name a .pgbuf file",
    }[case]
    if case == "env":
        args += ["--env", "Hopper-v9"]
    elif case == "exists":
        out.write_bytes(b"keep me")
    elif case == "other_env_checkpoint":
        args += ["--policy_checkpoint", str(agent_checkpoint(tmp_path / "w.pt", "Walker2d-v5", 17, 6)[0])]
    elif case == "other_dims_checkpoint":
        args += ["--policy_checkpoint", str(agent_checkpoint(tmp_path / "h.pt", "Hopper-v5", 17, 6)[0])]
    elif case == "missing_checkpoint":
        args += ["--policy_checkpoint", str(tmp_path / "missing.pt")]
    elif case == "steps":
        args[-1] = "0"
    elif case == "suffix":
        args[2] = str(tmp_path / "data.npz")
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert expected in err, err
    if case == "exists":
        assert out.read_bytes() == b"keep me"  # never lost
    else:
        assert not out.exists()
    assert not metadata_path(out).exists()


def test_overwrite_replaces_the_file(tmp_path):
    out = tmp_path / "data.pgbuf"
    out.write_bytes(b"old")
    assert main(["collect", "--out", str(out), "--steps", "10", "--overwrite"]) == 0
    assert TrajectoryBuffer.load(out).num_transitions == 10
    assert read_metadata(out)["transitions"] == 10
