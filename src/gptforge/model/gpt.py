"""A decoder-only transformer (GPT) whose parts are switchable by config.

GPT-2 (Radford et al., 2019) and Llama (Touvron et al., 2023) differ only in a few choices, all of
them fields of :class:`ModelConfig`: the norm, how positions enter, the MLP, biases, grouped-query
attention and tied embeddings. Later variants are switches too: fixed sinusoidal positions, GEGLU
and ReGLU MLPs, a head width set apart from ``n_embd / n_head`` and gated attention (see
docs/architecture.md). A mixture-of-experts MLP (``n_experts > 0``, see ``moe.py``) can
take the dense MLP's place in some or all blocks. This file holds the architecture and nothing
else: no optimizer, no loss, no distributed code, no file I/O (see ``train/`` and ``runtime/``).

*Packing*: fine-tuning puts several short examples back to back in one row and passes
``segment_ids`` numbering them. Each token then attends only within its own example and its
position restarts at 0 where its example starts, so every example is computed exactly as if it
were alone in the row (the idea of "packing with attention masks", e.g. Krell et al., 2021,
https://arxiv.org/abs/2107.02027).

*Rows of different lengths* (continuous batching, ``inference/batching.py``): ``positions``
(B, T) gives each token its own position. The cache then stores a token's keys and values at the
index equal to its position and returns the indices ``0..max(positions)``; a token attends to the
indices up to its own position, so each row sees its own sequence only (Yu et al., 2022, "Orca",
https://www.usenix.org/conference/osdi22/presentation/yu).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gptforge.model.attention import CausalSelfAttention
from gptforge.model.config import ModelConfig
from gptforge.model.layers import MLP, build_norm, rope_tables, sinusoidal_table
from gptforge.model.moe import MoEMLP


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm1 = build_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.norm2 = build_norm(cfg)
        self.mlp = MoEMLP(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg)

    def forward(self, x: torch.Tensor, rope, kv_cache=None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, kv_cache, attn_mask)
        return x + self.mlp(self.norm2(x))


def _segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True where a segment begins. A segment is a run of equal ids, so only
    neighbouring segments need distinct ids."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its segment (B, T): ``[[0, 0, 0, 1, 1, 2]]`` ->
    ``[[0, 1, 2, 0, 1, 0]]``."""
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)  # (B, T)
    starts = _segment_starts(segment_ids)
    segment_start = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T)
    return index - segment_start


def position_attention_mask(positions: torch.Tensor) -> torch.Tensor:
    """Mask (B, 1, T, L) over cache indices ``0..L-1`` with ``L = max(positions) + 1``, True =
    may attend: a token at position p sees the indices <= p of its own row."""
    length = int(positions.max()) + 1
    index = torch.arange(length, device=positions.device)
    return (index[None, None, None, :] <= positions[:, None, :, None])  # (B, 1, T, L)


def segment_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask (B, 1, T, T), True = may attend: causal and same segment."""
    T = segment_ids.size(1)
    run = _segment_starts(segment_ids).cumsum(dim=1)  # (B, T): segments numbered 1, 2, ...
    same = run[:, :, None] == run[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal).unsqueeze(1)  # (B, 1, T, T), broadcast over heads


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it normally comes from the data)")
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.pos_emb = (nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned"
                        else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = build_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Fixed tables are not saved in checkpoints: they are recomputed from the config.
        if cfg.pos_emb == "rope":
            cos, sin = rope_tables(cfg.head_size, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.pos_emb == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.block_size, cfg.n_embd),
                                 persistent=False)
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
        for module in self.modules():
            if isinstance(module, MLP):  # the dense MLPs and every expert
                nn.init.normal_(module.down.weight, mean=0.0, std=residual_std)

    def forward(self, idx: torch.Tensor, kv_cache=None, logits_to_keep: int = 0,
                segment_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, padded_vocab) for token ids ``idx`` (B, T).

        With ``kv_cache``, ``idx`` continues the sequence stored in the cache. ``logits_to_keep=n``
        computes logits for the last n positions only (generation needs just the last one).
        ``segment_ids`` (B, T) marks packed rows: runs of equal ids are independent sequences.
        ``positions`` (B, T), with a ``kv_cache`` that stores by position (see the module
        docstring): each row continues its own sequence; the caller moves the rows' lengths.
        """
        if positions is not None:
            pos, attn_mask = self._row_positions(positions, kv_cache, segment_ids)
        else:
            pos, attn_mask = self._positions(idx, kv_cache, segment_ids)
        x, rope = self._embed(idx, pos)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, kv_cache, attn_mask)
        if kv_cache is not None and positions is None:
            kv_cache.advance(idx.size(1))
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.norm_f(x))
        cap = self.config.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def _positions(self, idx: torch.Tensor, kv_cache, segment_ids: torch.Tensor | None):
        """Positions ((T,), or (B, T) for packed rows) and the mask (None: causal) of ``idx``."""
        T = idx.size(1)
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size "
                             f"{self.config.block_size}")
        if segment_ids is None:
            return torch.arange(start, start + T, device=idx.device), None  # (T,)
        if kv_cache is not None:
            raise ValueError("segment_ids (packed rows) cannot be combined with a kv_cache")
        # Packed rows: positions restart in each segment.
        return segment_positions(segment_ids), segment_attention_mask(segment_ids)

    def _row_positions(self, positions: torch.Tensor, kv_cache, segment_ids):
        """Each row's own ``positions`` (B, T) and the mask over the cache indices they see."""
        if kv_cache is None or segment_ids is not None:
            raise ValueError("positions need a kv_cache and cannot be combined with segment_ids")
        if int(positions.max()) >= self.config.block_size or int(positions.min()) < 0:
            raise ValueError(f"positions must lie in [0, block_size {self.config.block_size})")
        return positions, position_attention_mask(positions)

    def _embed(self, idx: torch.Tensor, pos: torch.Tensor):
        """Token embeddings (B, T, C) with absolute positions added, and the rotary tables for
        positions ``pos`` ((T,) shared by the rows, or (B, T) per row), None without RoPE."""
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            return x + self.pos_emb(pos), None
        if self.config.pos_emb == "sinusoidal":
            return x + self.pos_table[pos].to(x.dtype), None
        if pos.dim() == 2:  # (B, 1, T, hs/2): each row's own positions, broadcast over heads
            return x, (self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1))
        return x, (self.rope_cos[pos], self.rope_sin[pos])  # (T, hs/2)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters (shared tensors counted once); optionally without the position table."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    def num_active_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters one token uses: ``num_params`` with ``moe_top_k`` experts per MoE layer.

        Routers count in full, the ``n_experts - moe_top_k`` experts a token skips do not.
        Equal to ``num_params`` for a dense model.
        """
        n = self.num_params(exclude_embeddings)
        for module in self.modules():
            if isinstance(module, MoEMLP):
                per_expert = sum(p.numel() for p in module.experts[0].parameters())
                n -= (module.n_experts - module.top_k) * per_expert
        return n

    def aux_loss(self) -> torch.Tensor | None:
        """Weighted sum of the MoE layers' auxiliary losses of the last forward; None if dense.

        Load balancing times ``moe_aux_loss_coef`` plus router z-loss times ``moe_z_loss_coef``,
        summed over the MoE layers; the training objective adds it to the loss. The layers'
        stored losses are handed over and cleared, so no autograd graph stays attached to the
        model between steps (it would keep memory alive and make the model impossible to
        ``copy.deepcopy``): call this once per forward.
        """
        layers = [m for m in self.modules() if isinstance(m, MoEMLP)]
        if not layers:
            return None
        if any(m.balance_loss is None for m in layers):
            raise RuntimeError("GPT.aux_loss() needs a forward pass first (once per forward)")
        cfg = self.config
        total = sum(cfg.moe_aux_loss_coef * m.balance_loss + cfg.moe_z_loss_coef * m.z_loss
                    for m in layers)
        for m in layers:
            m.balance_loss = m.z_loss = None
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B.

        6 FLOPs per non-embedding-lookup parameter (2 forward, 4 backward; the attention gate's
        matrix is one of them) plus attention's score and value products,
        12 * n_layer * n_head * head_size * T per token at context length T (n_embd = n_head *
        head_size unless ``head_dim`` sets it apart). That
        term counts the whole T x T score matrix, the half a causal kernel skips included (PaLM's
        and nanoGPT's convention), so MFU figures compare with theirs.
        Only *active* parameters count (``num_active_params``): a token runs through top_k
        experts, not all of them, so the MFU of an MoE model is computed on the FLOPs it does.

        The backward pass is two halves of 2 FLOPs per parameter each: the gradient of the
        activations (always needed, to reach the layers below) and the gradient of the weight.
        A frozen weight (``requires_grad=False``, e.g. the base of a LoRA model) skips the
        second, so it costs 4, not 6.
        """
        frozen = self._matmul_params(lambda p: not p.requires_grad)
        return 3 * self.forward_flops_per_token(seq_len) - 2 * frozen

    def forward_flops_per_token(self, seq_len: int | None = None) -> int:
        """FLOPs of a forward pass per token: 2 per active matmul parameter, plus the attention
        products' 4 * n_layer * n_head * head_size * T (see :meth:`flops_per_token`)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 2 * self._matmul_params() + 4 * cfg.n_layer * cfg.attn_width * T

    def _matmul_params(self, keep=lambda p: True) -> int:
        """Active parameters a token multiplies with (not the position or input-embedding
        lookups, only ``moe_top_k`` experts per MoE layer), of those ``keep(p)`` selects."""
        n = sum(p.numel() for p in self.parameters() if keep(p))  # tied weights once
        lookups = [self.pos_emb.weight] if self.pos_emb is not None else []
        if not self.config.tie_embeddings:  # the input table is a lookup, not a matmul
            lookups.append(self.tok_emb.weight)
        n -= sum(p.numel() for p in lookups if keep(p))
        for module in self.modules():
            if isinstance(module, MoEMLP):
                per_expert = sum(p.numel() for p in module.experts[0].parameters() if keep(p))
                n -= (module.n_experts - module.top_k) * per_expert
        return n
