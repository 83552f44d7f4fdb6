"""Finding the largest micro-batch that fits in GPU memory (``train.batch_size=auto``).

The largest micro-batch that fits keeps the GPU busiest per step; what the optimizer sees is the
*global* batch (``train.global_batch_tokens``), which gradient accumulation keeps fixed whatever the
micro-batch. The search doubles the batch from 1 and runs one real forward and backward at each
size until one runs out of memory, so it measures what the model, precision and compile settings
actually need instead of estimating it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from gptforge.errors import GptforgeError

log = logging.getLogger(__name__)


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """The largest power of two ``<= limit`` with ``fits(b)``; 0 if even 1 does not fit."""
    best, b = 0, 1
    while b <= limit and fits(b):
        best, b = b, b * 2
    return best


def largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def cuda_probe(model: torch.nn.Module, objective, precision, block_size: int,
               vocab_size: int) -> Callable[[int], bool]:
    """``fits(b)``: whether one training forward+backward of b sequences fits in memory."""

    def fits(batch: int) -> bool:
        x = torch.randint(0, vocab_size, (batch, block_size), device=precision.device)
        try:
            with precision.autocast():
                loss, _ = objective(model, (x, x))
            loss.backward()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    return fits


def auto_batch_size(fits: Callable[[int], bool], global_batch_tokens: int, block_size: int,
                    world_size: int) -> int:
    """The micro-batch: the largest that fits and divides the global batch per process."""
    if global_batch_tokens <= 0:
        raise GptforgeError("train.batch_size=auto needs train.global_batch_tokens (the batch "
                            "the optimizer should see), e.g. train.global_batch_tokens=524288")
    per_process = global_batch_tokens // (block_size * world_size)
    if per_process < 1 or global_batch_tokens % (block_size * world_size):
        raise GptforgeError(f"train.global_batch_tokens={global_batch_tokens} must be a multiple "
                            f"of block_size x processes = {block_size * world_size}")
    found = largest_fitting(fits, per_process)
    if found == 0:
        raise GptforgeError("train.batch_size=auto: not even one sequence fits in GPU memory; "
                            "lower model.block_size, enable runtime.activation_checkpointing or "
                            "use runtime.parallel=fsdp")
    batch = largest_divisor_at_most(per_process, found)
    log.info("auto batch size: %d sequences fit, using %d (x %d accumulation steps)",
             found, batch, per_process // batch)
    return batch
