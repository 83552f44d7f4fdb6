"""A sweep as an Optuna study kept in the sweep directory, so it survives a kill and resumes.

The study is an append-only journal file (``study.journal``, Optuna's JournalStorage): every
event is one line, so a sweep killed at any moment leaves a readable study. Running the same
command again continues it: trials that were running when the sweep died are marked failed
(``interrupted``) and queued again with the same values, finished trials are kept, and only the
missing trials run. The sweep's definition (config, search space, budget, metric, sampler) is kept
in the study, and resuming with a different one is refused rather than mixed in.

Samplers: TPE (Bergstra et al. 2011, "Algorithms for Hyper-Parameter Optimization"), random, or a
full grid. Pruning: Optuna's median rule (as in Google Vizier, Golovin et al. 2017): a trial whose
intermediate value is worse than the median of earlier trials at the same step is stopped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from gptforge import atomic
from gptforge.config.loader import load_config, to_toml
from gptforge.errors import GptforgeError
from gptforge.sweep import results, trials
from gptforge.sweep.space import Param

log = logging.getLogger(__name__)

STUDY_NAME = "sweep"
PRUNER_STARTUP_TRIALS = 3  # finished trials before the median means anything


@dataclass
class Sweep:
    """Everything ``gptforge sweep`` was asked for."""

    config: str | None
    overrides: list[str]
    params: list[Param]
    budget: int
    out_dir: Path
    trials: int | None = None  # None: the grid's size (grid), else DEFAULT_TRIALS
    sampler: str = "tpe"
    metric: str = "val_loss"
    jobs: int = 1
    seed: int = 0
    prune: bool = True
    definition: dict = field(init=False)

    def __post_init__(self):
        self.definition = {
            "config": to_toml(load_config(self.config, self.overrides)),
            "params": {p.key: p.spec for p in self.params},
            "budget": self.budget, "metric": self.metric, "sampler": self.sampler}


DEFAULT_TRIALS = 20


def run_sweep(sweep: Sweep) -> optuna.Study:
    """Run (or continue) the sweep; write its results; return the study."""
    _check(sweep)
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    with _lock(sweep.out_dir):
        study, storage = _open_study(sweep)
        _requeue_interrupted(study, storage)
        base_config = sweep.out_dir / "base.toml"
        atomic.write_text(base_config, sweep.definition["config"])
        remaining = _target(sweep) - len(_counted(study))
        if remaining <= 0:
            log.info("sweep %s already holds its %d trials", sweep.out_dir, _target(sweep))
        try:
            if remaining > 0:
                log.info("sweep %s: %d trial(s) to run (%d done), %d step(s) each",
                         sweep.out_dir, remaining, len(_counted(study)), sweep.budget)
                study.optimize(_objective(sweep, base_config), n_trials=remaining,
                               n_jobs=sweep.jobs, catch=(TrialFailed,))
        finally:  # also after Ctrl-C: the table shows what was done
            results.write(study, sweep.params, sweep.out_dir, base_config, sweep.metric)
    return study


class TrialFailed(Exception):
    """A trial that ended without a value (its process failed); the sweep goes on."""


def _check(sweep: Sweep) -> None:
    if sweep.budget < 1:
        raise GptforgeError(f"--budget must be at least 1 step; got {sweep.budget}")
    if sweep.trials is not None and sweep.trials < 1:
        raise GptforgeError(f"--trials must be at least 1; got {sweep.trials}")
    if sweep.jobs < 1:
        raise GptforgeError(f"--jobs must be at least 1; got {sweep.jobs}")
    if sweep.sampler == "grid":
        for p in sweep.params:
            p.grid_values()  # refuses continuous ranges


def _target(sweep: Sweep) -> int:
    """How many finished trials the sweep should hold."""
    if sweep.sampler != "grid":
        return sweep.trials or DEFAULT_TRIALS
    size = 1
    for p in sweep.params:
        size *= len(p.grid_values())
    return min(size, sweep.trials or size)


def _sampler(sweep: Sweep) -> optuna.samplers.BaseSampler:
    if sweep.sampler == "grid":
        space = {p.key: p.grid_values() for p in sweep.params}
        return optuna.samplers.GridSampler(space, seed=sweep.seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=sweep.seed)
    return optuna.samplers.TPESampler(seed=sweep.seed)


def _pruner(sweep: Sweep) -> optuna.pruners.BasePruner:
    if not sweep.prune:
        return optuna.pruners.NopPruner()
    # Early values say little about the final one: judge only after a quarter of the budget.
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                       n_warmup_steps=sweep.budget // 4)


def _open_study(sweep: Sweep) -> tuple[optuna.Study, JournalStorage]:
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep logs each trial itself
    path = sweep.out_dir / "study.journal"
    storage = JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True,
                                sampler=_sampler(sweep), pruner=_pruner(sweep),
                                direction="minimize")
    saved = study.user_attrs.get("definition")
    if saved is None:
        study.set_user_attr("definition", sweep.definition)
    for what, value in sweep.definition.items():
        if saved is not None and saved.get(what) != value:
            raise GptforgeError(
                f"{sweep.out_dir} holds a sweep with another {what}; re-run it with the same "
                f"settings to continue it, or choose another --out")
    return study, storage


def _counted(study: optuna.Study) -> list:
    """Trials that count towards --trials: finished, and not cut short by a killed sweep."""
    return [t for t in study.get_trials(deepcopy=False)
            if t.state.is_finished() and not t.user_attrs.get("interrupted")]


def _requeue_interrupted(study: optuna.Study, storage: optuna.storages.BaseStorage) -> None:
    """Mark trials left running by a killed sweep as failed, and queue their values again."""
    study_id = storage.get_study_id_from_name(study.study_name)
    every = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in every}
    for t in every:
        if t.state == TrialState.RUNNING:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_user_attr(trial_id, "interrupted", True)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        elif not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted")):
            continue
        if t.number not in retried:
            log.info("trial %d was interrupted; it runs again with the same values", t.number)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})


def _suggest(trial: optuna.Trial, param: Param):
    dist = param.distribution
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(param.key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(param.key, dist.low, dist.high, log=dist.log)
    return trial.suggest_float(param.key, dist.low, dist.high, log=dist.log)


def _objective(sweep: Sweep, base_config: Path):
    def objective(trial: optuna.Trial) -> float:
        values = {p.key: _suggest(trial, p) for p in sweep.params}
        overrides = [p.override(values[p.key]) for p in sweep.params]
        run_dir = sweep.out_dir / f"trial-{trial.number}"
        command = trials.train_command(base_config, overrides, sweep.budget, run_dir)

        def should_prune(value: float, step: int) -> bool:
            trial.report(value, step)
            return trial.should_prune()

        try:
            outcome = trials.run_trial(command, run_dir, sweep.metric, should_prune)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        trial.set_user_attr("steps", outcome.steps)
        trial.set_user_attr("seconds", round(outcome.seconds, 1))
        shown = ", ".join(p.show(values[p.key]) for p in sweep.params)
        if outcome.pruned:
            log.info("trial %d (%s): pruned at step %d", trial.number, shown, outcome.steps)
            raise optuna.TrialPruned()
        if outcome.error:
            trial.set_user_attr("error", outcome.error)
            if outcome.interrupted:  # not the trial's fault: run it again on resume
                trial.set_user_attr("interrupted", True)
            log.warning("trial %d (%s) failed: %s", trial.number, shown, outcome.error)
            raise TrialFailed(outcome.error)
        log.info("trial %d (%s): %s %.4f after %d steps, %.0f s", trial.number, shown,
                 sweep.metric, outcome.value, outcome.steps, outcome.seconds)
        return outcome.value

    return objective


class _lock:
    """One sweep process per directory: two would run the same queued trials twice."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / "sweep.lock"

    def __enter__(self):
        try:
            pid = int(self.path.read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid is not None and pid != os.getpid() and _alive(pid):
            raise GptforgeError(f"another sweep (process {pid}) is running in "
                                f"{self.path.parent}; wait for it or stop it first")
        atomic.write_text(self.path, f"{os.getpid()}\n")
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
