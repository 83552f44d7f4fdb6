"""The whole path through the CLI, as a user runs it: prepare -> train -> generate -> resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gptforge
from gptforge.cli import main
from gptforge.metrics.sinks import read_metrics
from tests.conftest import prepare_corpus

pytestmark = pytest.mark.slow

TINY = ["runtime.progress=false", "runtime.device=cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_corpus(tmp_path_factory.mktemp("data"), 1500)


def train_args(data_dir, run_dir, *extra):
    return ["train", "-c", "tiny", f"data.dir={data_dir}", f"train.out_dir={run_dir}",
            *TINY, *extra]


def train_lines(run_dir):
    return [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]


def test_train_then_generate(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(data_dir, run, "train.max_steps=60", "train.eval_interval=20",
                           "optim.lr=3e-3", "train.ckpt_interval=20", "train.keep_last=1",
                           "runtime.tensorboard=true")) == 0
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert {"step", "loss", "lr", "tokens_per_sec", "mfu"} <= set(train[0])
    assert [r["step"] for r in evals] == [0, 20, 40, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5  # it learned something
    ckpt = run / "ckpt" / "step-000060"
    for name in ("model.safetensors", "model.json", "trainer_state.pt", "tokenizer"):
        assert (ckpt / name).exists(), name
    assert (run / "latest").read_text().strip() == "ckpt/step-000060"
    assert (run / "config.toml").is_file() and list((run / "tb").iterdir())
    assert "--- sample 1 ---" in capsys.readouterr().out

    assert main(["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "30",
                 "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and len(out) > len("ROMEO:") + 10

    model = gptforge.load(run)
    greedy = model.generate("JULIET", max_new_tokens=20, temperature=0)
    assert greedy == model.generate("JULIET", max_new_tokens=20, temperature=0)
    assert len(model.generate("JULIET", max_new_tokens=5, num_samples=3, seed=0)) == 3


def test_rerun_refuses_to_overwrite_then_resume_extends(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(data_dir, run, "train.max_steps=10")) == 0
    assert main(train_args(data_dir, run, "train.max_steps=10")) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "train.max_steps=15", *TINY]) == 0
    assert train_lines(run)[-1]["step"] == 15
    assert main(["train", "--resume", str(run), "model.n_layer=3"]) == 1
    assert "cannot change the architecture (model.n_layer)" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [
    [],
    ["optim.name=muon", "train.grad_accum=2", "schedule.batch_ramp_steps=16",
     "schedule.weight_decay=follow_lr"],
    ["optim.name=muon", "train.ckpt_format=sharded"],
], ids=["adamw", "muon-ramp", "muon-sharded"])
def test_resume_after_crash_is_exact(data_dir, tmp_path, monkeypatch, extra):
    """A run that crashes and resumes from its last checkpoint logs the same losses, step for
    step, as one that never stopped (CPU, fp32, dropout on: RNG state is restored too)."""
    from gptforge.train.loop import Trainer

    common = ["train.max_steps=24", "train.ckpt_interval=5", "train.eval_interval=8",
              "model.dropout=0.1", *extra]
    assert main(train_args(data_dir, tmp_path / "a", *common)) == 0

    original = Trainer.train_step

    def crash_at_13(self):
        if self.state.step == 13:
            raise RuntimeError("simulated crash")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_13)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(train_args(data_dir, tmp_path / "b", *common))
    monkeypatch.setattr(Trainer, "train_step", original)
    assert max(r["step"] for r in train_lines(tmp_path / "b")) == 13  # logged past the ckpt
    assert main(["train", "--resume", str(tmp_path / "b"), *TINY]) == 0

    def losses(run):
        return [(r["step"], r["loss"]) for r in train_lines(run)]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert len(losses(tmp_path / "a")) == 24


def test_sigterm_saves_a_checkpoint_and_resume_is_exact(data_dir, tmp_path):
    # Enough steps that the run is still going when its first metrics (written once a second)
    # appear.
    common = ["train.max_steps=1500", "train.ckpt_interval=5000", "train.eval_interval=5000",
              "train.sample_tokens=0", "runtime.threads=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "gptforge"]
    run_b = tmp_path / "b"
    proc = subprocess.Popen(cmd + train_args(data_dir, run_b, *common), env=env,
                            stderr=subprocess.PIPE, text=True)
    metrics = run_b / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(train_lines(run_b)) >= 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    stopped = int((run_b / "latest").read_text().strip().split("-")[-1])
    assert 20 <= stopped < 1500
    subprocess.run(cmd + ["train", "--resume", str(run_b), *TINY], env=env, check=True,
                   capture_output=True)
    subprocess.run(cmd + train_args(data_dir, tmp_path / "a", *common), env=env, check=True,
                   capture_output=True)
    a = [(r["step"], r["loss"]) for r in train_lines(tmp_path / "a")]
    b = [(r["step"], r["loss"]) for r in train_lines(run_b)]
    assert a == b and len(a) == 1500


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(data_dir, tmp_path, monkeypatch,
                                                              capsys):
    import torch

    from gptforge.train.objectives import LanguageModeling

    original = LanguageModeling.__call__
    calls = {"n": 0}

    def nan_after_12(self, model, batch):
        loss, n = original(self, model, batch)
        calls["n"] += 1
        return (loss * torch.nan if calls["n"] > 12 else loss), n

    monkeypatch.setattr(LanguageModeling, "__call__", nan_after_12)
    run = tmp_path / "run"
    assert main(train_args(data_dir, run, "train.ckpt_interval=5", "train.eval_steps=1",
                           "train.eval_interval=100")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss became nan" in err[0] and "step-000010" in err[0]
    assert gptforge.load(run).generate("RO", max_new_tokens=3, temperature=0) is not None


def test_early_stopping_and_best_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    # lr = 0: the val loss can never improve, so two evaluations without a new best stop the run.
    assert main(train_args(data_dir, run, "optim.lr=0", "train.eval_interval=2",
                           "train.early_stop_patience=2", "train.max_steps=100",
                           "train.ckpt_interval=100", "train.sample_tokens=0")) == 0
    evals = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert evals == [0, 2, 4]
    assert (run / "latest").read_text().strip() == "ckpt/step-000004"
    assert (run / "best").read_text().strip() == "ckpt/step-000004"  # only scored checkpoint


def test_resume_with_a_different_tokenizer_is_refused(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(data_dir, run, "train.max_steps=4")) == 0
    other_corpus = tmp_path / "other.txt"
    other_corpus.write_text("completely different text with other characters 0123456789\n" * 50)
    other = tmp_path / "other"
    assert main(["prepare", "--input", str(other_corpus), "--tokenizer", "char", "--out",
                 str(other), "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), f"data.dir={other}", *TINY]) == 1
    assert "different tokenizer" in capsys.readouterr().err


def test_bfloat16_autocast_trains(data_dir, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(data_dir, run, "runtime.dtype=bfloat16", "train.max_steps=30",
                           "optim.lr=3e-3", "train.eval_interval=30")) == 0
    evals = [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.3


def test_compiled_training_saves_plain_weights(data_dir, tmp_path):
    from safetensors import safe_open

    run = tmp_path / "run"
    assert main(train_args(data_dir, run, "runtime.compile=true", "train.max_steps=3",
                           "train.eval_steps=1", "train.sample_tokens=0")) == 0
    with safe_open(str(run / "ckpt" / "step-000003" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "_orig_mod" in k]
    assert gptforge.load(run).generate("RO", max_new_tokens=4, temperature=0)


def test_data_without_val_split_trains_without_evaluation(tmp_path, capsys):
    data = prepare_corpus(tmp_path, 300, "--val-fraction", "0")
    run = tmp_path / "run"
    assert main(train_args(data, run, "train.max_steps=6")) == 0
    assert not [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert (run / "latest").read_text().strip() == "ckpt/step-000006"


@pytest.mark.parametrize("policy", ["rollback", "skip", "rollback-sharded"])
def test_injected_nan_is_survived(data_dir, tmp_path, monkeypatch, policy):
    """One NaN loss at step 13: rollback reloads step 10 with half the learning rate; skip drops
    the batch. Either way the run finishes and logs the event."""
    import torch

    from gptforge.train.objectives import LanguageModeling

    original = LanguageModeling.__call__
    calls = {"n": 0}

    def one_nan(self, model, batch):
        loss, n = original(self, model, batch)
        calls["n"] += model.training  # training steps only, not evaluation batches
        return (loss * torch.nan if model.training and calls["n"] == 13 else loss), n

    monkeypatch.setattr(LanguageModeling, "__call__", one_nan)
    run = tmp_path / "run"
    policy, _, ckpt_format = policy.partition("-")
    assert main(train_args(data_dir, run, f"train.on_anomaly={policy}", "train.max_steps=20",
                           "train.ckpt_interval=5", "train.eval_interval=100",
                           f"train.ckpt_format={ckpt_format or 'full'}")) == 0
    records = read_metrics(run / "metrics.jsonl")
    events = [r for r in records if "event" in r]
    assert [(e["event"], e["step"]) for e in events] == [(policy, 13)]
    steps = [r["step"] for r in records if "loss" in r]
    if policy == "rollback":
        assert events[0]["lr_scale"] == 0.5
        assert steps == list(range(1, 21))  # steps 11-12 were redone and logged once
        assert [r["lr"] for r in records if r.get("step") == 11 and "loss" in r][0] < 0.001
    else:
        assert steps == [s for s in range(1, 21) if s != 13]


def test_wandb_offline_run_keeps_its_id_across_resume(data_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    wandb_args = ["runtime.wandb_project=gptforge-test", "train.sample_tokens=0"]
    assert main(train_args(data_dir, run, "train.max_steps=4", *wandb_args)) == 0
    run_id = (run / "wandb_id").read_text().strip()
    assert main(["train", "--resume", str(run), "train.max_steps=6", *TINY]) == 0
    assert (run / "wandb_id").read_text().strip() == run_id
    offline_runs = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 2  # the first run and its resumption, under one id


def test_training_on_a_weighted_mixture(data_dir, tmp_path, capsys):
    """Two datasets prepared with one tokenizer train together; the mixture is recorded."""
    import json

    second = tmp_path / "second.txt"
    second.write_text("JULIET:\nThe night sees the moon.\n" * 400)
    other = tmp_path / "other"
    assert main(["prepare", "--input", str(second), "--tokenizer",
                 str(data_dir / "tokenizer"), "--out", str(other), "--workers", "1"]) == 0
    run = tmp_path / "run"
    assert main(train_args(data_dir, run, f"data.mixture={data_dir}:3,{other}:1",
                           "train.max_steps=6")) == 0
    record = json.loads((run / "mixture.json").read_text())
    assert [r["weight"] for r in record] == [0.75, 0.25]
    state = __import__("torch").load(run / "ckpt" / "step-000006" / "trainer_state.pt",
                                     weights_only=True)
    assert sum(state["train_loader"]["rows_per_source"]) == 6 * 4

    foreign = tmp_path / "foreign"
    assert main(["prepare", "--input", str(second), "--tokenizer", "char", "--out",
                 str(foreign), "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(train_args(data_dir, tmp_path / "run2",
                           f"data.mixture={data_dir}:1,{foreign}:1")) == 1
    assert "another tokenizer" in capsys.readouterr().err


def test_resume_accepts_a_config_saved_before_new_model_fields(data_dir, tmp_path):
    """Fields added to the schema later are absent from older runs' config.toml files."""
    run = tmp_path / "run"
    assert main(train_args(data_dir, run, "train.max_steps=3")) == 0
    text = (run / "config.toml").read_text()
    (run / "config.toml").write_text("\n".join(
        line for line in text.splitlines() if not line.startswith("logit_softcap")))
    assert main(["train", "--resume", str(run), "train.max_steps=4", *TINY]) == 0
