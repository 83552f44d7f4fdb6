"""`gptforge sweep` as a user runs it: it finds the better learning rate, resumes without re-running
finished trials, writes a best.toml that trains, and refuses bad ranges in one line."""

from __future__ import annotations

import csv
import json

import pytest

from gptforge.cli import main
from gptforge.config.loader import load_config, to_toml
from tests.conftest import prepare_corpus

pytest.importorskip("optuna")


def final_val_loss(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in lines if "val_loss" in r][-1]


@pytest.mark.slow
def test_sweep_picks_the_better_lr_and_resumes_without_rerunning(tmp_path):
    import optuna

    data = prepare_corpus(tmp_path, 400)
    out = tmp_path / "sweep"
    common = [f"data.dir={data}", "train.sample_tokens=0", "runtime.device=cpu"]
    args = ["sweep", "-c", "tiny", *common, "--param", "optim.lr=1e-5,3e-3", "--sampler", "grid",
            "--budget", "10", "--out", str(out)]
    # The first run stops after one trial, as a killed sweep would have.
    assert main([*args, "--trials", "1"]) == 0
    first = (out / "trial-0" / "metrics.jsonl").stat().st_mtime_ns
    assert main([*args, "--trials", "2"]) == 0

    study = optuna.load_study(study_name="sweep", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))))
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert sorted(t.params["optim.lr"] for t in trials) == ["1e-5", "3e-3"]
    assert (out / "trial-0" / "metrics.jsonl").stat().st_mtime_ns == first  # not run again
    # The objective is each trial's final val loss, as its own run logged it.
    for t in trials:
        assert t.value == pytest.approx(final_val_loss(out / f"trial-{t.number}"))
    assert study.best_trial.params["optim.lr"] == "3e-3"

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["state"] for r in rows] == ["complete", "complete"] and \
        {r["steps"] for r in rows} == {"10"}
    assert "| **" in (out / "results.md").read_text()
    # best.toml is the sweep's config with the best value, written like a preset.
    best = load_config(str(out / "best.toml"))
    assert best.optim.lr == 3e-3
    assert to_toml(best) == to_toml(load_config("tiny", [*common, "optim.lr=3e-3"]))


@pytest.mark.parametrize("param, expected", [
    ("optim.lr=log:0:1e-3", "a log range needs LO > 0"),
    ("optim.lr=3e-3:1e-4", "LO must be below HI"),
    ("optim.lrr=1e-4:1e-3", "did you mean 'optim.lr'"),
    ("model.n_layer=0.5:2", "model.n_layer must be int, got 0.5"),
    ("model.n_layer=log:x:2", "model.n_layer must be int"),
    ("model.n_layer=two,three", "model.n_layer must be int"),
    ("model.dropout=0,0", "values must be distinct"),
    ("optim.lr=fast", "a range is LO:HI"),
    ("lr=1e-4:1e-3", "must look like section.key=SPEC"),
    ("train.max_steps=10,20", "the sweep sets it for each trial"),
])
def test_bad_param_gives_one_line(param, expected, tmp_path, capsys):
    code = main(["sweep", "-c", "tiny", "--param", param, "--budget", "5",
                 "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--param", "optim.lr=1e-4:1e-3", "--sampler", "grid"], "--sampler grid needs a list"),
    (["--param", "optim.lr=1e-4:1e-3", "--budget", "0"], "--budget must be at least 1"),
    ([], "name at least one --param"),
])
def test_bad_sweep_options_give_one_line(extra, expected, tmp_path, capsys):
    args = ["sweep", "-c", "tiny", "--out", str(tmp_path / "s"), *extra]
    if "--budget" not in extra:
        args += ["--budget", "5"]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and expected in err[0], err
