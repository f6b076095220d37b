"""Every invalid command-line value is rejected with a clear message and exit status 2, before the run directory
exists and before any data is collected."""
import re

import pytest
import torch

from polygrad_fast.cli import SUBCOMMANDS, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BOX = re.compile(r"[│╭╮╰╯─]+")


def plain(text: str) -> str:
    """tyro's boxed, wrapped error text as one line."""
    return " ".join(BOX.sub(" ", text).split())


CASES = [
    (["--horizon", "0"], "horizon must be an int >= 2 (the model's error is measured from imagined step 1 on), got 0"),
    (["--sampler.guidance_type", "foo"], "invalid choice 'foo' for argument '--sampler.guidance_type'"),
    (["--device", "tpu"], "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    (["--buffer_capacity", "10"], "buffer_capacity must be an int >= 1500 (prefill_steps 500 + one more episode of "
                                  "up to 1000 steps), got 10"),
    (["--prefill_steps", "0"], "prefill_steps must be an int >= 10 (at least one window of horizon 10), got 0"),
    (["--trainer.lr", "-1"], "lr"),
    (["--train_steps", "-5"], "train_steps must be an int >= 0, got -5"),
    (["--eval_interval", "0"], "eval_interval must be an int >= 1, got 0"),
    (["--checkpoint_interval", "0"], "checkpoint_interval must be an int >= 1, got 0"),
    (["--eval_batch", "0"], "eval_batch must be an int >= 1, got 0"),
    (["--guidance_tuning_interval", "0"], "guidance_tuning_interval must be an int >= 1, got 0"),
    (["--guidance_tuning_batch", "-2"], "guidance_tuning_batch must be an int >= 1, got -2"),
    (["--guidance_tuning_lr", "inf"], "guidance_tuning_lr must be a finite number, got inf"),
    (["--seed", "-1"], "seed must be an int >= 0 and <= 1073741823, got -1"),
    (["--noise_tau", "nan"], "noise_tau must be a finite number, got nan"),
    (["--env", "Hopper-v9"], "invalid choice 'Hopper-v9' for argument '--env'. Expected one of ('Hopper-v5', "
                             "'Walker2d-v5', 'HalfCheetah-v5', 'Ant-v5', 'Hopper-v4'"),
    (["--preset", "hoper"], "unknown preset 'hoper'; known presets: cheetah, debug, hopper, hopper-cpu, walker"),
    (["--trainer.lrr", "1"], "Unrecognized options: --trainer.lrr"),
    (["seed=3"], "Unrecognized options: seed=3"),  # the old key=value syntax
    (["--seed", "abc"], "Error parsing --seed: invalid literal for int() with base 10: 'abc'"),
    (["--horizon", "2.5"], "Error parsing --horizon: invalid literal for int() with base 10: '2.5'"),
    (["--sampler.clip_std", "-1"], "clip_std"),
    (["--denoiser.hidden_dim", "0"], "invalid MLPDenoiserConfig"),  # checked by building it on the meta device
    (["--denoiser.dropout", "2"], "dropout must be in [0, 1), got 2.0"),
    (["--trainer.batch_size", "0"], "batch_size must be >= 1, got 0"),
    (["--sampler.guidance_scale", "0"], "sampler.guidance_scale must be > 0"),
    (["--trainer.mixed_precision", "fp16"], "mixed_precision 'fp16' needs a CUDA device"),
    (["--execution.backend", "triton"], "backend 'triton' (from the backend option) needs a CUDA device"),
]
if not torch.cuda.is_available():
    CASES.append((["--device", "cuda:0"], "device is 'cuda:0' but no CUDA device is available here; use 'cpu'"))


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_rejected_before_the_run_directory_exists(tmp_path, capsys, args, message):
    logdir = tmp_path / "run"
    try:
        status = main(["train-wm", "--preset", "debug", "--logdir", str(logdir), *args])
    except SystemExit as exc:  # the parser's own exit
        status = exc.code
    assert status == 2
    err = plain(capsys.readouterr().err)
    assert message in err, err
    assert not logdir.exists()


def test_unknown_subcommand(capsys):
    assert main(["train-world-model"]) == 2
    err = capsys.readouterr().err
    assert f"unknown subcommand 'train-world-model'; expected one of {', '.join(SUBCOMMANDS)}" in err


def test_rerun_with_another_config_is_refused_naming_the_fields(tmp_path, capsys):
    logdir = tmp_path / "run"
    base = ["train-wm", "--preset", "debug", "--logdir", str(logdir), "--no-progress", "--train_steps", "0",
            "--prefill_steps", "100", "--eval_batch", "2", "--n_diffusion_steps", "4"]
    assert main(base) == 0
    before = {p.name: p.stat().st_mtime_ns for p in logdir.iterdir()}
    assert main([*base, "--seed", "7", "--trainer.lr", "0.001"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config; refusing to replace it" in err
    assert "  seed: 0 (saved) -> 7 (given)\n  trainer.lr: 0.0003 (saved) -> 0.001 (given)\n" in err
    assert {p.name: p.stat().st_mtime_ns for p in logdir.iterdir()} == before  # nothing touched
    assert main([*base, "--seed", "7", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "--overwrite: replacing the run in" in err and "seed: 0 (saved) -> 7 (given)" in err
    assert "deleting: buffer.pgbuf, checkpoints/ (1 files), config.json, metrics.jsonl" in err
