"""Two CPU processes under torchrun (gloo): DDP and FSDP2 match one process; resume N -> M."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from gptforge.cli import main
from gptforge.metrics.sinks import read_metrics
from tests.conftest import prepare_corpus

pytestmark = [pytest.mark.slow, pytest.mark.dist]

COMMON = ["-c", "tiny", "runtime.progress=false", "runtime.device=cpu", "train.max_steps=20",
          "train.ckpt_interval=10", "train.keep_last=5", "train.eval_interval=10",
          "train.sample_tokens=0", "optim.lr=3e-3"]


def torchrun(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "gptforge", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses(run, first_step: int = 1) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl")
            if "loss" in r and r["step"] >= first_step]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = f"data.dir={prepare_corpus(root, 1500)}"
    # The same global batch of 4 sequences: 4 on one process, or 2 on each of two.
    assert main(["train", *COMMON, data, f"train.out_dir={root / 'single'}",
                 "train.batch_size=4", "runtime.threads=1"]) == 0
    for strategy in ("ddp", "fsdp"):
        torchrun("train", *COMMON, data, f"train.out_dir={root / strategy}",
                 "train.batch_size=2", f"runtime.parallel={strategy}")
    torchrun("train", *COMMON, data, f"train.out_dir={root / 'fsdp_sharded'}",
             "train.batch_size=2", "runtime.parallel=fsdp", "train.ckpt_format=sharded")
    return root


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp_sharded"])
def test_two_processes_match_one(runs, strategy):
    assert losses(runs / strategy) == pytest.approx(losses(runs / "single"), rel=1e-4)
    evals = [r["val_loss"] for r in read_metrics(runs / strategy / "metrics.jsonl")
             if "val_loss" in r]
    single = [r["val_loss"] for r in read_metrics(runs / "single" / "metrics.jsonl")
              if "val_loss" in r]
    assert evals == pytest.approx(single, rel=1e-4)


def rewind(run, dst, step: int):
    """A copy of ``run`` whose latest checkpoint is ``step`` (as if it had stopped there)."""
    shutil.copytree(run, dst)
    (dst / "latest").write_text(f"ckpt/step-{step:06d}\n")
    return dst


@pytest.mark.parametrize("run", ["fsdp", "fsdp_sharded"])
def test_resume_two_to_two(runs, tmp_path, run):
    resumed = rewind(runs / run, tmp_path / run, 10)
    torchrun("train", "--resume", str(resumed), "runtime.progress=false")
    assert losses(resumed, 11) == pytest.approx(losses(runs / "single", 11), rel=1e-4)


@pytest.mark.parametrize("run", ["ddp", "fsdp_sharded"])
def test_resume_two_to_one(runs, tmp_path, run):
    """Full state gathered from DDP, or the shards of two FSDP2 ranks read back whole by one
    plain process."""
    resumed = rewind(runs / run, tmp_path / run, 10)
    assert main(["train", "--resume", str(resumed), "train.batch_size=4", "runtime.threads=1",
                 "runtime.progress=false"]) == 0
    assert losses(resumed, 11) == pytest.approx(losses(runs / "single", 11), rel=1e-4)


def test_fsdp_checkpoint_loads_for_single_process_generation(runs):
    import gptforge

    assert gptforge.load(runs / "fsdp").generate("RO", max_new_tokens=5, temperature=0)


def test_sharded_checkpoint_is_written_by_every_rank(runs):
    ckpt = runs / "fsdp_sharded" / "ckpt" / "step-000010"
    assert not (ckpt / "model.safetensors").exists()
    for part in ("model", "optimizer"):
        assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == \
            ["__0_0.distcp", "__1_0.distcp"]
    assert not list((runs / "fsdp_sharded" / "ckpt").glob(".tmp-*"))  # staging renamed away


def test_sharded_checkpoint_holds_the_same_weights_as_a_full_one(runs):
    import torch

    from gptforge.checkpoints.loading import build_model

    full = build_model(runs / "fsdp" / "ckpt" / "step-000020").state_dict()
    sharded = build_model(runs / "fsdp_sharded" / "ckpt" / "step-000020").state_dict()
    assert full.keys() == sharded.keys()
    for name in full:
        torch.testing.assert_close(sharded[name], full[name], rtol=1e-4, atol=1e-5)


def test_sft_on_two_processes_matches_one(tmp_path):
    """Ranks hold different numbers of assistant tokens; the step's loss and update are still
    the mean over every assistant token of the global batch, as in one process."""
    import json

    from gptforge.data import synthetic

    problems = synthetic.problems(max_operand=99)[::391][:25]  # answers of 1, 2 and 3 digits
    (tmp_path / "eq.txt").write_text(synthetic.pretraining_text(problems, repeats=4)
                                     + "0123456789\n")
    assert main(["prepare", "--input", str(tmp_path / "eq.txt"), "--tokenizer", "char", "--out",
                 str(tmp_path / "data"), "--workers", "1", "--no-progress"]) == 0
    quiet = ["runtime.progress=false", "runtime.device=cpu", "runtime.tensorboard=false",
             "train.sample_tokens=0"]
    assert main(["train", "-c", "tiny", *quiet, f"data.dir={tmp_path / 'data'}",
                 f"train.out_dir={tmp_path / 'base'}", "train.max_steps=2", "model.dropout=0",
                 "train.eval_steps=1"]) == 0
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic.sft_records(problems)))
    sft = ["sft", f"init_from={tmp_path / 'base'}", f"finetune.data={data}", *quiet,
           "finetune.val_fraction=0", "train.max_steps=5", "train.log_interval=1",
           "train.eval_interval=1000", "optim.lr=3e-3"]
    assert main([*sft, f"train.out_dir={tmp_path / 'one'}", "train.batch_size=4",
                 "runtime.threads=1"]) == 0
    torchrun(*sft, f"train.out_dir={tmp_path / 'two'}", "train.batch_size=2")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def test_one_process_with_accumulation_matches_two_processes(tmp_path):
    """1 process x grad_accum 2 and 2 processes x grad_accum 1 draw the same global batches
    (data/loader.py), so their losses agree after 40 steps; 58 windows per epoch, so epochs end
    mid-step (where taking 2 + 2 and 4 windows used to part ways)."""
    data = f"data.dir={prepare_corpus(tmp_path, 65)}"
    steps = ["train.max_steps=40", "train.ckpt_interval=40", "train.eval_interval=40"]
    assert main(["train", *COMMON, *steps, data, f"train.out_dir={tmp_path / 'accum'}",
                 "train.batch_size=2", "train.grad_accum=2", "runtime.threads=1"]) == 0
    torchrun("train", *COMMON, *steps, data, f"train.out_dir={tmp_path / 'ranks'}",
             "train.batch_size=2")
    accum, ranks = losses(tmp_path / "accum"), losses(tmp_path / "ranks")
    assert len(accum) == 40
    assert accum == pytest.approx(ranks, abs=1e-5)
