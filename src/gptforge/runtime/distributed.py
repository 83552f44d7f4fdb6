"""Data-parallel training across processes: torchrun environment, DDP and FSDP2, collectives.

The same ``gptforge train`` runs as one process or as N under ``torchrun --nproc-per-node N -m
gptforge train ...``. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; from them this module joins
the process group (NCCL on CUDA, gloo on CPU) and wraps the model:

- **DDP** keeps a full copy of the model on every rank and averages gradients during backward.
- **FSDP2** (``fully_shard``) shards parameters, gradients and optimizer state across ranks, one
  block at a time, gathering a block's weights just before it runs; memory per rank falls with N.

What each rank saves and loads (full or sharded state dicts) is in ``checkpoints/state.py``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by torchrun with WORLD_SIZE > 1; else a no-op."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return info, device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, strategy: str, info: DistInfo, precision) -> nn.Module:
    """The module to run: DDP-wrapped, or FSDP2-sharded in place (then ``model`` is returned)."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [precision.device.index] if precision.device.type == "cuda" else None
        # No buffer needs syncing (the RoPE tables are constants), and gradients that are views
        # into the all-reduce buckets save a copy of every gradient.
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                       gradient_as_bucket_view=True)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = None
    if precision.dtype != torch.float32:  # compute in low precision, reduce gradients in fp32
        mp = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation step."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return all_reduce_sum(value, info) / info.world_size


def gather_objects(obj, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def sum_over_ranks(value: int, info: DistInfo, device: torch.device) -> int:
    """The sum of ``value`` over all ranks (every rank gets it)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], device=device, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def min_over_ranks(value: int, info: DistInfo, device: torch.device) -> int:
    """The smallest ``value`` of all ranks (every rank gets it)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
