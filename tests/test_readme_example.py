"""The README's FastGuidedSampler example runs as written; its Running commands parse (and the cheap ones run)."""
import math
import re
import shlex
from pathlib import Path

import pytest
import torch

from polygrad_fast.cli import main, parse_run
from polygrad_fast.presets import DEFAULT_PRESET, PRESETS, WorldModelRunConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Drop-in `FastGuidedSampler`"


def readme_example() -> str:
    text = README.read_text()
    assert SECTION in text, f"README lacks the section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "expected exactly one python block in the sampler section"
    return blocks[0]


def test_readme_sampler_example_runs(capsys):
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    batch = namespace["batch"]
    assert batch.observations.shape == (256, 10, 11) and batch.actions.shape == (256, 10, 3)
    # the tuner moved (compared in log space: float32 exp(log 0.005) alone is already != 0.005)
    assert abs(float(namespace["tuner"].log_scale) - math.log(0.005)) > 1e-6
    assert "torch.Size([256, 10, 11])" in capsys.readouterr().out


def running_commands() -> list[list[str]]:
    """The commands of the README's Running block, without comments."""
    section = README.read_text().split("## Running\n", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    return [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.strip()]


WORKFLOW = ("plot", "render", "collect")  # subcommands whose README lines act on files the lines before made


def test_readme_running_commands(capsys):
    commands = running_commands()
    assert len(commands) >= 4
    for argv in commands:
        assert argv[0] == ".venv/bin/polygrad-fast", argv  # works right after the set-up commands
        name, rest = argv[1], argv[2:]
        if name == "env-report":
            assert main([name, *rest]) == 0 and "native_buffer" in capsys.readouterr().out
        elif "--help" in rest:
            with pytest.raises(SystemExit) as info:
                main([name, *rest])
            assert info.value.code == 0 and "--trainer.lr FLOAT" in capsys.readouterr().out
        elif "cuda" in rest and not torch.cuda.is_available():
            with pytest.raises(SystemExit):  # refused, with a message, on a machine without a GPU
                parse_run(rest, name, "", WorldModelRunConfig, PRESETS, DEFAULT_PRESET)
            assert "no CUDA device is available" in capsys.readouterr().err
        elif name == "train":  # the agent: its command line parses into a valid config
            from polygrad_fast.agent import parse_args

            parse_args(rest)
        elif name in ("eval-wm", "wm-eval"):  # the world-model comparison: its command line parses
            from polygrad_fast import wm_eval

            wm_eval.parse_args(rest)
        elif name in WORKFLOW:  # they read a run directory: run for real in test_readme_workflow_runs (slow)
            with pytest.raises(SystemExit) as info:
                main([name, "--help"])
            assert info.value.code == 0 and "--out" in capsys.readouterr().out
        else:  # a world-model run: its command line parses into a valid config
            assert name == "train-wm"
            parse_run(rest, name, "", WorldModelRunConfig, PRESETS, DEFAULT_PRESET)


@pytest.mark.slow
def test_readme_workflow_runs(tmp_path, monkeypatch, capsys):
    """The Running block's lines that write runs/debug and act on it run as written, in order, from a fresh
    directory: the debug agent run, then plot, render and collect (about a minute)."""
    monkeypatch.chdir(tmp_path)
    lines = [argv for argv in running_commands()
             if any(a.startswith("runs/debug") for a in argv) or argv[1] in WORKFLOW]
    assert [argv[1] for argv in lines][:4] == ["train", "plot", "render", "train"] and lines[-1][1] == "collect"
    for argv in lines:
        argv = [*argv, "--no_progress"] if argv[1] == "train" else argv
        assert main(argv[1:]) == 0, argv
    for path in ("runs/debug/curves.png", "runs/debug/imagined.gif", "runs/hopper-random.pgbuf",
                 "runs/debug-agd/final_metrics.json"):
        assert (tmp_path / path).stat().st_size > 0, path
    assert (tmp_path / "runs/debug/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "runs/debug/imagined.gif").read_bytes()[:6] in (b"GIF87a", b"GIF89a")
