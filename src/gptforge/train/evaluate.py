"""Evaluation on held-out data: mean loss over a fixed set of val batches.

The val loader is reset before each evaluation, so every evaluation of a run scores the same
batches and the val curve shows the model changing, not the sample. The loss is the mean over
every loss term (token, or DPO pair) of those batches on all ranks, as in training (see
``objectives.py``). Perplexity is exp(loss).
"""

from __future__ import annotations

import math

import torch

from gptforge.runtime.distributed import all_reduce_sum, sum_over_ranks


@torch.no_grad()
def evaluate(model, loader, objective, precision, steps: int, dist_info=None) -> dict:
    was_training = model.training
    model.eval()
    loader.reset()
    total = torch.zeros((), device=precision.device)  # the sum of the loss terms
    terms = 0
    extra: dict[str, float] = {}
    for _ in range(steps):
        batch = loader.next_batch()
        n = objective.loss_terms(batch)
        batch = tuple(t.to(precision.device, non_blocking=True) for t in batch)
        with precision.autocast():
            loss, _ = objective(model, batch)
        total += loss.float() * n
        terms += n
        for key, value in objective.metrics.items():
            extra[f"val_{key}"] = extra.get(f"val_{key}", 0.0) + float(value) / max(1, steps)
    model.train(was_training)
    if dist_info is not None:  # each rank scored its own share of the val batches
        total = all_reduce_sum(total, dist_info)
        terms = sum_over_ranks(terms, dist_info, precision.device)
    val_loss = float(total) / max(1, terms)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), **extra}
