"""Activation checkpointing: trade compute for memory, one transformer block at a time.

Backward needs the intermediate activations of the forward pass. Normally all of them are kept,
and for long contexts they dominate memory. With checkpointing, a block keeps only its input;
during backward it runs its forward again to rebuild what it needs (Chen et al., 2016,
"Training Deep Nets with Sublinear Memory Cost"). The price is one extra forward per block,
roughly +30% step time; the gain is activation memory that no longer grows with depth.

It is applied from outside the model by replacing each block's ``forward``, so parameter names,
state dicts and checkpoints are unchanged. Only training forwards are checkpointed; evaluation
and generation run the block as usual.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: nn.Module) -> None:
    for block in model.blocks:
        block.forward = functools.partial(_checkpointed, block, block.forward)


def _checkpointed(block: nn.Module, forward, *args, **kwargs):
    if block.training and torch.is_grad_enabled():
        # use_reentrant=False: the recommended implementation (works with kwargs and compile).
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)
