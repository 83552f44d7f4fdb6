"""Building blocks of a transformer block: normalisation, rotary positions, feed-forward.

Each is a small ``nn.Module`` (or pure function) chosen by name from :class:`ModelConfig`, so one
GPT class covers GPT-2 (LayerNorm, learned positions, GELU) and Llama (RMSNorm, RoPE, SwiGLU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.model.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019): LayerNorm without centring or bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under bf16 autocast x arrives in bf16 and the weight is fp32; the fused kernel needs
        # one dtype (mixed, PyTorch falls back to a 3-4x slower path and warns).
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.rms_norm(x, (x.size(-1),), weight, self.eps)


def build_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.n_embd
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_len, head_dim // 2) for rotary embeddings.

    RoPE (Su et al., 2021, https://arxiv.org/abs/2104.09864) rotates each pair of channels of q and
    k by an angle proportional to the position, so q·k depends only on the relative distance.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by the angles for its T positions; cos/sin are (T, hs/2).

    Channels are paired as (i, i + hs/2) ("rotate half"), the layout Llama checkpoints use.
    """
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class MLP(nn.Module):
    """Position-wise feed-forward network: GELU, squared ReLU, or SwiGLU (Shazeer, 2020)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.hidden_dim
        up_width = 2 * hidden if cfg.mlp == "swiglu" else hidden  # gate and value in one matmul
        self.up = nn.Linear(cfg.n_embd, up_width, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.down(h))
