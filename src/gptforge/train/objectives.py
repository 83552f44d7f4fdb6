"""Objectives: what a training step minimises, given a model and a batch.

The training loop is the same for pretraining and later stages; what differs is the batch and the
objective. An objective is a callable ``(model, batch) -> (loss, n_tokens)``: the mean loss over
the tokens that count, and how many tokens those were.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; targets equal to IGNORE_INDEX do not count."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE_INDEX)


class LanguageModeling:
    """Next-token prediction on every position (pretraining)."""

    name = "lm"

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        logits = model(x)
        return token_cross_entropy(logits, y), y.numel()
