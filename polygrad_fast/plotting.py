"""Learning curves of agent runs: evaluation return vs env steps and world-model error vs imagination step.

    from polygrad_fast.plotting import plot_runs
    plot_runs(["runs/agent/InvertedPendulum-v5/pendulum-cpu_seed0", "..._seed1"], "pendulum.png",
              reference_lines={"random policy": 8.0})

Reads each run directory's ``metrics.jsonl`` (written by ``polygrad_fast.agent``). Several runs are treated as
seeds of one configuration: the curve is their mean at the evaluation steps they all reached, the band their
min..max. Needs matplotlib (``pip install matplotlib``).
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
    """The records of ``logdir/metrics.jsonl``; FileNotFoundError naming the path when it is missing."""
    path = Path(logdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in run directory {logdir} (expected {path})")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


def plot_runs(logdirs: Iterable[str | Path], out_png: str | Path, title: str | None = None,
              reference_lines: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """Write a PNG with two panels and return what was drawn.

    Left: evaluation return vs env steps, the mean over runs at the evaluation steps all runs reached (min..max
    band when there are several), each run's exploration returns (running mean, faint) and optional horizontal
    ``reference_lines`` (label -> return). Right: the last
    evaluation's world-model dynamics MSE vs imagination step k, mean over runs (log scale).
    Returns {'steps', 'return_mean', 'return_min', 'return_max', 'error_steps', 'error_mean'}.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    logdirs = [Path(d) for d in logdirs]
    if not logdirs:
        raise ValueError("plot_runs needs at least one run directory")
    runs = [read_metrics(d) for d in logdirs]
    curves = [eval_curve(r) for r in runs]
    for d, (steps, _) in zip(logdirs, curves):
        if steps.size == 0:
            raise ValueError(f"run directory {d} has no '{RETURN_KEY}' records yet")
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
    table = np.array([[ret[np.searchsorted(steps, s)] for s in common] for steps, ret in curves])
    data = {"steps": np.array(common, dtype=np.int64), "return_mean": table.mean(axis=0),
            "return_min": table.min(axis=0), "return_max": table.max(axis=0)}
    errors = [error_curve(r) for r in runs]
    err_steps = sorted(set.intersection(*(set(k.tolist()) for k, _ in errors)))
    data["error_steps"] = np.array(err_steps, dtype=np.int64)
    data["error_mean"] = (np.array([[e[np.searchsorted(k, s)] for s in err_steps] for k, e in errors]).mean(axis=0)
                          if err_steps else np.zeros(0))

    fig, (ax_ret, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    label = f"mean of {len(runs)} runs" if len(runs) > 1 else logdirs[0].name
    ax_ret.plot(data["steps"], data["return_mean"], marker="o", label=label)
    if len(runs) > 1:
        ax_ret.fill_between(data["steps"], data["return_min"], data["return_max"], alpha=0.25, label="min..max")
    for i, records in enumerate(runs):  # the stochastic exploration policy's returns, faint, per run
        steps, smooth = exploration_curve(records)
        if steps.size:
            ax_ret.plot(steps, smooth, color="tab:orange", alpha=0.35, linewidth=1,
                        label="exploration (running mean of 20 episodes)" if i == 0 else None)
    for name, value in (reference_lines or {}).items():
        ax_ret.axhline(value, linestyle="--", color="gray", label=f"{name} ({value:.3g})")
    ax_ret.set_xlabel("env steps")
    ax_ret.set_ylabel("evaluation return")
    ax_ret.legend()
    ax_ret.grid(alpha=0.3)
    if err_steps:
        ax_err.plot(data["error_steps"], data["error_mean"], marker="o")
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


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m polygrad_fast.plotting",
                                     description="Plot the learning curves of agent run directories (seeds).")
    parser.add_argument("out_png")
    parser.add_argument("logdirs", nargs="+")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    data = plot_runs(args.logdirs, args.out_png, title=args.title)
    print(f"wrote {args.out_png}: final mean evaluation return {data['return_mean'][-1]:.1f} "
          f"at {data['steps'][-1]} env steps over {len(args.logdirs)} run(s)")


if __name__ == "__main__":
    main()
