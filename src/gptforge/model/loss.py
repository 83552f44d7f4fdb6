"""Next-token losses on logits: what every objective, evaluation and data loader agrees on.

They live beside the model, below their users: the training objectives (``train/objectives.py``),
the scoring of multiple-choice tasks (``eval/``) and the fine-tuning loaders that mark the targets
not to learn from (``data/``) all import them from here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""A target with this value does not count in the loss (a user turn, padding)."""


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; targets equal to IGNORE_INDEX do not count."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE_INDEX)


def target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position (B, T), 0 where the target is IGNORE_INDEX."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                          ignore_index=IGNORE_INDEX, reduction="none")  # (B*T,)
    return -nll.view(targets.shape)
