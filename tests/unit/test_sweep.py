"""Sweep parts without training: the search space, watching and pruning a trial process, and
recovering the trials a killed sweep left running."""

from __future__ import annotations

import sys

import pytest

from gptforge.config.loader import load_config

optuna = pytest.importorskip("optuna")

from optuna.distributions import (  # noqa: E402
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState  # noqa: E402

from gptforge.sweep import space, study, trials  # noqa: E402


def test_specs_become_distributions_typed_by_the_config_field():
    parse = lambda item: space.parse_param(item, "tiny", []).distribution  # noqa: E731
    assert parse("optim.lr=log:1e-4:3e-3") == FloatDistribution(1e-4, 3e-3, log=True)
    assert parse("model.n_layer=2:4") == IntDistribution(2, 4)  # an int field: integers
    assert parse("model.dropout=0:0.5") == FloatDistribution(0.0, 0.5)  # a float field: floats
    assert parse("train.batch_size=int:2:8") == IntDistribution(2, 8)
    assert parse("model.norm=layernorm,rmsnorm") == CategoricalDistribution(
        ("layernorm", "rmsnorm"))


@pytest.mark.parametrize("item, value, field", [
    ("optim.lr=log:1e-5:1e-2", 0.0003162, ("optim", "lr")),
    ("model.n_layer=int:1:4", 3, ("model", "n_layer")),
    ("model.norm=layernorm,rmsnorm", "rmsnorm", ("model", "norm")),
    ("optim.lr=1e-5,3e-3", "3e-3", ("optim", "lr")),
])
def test_a_sampled_value_reaches_the_config_unchanged(item, value, field):
    param = space.parse_param(item, "tiny", [])
    cfg = load_config("tiny", [param.override(value)])
    got = getattr(getattr(cfg, field[0]), field[1])
    assert got == (float(value) if field[1] == "lr" else value)


def fake_trial(lines: list[str], delay_s: float, exit_code: int = 0) -> list[str]:
    """A child process that appends ``lines`` to metrics.jsonl (in its cwd argument), one every
    ``delay_s``, then prints a last line and exits with ``exit_code``."""
    script = (
        "import sys, time, pathlib\n"
        "path = pathlib.Path(sys.argv[1]) / 'metrics.jsonl'\n"
        f"for line in {lines!r}:\n"
        "    with open(path, 'a') as f: f.write(line + '\\n')\n"
        f"    time.sleep({delay_s})\n"
        f"print('error: boom'); sys.exit({exit_code})\n")
    return [sys.executable, "-c", script]


def test_a_trial_is_stopped_when_the_pruner_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(trials, "POLL_SECONDS", 0.05)
    lines = [f'{{"step": {s}, "val_loss": {4 - s / 10}}}' for s in (0, 1, 2, 3, 4, 5)]
    seen = []

    def should_prune(value, step):
        seen.append((step, value))
        return step == 2

    outcome = trials.run_trial(fake_trial(lines, 0.4) + [str(tmp_path)], tmp_path, "val_loss",
                               should_prune)
    assert outcome.pruned and outcome.error is None and outcome.steps == 2
    assert seen == [(1, 3.9), (2, 3.8)]  # step 0 (the untrained model) is not judged
    # stopped, not waited for: it never wrote its last lines
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) < len(lines)
    assert "boom" not in (tmp_path / "train.log").read_text()


def test_a_crashed_trial_fails_with_its_last_line(tmp_path):
    lines = ['{"step": 1, "val_loss": 3.0}', '{"step": 2, "val_l']  # cut short
    outcome = trials.run_trial(fake_trial(lines, 0.0, exit_code=1) + [str(tmp_path)], tmp_path,
                               "val_loss", lambda value, step: False)
    assert not outcome.pruned and outcome.value == 3.0 and outcome.steps == 1
    assert outcome.error == "exit code 1: error: boom" and not outcome.interrupted


def test_a_trial_stopped_by_a_signal_counts_as_interrupted(tmp_path):
    lines = ['{"step": 1, "val_loss": 3.0}']
    outcome = trials.run_trial(fake_trial(lines, 0.0, exit_code=143) + [str(tmp_path)],
                               tmp_path, "val_loss", lambda value, step: False)
    assert outcome.interrupted and outcome.error.startswith("exit code 143")


def test_trials_left_running_by_a_killed_sweep_are_failed_and_queued_again(tmp_path):
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.journal")))
    s = optuna.create_study(study_name="sweep", storage=storage)
    done = s.ask()
    done.suggest_float("optim.lr", 1e-4, 1e-2, log=True)
    s.tell(done, 3.0)
    killed = s.ask()  # never told: what a SIGKILL'd sweep leaves
    lr = killed.suggest_float("optim.lr", 1e-4, 1e-2, log=True)

    study._requeue_interrupted(s, storage)
    study._requeue_interrupted(s, storage)  # a second resume must not queue it twice
    states = [(t.state, t.user_attrs.get("interrupted"), t.user_attrs.get("retry_of"))
              for t in s.get_trials()]
    assert states == [(TrialState.COMPLETE, None, None), (TrialState.FAIL, True, None),
                      (TrialState.WAITING, None, killed.number)]
    assert len(study._counted(s)) == 1
    retry = s.ask()
    assert retry.suggest_float("optim.lr", 1e-4, 1e-2, log=True) == lr


def test_resuming_with_another_definition_is_refused(tmp_path):
    from gptforge.errors import GptforgeError

    params = space.parse_params(["optim.lr=1e-4,1e-3"], "tiny", [])
    first = study.Sweep(config="tiny", overrides=[], params=params, budget=10, out_dir=tmp_path)
    study._open_study(first)
    same = study.Sweep(config="tiny", overrides=[], params=params, budget=10, out_dir=tmp_path,
                       trials=50, jobs=2)  # --trials and --jobs may change
    study._open_study(same)
    other = study.Sweep(config="tiny", overrides=["model.n_layer=3"], params=params, budget=10,
                        out_dir=tmp_path)
    with pytest.raises(GptforgeError, match="holds a sweep with another config"):
        study._open_study(other)
