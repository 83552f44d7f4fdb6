"""Attention-probability dropout is left to CUDA's fused SDPA kernels: on CPU the attention
product of a training step is the deterministic one (residual dropout still applies)."""

from __future__ import annotations

import torch

from gptforge.model.attention import CausalSelfAttention
from gptforge.model.config import ModelConfig


def test_cpu_training_drops_residuals_but_not_attention_probabilities():
    torch.manual_seed(0)
    attn = CausalSelfAttention(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8,
                                           vocab_size=10, dropout=0.5), layer_idx=0)
    x = torch.randn(2, 8, 16)
    attn.eval()
    expected = attn(x, None)
    attn.train()
    dropped = attn(x, None)
    assert not torch.allclose(dropped, expected)  # the residual dropout is on
    attn.resid_dropout = torch.nn.Identity()
    assert torch.allclose(attn(x, None), expected, atol=1e-6)  # the attention itself is exact
