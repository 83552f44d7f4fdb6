"""Objectives: what a training step minimises, given a model and a batch.

The training loop is the same for pretraining and later stages; what differs is the batch and the
objective. An objective is a callable ``(model, batch) -> (loss, n_tokens)``: the mean loss over
the tokens that count, and how many tokens those were. ``batch`` is the tuple of tensors the
stage's loader yields (``(x, y)`` for language modelling). An objective may also keep a dict of
floats in ``self.metrics`` describing its last call (e.g. DPO's reward margin); the loop averages
them over the micro-batches of a step and logs them next to the loss (``val_``-prefixed when
evaluating).

A mixture-of-experts model also has auxiliary router losses (``GPT.aux_loss()``). They are added
so that they contribute their gradient but not their value: the returned loss (which the loop
backpropagates, logs and checks for NaN) reads as the plain next-token loss, comparable between
dense and MoE models and with the validation loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; targets equal to IGNORE_INDEX do not count."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE_INDEX)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` and DDP wrappers (in either order)."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        else:
            return model


def with_aux_gradient(loss: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
    """``loss`` in value, ``loss + aux`` in gradient (``aux - aux.detach()`` is exactly 0)."""
    if aux is None:
        return loss
    return loss + (aux - aux.detach())


class LanguageModeling:
    """Next-token prediction on every position (pretraining)."""

    name = "lm"

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        logits = model(x)
        loss = token_cross_entropy(logits, y)
        aux_loss = getattr(unwrap_model(model), "aux_loss", None)  # MoE router losses
        if aux_loss is not None:
            loss = with_aux_gradient(loss, aux_loss())
        return loss, y.numel()
