"""Building the optimizer: AdamW (default), Muon + AdamW, or Adafactor.

Weight decay pulls weights towards zero. It makes sense for matrices (linear layers and
embeddings), where it regularises, but not for gains and biases of norms and linear layers
(1-D tensors), where it only fights the scale the network needs. So matrices decay and vectors do
not (the split nanoGPT and most LLM codebases use).

Muon (Jordan et al., 2024) orthogonalises the momentum of each hidden weight matrix with a few
Newton-Schulz iterations, so every direction of the update has a similar size; the speed records
credit it with ~1.5x sample efficiency over AdamW. It only suits the 2-D matrices inside the
blocks: embeddings, the output layer, norms and biases keep AdamW. PyTorch's ``torch.optim.Muon``
is used with ``adjust_lr_fn="match_rms_adamw"`` (Liu et al., 2025, "Muon is Scalable for LLM
Training"), which scales its update to AdamW's RMS so both share ``optim.lr`` and the schedule.

Adafactor (Shazeer & Stern, 2018) keeps factored second moments (a row and a column vector per
matrix instead of a full matrix), which saves most of Adam's optimizer memory.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from gptforge.config.schema import OptimConfig

log = logging.getLogger(__name__)

def parameter_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named trainable parameters; shared (tied) tensors are listed once."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device):
    """The optimizer for ``model``: a torch optimizer or, for Muon, an :class:`OptimizerChain`."""
    params = trainable(model)
    if cfg.name == "adafactor":
        return torch.optim.Adafactor(parameter_groups(params, cfg.weight_decay), lr=cfg.lr)
    if cfg.name == "muon":
        return build_muon(model, params, cfg, device)
    return build_adamw(params, cfg, device)


def build_adamw(params, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    fused = use_fused(cfg.fused, device)
    return torch.optim.AdamW(parameter_groups(params, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def build_muon(model: nn.Module, params, cfg: OptimConfig, device):
    """Muon for the 2-D weights inside the blocks, AdamW for everything else."""
    # LoRA factors are not weight matrices in Muon's sense (their product is): AdamW for them.
    hidden = [(n, p) for n, p in params
              if p.dim() == 2 and n.startswith("blocks.") and ".lora_" not in n]
    hidden_ids = {id(p) for _, p in hidden}
    rest = [(n, p) for n, p in params if id(p) not in hidden_ids]
    if not hidden:  # e.g. LoRA froze every block matrix: nothing for Muon to do
        log.info("optim.name=muon: no trainable matrices inside the blocks; using AdamW")
        return build_adamw(params, cfg, device)
    muon = torch.optim.Muon([p for _, p in hidden], lr=cfg.lr, weight_decay=cfg.weight_decay,
                            momentum=cfg.muon_momentum, adjust_lr_fn="match_rms_adamw")
    log.debug("Muon on %d matrices, AdamW on %d other tensors", len(hidden), len(rest))
    return OptimizerChain([muon, build_adamw(rest, cfg, device)])


def use_fused(setting: str, device: torch.device) -> bool:
    """The fused AdamW kernel updates all tensors in one pass (CUDA, CPU and MPS)."""
    if setting == "auto":
        return device.type in ("cuda", "cpu", "mps")
    return setting == "true"


class OptimizerChain:
    """Several optimizers over disjoint parameters, used as one.

    ``param_groups`` lists all their groups, so the loop sets the learning rate of every group in
    one place; ``state_dict`` keeps each optimizer's state under its position.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self):
        merged = {}
        for opt in self.optimizers:
            merged.update(opt.state)
        return merged

    def step(self, closure=None) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for opt, saved in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(saved)
