"""A mixture-of-experts (MoE) feed-forward layer: many MLPs, each token uses only a few.

A sparse MoE layer (Shazeer et al., 2017, https://arxiv.org/abs/1701.06538) replaces a block's MLP
by ``n_experts`` MLPs and a router, a linear map that scores every expert for every token. Each
token goes to its ``top_k`` best-scoring experts and receives the weighted sum of their outputs,
so parameters grow with ``n_experts`` while the compute per token grows only with ``top_k``.

Routing (Mixtral, Jiang et al., 2024, https://arxiv.org/abs/2401.04088): softmax over all expert
logits, keep the top k probabilities and renormalise them to sum to 1. With k = 1 the weight is
the raw probability instead (Switch Transformer, Fedus et al., 2021,
https://arxiv.org/abs/2101.03961): renormalised it would always be 1 and the router would get no
gradient from the language-modelling loss. Every token is processed ("dropless" routing): there is
no expert capacity, so no token is ever skipped.

A router left alone tends to collapse onto a few experts, which then get all the training signal.
Two auxiliary losses counter that; the layer stores them after each forward (``balance_loss``,
``z_loss``) and ``GPT.aux_loss()`` adds them up with their coefficients, so the model's forward
still returns only logits:

- load balancing (Switch Transformer, eq. 4): ``n_experts * sum_i f_i * P_i``, where ``f_i`` is
  the fraction of the (token, slot) assignments sent to expert i and ``P_i`` the mean router
  probability of expert i. It is 1 when routing is uniform and up to ``n_experts`` when collapsed.
- router z-loss (ST-MoE, Zoph et al., 2022, https://arxiv.org/abs/2202.08906): the mean squared
  log-sum-exp of the router logits, which keeps them small and the softmax numerically stable.

Each expert is an ordinary :class:`~gptforge.model.layers.MLP`, so its code and initialisation are
the dense MLP's. On a CPU this was as fast as stacking the experts' weights and running one
batched matmul over per-expert groups padded to the same length (``benchmarks/moe_step_time.py``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from gptforge.model.config import ModelConfig
from gptforge.model.layers import MLP


def route(probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, experts), each (N, top_k): the chosen experts of each token and their weights."""
    top_probs, experts = probs.topk(top_k, dim=-1)
    if top_k > 1:  # Mixtral; with one expert keep the raw probability (Switch)
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
    return top_probs, experts


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss ``E * sum_i f_i * P_i`` (a scalar, 1 when uniform).

    ``probs`` (N, E) are the router probabilities, ``counts`` (E,) the assignments per expert.
    ``f`` is not differentiable (it counts); the gradient flows through ``P``, pushing probability
    away from the experts that receive more than their share.
    """
    n_experts = probs.size(-1)
    f = counts.float() / counts.sum()  # (E,) fraction of assignments
    P = probs.mean(dim=0)  # (E,) mean router probability
    return n_experts * (f * P).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(router logits)^2."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MoEMLP(nn.Module):
    """Top-k routed mixture of ``cfg.n_experts`` MLPs of kind ``cfg.mlp``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.moe_top_k
        expert_cfg = dataclasses.replace(cfg, mlp_hidden=cfg.moe_expert_hidden or cfg.hidden_dim)
        self.router = nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(expert_cfg) for _ in range(cfg.n_experts))
        self.balance_loss: torch.Tensor | None = None  # of the last forward
        self.z_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C): routing is per token
        logits = self.router(x).float()  # (N, E); softmax in fp32 even under autocast (ST-MoE)
        probs = logits.softmax(dim=-1)
        weights, experts = route(probs, self.top_k)  # (N, k), (N, k)
        counts = torch.bincount(experts.flatten(), minlength=self.n_experts)  # (E,)
        self.balance_loss = load_balancing_loss(probs, counts)
        self.z_loss = router_z_loss(logits)
        y = self.dispatch(x, weights, experts, counts)
        return y.view(B, T, C)

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                 counts: torch.Tensor) -> torch.Tensor:
        """Run each expert on the tokens routed to it; return each token's weighted sum (N, C).

        The N*k (token, slot) assignments are sorted by expert, so every expert sees one
        contiguous group of rows; the outputs are then put back in (token, slot) order and summed
        over the k slots. Every expert runs, even on zero rows, so all of them get a gradient
        (DDP expects one for every parameter).
        """
        N, k = experts.shape
        order = experts.flatten().argsort(stable=True)  # (N*k,) assignments grouped by expert
        groups = x[order // k].split(counts.tolist())  # E tensors (count_e, C); a host sync
        out = torch.cat([expert(g) for expert, g in zip(self.experts, groups)])  # (N*k, C)
        unsorted = torch.empty_like(out)
        unsorted[order] = out  # back to (token, slot) order
        unsorted = unsorted.view(N, k, -1)  # (N, k, C)
        return (unsorted * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)
