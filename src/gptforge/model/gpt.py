"""A decoder-only transformer (GPT) whose parts are switchable by config.

GPT-2 (Radford et al., 2019) and Llama (Touvron et al., 2023) differ only in a few choices, all of
them fields of :class:`ModelConfig`: the norm, how positions enter, the MLP, biases, grouped-query
attention and tied embeddings. This file holds the architecture and nothing else: no optimizer, no
loss, no distributed code, no file I/O (see ``train/`` and ``runtime/``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gptforge.model.attention import CausalSelfAttention
from gptforge.model.config import ModelConfig
from gptforge.model.layers import MLP, build_norm, rope_tables


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm1 = build_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.norm2 = build_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope, kv_cache=None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, kv_cache)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it normally comes from the data)")
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = build_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos_emb == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            # Not saved in checkpoints: recomputed from the config.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, zero biases, and output projections scaled down.

        Each block adds two residual branches; scaling their output layers by 1/sqrt(2*n_layer)
        keeps the residual stream's variance independent of depth (GPT-2 paper, section 2.3).
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.down.weight, mean=0.0, std=residual_std)

    def forward(self, idx: torch.Tensor, kv_cache=None, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (B, T, padded_vocab) for token ids ``idx`` (B, T).

        With ``kv_cache``, ``idx`` continues the sequence stored in the cache. ``logits_to_keep=n``
        computes logits for the last n positions only (generation needs just the last one).
        """
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size "
                             f"{self.config.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.norm_f(x))
        cap = self.config.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters (shared tensors counted once); optionally without the position table."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B.

        6 FLOPs per non-embedding-lookup parameter (2 forward, 4 backward) plus attention's
        score and value products, 12 * n_layer * n_embd * T per token at context length T.
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params(exclude_embeddings=True)
        if not cfg.tie_embeddings:  # the input table is a lookup, not a matmul
            n -= self.tok_emb.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * T
