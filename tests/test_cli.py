"""The polygrad-fast command line: subcommands, --help listing every config field, presets as defaults, the
package surface (lazy top-level names, one version, console script)."""
import dataclasses
import json
import re
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest

import polygrad_fast
from polygrad_fast.cli import SUBCOMMANDS, main, parse_run
from polygrad_fast.config import flatten, to_dict
from polygrad_fast.presets import PRESETS, WorldModelRunConfig, get_preset

ROOT = Path(__file__).resolve().parents[1]
BOX = re.compile(r"[│╭╮╰╯─]+")


def help_text(capsys, *args) -> str:
    with pytest.raises(SystemExit) as info:
        main(["train-wm", *args, "--help"])
    assert info.value.code == 0
    return " ".join(BOX.sub(" ", capsys.readouterr().out).split())


def test_top_level_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"  {name}  " in out
    assert main([]) == 2  # no subcommand: usage, failure status


def test_train_wm_help_lists_every_field_with_type_and_default(capsys):
    text = help_text(capsys, "--preset", "debug")
    cfg = get_preset("debug")
    for key, value in flatten(to_dict(cfg)).items():
        if isinstance(value, bool):
            flag = f"--{key}, --{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}no_{key.rsplit('.', 1)[-1]}"
            assert flag in text, key
        else:
            assert f"--{key} " in text, key
        assert f"(default: {value})" in text or f"(default: {value!r})" in text, key
    assert "--prefill_steps INT" in text and "--noise_tau FLOAT" in text and "--device STR" in text
    assert "--sampler.guidance_type {grad,sample,none}" in text
    assert "--preset {hopper,walker,cheetah,hopper-cpu,debug}" in text
    for option in ("--logdir", "--overwrite", "--no_progress", "--tensorboard"):
        assert option in text


def test_every_subcommand_has_help(capsys):
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert f"usage: polygrad-fast {name}" in capsys.readouterr().out


def test_preset_sets_the_defaults_and_flags_override_them():
    for name, preset in PRESETS.items():
        assert parse_run(["--preset", name], "p", "d", WorldModelRunConfig, PRESETS, "hopper-cpu")[1] == preset
    name, cfg, opts = parse_run(["--seed", "4", "--preset=debug", "--trainer.lr", "1e-3",
                                 "--sampler.guidance_type", "none", "--sampler.clip_std", "None",
                                 "--execution.no_cpu_prepack", "--no-progress", "--logdir", "x"],
                                "p", "d", WorldModelRunConfig, PRESETS, "hopper-cpu")
    debug = get_preset("debug")
    assert name == "debug" and cfg == dataclasses.replace(
        debug, seed=4, trainer=dataclasses.replace(debug.trainer, lr=1e-3),
        sampler=dataclasses.replace(debug.sampler, guidance_type="none", clip_std=None),
        execution=dataclasses.replace(debug.execution, cpu_prepack=False))
    assert (opts.logdir, opts.progress, opts.overwrite) == (Path("x"), False, False)
    assert parse_run([], "p", "d", WorldModelRunConfig, PRESETS, "hopper-cpu")[:2] == ("hopper-cpu",
                                                                                     get_preset("hopper-cpu"))


def test_module_entry_points_run_the_same_cli(capsys):
    out = subprocess.run([sys.executable, "-m", "polygrad_fast.train_world_model", "--help"], capture_output=True,
                         text=True)  # python -m polygrad_fast.env_report: tests/test_env_report.py
    assert out.returncode == 0 and "--trainer.lr FLOAT" in out.stdout, out.stderr
    assert main(["env-report", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["polygrad_fast"] == polygrad_fast.__version__


def test_import_is_light_and_every_public_name_resolves():
    code = ("import sys, polygrad_fast as p; heavy = [m for m in ('torch', 'numpy', 'gymnasium', 'mujoco', 'triton', "
            "'tyro') if m in sys.modules]; assert not heavy, heavy; "
            "[getattr(p, n) for n in p.__all__]; print(sorted(set(p.__all__) - set(dir(p))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    from polygrad_fast import ExecutionOptions, FastGuidedSampler, SamplerNoise, TrajectoryBuffer

    assert FastGuidedSampler.__module__ == "polygrad_fast.sampler" and ExecutionOptions.__name__ == "ExecutionOptions"
    assert SamplerNoise.__module__ == "polygrad_fast.noise" and TrajectoryBuffer.__name__ == "TrajectoryBuffer"
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        polygrad_fast.Nope  # noqa: B018


def test_packaging_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", project["version"])  # the one source of the version ...
    assert "__version__ = " not in (ROOT / "polygrad_fast" / "__init__.py").read_text()  # ... no second copy
    scripts = project["scripts"]
    assert scripts == {"polygrad-fast": "polygrad_fast.cli:main"}
    module, function = scripts["polygrad-fast"].split(":")
    assert callable(getattr(__import__(module, fromlist=[function]), function))
    assert "tyro" in " ".join(project["dependencies"])
    assert any(d.startswith("triton") and "platform_machine" in d for d in project["optional-dependencies"]["test"])
    assert set(project["optional-dependencies"]) >= {"tensorboard", "plot", "test"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert (ROOT / "polygrad_fast" / "py.typed").exists()
    assert typing.get_type_hints(WorldModelRunConfig)  # the config is fully typed (tyro needs it)
