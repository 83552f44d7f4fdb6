"""A preallocated key/value cache for autoregressive decoding.

Without a cache, every new token re-runs attention over the whole prefix: O(T^2) work per token.
With it, each layer stores the keys and values it has computed, and a decoding step only computes
q, k, v for the one new token. The tensors are allocated once at full length, so decoding never
reallocates or concatenates. Each layer has its own tensors, so a compiled decode step can take
them as separate inputs and write into them in place (see ``decode.py``).

The cache also remembers which token sits at each filled position (``ids``). A cache kept after
one generation can then serve the next: the keys and values of a position depend only on the
tokens up to it, so where a new prompt starts with the same ids, those positions are still valid
and only the rest of the prompt needs a forward pass (a chat turn, which re-sends the whole
conversation, shares everything but the newest message with the turn before).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, head_dim: int,
                 max_len: int, *, dtype: torch.dtype, device: torch.device):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        # ids[:, :pos] are the tokens whose keys/values fill positions :pos. They are written
        # (record) before the forward pass and pos moves only once every layer is written, so the
        # two agree even if a forward pass is interrupted.
        self.ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0  # positions filled so far

    @classmethod
    def for_model(cls, model, batch_size: int, dtype: torch.dtype | None = None) -> KVCache:
        cfg = model.config
        weight = model.lm_head.weight
        return cls(cfg.n_layer, batch_size, cfg.kv_heads, cfg.head_size, cfg.block_size,
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

    def record(self, idx: torch.Tensor) -> None:
        """Note the tokens ``idx`` (B, T) about to be stored from the current position on."""
        end = self.pos + idx.size(1)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len} positions")
        self.ids[:, self.pos:end] = idx

    def shared_prefix(self, idx: torch.Tensor) -> int:
        """How many leading positions hold exactly the first tokens of ``idx`` (B, T), in every
        row: the part of a new prompt whose keys and values are already here."""
        n = min(self.pos, idx.size(1))
        same = (self.ids[:, :n] == idx[:, :n]).all(dim=0).tolist()  # (n,)
        return same.index(False) if False in same else n

    def rewind(self, n: int) -> None:
        """Forget every position from ``n`` on; later updates overwrite them."""
        self.pos = min(self.pos, n)
