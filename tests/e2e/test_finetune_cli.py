"""Post-training through the CLI: sft and dpo from a checkpoint, full or LoRA, then chat."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

import gptforge
from gptforge.cli import main
from gptforge.data import synthetic
from gptforge.metrics.sinks import read_metrics

pytestmark = pytest.mark.slow

QUIET = ["runtime.progress=false", "runtime.device=cpu", "runtime.dtype=float32",
         "runtime.tensorboard=false", "train.sample_tokens=0"]
TINY_MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A base checkpoint (a barely trained tiny model) and SFT/DPO data for 25 sums."""
    root = tmp_path_factory.mktemp("finetune")
    problems = synthetic.problems(max_operand=4)
    # Every digit appears, also those only in the near-miss answers of the DPO pairs.
    (root / "eq.txt").write_text(synthetic.pretraining_text(problems, repeats=8) + "0123456789\n")
    assert main(["prepare", "--input", str(root / "eq.txt"), "--tokenizer", "char", "--out",
                 str(root / "data"), "--workers", "1", "--no-progress"]) == 0
    assert main(["train", *TINY_MODEL, *QUIET, f"data.dir={root / 'data'}",
                 f"train.out_dir={root / 'base'}", "train.max_steps=2", "train.batch_size=4",
                 "train.eval_steps=1"]) == 0
    return {"root": root, "problems": problems, "base": root / "base",
            "sft": write_jsonl(root / "sft.jsonl", synthetic.sft_records(problems)),
            "dpo": write_jsonl(root / "dpo.jsonl", synthetic.preference_records(problems))}


def sft_args(task, out, *extra):
    return ["sft", f"init_from={task['base']}", f"finetune.data={task['sft']}",
            f"train.out_dir={out}", "finetune.val_fraction=0", "train.batch_size=16",
            "optim.lr=3e-3", "train.eval_interval=1000", *QUIET, *extra]


def test_sft_raises_accuracy_and_dpo_logs_rewards(task, tmp_path):
    before = synthetic.chat_accuracy(gptforge.load(task["base"]), task["problems"])
    assert main(sft_args(task, tmp_path / "sft", "train.max_steps=150")) == 0
    after = synthetic.chat_accuracy(gptforge.load(tmp_path / "sft"), task["problems"])
    assert before <= 0.1 and after >= 0.6, (before, after)

    assert main(["dpo", f"init_from={tmp_path / 'sft'}", f"finetune.data={task['dpo']}",
                 f"train.out_dir={tmp_path / 'dpo'}", "train.max_steps=20", "optim.lr=5e-4",
                 "finetune.val_fraction=0.2", "train.eval_interval=20", "train.batch_size=8",
                 *QUIET]) == 0
    records = read_metrics(tmp_path / "dpo" / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert {"reward_margin", "reward_accuracy", "chosen_reward"} <= set(train[-1])
    evals = [r for r in records if "val_loss" in r]
    assert evals[0]["val_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert evals[-1]["val_reward_margin"] > 0


def test_lora_sft_saves_adapters_resumes_and_chats(task, tmp_path):
    run = tmp_path / "lora"
    assert main(sft_args(task, run, "lora.rank=4", "train.max_steps=6",
                         "train.ckpt_interval=3")) == 0
    ckpt = run / "ckpt" / "step-000006"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(".lora_" in n for n in names)
    meta = json.loads((ckpt / "model.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["lora"]["base"].endswith("step-000002")
    assert main(["sft", "--resume", str(run), "train.max_steps=8", *QUIET]) == 0
    assert (run / "latest").read_text().strip() == "ckpt/step-000008"
    reply = gptforge.load(run).chat([{"role": "user", "content": "1+2"}], temperature=0,
                                    max_new_tokens=4)
    assert isinstance(reply, str)


def test_sft_loss_does_not_depend_on_how_the_batch_is_split(task, tmp_path):
    """5 conversations per step as 1 x 5 or 5 x 1 micro-batches: the same loss and the same
    update, because each micro-batch weighs by its share of the step's assistant tokens (which
    differ: answers of 1 to 3 digits). 25 conversations: no epoch ends inside a step."""
    base = tmp_path / "base"
    assert main(["train", *TINY_MODEL, *QUIET, f"data.dir={task['root'] / 'data'}",
                 f"train.out_dir={base}", "train.max_steps=2", "train.batch_size=4",
                 "train.eval_steps=1", "model.dropout=0"]) == 0
    records = synthetic.sft_records(synthetic.problems(max_operand=99)[::391][:25])
    lengths = {len(r["messages"][1]["content"]) for r in records}
    assert len(records) == 25 and lengths == {1, 2, 3}, lengths
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    runs = []
    for batch, accum in ((5, 1), (1, 5)):
        run = tmp_path / f"b{batch}"
        assert main(sft_args({**task, "base": base, "sft": data}, run, "train.max_steps=6",
                             f"train.batch_size={batch}", f"train.grad_accum={accum}",
                             "train.log_interval=1")) == 0
        runs.append([r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r])
    assert len(runs[0]) == 6
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)


def test_finetuning_from_a_sharded_checkpoint(task, tmp_path):
    """A base saved as DCP shards: LoRA adapters record its fingerprint (and are saved in full
    although sharded checkpoints were asked for); full SFT saves sharded and resumes."""
    from gptforge.checkpoints.format import is_sharded, latest_checkpoint, weights_sha256

    base = tmp_path / "base"
    assert main(["train", *TINY_MODEL, *QUIET, f"data.dir={task['root'] / 'data'}",
                 f"train.out_dir={base}", "train.max_steps=2", "train.batch_size=4",
                 "train.eval_steps=1", "train.ckpt_format=sharded"]) == 0
    base_ckpt = latest_checkpoint(base)
    assert is_sharded(base_ckpt)
    sharded_task = {**task, "base": base}

    lora = tmp_path / "lora"
    assert main(sft_args(sharded_task, lora, "lora.rank=4", "train.max_steps=3",
                         "train.ckpt_format=sharded")) == 0
    ckpt = latest_checkpoint(lora)
    assert not is_sharded(ckpt)
    meta = json.loads((ckpt / "model.json").read_text())
    assert meta["lora"]["base_sha256"] == weights_sha256(base_ckpt)
    reply = gptforge.load(lora).chat([{"role": "user", "content": "1+2"}], temperature=0,
                                     max_new_tokens=4)
    assert isinstance(reply, str)

    full = tmp_path / "full"
    assert main(sft_args(sharded_task, full, "train.max_steps=3", "train.ckpt_interval=2",
                         "train.ckpt_format=sharded")) == 0
    assert is_sharded(latest_checkpoint(full))
    assert main(["sft", "--resume", str(full), "train.max_steps=5", *QUIET]) == 0
    assert (full / "latest").read_text().strip() == "ckpt/step-000005"


def test_finetune_input_errors(task, tmp_path, capsys):
    assert main(["sft", f"finetune.data={task['sft']}", *QUIET]) == 1
    assert "needs a checkpoint to start from: init_from=" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "1+1"}]}\n{"oops": 1}\n')
    assert main(sft_args(task, tmp_path / "r", "train.max_steps=1") [:2] +
                [f"finetune.data={bad}", f"train.out_dir={tmp_path / 'r'}", *QUIET]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:" in err[0]
