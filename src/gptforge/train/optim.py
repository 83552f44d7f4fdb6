"""Building the optimizer: AdamW with decay and no-decay parameter groups.

Weight decay pulls weights towards zero. It makes sense for matrices (linear layers and
embeddings), where it regularises, but not for gains and biases of norms and linear layers
(1-D tensors), where it only fights the scale the network needs. So matrices decay and vectors do
not (the split nanoGPT and most LLM codebases use).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from gptforge.config.schema import OptimConfig
from gptforge.errors import GptforgeError

log = logging.getLogger(__name__)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():  # shared (tied) tensors are yielded once
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.name != "adamw":
        raise GptforgeError(f"optim.name: unknown optimizer '{cfg.name}' (available: adamw)")
    fused = use_fused(cfg.fused, device)
    groups = parameter_groups(model, cfg.weight_decay)
    log.debug("AdamW: %d decayed and %d non-decayed tensors, fused=%s",
              len(groups[0]["params"]), len(groups[1]["params"]), fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused)


def use_fused(setting: str, device: torch.device) -> bool:
    """The fused AdamW kernel updates all tensors in one pass (CUDA, CPU and MPS in torch >= 2.4)."""
    if setting not in ("auto", "true", "false"):
        raise GptforgeError(f"optim.fused must be auto, true or false, not '{setting}'")
    if setting == "auto":
        return device.type in ("cuda", "cpu", "mps")
    return setting == "true"
