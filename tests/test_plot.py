"""`polygrad-fast plot`: PNG learning curves from run directories (agent and world-model runs), mean and band over
seeds, and clear errors for a missing directory, a directory without metrics or without evaluations."""
import json
from pathlib import Path

import numpy as np
import pytest

from polygrad_fast.cli import main
from polygrad_fast.plotting import error_history, plot_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(logdir: Path, records: list[dict]) -> Path:
    logdir.mkdir(parents=True)
    (logdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return logdir


def agent_run(logdir: Path, returns: list[float]) -> Path:
    return write_run(logdir, [{"step": 0, "dataset/transitions": 10}] + [
        {"step": 500 * i, "eval/return_mean": r, "errors/dynamics_mse_0001_step": 0.1 * (i + 1),
         "errors/dynamics_mse_0002_step": 0.2 * (i + 1)} for i, r in enumerate(returns)])


def wm_run(logdir: Path, scale: float, horizon: int = 4) -> Path:
    """A world-model run's records: errors at every evaluation (and the persistence yardstick's), no returns."""
    evals = []
    for step in (0, 20, 40):
        rec = {"step": step}
        for k in range(1, horizon):
            rec[f"errors/dynamics_mse_{k:04d}_step"] = scale * k / (1 + step)
            rec[f"errors/persistence_dynamics_mse_{k:04d}_step"] = 9.0  # must not be read as the model's error
        evals.append(rec)
    return write_run(logdir, [{"step": 10, "diffusion/loss": 0.5}, *evals])


def test_plot_subcommand_writes_a_png_of_seeds(tmp_path, capsys):
    a, b = agent_run(tmp_path / "s0", [1.0, 10.0, 30.0]), agent_run(tmp_path / "s1", [3.0, 20.0])
    out = tmp_path / "fig" / "curves.png"
    assert main(["plot", str(a), str(b), "--out", str(out), "--title", "two seeds"]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert f"wrote {out}" in capsys.readouterr().out
    data = plot_runs([a, b], tmp_path / "again.png")
    assert data["steps"].tolist() == [0, 500]  # the steps both seeds reached
    assert data["return_mean"].tolist() == [2.0, 15.0]
    assert data["return_min"].tolist() == [1.0, 10.0] and data["return_max"].tolist() == [3.0, 20.0]
    # last evaluations: s0 at i=2 (x3), s1 at i=1 (x2)
    assert np.allclose(data["error_mean"], [0.25, 0.5]) and np.allclose(data["error_min"], [0.2, 0.4])


def test_plot_default_out_is_in_the_first_run_directory(tmp_path):
    run = agent_run(tmp_path / "s0", [1.0, 2.0])
    assert main(["plot", str(run)]) == 0
    assert (run / "learning_curves.png").read_bytes()[:8] == PNG_MAGIC


def test_world_model_runs_plot_the_error_history(tmp_path):
    a, b = wm_run(tmp_path / "wm0", 1.0), wm_run(tmp_path / "wm1", 3.0)
    steps, mse, k = error_history([json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()])
    assert k == 3 and steps.tolist() == [0, 20, 40] and np.allclose(mse, [3.0, 3 / 21, 3 / 41])
    data = plot_runs([a, b], tmp_path / "wm.png")
    assert (tmp_path / "wm.png").read_bytes()[:8] == PNG_MAGIC
    assert data["steps"].tolist() == [0, 20, 40]
    assert np.allclose(data["return_mean"], [6.0, 6 / 21, 6 / 41])  # mean of 3 and 9 at step 0
    assert data["error_steps"].tolist() == [1, 2, 3]
    assert np.allclose(data["error_mean"], [2 / 41, 4 / 41, 6 / 41])  # the last evaluation (step 40), not 9.0


@pytest.mark.parametrize("case", ["missing", "no_metrics", "no_evaluations", "not_json", "mixed", "horizons",
                                  "not_png"])
def test_plot_rejects_bad_run_directories(tmp_path, capsys, case):
    good = agent_run(tmp_path / "good", [1.0])
    expected = {
        "missing": "no metrics.jsonl in run directory {d}: the directory does not exist",
        "no_metrics": "no metrics.jsonl in run directory {d}",
        "no_evaluations": "run directory {d} has no evaluation records yet",
        "not_json": "metrics.jsonl line 2 is not JSON",
        "mixed": "runs mix agent runs",
        "horizons": "the world-model runs have different horizons (last reported imagination steps [3, 5])",
        "not_png": "--out must name a .png file, got",
    }[case]
    d = tmp_path / "bad"
    args = [str(d)]
    if case == "no_metrics":
        d.mkdir()
    elif case == "no_evaluations":
        write_run(d, [{"step": 10, "diffusion/loss": 0.5}])
    elif case == "not_json":
        d.mkdir()
        (d / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, oops\n')
    elif case == "mixed":
        wm_run(d, 1.0)
        args = [str(good), str(d)]
    elif case == "horizons":
        wm_run(d, 1.0)
        args = [str(d), str(wm_run(tmp_path / "long", 1.0, horizon=6))]
    elif case == "not_png":
        args = [str(good), "--out", str(tmp_path / "curves.gif")]
    out = tmp_path / "out.png"
    if case != "not_png":
        args += ["--out", str(out)]
    with pytest.raises(SystemExit) as info:
        main(["plot", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert expected.format(d=d) in err, err
    assert not out.exists()


def test_plot_needs_a_run_directory(capsys):
    with pytest.raises(SystemExit) as info:
        main(["plot"])
    assert info.value.code == 2
    assert "the following arguments are required: LOGDIR" in capsys.readouterr().err
