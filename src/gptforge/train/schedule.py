"""Learning-rate schedules as pure functions of the step.

Because the rate is computed from the step number alone, a resumed run needs no scheduler state:
the step counter is enough. All schedules warm up linearly over ``warmup_steps`` (step s of the
warm-up uses ``lr * (s + 1) / (warmup + 1)``; Adam's
second-moment estimates are poor at first, and large early updates can destabilise training).

- ``cosine``: cosine decay from the peak to ``min_lr_ratio * lr`` at ``max_steps`` (GPT-3,
  Chinchilla).
- ``wsd``: warmup-stable-decay: hold the peak, then decay linearly to the floor over the last
  ``decay_fraction`` of the steps (Hu et al., 2024, MiniCPM). A long cooldown is what helped most
  in nanochat's and modded-nanogpt's speed records.
- ``linear``: linear decay from the peak to the floor.
- ``constant``: the peak after warm-up.

Weight decay and the batch size can follow schedules too (``schedule.weight_decay``,
``schedule.batch_ramp_steps``). A batch-size ramp starts with fewer micro-batches per step: early
gradients are noisy anyway (large steps in a rough landscape), and a small batch buys more updates
per token then (GPT-3 ramped its batch size; McCandlish et al., 2018, on the critical batch size).
It changes ``grad_accum``, not the micro-batch, so tensor shapes (and compiled graphs) stay fixed.
"""

from __future__ import annotations

import math

from gptforge.config.schema import ScheduleConfig


def lr_at(step: int, peak_lr: float, max_steps: int, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``max_steps``."""
    warmup = min(cfg.warmup_steps, max_steps)
    if step < warmup:
        return peak_lr * (step + 1) / (warmup + 1)
    if cfg.name == "constant":
        return peak_lr
    floor = peak_lr * cfg.min_lr_ratio
    if cfg.name == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * max_steps))
        decay_start = max(warmup, max_steps - decay_steps)
        if step < decay_start:
            return peak_lr
        progress = (step - decay_start) / max(1, max_steps - decay_start)
        return peak_lr + (floor - peak_lr) * min(1.0, progress)
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if cfg.name == "linear":
        return peak_lr + (floor - peak_lr) * progress
    return floor + 0.5 * (peak_lr - floor) * (1.0 + math.cos(math.pi * progress))


def weight_decay_factor(step: int, max_steps: int, lr_ratio: float, cfg: ScheduleConfig) -> float:
    """Multiplier on ``optim.weight_decay`` at ``step``; ``lr_ratio`` is lr / peak lr now."""
    if cfg.weight_decay == "constant":
        return 1.0
    if cfg.weight_decay == "follow_lr":
        return lr_ratio
    return max(0.0, 1.0 - step / max(1, max_steps))  # "linear"


def grad_accum_at(step: int, grad_accum: int, cfg: ScheduleConfig) -> int:
    """Micro-batches accumulated at ``step`` under the batch-size ramp (``grad_accum`` after it)."""
    if cfg.batch_ramp_steps <= 0 or step >= cfg.batch_ramp_steps:
        return grad_accum
    start = max(1, round(cfg.batch_ramp_start * grad_accum))
    return min(grad_accum, start + (grad_accum - start) * step // cfg.batch_ramp_steps)
