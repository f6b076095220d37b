"""Smoke test of the world-model run (debug preset: seconds) and its command line."""
import json

import pytest
import torch

from polygrad_fast.buffer import TrajectoryBuffer
from polygrad_fast.config import from_dict
from polygrad_fast.presets import PRESETS, WorldModelRunConfig, get_preset
from polygrad_fast.train_world_model import main, parse_args


def test_presets_are_consistent():
    assert {"hopper", "walker", "cheetah", "hopper-cpu", "debug"} <= set(PRESETS)
    assert get_preset("hopper").noise_tau == 0.1 and get_preset("walker").noise_tau == 1.0
    assert get_preset("hopper").denoiser.hidden_dim == 1024 and get_preset("hopper").n_diffusion_steps == 128
    with pytest.raises(KeyError, match="unknown preset 'hoper'"):
        get_preset("hoper")


def test_cli_overrides_and_errors(capsys):
    cfg, args = parse_args(["--preset", "debug", "seed=4", "trainer.lr=1e-3", "sampler.guidance_type=none"])
    assert (cfg.seed, cfg.trainer.lr, cfg.sampler.guidance_type) == (4, 1e-3, "none")
    assert "debug_seed4" in args.logdir
    with pytest.raises(SystemExit):
        parse_args(["--preset", "debug", "trainer.lrr=1"])
    assert "unknown config key 'trainer.lrr'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--preset", "debug", "env=Hopper-v9"])
    assert "unknown env name 'Hopper-v9'; supported: Hopper-v5" in capsys.readouterr().err


def test_debug_run_end_to_end(tmp_path, capsys):
    logdir = tmp_path / "run"
    main(["--preset", "debug", "--logdir", str(logdir), "--no-progress", "seed=1"])
    out = capsys.readouterr().out
    assert "done: 40 steps on Hopper-v5" in out
    cfg = from_dict(WorldModelRunConfig, json.loads((logdir / "config.json").read_text()))
    assert cfg.seed == 1 and cfg.train_steps == 40
    records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "errors/dynamics_mse_0009_step" in r]
    assert len(evals) == 2  # eval_interval 20 over 40 steps
    for r in evals:
        for key in ("errors/dynamics_mse_0001_step", "errors/persistence_dynamics_mse_0009_step", "imagine/act_std"):
            assert isinstance(r[key], float) and r[key] >= 0
    losses = [r["diffusion/loss"] for r in records if "diffusion/loss" in r]
    assert len(losses) == 4 and all(0 < x < 100 for x in losses)
    ckpt = torch.load(logdir / "checkpoint.pt", weights_only=False)
    assert ckpt["trainer"]["step"] == 40 and ckpt["config"]["seed"] == 1
    buf = TrajectoryBuffer.load(logdir / "buffer.pgbuf")
    assert buf.num_transitions >= 500
