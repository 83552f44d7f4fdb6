"""Building blocks of a transformer block: normalisation, positions, feed-forward.

Each is a small ``nn.Module`` (or pure function) chosen by name from :class:`ModelConfig`, so one
GPT class covers GPT-2 (LayerNorm, learned positions, GELU), Llama (RMSNorm, RoPE, SwiGLU) and
the original Transformer's fixed sinusoidal positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.model.config import GATED_MLPS, ModelConfig


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
        return normalize("rmsnorm", x, weight, None, self.eps)


def normalize(kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              eps: float) -> torch.Tensor:
    """The norm ``kind`` ("rmsnorm" or "layernorm") over the last dimension of ``x``, as a
    function of its tensors: what the modules below compute, for code that holds the weights
    outside a module (the compiled decode step)."""
    if kind == "rmsnorm":
        return F.rms_norm(x, (x.size(-1),), weight, eps)
    return F.layer_norm(x, (x.size(-1),), weight, bias, eps)


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


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """Fixed position embeddings (max_len, dim) of "Attention Is All You Need" (Vaswani et al.,
    2017, https://arxiv.org/abs/1706.03762, section 3.5): channel 2i holds
    sin(pos / 10000^(2i/dim)), channel 2i+1 the cosine of the same angle.

    Unlike the paper, the token embeddings are not multiplied by sqrt(dim) before the sum: they
    start at the model's own ``init_std``, as learned position embeddings do.
    """
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).view(max_len, dim)  # interleaved


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by the angles for its T positions; cos/sin are (T, hs/2).

    Channels are paired as (i, i + hs/2) ("rotate half"), the layout Llama checkpoints use.
    """
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# The nonlinearity of each MLP kind; for the gated ones, the one applied to the gate. GELU's
# ``approximate`` ("tanh" as in GPT-2, or "none", the exact erf form) is ``model.gelu_approximate``.
ACTIVATIONS = {
    "gelu": lambda h, approximate: F.gelu(h, approximate=approximate),
    "relu2": lambda h, approximate: F.relu(h).square(),  # Primer (So et al., 2021)
    "swiglu": lambda h, approximate: F.silu(h),
    "geglu": lambda h, approximate: F.gelu(h, approximate=approximate),
    "reglu": lambda h, approximate: F.relu(h),
}


def mlp_activation(kind: str, h: torch.Tensor, gelu_approximate: str = "tanh") -> torch.Tensor:
    """The MLP's hidden activation from the up projection's output ``h``.

    A gated linear unit (Shazeer, 2020, "GLU Variants Improve Transformer",
    https://arxiv.org/abs/2002.05202) computes ``act(gate) * value``: ``h`` holds the gate in its
    first half and the value in its second (one matmul for both).
    """
    if kind in GATED_MLPS:
        gate, value = h.chunk(2, dim=-1)
        return ACTIVATIONS[kind](gate, gelu_approximate) * value
    return ACTIVATIONS[kind](h, gelu_approximate)


class MLP(nn.Module):
    """Position-wise feed-forward network: GELU, squared ReLU, or a gated linear unit
    (SwiGLU, GEGLU, ReGLU)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.gelu_approximate = cfg.mlp, cfg.gelu_approximate
        hidden = cfg.hidden_dim
        up_width = 2 * hidden if cfg.gated_mlp else hidden  # gate and value in one matmul
        self.up = nn.Linear(cfg.n_embd, up_width, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = mlp_activation(self.kind, self.up(x), self.gelu_approximate)
        return self.dropout(self.down(h))
