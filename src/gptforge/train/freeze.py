"""Freezing parts of a model: ``train.freeze`` names what keeps its starting weights.

Continued pretraining and fine-tuning often train only part of a network: the embeddings kept
while a new domain is learned, or the lower blocks kept (they hold the most general features,
Yosinski et al., 2014, "How transferable are features in deep neural networks?") while the upper
ones adapt. A frozen parameter gets ``requires_grad = False`` before the optimizer is built, so
the optimizer never holds it, no gradient is computed for it, and the FLOPs count skips its
weight gradients. Parts, comma-separated:

- ``embeddings``: the token embeddings and a learned position table;
- ``blocks:A-B`` (blocks A to B, 0-based, both included) or ``blocks:N`` (block N alone);
  ``blocks`` alone is every block;
- ``norm_f``: the final norm; ``lm_head``: the output layer.

With tied embeddings the token embeddings *are* the output layer: freezing either freezes both.
"""

from __future__ import annotations

import logging

from torch import nn

from gptforge.errors import GptforgeError

log = logging.getLogger(__name__)

PARTS = ("embeddings", "blocks", "blocks:A-B", "blocks:N", "norm_f", "lm_head")


def freeze(model: nn.Module, spec: str) -> list[str]:
    """Freeze the parts ``spec`` names (see the module docstring); return the frozen names."""
    prefixes = [p for part in spec.split(",") if part.strip()
                for p in _prefixes(part.strip(), model)]
    if not prefixes:
        return []
    frozen = []
    for name, param in model.named_parameters(remove_duplicate=False):  # tied: both names
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            param.requires_grad = False
            frozen.append(name)
    if not any(p.requires_grad for p in model.parameters()):
        raise GptforgeError(f"train.freeze={spec!r} freezes every weight: nothing is left to "
                            "train")
    total = sum(p.numel() for p in model.parameters())
    still = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("train.freeze=%s: %d tensors frozen, %.3fM of %.3fM parameters train", spec,
             len(frozen), still / 1e6, total / 1e6)
    if getattr(model, "config", None) is not None and model.config.tie_embeddings \
            and any(p in ("tok_emb", "lm_head") for p in prefixes):
        log.info("the embeddings are tied to the output layer: both are frozen")
    return frozen


def _prefixes(part: str, model: nn.Module) -> list[str]:
    """Parameter-name prefixes of one part of ``train.freeze``."""
    n_layer = len(model.blocks)
    if part == "embeddings":
        return ["tok_emb", "pos_emb"]
    if part in ("norm_f", "lm_head"):
        return [part]
    if part == "blocks":
        return [f"blocks.{i}" for i in range(n_layer)]
    if part.startswith("blocks:"):
        first, last = _block_range(part, n_layer)
        return [f"blocks.{i}" for i in range(first, last + 1)]
    raise GptforgeError(f"train.freeze: unknown part {part!r}; use {', '.join(PARTS)} "
                        "(comma-separated)")


def _block_range(part: str, n_layer: int) -> tuple[int, int]:
    text = part.split(":", 1)[1]
    lo, _, hi = text.partition("-")
    try:
        first, last = int(lo), int(hi or lo)
    except ValueError:
        raise GptforgeError(f"train.freeze: {part!r} must be blocks:A-B or blocks:N with "
                            "block numbers") from None
    if not 0 <= first <= last < n_layer:
        raise GptforgeError(f"train.freeze: {part!r} is outside the model's blocks 0-"
                            f"{n_layer - 1}")
    return first, last
