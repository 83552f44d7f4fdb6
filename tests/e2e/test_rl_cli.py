"""``gptforge rl`` through the CLI: GRPO raises a verifiable reward, survives a reward function
that raises, resumes exactly, and refuses bad input in one line."""

from __future__ import annotations

import json
import random

import pytest

from gptforge.cli import main
from gptforge.metrics.sinks import read_metrics

pytestmark = pytest.mark.slow

QUIET = ["runtime.progress=false", "runtime.device=cpu", "runtime.dtype=float32",
         "runtime.tensorboard=false", "train.sample_tokens=0"]
TINY_MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32"]
REWARDS = '''
def starts_with_h(prompt, completion, example):
    return float(completion.startswith("h"))

def picky(prompt, completion, example):
    if completion.startswith("a"):
        raise ValueError("no answers starting with a")
    return float(completion.startswith("h"))
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A barely trained model on random letter strings and a few plain-text prompts."""
    root = tmp_path_factory.mktemp("rl")
    rng = random.Random(0)
    lines = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 9)))
             for _ in range(300)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    (root / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": p, "answer": "h"}) + "\n" for p in ("ab", "cd", "ef", "gh", "ba")))
    (root / "rewards.py").write_text(REWARDS)
    assert main(["prepare", "--input", str(root / "corpus.txt"), "--tokenizer", "char",
                 "--out", str(root / "data"), "--workers", "1", "--no-progress"]) == 0
    assert main(["train", *TINY_MODEL, *QUIET, f"data.dir={root / 'data'}",
                 f"train.out_dir={root / 'base'}", "train.max_steps=15", "train.batch_size=8",
                 "train.eval_steps=1"]) == 0
    return root


def rl_args(task, out, *extra):
    return ["rl", f"init_from={task / 'base'}", f"rl.data={task / 'prompts.jsonl'}",
            f"rl.reward={task / 'rewards.py'}:starts_with_h", f"train.out_dir={out}",
            "rl.group_size=8", "rl.max_new_tokens=3", "train.batch_size=4", "optim.lr=1e-2",
            "train.log_interval=1", *QUIET, *extra]


def train_records(run):
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_grpo_raises_the_mean_reward(task, tmp_path):
    assert main(rl_args(task, tmp_path / "rl", "train.max_steps=25")) == 0
    rewards = [r["reward_mean"] for r in train_records(tmp_path / "rl")]
    assert len(rewards) == 25
    start, end = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert start < 0.5 and end > start + 0.4, rewards
    last = train_records(tmp_path / "rl")[-1]
    assert {"reward_std", "advantage_abs", "completion_len", "failed_rollouts"} <= set(last)
    meta = json.loads((tmp_path / "rl" / "ckpt" / "step-000025" / "model.json").read_text())
    assert meta["fine_tuned"] == "rl"


def test_a_reward_function_that_raises_is_counted_and_training_goes_on(task, tmp_path, caplog):
    run = tmp_path / "picky"
    assert main(rl_args(task, run, "train.max_steps=4",
                        f"rl.reward={task / 'rewards.py'}:picky")) == 0
    failed = sum(r["failed_rollouts"] for r in train_records(run))
    assert failed > 0 and len(train_records(run)) == 4
    assert "reward function failed on a rollout (reward 0): ValueError: no answers starting " \
           "with a" in caplog.text


def test_resume_is_exact_mid_round(task, tmp_path, monkeypatch):
    """With two passes per batch of rollouts and a checkpoint between them, a crashed and
    resumed run logs the same losses and rewards as one that never stopped."""
    from gptforge.train.loop import Trainer

    common = ["train.max_steps=7", "train.ckpt_interval=3", "rl.ppo_epochs=2", "rl.kl_coef=0.05"]
    assert main(rl_args(task, tmp_path / "a", *common)) == 0
    original = Trainer.train_step

    def crash_at_5(self):
        if self.state.step == 5:
            raise RuntimeError("simulated crash")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(rl_args(task, tmp_path / "b", *common))
    monkeypatch.setattr(Trainer, "train_step", original)
    assert main(["rl", "--resume", str(tmp_path / "b"), *QUIET]) == 0

    def figures(run):
        return [(r["step"], r["loss"], r["reward_mean"], r["kl"]) for r in train_records(run)]

    assert figures(tmp_path / "a") == figures(tmp_path / "b")
    assert len(figures(tmp_path / "a")) == 7


@pytest.mark.parametrize("extra, message", [
    (["rl.reward=no_such_module_qq:f"], "rl.reward: cannot import module 'no_such_module_qq'"),
    (["rl.reward=exact", "rl.data={bad}"], 'no "answer" to compare with'),
    (["rl.group_size=1"], "rl.group_size must be >= 2"),
    (["rl.max_new_tokens=40"], "rl.max_new_tokens: max_new_tokens (40) must be between 1"),
])
def test_bad_input_is_one_line(task, tmp_path, capsys, extra, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ab"}\n')
    extra = [e.replace("{bad}", str(bad)) for e in extra]
    assert main(rl_args(task, tmp_path / "x", "train.max_steps=1", *extra)) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
