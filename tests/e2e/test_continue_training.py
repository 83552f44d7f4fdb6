"""Continued training through the CLI: ``init_from`` a run or a Hugging Face directory starts a
new run from its weights, ``train.freeze`` keeps parts bit-identical, ``train.init_optimizer``
carries the moments over, and what contradicts the checkpoint is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptforge.checkpoints.format import latest_checkpoint, load_trainer_state, read_safetensors
from gptforge.cli import main
from gptforge.metrics.sinks import read_metrics
from tests.conftest import make_corpus_text

pytestmark = pytest.mark.slow

QUIET = ["runtime.progress=false", "runtime.device=cpu", "train.sample_tokens=0"]
# New data: other sentences over the same characters (the base run's char tokenizer covers them).
NEW_TEXT = "\n".join(f"the {o} {v} {n}." for n in ("Romeo", "Juliet", "Nurse")
                     for v in ("loves", "greets", "calls") for o in ("moon", "night", "stars"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A run of 30 steps on a corpus (one layer: the tiny preset has two), and new data prepared
    with its tokenizer."""
    root = tmp_path_factory.mktemp("continue")
    (root / "old.txt").write_text(make_corpus_text(300))
    assert main(["prepare", "--input", str(root / "old.txt"), "--tokenizer", "char", "--out",
                 str(root / "old"), "--workers", "1", "--no-progress"]) == 0
    assert main(["train", "-c", "tiny", f"data.dir={root / 'old'}", "model.n_layer=1",
                 f"train.out_dir={root / 'base'}", "train.max_steps=30", "optim.lr=3e-3",
                 *QUIET]) == 0
    (root / "new.txt").write_text(NEW_TEXT * 20)
    tokenizer = latest_checkpoint(root / "base") / "tokenizer"
    assert main(["prepare", "--input", str(root / "new.txt"), "--tokenizer", str(tokenizer),
                 "--out", str(root / "new"), "--workers", "1", "--no-progress"]) == 0
    return root


def run_args(root, out, *extra):
    return ["train", "-c", "tiny", f"data.dir={root / 'new'}", f"train.out_dir={out}",
            "train.max_steps=12", "train.eval_interval=12", "optim.lr=3e-3", *QUIET, *extra]


def val_losses(run):
    return [r["val_loss"] for r in read_metrics(Path(run) / "metrics.jsonl") if "val_loss" in r]


def test_init_from_a_run_starts_from_its_weights_and_lowers_the_loss(base, tmp_path):
    assert main(run_args(base, tmp_path / "scratch")) == 0
    assert main(run_args(base, tmp_path / "continued", f"init_from={base / 'base'}",
                         "model.dropout=0.1")) == 0
    scratch, continued = val_losses(tmp_path / "scratch"), val_losses(tmp_path / "continued")
    assert continued[0] < scratch[0] - 1.0  # it starts from what the base run learned
    assert continued[-1] < continued[0]  # and learns the new data
    meta = (latest_checkpoint(tmp_path / "continued") / "model.json").read_text()
    assert '"n_layer": 1' in meta and '"dropout": 0.1' in meta  # the base's architecture


def test_freeze_keeps_frozen_weights_bit_identical(base, tmp_path):
    assert main(run_args(base, tmp_path / "frozen", f"init_from={base / 'base'}",
                         "train.freeze=embeddings,blocks:0-0", "train.max_steps=4")) == 0
    before = read_safetensors(latest_checkpoint(base / "base") / "model.safetensors")
    after = read_safetensors(latest_checkpoint(tmp_path / "frozen") / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"norm_f.weight", "norm_f.bias"}  # tied lm_head = the frozen embeddings


def test_init_optimizer_carries_the_moments_over(base, tmp_path, capsys):
    assert main(run_args(base, tmp_path / "carried", f"init_from={base / 'base'}",
                         "train.init_optimizer=true", "train.max_steps=2")) == 0
    state = load_trainer_state(latest_checkpoint(tmp_path / "carried"))["optimizer"]
    steps = {float(s["step"]) for s in state["optimizers"][0]["state"].values()}
    assert steps == {32.0}  # the base's 30 Adam steps, then 2 of this run
    assert main(run_args(base, tmp_path / "bad", f"init_from={base / 'base'}",
                         "train.init_optimizer=true", "train.freeze=blocks:0")) == 1
    assert "optimized other parameters" in capsys.readouterr().err


def test_init_from_a_hugging_face_directory_lowers_the_loss(tmp_path):
    pytest.importorskip("transformers")
    from tests.tiny_hf import CORPUS, make_hf_model

    make_hf_model(tmp_path / "hf", "llama")
    (tmp_path / "text.txt").write_text("\n".join(CORPUS * 30))
    assert main(["prepare", "--input", str(tmp_path / "text.txt"), "--tokenizer",
                 str(tmp_path / "hf"), "--out", str(tmp_path / "data"), "--workers", "1",
                 "--no-progress"]) == 0
    assert main(["train", "-c", "tiny", f"data.dir={tmp_path / 'data'}", "model.block_size=32",
                 f"init_from={tmp_path / 'hf'}", f"train.out_dir={tmp_path / 'run'}",
                 "train.max_steps=12", "train.eval_interval=12", "optim.lr=3e-3", *QUIET]) == 0
    losses = val_losses(tmp_path / "run")
    assert losses[-1] < losses[0] - 0.3
    assert (tmp_path / "run" / "imported" / "model.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["model.n_layer=3"], "model.n_layer=3 contradicts init_from"),
    (["model.block_size=16"], "model.block_size=16 contradicts init_from"),  # learned positions
    (["train.freeze=blocks:5"], "outside the model's blocks 0-0"),
    (["train.freeze=attention"], "unknown part 'attention'"),
])
def test_contradictions_are_refused_in_one_line(base, tmp_path, capsys, extra, message):
    assert main(run_args(base, tmp_path / "run", f"init_from={base / 'base'}", *extra)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_other_tokenizer_and_optimizer_without_checkpoint_are_refused(base, tmp_path, capsys):
    (tmp_path / "other.txt").write_text("completely different letters: xyzXYZ 0123\n" * 50)
    assert main(["prepare", "--input", str(tmp_path / "other.txt"), "--tokenizer", "char",
                 "--out", str(tmp_path / "other"), "--workers", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "-c", "tiny", f"data.dir={tmp_path / 'other'}", *QUIET,
                 f"init_from={base / 'base'}", f"train.out_dir={tmp_path / 'a'}"]) == 1
    assert "--tokenizer" in capsys.readouterr().err
    assert main(run_args(base, tmp_path / "b", "train.init_optimizer=true")) == 1
    assert "needs init_from" in capsys.readouterr().err
    assert main(["dpo", f"init_from={base / 'base'}", "finetune.data=prefs.jsonl", *QUIET,
                 f"train.out_dir={tmp_path / 'c'}", "model.dropout=0.1"]) == 1
    assert "model.dropout=0.1 does not apply to gptforge dpo" in capsys.readouterr().err


def test_freeze_applies_to_sft_too(base, tmp_path):
    chat = '{"messages": [{"role": "user", "content": "Romeo"}, ' \
           '{"role": "assistant", "content": "the moon"}]}\n'
    (tmp_path / "chats.jsonl").write_text(chat * 8)
    assert main(["sft", f"init_from={base / 'base'}", f"finetune.data={tmp_path / 'chats.jsonl'}",
                 f"train.out_dir={tmp_path / 'sft'}", "train.max_steps=3", "train.batch_size=4",
                 "finetune.val_fraction=0", "train.freeze=blocks", *QUIET]) == 0
    before = read_safetensors(latest_checkpoint(base / "base") / "model.safetensors")
    after = read_safetensors(latest_checkpoint(tmp_path / "sft") / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any(k.startswith("blocks.") for k in changed), changed
