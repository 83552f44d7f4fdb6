"""A preallocated key/value cache for autoregressive decoding.

Without a cache, every new token re-runs attention over the whole prefix: O(T^2) work per token.
With it, each layer stores the keys and values it has computed, and a decoding step only computes
q, k, v for the one new token. The tensors are allocated once at full length, so decoding never
reallocates or concatenates. Each layer has its own tensors, so a compiled decode step can take
them as separate inputs and write into them in place (see ``decode.py``).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, head_dim: int,
                 max_len: int, *, dtype: torch.dtype, device: torch.device):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len
        self.pos = 0  # positions filled so far

    @classmethod
    def for_model(cls, model, batch_size: int, dtype: torch.dtype | None = None) -> KVCache:
        cfg = model.config
        weight = model.lm_head.weight
        return cls(cfg.n_layer, batch_size, cfg.kv_heads, cfg.head_dim, cfg.block_size,
                   dtype=dtype or weight.dtype, device=weight.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nkv, T, hs) at the current position; return all keys/values so far
        (in the dtype of ``k``: the cache may hold a narrower one)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len} positions")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end].to(k.dtype), self.v[layer][:, :, :end].to(v.dtype)

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0
