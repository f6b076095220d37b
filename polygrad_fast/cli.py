"""The ``polygrad-fast`` command line: one console script, one subcommand per entry of ``SUBCOMMANDS``.

    polygrad-fast train-wm --preset debug --seed 3 --trainer.lr 1e-4
    polygrad-fast env-report --json
    polygrad-fast train-wm --help            # every config field with its type and default

A subcommand is ``"name": ("module:function", "one line of help")``; the function is called as
``function(argv, prog)`` and its module is imported only when the subcommand runs (``--help`` stays fast). Run
commands build their command line with ``parse_run``: ``--preset NAME`` picks the defaults, then tyro parses every
field of the config dataclass from its type (``--section.field VALUE``), and the config's own validation runs
before anything is created.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Mapping, TypeVar

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train-wm": ("polygrad_fast.train_world_model:cli",
                 "train a world model on a MuJoCo task; error against the simulator"),
    "train": ("polygrad_fast.agent:cli", "online RL in imagination: the PolyGRAD agent on a MuJoCo task"),
    "eval-wm": ("polygrad_fast.wm_eval:main",
                "world-model error comparison: PolyGRAD vs autoregressive baselines, same data and policy"),
    "wm-eval": ("polygrad_fast.wm_eval:main", "the same as eval-wm (its earlier name)"),
    "collect": ("polygrad_fast.collect:cli", "collect a dataset (.pgbuf) from a random policy or an agent checkpoint"),
    "render": ("polygrad_fast.render:main", "GIF/MP4: an imagined trajectory next to its real replay, or a policy "
               "episode (MuJoCo offscreen)"),
    "plot": ("polygrad_fast.plotting:main", "PNG learning curves (return or error vs steps, error vs imagined step) "
             "of run directories"),
    "env-report": ("polygrad_fast.env_report:cli", "versions, native build and active backends of this install"),
}

C = TypeVar("C")


class UsageError(ValueError):
    """A request that cannot run as given (e.g. a run directory holding another config); ``main`` prints it and
    exits with status 2."""


@dataclass(frozen=True)
class RunOptions:
    """Where and how a run writes; not part of its config (config.json)."""

    logdir: Path | None = None
    """Run directory (default runs/<env>/<preset>_seed<seed>_<time>); the same config resumes the run in it."""
    overwrite: bool = False
    """Delete the run already in --logdir (each file named) and start a new one."""
    progress: bool = True
    """Progress bar (--no_progress: log lines on stdout instead)."""
    tensorboard: bool = False
    """Also write TensorBoard event files (needs the tensorboard extra)."""


def parse_run(argv: list[str] | None, prog: str, description: str, config_type: type[C],
              presets: Mapping[str, C], default_preset: str) -> tuple[str, C, RunOptions]:
    """``(preset name, config, RunOptions)`` from the command line of a run.

    ``--preset NAME`` (one of ``presets``) is read first and its config becomes the defaults; tyro then parses
    the rest: every field of ``config_type`` by its dotted name, plus the ``RunOptions``. A value the config's
    ``__post_init__`` rejects exits with status 2 and its message.
    """
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(prog=prog, add_help=False)
    pre.add_argument("--preset", default=default_preset)
    known, rest = pre.parse_known_args(argv)
    if known.preset not in presets:
        exit_usage(prog, f"unknown preset {known.preset!r}; known presets: {', '.join(sorted(presets))}")
    args_type = dataclasses.make_dataclass("Args", [
        ("preset", Annotated[Literal[tuple(presets)], tyro.conf.arg(help="named defaults (read first)")]),
        ("config", Annotated[config_type, tyro.conf.arg(name="")]),
        ("options", Annotated[RunOptions, tyro.conf.arg(name="")]),
    ], frozen=True)
    args_type.__doc__ = description
    default = args_type(preset=known.preset, config=presets[known.preset], options=RunOptions())
    try:
        args = tyro.cli(args_type, args=rest, default=default, prog=prog, use_underscores=True)
    except (ValueError, TypeError) as exc:  # a config's validation, run while tyro builds it
        exit_usage(prog, str(exc))
    return known.preset, args.config, args.options


def exit_usage(prog: str, message: str) -> None:
    """Print ``prog: error: message`` to stderr and exit with status 2 (a usage error)."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return ("usage: polygrad-fast {" + ",".join(SUBCOMMANDS) + "} [ARGS]\n\nPolyGRAD world models and agents.\n\n"
            "subcommands:\n" + "\n".join(lines) + "\n\n'polygrad-fast SUBCOMMAND --help' lists its arguments.")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``polygrad-fast`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"{_usage()}\n\npolygrad-fast: error: unknown subcommand {name!r}; expected one of "
              f"{', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module, function = SUBCOMMANDS[name][0].split(":")
    entry = getattr(importlib.import_module(module), function)
    prog = f"polygrad-fast {name}"
    try:
        entry(rest, prog)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
