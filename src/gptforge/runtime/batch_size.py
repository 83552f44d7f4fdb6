"""Finding the largest micro-batch that fits in GPU memory (``train.batch_size=auto``).

The largest micro-batch that fits keeps the GPU busiest per step; what the optimizer sees is the
*global* batch (``train.global_batch_tokens``), which gradient accumulation keeps fixed whatever the
micro-batch. The search doubles the batch from 1 and runs one real forward and backward at each
size until one runs out of memory, so it measures what the model, precision and activation
checkpointing actually need instead of estimating it.

What a probe leaves out, and how it is made up for:

- The optimizer state does not exist yet (AdamW creates its two moments at the first step), nor do
  DDP's gradient buckets: memory for them is held aside during every probe, along with a margin
  (``margin`` of the GPU's memory) for fragmentation, evaluation and checkpoint gathering.
- Probes run the *eager* model in this process alone: torch.compile would recompile for every size
  (and then train with a dynamic-shape graph), and a DDP or FSDP forward is a collective that
  deadlocks when one rank runs out of memory and another does not. Compiled code needs no more
  memory than eager code, so the answer errs on the safe side. Ranks then agree on the smallest
  answer (``agree``).
- Probes leave no trace: gradients are dropped, the train/eval mode and the CPU and GPU random
  generators are restored, and the memory of a failed try (kept alive by the exception's
  traceback until it is gone) is returned to the driver before the next one.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch
from torch import nn

from gptforge.errors import GptforgeError

log = logging.getLogger(__name__)

# Out-of-memory errors that do not come from the caching allocator (cuBLAS/cuDNN workspaces, raw
# cudaMalloc) arrive as plain RuntimeErrors with one of these in the message.
OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """The largest power of two ``<= limit`` with ``fits(b)``; 0 if even 1 does not fit."""
    best, b = 0, 1
    while b <= limit and fits(b):
        best, b = b, b * 2
    return best


def largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in OOM_MESSAGES)


def eager_module(model: nn.Module) -> tuple[nn.Module, bool]:
    """(the plain module inside torch.compile and DDP wrappers, whether DDP was one of them)."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = False
    while True:
        if isinstance(model, DistributedDataParallel):
            model, ddp = model.module, True
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            break
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            raise GptforgeError(
                "train.batch_size=auto cannot probe a model already sharded with FSDP (every "
                "forward is a collective, and a rank that runs out of memory would stall the "
                "others); set train.batch_size to a number")
    return model, ddp


def reserve_bytes(module: nn.Module, *, data_parallel: bool, total_memory: int,
                  margin: float) -> int:
    """Memory a probe cannot see but training will use: optimizer state (AdamW's two fp32
    moments per trainable parameter, more than Muon or Adafactor keep), DDP's gradient buckets
    (one more gradient copy), and ``margin`` of the device's memory."""
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return 2 * trainable + (trainable if data_parallel else 0) + int(margin * total_memory)


def cuda_probe(model: nn.Module, objective, precision, block_size: int, vocab_size: int, *,
               margin: float = 0.1, data_parallel: bool | None = None) -> Callable[[int], bool]:
    """``fits(b)``: whether one training forward+backward of b sequences fits in memory.

    ``model`` may be compiled or DDP-wrapped (the eager module inside is probed); pass the
    unwrapped model with ``data_parallel=True`` when it will be DDP-wrapped afterwards.
    """
    module, wrapped_in_ddp = eager_module(model)
    device = precision.device
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    if data_parallel is None:
        data_parallel = wrapped_in_ddp
    reserve = reserve_bytes(module, data_parallel=data_parallel, total_memory=total, margin=margin)
    rng_devices = [device] if device.type == "cuda" else []

    def fits(batch: int) -> bool:
        was_training = module.training
        module.train()  # dropout masks take memory too
        try:
            with torch.random.fork_rng(devices=rng_devices, device_type="cuda"):
                ok = _try_step(module, objective, precision, batch, block_size, vocab_size,
                               reserve)
        finally:
            module.zero_grad(set_to_none=True)
            module.train(was_training)
        release_memory(device, collect=not ok)
        log.debug("auto batch size: %d x %d tokens %s", batch, block_size,
                  "fits" if ok else "does not fit")
        return ok

    return fits


def _try_step(module: nn.Module, objective, precision, batch: int, block_size: int,
              vocab_size: int, reserve: int) -> bool:
    """One forward and backward of ``batch`` random sequences next to a ``reserve``-byte block;
    False if memory ran out. Every tensor made here dies with this frame."""
    try:
        held = torch.empty(reserve, dtype=torch.uint8, device=precision.device)
        x = torch.randint(0, vocab_size, (batch, block_size), device=precision.device)
        with precision.autocast():
            loss, _ = objective(module, (x, x))
        loss.backward()
        del held, loss
        return True
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(err):
            raise
        return False


def release_memory(device: torch.device, *, collect: bool) -> None:
    """Free what a probe left: cycles (``collect``), then cached blocks back to the driver."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def auto_batch_size(fits: Callable[[int], bool], global_batch_tokens: int, block_size: int,
                    world_size: int, agree: Callable[[int], int] | None = None) -> int:
    """The micro-batch: the largest that fits and divides the global batch per process.

    ``agree`` turns this process's number into the one all processes use (the minimum over ranks
    under torchrun); every rank must call this function, and they probe the same sizes.
    """
    agree = agree or (lambda n: n)
    if global_batch_tokens <= 0:
        raise GptforgeError("train.batch_size=auto needs train.global_batch_tokens (the batch "
                            "the optimizer should see), e.g. train.global_batch_tokens=524288")
    per_process = global_batch_tokens // (block_size * world_size)
    if per_process < 1 or global_batch_tokens % (block_size * world_size):
        raise GptforgeError(f"train.global_batch_tokens={global_batch_tokens} must be a multiple "
                            f"of block_size x processes = {block_size * world_size}")
    found = agree(largest_fitting(fits, per_process))
    if found == 0:
        raise GptforgeError("train.batch_size=auto: not even one sequence fits in GPU memory "
                            "next to the optimizer state and a safety margin; lower "
                            "model.block_size, enable runtime.activation_checkpointing or use "
                            "runtime.parallel=fsdp")
    batch = largest_divisor_at_most(per_process, found)
    # Sizes between found and 2 x found were never tried; a divisor among them may still fit.
    untried = largest_divisor_at_most(per_process, 2 * found - 1)
    if untried > found and agree(int(fits(untried))):
        batch = untried
    log.info("auto batch size: %d sequences fit, using %d (x %d accumulation steps)",
             max(found, batch), batch, per_process // batch)
    return batch
