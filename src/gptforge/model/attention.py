"""Causal self-attention through ``scaled_dot_product_attention``.

SDPA picks the fastest kernel available (FlashAttention on CUDA, a flash-style kernel on CPU) and
supports grouped-query attention (Ainslie et al., 2023, https://arxiv.org/abs/2305.13245), where
several query heads share one key/value head, which shrinks the KV cache by ``n_head/n_kv_head``.

For decoding, an optional cache object stores past keys and values. The model only needs two
things from it (duck typing keeps ``model/`` free of inference code): ``cache.pos``, the number of
positions already stored, and ``cache.update(layer, k, v)``, which stores the new keys/values and
returns all of them so far.

*Gated attention* (``attn_gate``; Qiu et al., 2025, https://arxiv.org/abs/2505.06708, used in
Qwen3-Next): the heads' output is multiplied by ``sigmoid(x @ W_gate)`` before the output
projection, with ``x`` the block's normed input, one gate per head or per channel. The paper finds
it adds a cheap non-linearity between the value and output projections and lets a head output
nearly nothing, which removes the "attention sink" on the first token and steadies training.
The gate is its own linear layer ``attn.gate`` (a LoRA target like ``qkv``).

*Dropout.* The attention probabilities are dropped (``dropout_p``) only on CUDA, where SDPA's
flash and memory-efficient kernels draw the mask inside the fused kernel. On CPU (and MPS) a
``dropout_p > 0`` sends SDPA from its fused flash kernel to the unfused path that materializes the
(T, T) attention matrix and a mask for it: measured on a 2-core Xeon, a 6-layer 384-wide GPT at
T=256 took 1.73x the CPU time per step with ``model.dropout=0.1`` than with 0, most of it there
(docs/benchmarks.md). So on those devices only the residual and embedding dropouts regularize, a
deviation from GPT-2/nanoGPT (which also drop attention probabilities), measured in
docs/benchmarks.md. The difference is confined to training: evaluation never drops anything.

For packed rows (several fine-tuning examples back to back in one row, see
``data/finetune_loader.py``) the model passes a block-diagonal causal mask instead: a token attends
to the earlier tokens of its own example only, so each example is computed as if it were alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.model.config import ModelConfig
from gptforge.model.layers import RMSNorm, apply_rope


class CausalSelfAttention(nn.Module):
    float32_sdpa = False
    """Compute the attention product in float32 even under bf16 autocast. A runtime choice, set
    from outside (``runtime.device.use_float32_attention``) where bf16 attention is the slower."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_size
        qkv_width = (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_size
        self.qkv = nn.Linear(cfg.n_embd, qkv_width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.attn_width, cfg.n_embd, bias=cfg.bias)
        gates = {"head": cfg.n_head, "channel": cfg.attn_width}.get(cfg.attn_gate)
        self.gate = nn.Linear(cfg.n_embd, gates, bias=cfg.bias) if gates else None
        self.use_rope = cfg.pos_emb == "rope"
        self.q_norm = RMSNorm(cfg.head_size, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_size, cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv_cache=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_mask`` (B, 1, T, T), True = may attend, replaces the causal mask (packed rows)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
             self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        start = 0
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, start+T, hs)
        if attn_mask is None:
            attn_mask = self._cached_mask(start, T, x.device)
            is_causal = start == 0 and T > 1
        else:
            is_causal = False  # the given mask is already causal
        options = dict(attn_mask=attn_mask, dropout_p=self._attention_dropout(q),
                       is_causal=is_causal, enable_gqa=self.n_kv_head != self.n_head)
        if self.float32_sdpa and q.dtype != torch.float32:
            with torch.autocast(x.device.type, enabled=False):  # autocast would cast back
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **options)
            y = y.to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, **options)  # (B, nh, T, hs)
        y = y.transpose(1, 2)  # (B, T, nh, hs)
        if self.gate is not None:
            y = gate_heads(y, self.gate(x))
        return self.resid_dropout(self.proj(y.reshape(B, T, self.n_head * self.head_dim)))

    def _attention_dropout(self, q: torch.Tensor) -> float:
        """Dropout on the attention probabilities: in training, on CUDA only, where it stays
        inside SDPA's fused kernel (see the module docstring)."""
        return self.dropout if self.training and q.is_cuda else 0.0

    @staticmethod
    def _cached_mask(start: int, T: int, device: torch.device) -> torch.Tensor | None:
        """Mask for T new queries after ``start`` cached positions (None when not needed).

        With nothing cached, ``is_causal`` does the job; a single new token may see everything.
        A chunk of several tokens after a cache sees the cache plus the causal part of itself.
        """
        if start == 0 or T == 1:
            return None
        q_pos = torch.arange(start, start + T, device=device)[:, None]
        k_pos = torch.arange(start + T, device=device)[None, :]
        return k_pos <= q_pos  # (T, start+T), True = may attend


def gate_heads(y: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """Heads' output y (..., nh, hs) times sigmoid of the gate logits (..., nh) for one gate per
    head, or (..., nh * hs) for one per channel."""
    gates = torch.sigmoid(gate_logits).to(y.dtype)
    if gates.size(-1) == y.size(-2):  # per head: broadcast over the head's channels
        return y * gates.unsqueeze(-1)
    return y * gates.view(y.shape)
