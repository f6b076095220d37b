"""Learning curves of runs: evaluation return vs env steps and world-model error vs imagination step.

    polygrad-fast plot runs/InvertedPendulum-v5/pendulum-cpu_seed0 runs/.../pendulum-cpu_seed1 --out curves.png
    from polygrad_fast.plotting import plot_runs
    plot_runs(["runs/.../pendulum-cpu_seed0", "..._seed1"], "pendulum.png", reference_lines={"random policy": 8.0})

Reads each run directory's ``metrics.jsonl`` (written by ``polygrad_fast.agent`` or by the world-model run
``polygrad_fast.train_world_model``). Several runs are treated as seeds of one configuration: a curve is their
mean at the steps they all reached, the band their min..max. World-model runs have no returns: their left panel
is the dynamics MSE at the last reported imagination step vs training step. Needs matplotlib.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

RETURN_KEY = "eval/return_mean"
_ERROR_KEY = re.compile(r"^errors/dynamics_mse_(\d{4})_step$")


def read_metrics(logdir: str | Path) -> list[dict]:
    """The records of ``logdir/metrics.jsonl``; FileNotFoundError naming the path when the directory or the file
    is missing, ValueError naming the line when a line is not JSON."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise FileNotFoundError(f"no metrics.jsonl in run directory {logdir}: the directory does not exist")
    path = logdir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in run directory {logdir} (expected {path})")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {i} is not JSON ({exc.msg}): {line[:80]!r}") from None
    return records


def eval_curve(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(env steps [N], evaluation return [N]) of one run, in step order."""
    pairs = sorted((r["step"], float(r[RETURN_KEY])) for r in records if RETURN_KEY in r)
    steps = np.array([p[0] for p in pairs], dtype=np.int64)
    return steps, np.array([p[1] for p in pairs], dtype=np.float64)


def exploration_curve(records: list[dict], window: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(env step at each episode's end [E], running mean of the last ``window`` exploration returns [E])."""
    pairs = [(r["step"], float(r["expl/return"])) for r in records if "expl/return" in r]
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    steps, returns = (np.array(c) for c in zip(*pairs))
    csum = np.concatenate([[0.0], np.cumsum(returns)])
    idx = np.arange(1, len(returns) + 1)
    lo = np.maximum(idx - window, 0)
    return steps.astype(np.int64), (csum[idx] - csum[lo]) / (idx - lo)


def error_curve(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(imagination steps k [K], dynamics MSE [K]) of the run's last evaluation that has errors."""
    last = next((r for r in reversed(records) if any(_ERROR_KEY.match(k) for k in r)), None)
    if last is None:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    ks = sorted(int(m.group(1)) for k in last if (m := _ERROR_KEY.match(k)))
    return np.array(ks, dtype=np.int64), np.array([float(last[f"errors/dynamics_mse_{k:04d}_step"]) for k in ks])


def error_history(records: list[dict]) -> tuple[np.ndarray, np.ndarray, int]:
    """(steps [N], dynamics MSE at imagination step k [N], k) over the run's evaluations, k the largest reported
    step of the last one: the learning curve of a world-model run, which has no returns."""
    ks, _ = error_curve(records)
    if ks.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0), 0
    key = f"errors/dynamics_mse_{int(ks[-1]):04d}_step"
    pairs = sorted((r["step"], float(r[key])) for r in records if key in r)
    return np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs]), int(ks[-1])


def _on_common_steps(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(steps all curves have [N], values [runs, N]) from per-run (steps, values) curves."""
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
    table = np.array([[v[np.searchsorted(s, c)] for c in common] for s, v in curves]).reshape(len(curves), -1)
    return np.array(common, dtype=np.int64), table


def plot_runs(logdirs: Iterable[str | Path], out_png: str | Path, title: str | None = None,
              reference_lines: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """Write a PNG with two panels and return what was drawn.

    Left, agent runs: evaluation return vs env steps, the mean over runs at the evaluation steps all runs reached
    (min..max band when there are several), each run's exploration returns (running mean, faint) and optional
    horizontal ``reference_lines`` (label -> return). Left, world-model runs (no returns): the dynamics MSE at the
    last reported imagination step vs training step, same mean and band. Right: the last evaluation's dynamics
    MSE vs imagination step k, mean over runs with a min..max band (log scale).
    Returns {'steps', 'return_mean', 'return_min', 'return_max', 'error_steps', 'error_mean', 'error_min',
    'error_max'} ('return_*' hold the left panel's values either way). ValueError when a run has no evaluations,
    or some runs have returns and others not.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    logdirs = [Path(d) for d in logdirs]
    if not logdirs:
        raise ValueError("plot_runs needs at least one run directory")
    runs = [read_metrics(d) for d in logdirs]
    curves = [eval_curve(r) for r in runs]
    has_returns = [steps.size > 0 for steps, _ in curves]
    if not all(has_returns):
        if any(has_returns):
            raise ValueError(f"runs mix agent runs (with '{RETURN_KEY}') and runs without: "
                             f"{', '.join(str(d) for d, h in zip(logdirs, has_returns) if not h)} have none")
        histories = [error_history(r) for r in runs]
        empty = [str(d) for d, (s, _, _) in zip(logdirs, histories) if s.size == 0]
        if empty:
            raise ValueError(f"run directory {empty[0]} has no evaluation records yet (neither '{RETURN_KEY}' nor "
                             "'errors/dynamics_mse_<k>_step')")
        last_steps = sorted({k for _, _, k in histories})
        if len(last_steps) > 1:
            raise ValueError(f"the world-model runs have different horizons (last reported imagination steps "
                             f"{last_steps}): plot them separately")
        curves = [(s, v) for s, v, _ in histories]
        left_label = f"dynamics MSE at imagination step {last_steps[0]}"
    else:
        left_label = "evaluation return"
    steps, table = _on_common_steps(curves)
    if steps.size == 0:
        raise ValueError(f"the runs {', '.join(map(str, logdirs))} share no evaluation step")
    data = {"steps": steps, "return_mean": table.mean(axis=0), "return_min": table.min(axis=0),
            "return_max": table.max(axis=0)}
    errors = [error_curve(r) for r in runs]
    data["error_steps"], err_table = _on_common_steps(errors)
    for stat in ("mean", "min", "max"):
        data[f"error_{stat}"] = getattr(err_table, stat)(axis=0) if data["error_steps"].size else np.zeros(0)

    fig, (ax_ret, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    label = f"mean of {len(runs)} runs" if len(runs) > 1 else logdirs[0].name
    ax_ret.plot(data["steps"], data["return_mean"], marker="o", label=label)
    if len(runs) > 1:
        ax_ret.fill_between(data["steps"], data["return_min"], data["return_max"], alpha=0.25, label="min..max")
    for i, records in enumerate(runs):  # the stochastic exploration policy's returns, faint, per run
        expl_steps, smooth = exploration_curve(records)
        if expl_steps.size:
            ax_ret.plot(expl_steps, smooth, color="tab:orange", alpha=0.35, linewidth=1,
                        label="exploration (running mean of 20 episodes)" if i == 0 else None)
    for name, value in (reference_lines or {}).items():
        ax_ret.axhline(value, linestyle="--", color="gray", label=f"{name} ({value:.3g})")
    if all(has_returns):
        ax_ret.set_xlabel("env steps")
    else:
        ax_ret.set_xlabel("training steps")
        ax_ret.set_yscale("log")
    ax_ret.set_ylabel(left_label)
    ax_ret.legend()
    ax_ret.grid(alpha=0.3)
    if data["error_steps"].size:
        ax_err.plot(data["error_steps"], data["error_mean"], marker="o")
        if len(runs) > 1:
            ax_err.fill_between(data["error_steps"], data["error_min"], data["error_max"], alpha=0.25)
        ax_err.set_yscale("log")
    ax_err.set_xlabel("imagination step k")
    ax_err.set_ylabel("dynamics MSE vs simulator (last evaluation)")
    ax_err.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return data


def main(argv: list[str] | None = None, prog: str = "python -m polygrad_fast.plotting") -> dict[str, np.ndarray]:
    """``LOGDIR [LOGDIR ...] [--out PATH] [--title TEXT]``; called as ``main(argv, prog)`` it is the
    ``polygrad-fast plot`` subcommand. A missing directory, one without metrics.jsonl or without evaluations exits
    with status 2 and the reason."""
    import argparse

    from .cli import exit_usage

    parser = argparse.ArgumentParser(prog=prog, description="Plot the learning curves of run directories (several "
                                     "are treated as seeds of one configuration) to a PNG.")
    parser.add_argument("logdirs", nargs="+", type=Path, metavar="LOGDIR",
                        help="run directories holding metrics.jsonl (agent or world-model runs)")
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG to write (default: LOGDIR/learning_curves.png of the first LOGDIR)")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    out = args.out or args.logdirs[0] / "learning_curves.png"
    if out.suffix.lower() != ".png":
        exit_usage(prog, f"--out must name a .png file, got {str(out)!r}")
    try:
        data = plot_runs(args.logdirs, out, title=args.title)
    except (FileNotFoundError, ValueError) as exc:
        exit_usage(prog, str(exc))
    print(f"wrote {out}: last mean value {data['return_mean'][-1]:.4g} at step {data['steps'][-1]} over "
          f"{len(args.logdirs)} run(s)")
    return data


if __name__ == "__main__":
    main()
