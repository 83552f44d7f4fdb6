"""Learning-rate schedules as pure functions of the step.

Because the rate is computed from the step number alone, a resumed run needs no scheduler state:
the step counter is enough. All schedules warm up linearly over ``warmup_steps`` (step s of the
warm-up uses ``lr * (s + 1) / (warmup + 1)``; Adam's
second-moment estimates are poor at first, and large early updates can destabilise training).

- ``cosine``: cosine decay from the peak to ``min_lr_ratio * lr`` at ``max_steps`` (GPT-3, Chinchilla).
- ``wsd``: warmup-stable-decay: hold the peak, then decay linearly to the floor over the last
  ``decay_fraction`` of the steps (Hu et al., 2024, MiniCPM). A long cooldown is what helped most
  in nanochat's and modded-nanogpt's speed records.
- ``linear``: linear decay from the peak to the floor.
- ``constant``: the peak after warm-up.
"""

from __future__ import annotations

import math

from gptforge.config.schema import ScheduleConfig
from gptforge.errors import GptforgeError

SCHEDULES = ("cosine", "wsd", "linear", "constant")


def lr_at(step: int, peak_lr: float, max_steps: int, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``max_steps``."""
    if cfg.name not in SCHEDULES:
        raise GptforgeError(f"schedule.name: unknown schedule '{cfg.name}' "
                            f"(use {', '.join(SCHEDULES)})")
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
