"""Evaluation on held-out data: mean loss over a fixed set of val batches.

The val loader is reset before each evaluation, so every evaluation of a run scores the same
batches and the val curve shows the model changing, not the sample. Perplexity is exp(loss).
"""

from __future__ import annotations

import math

import torch

from gptforge.runtime.distributed import all_reduce_mean


@torch.no_grad()
def evaluate(model, loader, objective, precision, steps: int, dist_info=None) -> dict:
    was_training = model.training
    model.eval()
    loader.reset()
    total = torch.zeros((), device=precision.device)
    extra: dict[str, float] = {}
    for _ in range(steps):
        batch = tuple(t.to(precision.device, non_blocking=True) for t in loader.next_batch())
        with precision.autocast():
            loss, _ = objective(model, batch)
        total += loss.float()
        for key, value in getattr(objective, "metrics", {}).items():
            extra[f"val_{key}"] = extra.get(f"val_{key}", 0.0) + float(value) / max(1, steps)
    model.train(was_training)
    if dist_info is not None:  # each rank scored its own share of the val batches
        total = all_reduce_mean(total, dist_info)
    val_loss = float(total) / max(1, steps)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), **extra}
