"""The Optuna sweep (sweep=optuna_ogm_ge): a database storage works, and a study continues where it stopped."""

from __future__ import annotations

import pytest

from conftest import FAST, read_metrics, run_cli

optuna = pytest.importorskip("optuna")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

from mmbalance.sweeps import TrialSeededTPESampler  # noqa: E402


def _objective(trial):
    x, y = trial.suggest_float("x", 0.05, 2.0), trial.suggest_float("y", 0.05, 2.0)
    return -((x - 1) ** 2) - (y - 0.5) ** 2


def _study_in_steps(storage: str, steps: list[int]) -> list[dict]:
    """Run a study in several processes' worth of steps (a new sampler each, as a new command would)."""
    for n in steps:
        study = optuna.create_study(study_name="s", storage=storage, direction="maximize", load_if_exists=True,
                                    sampler=TrialSeededTPESampler(seed=0, n_startup_trials=3))
        study.optimize(_objective, n_trials=n)
    return [t.params for t in optuna.load_study(study_name="s", storage=storage).trials]


def test_a_resumed_study_draws_what_an_uninterrupted_one_draws(tmp_path):
    """In a sqlite storage (Optuna 2 fails there with SQLAlchemy 2): random start-up trials and TPE trials
    alike, a study stopped twice and resumed draws the same values as one run through, and never repeats."""
    resumed = _study_in_steps(f"sqlite:///{tmp_path / 'a.db'}", [2, 2, 3])
    straight = _study_in_steps(f"sqlite:///{tmp_path / 'b.db'}", [7])
    assert resumed == straight
    assert len({p["x"] for p in resumed}) == 7


@pytest.mark.slow  # two sweep commands (about 20 s of CPU); the test above covers storage and sampler quickly
def test_an_interrupted_optuna_sweep_resumes_from_its_storage(tmp_path):
    """Two trials into a sqlite study, stop, the same command again: the study holds 4 completed trials with
    4 different alphas (a plain seeded TPESampler would replay the first two), each with its run's val/acc;
    the console carries neither ANSI colour codes nor alembic's plugin lines."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = ["sweep=optuna_ogm_ge", f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=2", *FAST,
            "trainer.epochs=1", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    for _ in range(2):
        proc = run_cli(args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        console = proc.stdout + proc.stderr
        assert "\x1b[" not in console and "setup plugin" not in console
    assert "Using an existing study" in console
    study = optuna.load_study(study_name="ogm_ge_alpha", storage=storage)
    trials = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert [t.number for t in trials] == [0, 1, 2, 3] and len(study.trials) == 4
    alphas = [t.params["method.alpha"] for t in trials]
    assert len(set(alphas)) == 4 and all(0.05 <= a <= 2.0 for a in alphas)
    runs = {r["config"]["method"]["alpha"]: r for r in map(read_metrics, (tmp_path / "sweep").glob("*/"))
            if r.get("status")}
    assert sorted(runs) == sorted(alphas)
    assert all(t.value == runs[t.params["method.alpha"]]["metrics"]["val/acc"] for t in trials)


def test_a_storage_that_cannot_open_or_holds_the_study_with_another_direction_is_one_message(tmp_path):
    base = ["sweep=optuna_ogm_ge", "hydra.sweeper.n_trials=1", *FAST, "trainer.epochs=1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = run_cli([*base, f"hydra.sweeper.storage=sqlite:///{tmp_path / 'no' / 'such' / 'x.db'}"], cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "hydra.sweeper.storage=sqlite:///" in proc.stderr and "cannot open the Optuna study database" in proc.stderr
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="ogm_ge_alpha", storage=storage, direction="maximize")
    proc = run_cli([*base, f"hydra.sweeper.storage={storage}", "hydra.sweeper.direction=minimize"], cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert ("error: hydra.sweeper.direction=minimize: the study 'ogm_ge_alpha' in " + storage
            + " was created to maximize") in proc.stderr
    assert not list((tmp_path / "sweep").glob("*/metrics.json"))  # no trial ran
