"""Optuna pieces for the Hydra Optuna sweeper (`sweep=optuna_*`, `pip install "mmbalance[sweeps]"`).

Imported by Hydra when it builds the sweeper's sampler (`hydra.sweeper.sampler._target_`), so Optuna loads only
in a sweep that uses it.
"""

from __future__ import annotations

import numpy as np
import optuna
from optuna.samplers import BaseSampler, TPESampler

# Optuna's own handler writes ANSI-coloured lines to stderr whatever the stream is (a SLURM log, a file): hand its
# records to the logging Hydra configured instead (plain text, the sweep's format)
optuna.logging.disable_default_handler()
optuna.logging.enable_propagation()


class TrialSeededTPESampler(BaseSampler):
    """Optuna's TPESampler, with the random draws of trial n seeded from (seed, n) alone.

    A plain `TPESampler(seed=s)` starts its random stream anew in every process, so a study resumed from its
    storage (same `study_name` and `storage`) replays the first run's draws: its first new trials repeat
    parameters already tried (mmbalance then finds those runs complete and skips them), and the study does not
    move on. Here trial n's draws depend on the seed, n and the trials before it, as stored: a resumed study
    draws exactly what an uninterrupted one would have drawn. `seed=None` is a plain, unseeded TPESampler.
    Every other argument goes to TPESampler.
    """

    def __init__(self, seed: int | None = None, **tpe_kwargs):
        self.seed = seed
        self._tpe_kwargs = tpe_kwargs
        self._unseeded = TPESampler(seed=None, **tpe_kwargs) if seed is None else None
        self._by_trial: dict[int, TPESampler] = {}  # trials asked and not yet told

    def _sampler(self, trial) -> TPESampler:
        if self._unseeded is not None:
            return self._unseeded
        sampler = self._by_trial.get(trial.number)
        if sampler is None:
            seed = int(np.random.SeedSequence([int(self.seed) % 2**32, trial.number]).generate_state(1)[0])
            sampler = self._by_trial[trial.number] = TPESampler(seed=seed, **self._tpe_kwargs)
        return sampler

    def infer_relative_search_space(self, study, trial):
        return self._sampler(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._sampler(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._sampler(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):  # Optuna >= 3 calls it
        sampler = self._sampler(trial)
        if hasattr(sampler, "before_trial"):
            sampler.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._sampler(trial).after_trial(study, trial, state, values)
        self._by_trial.pop(trial.number, None)

    def reseed_rng(self) -> None:
        """Seeded: nothing to do (each trial's draws are fixed by its number); unseeded: reseed the TPESampler."""
        if self._unseeded is not None:
            self._unseeded.reseed_rng()
