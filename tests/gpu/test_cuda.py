"""CUDA paths: bf16 autocast, torch.compile, fused AdamW, fp16 loss scaling, train.batch_size=auto,
NCCL with DDP and FSDP2 mixed precision, the peak-FLOP/s table, compiled decoding.

Skipped without a GPU (CI has none); run them on a GPU machine with ``python -m pytest tests/gpu``
(``bash benchmarks/gpu_session.sh OUT`` runs them and the throughput benchmarks). One GPU is
enough for all but the two-process test.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gptforge.cli import main
from gptforge.metrics.sinks import read_metrics
from tests.conftest import prepare_corpus

pytestmark = [pytest.mark.slow, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

COMMON = ["-c", "tiny", "runtime.progress=false", "runtime.device=cuda", "runtime.dtype=auto",
          "train.max_steps=30", "train.eval_interval=30", "optim.lr=3e-3", "train.batch_size=8"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_corpus(tmp_path_factory.mktemp("gpu"), 1500)


def val_losses(run):
    return [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]


def saved_config(run):
    from gptforge.config.loader import load_config

    return load_config(str(run / "config.toml"))


@pytest.mark.parametrize("extra", [
    ["runtime.compile=true"],  # bf16 autocast, compiled, fused AdamW
    # What pre-Ampere GPUs (no bf16) get from runtime.dtype=auto: fp16 autocast + GradScaler.
    ["runtime.dtype=float16"],
], ids=["bf16-compiled-fused", "fp16-loss-scaling"])
def test_training_learns(data_dir, tmp_path, extra):
    run = tmp_path / "run"
    assert main(["train", *COMMON, f"data.dir={data_dir}", f"train.out_dir={run}", *extra]) == 0
    losses = val_losses(run)
    assert losses[-1] < losses[0] - 0.3
    import gptforge
    assert gptforge.load(run).generate("RO", max_new_tokens=8, temperature=0)


def test_auto_batch_size_trains_compiled(data_dir, tmp_path):
    run = tmp_path / "run"
    global_tokens = 32 * 32 * 8  # tiny's block_size is 32
    assert main(["train", *COMMON, f"data.dir={data_dir}", f"train.out_dir={run}",
                 "train.batch_size=auto", f"train.global_batch_tokens={global_tokens}",
                 "train.max_steps=10", "train.eval_interval=10", "runtime.compile=true"]) == 0
    train = saved_config(run).train
    batch = train.batch_size
    assert isinstance(batch, int) and batch >= 1 and batch & (batch - 1) == 0
    assert batch * train.grad_accum * 32 == global_tokens
    steps = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps[-1]["step"] == 10 and all(r["loss"] == r["loss"] for r in steps)


def test_cuda_search_restores_state_and_memory():
    from gptforge.model import GPT, ModelConfig
    from gptforge.runtime.batch_size import auto_batch_size, cuda_probe
    from gptforge.runtime.device import resolve_precision
    from gptforge.train.objectives import LanguageModeling

    precision = resolve_precision(torch.device("cuda"), "auto")
    model = GPT(ModelConfig(vocab_size=50304, n_layer=4, n_head=4, n_embd=256,
                            block_size=1024, dropout=0.1)).cuda()
    probe = cuda_probe(model, LanguageModeling(), precision, 1024, 50304)
    assert probe(1)  # also creates what CUDA libraries keep for good (cuBLAS workspaces)
    rng = torch.cuda.get_rng_state()
    before = torch.cuda.memory_allocated()
    batch = auto_batch_size(probe, 1024 * 1024, 1024, 1)  # stops at the first OOM (or 1024)
    assert batch >= 1 and batch & (batch - 1) == 0
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert torch.cuda.memory_allocated() - before < 16 * 2**20  # no probe left anything alive


@pytest.fixture
def nccl_process_group(tmp_path):
    """A one-process NCCL group, joined as runtime/distributed.py joins it under torchrun."""
    import torch.distributed as dist

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, device_id=device)
    yield device
    dist.destroy_process_group()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nccl_ddp_and_fsdp2_bf16_on_one_gpu(nccl_process_group, strategy, optimizer):
    from torch.nn.parallel import DistributedDataParallel

    from gptforge.checkpoints import state as checkpoint_state
    from gptforge.config.schema import OptimConfig
    from gptforge.model import GPT, ModelConfig
    from gptforge.runtime import distributed
    from gptforge.runtime.device import Precision
    from gptforge.train.objectives import LanguageModeling
    from gptforge.train.optim import build_optimizer

    device = nccl_process_group
    precision = Precision(device, torch.bfloat16)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=128, n_layer=2, n_head=2, n_embd=64, block_size=32))
    model.to(device)
    # wrap_model wraps only when there are several processes; this one NCCL rank stands in.
    several = distributed.DistInfo(rank=0, local_rank=0, world_size=2)
    train_model = distributed.wrap_model(model, strategy, several, precision)
    if strategy == "ddp":
        assert isinstance(train_model, DistributedDataParallel)
        assert train_model.device_ids == [0]
    else:
        assert train_model is model and distributed.is_sharded(model)
    optimizer = build_optimizer(model, OptimConfig(name=optimizer, lr=1e-2), device)
    adamw = getattr(optimizer, "optimizers", [optimizer])[-1]
    assert adamw.defaults["fused"]  # the fused CUDA kernel, DTensors (FSDP2) included
    x = torch.randint(0, 128, (4, 32), device=device)
    losses = []
    for _ in range(8):  # one batch, learnt by heart
        with precision.autocast():
            loss, _ = LanguageModeling()(train_model, (x, x.roll(-1, dims=1)))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        assert torch.isfinite(norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    if strategy == "fsdp":  # MixedPrecisionPolicy: fp32 sharded master weights, bf16 compute
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert model(x).dtype == torch.bfloat16  # (leaves the root's weights gathered, in bf16)
    state = checkpoint_state.full_model_state(model)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.values())
    checkpoint_state.load_full_model_state(model, state)
    assert distributed.min_over_ranks(7, several, device) == 7  # an NCCL all-reduce


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


def test_peak_flops_table_matches_a_measured_matmul():
    from gptforge.runtime.device import (
        Precision,
        gpu_peak_flops,
        measure_matmul_flops,
        peak_flops,
    )

    precision = Precision(torch.device("cuda"), torch.bfloat16)
    name = torch.cuda.get_device_name()
    table = gpu_peak_flops(name, torch.bfloat16, torch.cuda.get_device_capability())
    if table is None:
        pytest.skip(f"{name} is not in the peak-FLOP/s table")
    assert peak_flops(precision) == table
    measured = measure_matmul_flops(precision, n=8192, seconds=1.0)
    # A dense datasheet figure is reachable in part: a sparse one (2x) would give < 0.5.
    assert 0.5 < measured / table < 1.05, f"{name}: {measured / 1e12:.0f} TFLOP/s measured"


def test_compiled_decoding_runs(data_dir, tmp_path):
    import gptforge

    run = tmp_path / "run"
    assert main(["train", *COMMON, f"data.dir={data_dir}", f"train.out_dir={run}",
                 "train.max_steps=10", "train.eval_interval=10"]) == 0
    plain = gptforge.load(run).generate("RO", max_new_tokens=16, temperature=0)
    compiled = gptforge.load(run, compile=True).generate("RO", max_new_tokens=16, temperature=0)
    assert len(compiled) == len(plain) > 0
