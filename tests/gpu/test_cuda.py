"""CUDA paths: bf16 autocast, torch.compile, fused AdamW, NCCL DDP and FSDP2 mixed precision.

Skipped without a GPU (CI has none); run them on a GPU machine with ``python -m pytest tests/gpu``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gptforge.cli import main
from gptforge.metrics.sinks import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

COMMON = ["-c", "tiny", "runtime.progress=false", "runtime.device=cuda", "runtime.dtype=auto",
          "train.max_steps=30", "train.eval_interval=30", "optim.lr=3e-3", "train.batch_size=8"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tests.conftest import make_corpus_text

    root = tmp_path_factory.mktemp("gpu")
    (root / "c.txt").write_text(make_corpus_text(1500))
    assert main(["prepare", "--input", str(root / "c.txt"), "--tokenizer", "char", "--out",
                 str(root / "data"), "--workers", "1"]) == 0
    return root / "data"


def val_losses(run):
    return [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]


def test_bf16_compiled_fused_training_learns(data_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *COMMON, f"data.dir={data_dir}", f"train.out_dir={run}",
                 "runtime.compile=true"]) == 0
    losses = val_losses(run)
    assert losses[-1] < losses[0] - 0.3
    import gptforge
    assert gptforge.load(run).generate("RO", max_new_tokens=8, temperature=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nccl_two_gpus_bf16(data_dir, tmp_path, strategy):
    run = tmp_path / strategy
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "gptforge", "train", *COMMON, f"data.dir={data_dir}", f"train.out_dir={run}",
           f"runtime.parallel={strategy}", "train.batch_size=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = val_losses(run)
    assert losses[-1] < losses[0] - 0.3
