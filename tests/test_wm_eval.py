"""The world-model comparison: every method scored on the same windows, the persistence yardstick with its own
reward, the report files, the command line, and bad input refused before any training."""
import csv
import dataclasses

import numpy as np
import pytest
import torch

from polygrad_fast import wm_eval
from polygrad_fast.baselines import AutoregressiveDiffusion, AutoregressiveDiffusionConfig, EnsembleConfig
from polygrad_fast.baselines import ProbabilisticEnsemble
from polygrad_fast.buffer import TrajectoryBuffer
from polygrad_fast.checkpoint import CheckpointManager
from polygrad_fast.denoisers import MLPDenoiserConfig, TransformerDenoiserConfig
from polygrad_fast.diffusion_trainer import DiffusionTrainerConfig
from polygrad_fast.envs import SimStateEnv
from polygrad_fast.policy import Actor

TINY_TRAINER = DiffusionTrainerConfig(batch_size=16, step_start_ema=2)
TINY = wm_eval.WMEvalConfig(
    dataset_steps=300, horizons=(5, 8), eval_batch=6, n_diffusion_steps=4, polygrad_hidden=32,
    polygrad_hidden_long=32, polygrad_layers=1, polygrad_train_steps=5, trainer=TINY_TRAINER,
    transformer=TransformerDenoiserConfig(n_embd=16, n_head=2, num_layers=1), transformer_trainer=TINY_TRAINER,
    sampling_steps=(2,),
    ar=AutoregressiveDiffusionConfig(denoiser=MLPDenoiserConfig(hidden_dim=32, num_layers=1), trainer=TINY_TRAINER,
                                     train_steps=5),
    ensemble=EnsembleConfig(hidden=16, layers=2, train_steps=5, batch_size=16))


@pytest.fixture(scope="module")
def hopper_buffer():
    env = SimStateEnv("Hopper-v5", seed=0)
    yield wm_eval.collect_dataset(env, 300, seed=0)
    env.close()


@pytest.fixture(scope="module")
def results(hopper_buffer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return wm_eval.evaluate(TINY, buffer=hopper_buffer, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)


def test_every_method_at_every_horizon(results):
    methods = ["polygrad", "polygrad_k2", *wm_eval.METHODS[1:]]  # the few-step chain next to the full one
    assert [(r.horizon, r.method) for r in results] == [(h, m) for h in TINY.horizons for m in methods]
    for r in results:
        assert r.steps == list(range(1, r.horizon)) and r.batch == TINY.eval_batch
        assert np.isfinite(r.dynamics_mse).all() and np.isfinite(r.dynamics_mse_std).all()
        assert r.imagine_seconds > 0 and np.isfinite(r.reward_mse)
        assert (r.train_seconds > 0) == (r.method != "persistence")


def test_transformer_and_few_step_methods_sample_what_they_name(hopper_buffer, monkeypatch, one_torch_thread):
    """polygrad_transformer imagines with a TransformerDenoiser trained at transformer_trainer's lr, polygrad_kK
    with the PolyGRAD model's K-step chain, polygrad with the configured chain (all T steps)."""
    from polygrad_fast.denoisers import ResidualMLPDenoiser, TransformerDenoiser

    built, trained = [], []

    class Spy(wm_eval.FastGuidedSampler):
        def __init__(self, denoiser, *args, config, **kwargs):
            super().__init__(denoiser, *args, config=config, **kwargs)
            built.append((type(denoiser), config.sampling_steps, self.n_chain_steps))

    init = wm_eval.DiffusionTrainer.__init__
    monkeypatch.setattr(wm_eval, "FastGuidedSampler", Spy)
    monkeypatch.setattr(wm_eval.DiffusionTrainer, "__init__", lambda self, d, sched, config: trained.append(
        (type(d), config.lr)) or init(self, d, sched, config))
    cfg = dataclasses.replace(TINY, horizons=(3,), methods=("polygrad", "polygrad_transformer"), sampling_steps=(3,),
                              eval_batch=2, transformer_trainer=dataclasses.replace(TINY_TRAINER, lr=1e-4))
    results = wm_eval.evaluate(cfg, buffer=hopper_buffer, log=lambda *_: None)
    assert [r.method for r in results] == ["polygrad", "polygrad_k3", "polygrad_transformer"]
    assert trained == [(ResidualMLPDenoiser, TINY_TRAINER.lr), (TransformerDenoiser, 1e-4)]
    assert built == [(ResidualMLPDenoiser, None, TINY.n_diffusion_steps), (ResidualMLPDenoiser, 3, 3),
                     (TransformerDenoiser, None, TINY.n_diffusion_steps)]
    assert results[0].train_seconds == results[1].train_seconds  # one model, two chains


def test_persistence_reward_error_is_its_own(results):
    """The yardstick predicts the dataset's mean reward: its reward error is not the model's (the old yardstick was
    given the model's imagined rewards, so the two were always equal)."""
    by = {(r.horizon, r.method): r for r in results}
    for h in TINY.horizons:
        assert by[h, "persistence"].reward_mse != pytest.approx(by[h, "polygrad"].reward_mse, rel=1e-3)


def test_persistence_rollout_holds_state_and_acts_on_it(hopper_buffer):
    torch.manual_seed(0)
    actor = Actor(11, 3, init_std=0.1 + 1e-6, min_std=0.1)  # std 0.1: actions within ~0.5 of the mean
    start = hopper_buffer.sample_windows(200, 1, seed=3, normalize=False).start_obs
    r = wm_eval.persistence_rollout(start, actor, 4, mean_reward=0.7, generator=torch.Generator().manual_seed(0))
    assert (r.observations == start[:, None]).all() and (r.rewards == 0.7).all()
    with torch.no_grad():
        mean = actor(start)[0]
    z = (r.actions - mean[:, None]) / 0.1  # standardised under pi(.|s_0): N(0, 1) if drawn on the held state
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05  # 2400 draws: 3 sigma ~ 0.06 / 0.04


def test_write_report_files_parse(results, tmp_path):
    paths = wm_eval.write_report(results, tmp_path / "report")
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(r.steps) for r in results)
    first = results[0]
    row = next(x for x in rows if x["method"] == first.method and int(x["horizon"]) == first.horizon
               and int(x["step"]) == first.steps[-1])
    assert float(row["dynamics_mse"]) == pytest.approx(first.dynamics_mse[-1])
    assert float(row["imagine_seconds_per_batch"]) == pytest.approx(first.imagine_seconds)
    md = paths["markdown"].read_text()
    for h in TINY.horizons:
        assert f"### h = {h}" in md
    for m in (*wm_eval.METHODS, "polygrad_k2"):
        assert md.count(f"| {m} |") == len(TINY.horizons)
    for r in results:  # each method's row carries its imagination seconds per batch and training seconds
        row = next(line for line in md.splitlines() if line.startswith(f"| {r.method} |")
                   and f"| {r.imagine_seconds:.3g} | {r.train_seconds:.3g} |" in line)
        assert row.endswith(f"| {r.imagine_seconds:.3g} | {r.train_seconds:.3g} |")
    assert "imagine s / batch" in md
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no results"):
        wm_eval.write_report([], tmp_path / "empty")


def test_main_runs_the_comparison(tmp_path, one_torch_thread):
    out = tmp_path / "out"
    results = wm_eval.main([
        "--preset", "cpu", "--outdir", str(out), "--dataset_steps", "200", "--horizons", "4", "--eval_batch", "3",
        "--methods", "polygrad", "persistence", "--n_diffusion_steps", "2", "--polygrad_hidden", "16",
        "--polygrad_layers", "1", "--polygrad_train_steps", "2", "--trainer.batch_size", "8"])
    assert [r.method for r in results] == ["polygrad", "persistence"]
    assert {p.name for p in out.iterdir()} == {"errors.csv", "summary.md", "errors_vs_step.png", "config.json"}


@pytest.mark.parametrize("name", ["eval-wm", "wm-eval"])
def test_subcommand_refuses_a_missing_dataset_before_training(tmp_path, capsys, no_training, name):
    from polygrad_fast.cli import main

    with pytest.raises(SystemExit) as exc:
        main([name, "--preset", "cpu", "--outdir", str(tmp_path / "out"), "--dataset", str(tmp_path / "no.pgbuf")])
    assert exc.value.code == 2
    assert f"polygrad-fast {name}: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_main_refuses_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        wm_eval.main(["--preset", "cpu", "--horizons", "10"])
    assert exc.value.code == 2 and "--outdir DIR is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        wm_eval.main(["--preset", "cpu", "--outdir", str(tmp_path), "--horizons", "1"])
    assert exc.value.code == 2 and "horizons" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def no_training(monkeypatch):
    """Any training reached fails the test: the errors below must come first."""
    def boom(*_args, **_kwargs):
        raise AssertionError("training started before the input was checked")

    monkeypatch.setattr(wm_eval, "_train_polygrad", boom)
    monkeypatch.setattr(AutoregressiveDiffusion, "train", boom)
    monkeypatch.setattr(ProbabilisticEnsemble, "fit", boom)


def test_dataset_with_other_dims_is_refused(no_training):
    other = TrajectoryBuffer(17, 6, 91, 100)
    with pytest.raises(ValueError, match=r"dims \(17, 6, 91\), Hopper-v5 has \(11, 3, 58\)"):
        wm_eval.evaluate(TINY, buffer=other)


def test_dataset_of_another_task_with_the_same_dims_is_refused(no_training):
    walker = SimStateEnv("Walker2d-v5", seed=0)
    buffer = wm_eval.collect_dataset(walker, 60, seed=0)
    walker.close()
    cheetah = dataclasses.replace(TINY, env="HalfCheetah-v5", horizons=(2,))
    with pytest.raises(ValueError, match="recorded in another task"):
        wm_eval.evaluate(cheetah, buffer=buffer)


def test_dataset_file_of_other_dims_is_refused(tmp_path, no_training):
    path = tmp_path / "walker.pgbuf"
    TrajectoryBuffer(17, 6, 91, 100).save(path)
    with pytest.raises(ValueError, match="obs_dim"):
        wm_eval.evaluate(dataclasses.replace(TINY, dataset=str(path)))
    with pytest.raises(FileNotFoundError):
        wm_eval.evaluate(dataclasses.replace(TINY, dataset=str(tmp_path / "missing.pgbuf")))


def test_horizon_beyond_the_longest_episode_is_refused(hopper_buffer, no_training):
    longest = int(hopper_buffer.episode_lengths().max())
    with pytest.raises(ValueError, match=f"horizon {longest + 1} exceeds the dataset's longest episode"):
        wm_eval.evaluate(dataclasses.replace(TINY, horizons=(longest + 1,)), buffer=hopper_buffer)


def test_policy_of_the_wrong_size_is_refused(hopper_buffer, no_training):
    with pytest.raises(ValueError, match="policy maps obs 17 -> actions 6, but Hopper-v5 has obs 11 and actions 3"):
        wm_eval.evaluate(TINY, buffer=hopper_buffer, actor=Actor(17, 6))
    with pytest.raises(TypeError, match="policy must be a polygrad_fast.policy.Actor"):
        wm_eval.evaluate(TINY, buffer=hopper_buffer, actor=lambda obs: obs)


def test_policy_from_an_agent_checkpoint(tmp_path):
    torch.manual_seed(0)
    actor = Actor(11, 3, hidden=16, layers=1)
    state = {"format": 1, "config": {"env": "Hopper-v5"},
             "a2c": {"actor_config": dataclasses.asdict(actor.config), "actor": actor.state_dict()}}
    torch.save(state, tmp_path / "step_000000010.pt")
    managed = CheckpointManager(tmp_path / "checkpoints").save(10, state)  # the agent's run-directory layout
    obs = torch.randn(4, 11)
    for path in (tmp_path / "step_000000010.pt", managed):
        loaded = wm_eval.load_policy(path, "Hopper-v5")
        torch.testing.assert_close(loaded(obs)[0], actor(obs)[0], rtol=0, atol=0)
        torch.testing.assert_close(loaded.std(), actor.std(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="holds a policy for 'Hopper-v5', the evaluation is on 'Walker2d-v5'"):
        wm_eval.load_policy(tmp_path / "step_000000010.pt", "Walker2d-v5")
    torch.save({"format": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an agent checkpoint"):
        wm_eval.load_policy(tmp_path / "other.pt", "Hopper-v5")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        wm_eval.load_policy(tmp_path / "missing.pt", "Hopper-v5")


def test_config_errors():
    with pytest.raises(ValueError, match="horizons"):
        dataclasses.replace(TINY, horizons=(1,))
    with pytest.raises(ValueError, match="methods must be distinct"):
        dataclasses.replace(TINY, methods=("polygrad", "polygrad"))
    with pytest.raises(ValueError, match="methods must be distinct"):
        dataclasses.replace(TINY, methods=("transformer",))
    with pytest.raises(ValueError, match=r"sampling_steps must be an int >= 2 and <= 4 \(a K-step chain"):
        dataclasses.replace(TINY, sampling_steps=(5,))
    with pytest.raises(ValueError, match="sampling_steps must be distinct"):
        dataclasses.replace(TINY, sampling_steps=(2, 2))
